"""The tenant API: `POST /v1/calls` asks for an outbound call, `GET /v1/calls/dials/{id}` tells what
became of it, `POST /v1/sql` queries the analyst tables. All take a tenant API key
(`Authorization: Bearer KEY`) and only ever see that tenant's data; every SQL query is audited.
Reads of the analytics store run on threads of their own (`AnalyticsReads`), a tenant's SQL queries
one at a time.

A dial request is recorded as `call.dial_requested` (the dial's stream, seq 0) and answered 202 at
once; the dialer (`consumers.workers.dialer`) places it within the tenant's rate limit, and the answered
call joins the same media path as an inbound one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Security
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask

from consumers.event_reader import read_call
from gateway.admission import retry_after
from gateway.runtime import PRODUCER, GatewayRuntime, new_call_id
from producers.event_writer import CallRecorder
from projections.recording_store import RangeNotSatisfiable, RecordingStoreError
from projections.store import AnalyticsError, QueryResult
from projections.tenant_sql import ForbiddenQuery, QueryFailed, TenantSql
from projections.vcon_export import KEY_FILE as VCON_KEY_FILE
from projections.vcon_export import MEDIA_TYPE as VCON_MEDIA_TYPE
from projections.vcon_export import (
    RecordingMode,
    VconKeyError,
    export_vcon,
    open_signing_key,
    read_call_material,
    recording_started,
)
from schemas.base import Event, EventPayload
from schemas.events import CallDialFailed, CallDialPlaced, CallDialRequested, CallStatus
from schemas.topics import CALLS, COMMANDS
from schemas.version import __version__
from streams.channels.twilio_outbound import DIAL_ID, check_parameters
from streams.config.agents import RoutingError
from streams.config.tenants import E164, TenantSpec
from streams.keystore.shredding import request_erasure

_BYTE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")
"""One byte range (the store is asked for it as it is); several in one request get the whole file."""
DIAL_LOOKBACK_MS = 60_000
"""A dial's events start at its request; its id carries that time, which bounds the log scan."""
ANALYTICS_THREADS = 4
"""Threads that read the analytics store for the tenant API; more reads at once wait for one. (chDB runs one
query at a time however many wait for it; a ClickHouse server runs them side by side.)"""

P = ParamSpec("P")
T = TypeVar("T")


class TenantQueryRunning(Exception):
    """The tenant has a SQL query running already."""


class AnalyticsReads:
    """The tenant API's reads of the analytics store, on a bounded pool of threads of their own: a query
    that runs to its time limit holds one of these, never one of the default executor's, which the calls'
    path needs (their keys, their recordings). And the tenants with a SQL query running, one each, so that
    one tenant cannot line the store up for everyone."""

    def __init__(self) -> None:
        self._threads = ThreadPoolExecutor(max_workers=ANALYTICS_THREADS, thread_name_prefix="analytics-read")
        self._querying: set[str] = set()
        self._querying_lock = threading.Lock()  # a query's end is told on the pool's thread

    async def read(self, read: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`read(*args, **kwargs)` on one of the pool's threads."""
        return await asyncio.wrap_future(self._threads.submit(read, *args, **kwargs))

    async def tenant_query(self, sql: TenantSql, tenant_id: str, query: str) -> QueryResult:
        """The tenant's query, on one of the pool's threads; TenantQueryRunning while another of its
        queries has not ended."""
        with self._querying_lock:
            if tenant_id in self._querying:
                raise TenantQueryRunning(tenant_id)
            self._querying.add(tenant_id)
        running = self._threads.submit(sql.query, tenant_id, query)
        # Free when the query ends, not when its request does: a client that hangs up cannot line up another.
        running.add_done_callback(lambda _: self._ended(tenant_id))
        return await asyncio.wrap_future(running)

    def _ended(self, tenant_id: str) -> None:
        with self._querying_lock:
            self._querying.discard(tenant_id)

    def close(self) -> None:
        """Queries not started are dropped; one running ends at its time limit."""
        self._threads.shutdown(wait=False, cancel_futures=True)


def new_dial_id(now_ms: int | None = None) -> str:
    """`dial-` + 12 hex digits of the request's epoch milliseconds + 20 random: sortable by time."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return f"dial-{now_ms:012x}{random.getrandbits(80):020x}"


def dial_time_ms(dial_id: str) -> int:
    return int(dial_id[5:17], 16)


class DialRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={
        "examples": [{"agent": "front-desk", "to": "+15551234567", "parameters": {"order": "A-1042"}}]})

    agent: str = Field(description="The tenant's agent that talks to the person.")
    to: str = Field(pattern=E164, description="Who to call, E.164.")
    from_: str | None = Field(None, alias="from", pattern=E164,
                              description="Caller id, one of the tenant's numbers; default its first.")
    parameters: dict[str, str] = Field(default_factory=dict,
                                       description="Passed to the agent in the call's call.started.")
    expires_in_s: int | None = Field(None, ge=1, le=86_400,
                                     description="Give up if not placed within this; default the tenant's max_wait_s.")
    ring_timeout_s: int | None = Field(None, ge=5, le=600)

    @field_validator("parameters")
    @classmethod
    def _parameters_travel(cls, parameters: dict[str, str]) -> dict[str, str]:
        check_parameters(parameters)
        return parameters


class DialAccepted(BaseModel):
    dial_id: str
    call_id: str
    status: Literal["queued"] = "queued"
    status_url: str


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=20_000, description="One SELECT over the analyst tables.")


class SqlResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    row_count: int
    limits: dict[str, Any] = Field(description="What the query ran under: rows and seconds at most.")


class ErasureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: str = Field(pattern=E164, description="The caller's (or called person's) number, E.164.")
    reason: str = Field("", max_length=500, description="Why, for the audit trail (a data subject's request...).")


class ErasureAccepted(BaseModel):
    erasure_id: str
    caller_key: str
    erased_before_us: int
    status: Literal["accepted"] = "accepted"
    detail: str = ("the caller's memory and their calls' rows and recordings are removed from the projections as they "
                   "reach this event; the log keeps raw events until its retention removes them")


class DialEvent(BaseModel):
    seq: int
    type: str
    at_us: int
    detail: str


class DialView(BaseModel):
    dial_id: str
    call_id: str
    status: str
    """queued, placed, failed, or the carrier's last status (ringing, in-progress, busy, no-answer...)."""
    attempts: int
    provider_call_id: str | None
    error: str | None
    events: list[DialEvent]


class ErrorDetail(BaseModel):
    """What a refused request gets (FastAPI's HTTPException body)."""

    detail: str


class Unprocessable(BaseModel):
    """FastAPI's list of validation errors, or a sentence for a value the tenant may not use."""

    detail: str | list[dict[str, Any]]


def refusal(description: str) -> dict[str, Any]:
    return {"model": ErrorDetail, "description": description}


UNREADABLE_BODY = refusal("The body cannot be read (not UTF-8, so not JSON).")


tenant_api_key = HTTPBearer(auto_error=False, scheme_name="TenantApiKey",
                            description="A tenant API key: `Authorization: Bearer KEY`.")


async def tenant_of(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(tenant_api_key)]
) -> tuple[TenantSpec, str]:
    """The tenant (and key id) of the request's API key; 401, audited, without a valid one; 429 over the
    key's rate (or from an address that keeps sending invalid keys); 503 while the gateway cannot
    record what the request does (every request is audited in the log)."""
    runtime: GatewayRuntime = request.app.state.gateway
    problem = runtime.not_ready()
    if problem is not None:
        raise HTTPException(503, f"not now: {problem}", headers={"Retry-After": "5"})
    remote = request.client.host if request.client else None
    found = runtime.tenants.by_api_key(credentials.credentials) if credentials is not None else None
    if found is None:
        # Bounded before the audit record: a stranger must not be able to make us write without end.
        wait = runtime.rate_limits.failed_auth(remote or "-")
        if wait is not None:
            raise HTTPException(429, "too many requests without a valid API key from this address",
                                headers={"Retry-After": retry_after(wait)})
        await runtime.audit(tenant_id="platform", call_id="-", actor="api", action="api.unauthorized",
                            resource=request.url.path, outcome="denied",
                            detail="missing Authorization header" if credentials is None else "unknown API key",
                            remote_addr=remote)
        raise HTTPException(401, "a tenant API key is required: Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})
    tenant, key_id = found
    limits = tenant.limits
    wait = runtime.rate_limits.take(f"{tenant.id}/{key_id}", limits.api_requests_per_minute, limits.api_burst)
    if wait is not None:
        raise HTTPException(429, f"API key {key_id} is over its rate ({limits.api_requests_per_minute:g} requests a "
                                 f"minute, {limits.api_burst} at once)", headers={"Retry-After": retry_after(wait)})
    return found


Caller = Annotated[tuple[TenantSpec, str], Depends(tenant_of)]


TENANT_API_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: refusal("No API key, or not one of a tenant's."),
    503: {**refusal("The gateway cannot record requests now (its log is away, or it is shutting down)."),
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
    429: {**refusal("Over the key's request rate (or this address sent too many invalid keys)."),
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}}}
"""What every route of the tenant API may answer before it does anything (`tenant_of`)."""


def api_router(runtime: GatewayRuntime, analytics: AnalyticsReads) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["tenant API"], responses=TENANT_API_REFUSALS)

    @router.post("/calls", status_code=202, response_model=DialAccepted,
                 responses={400: UNREADABLE_BODY, 404: refusal("The tenant has no such agent."),
                            409: refusal("The tenant has no caller ids to dial out from."),
                            422: {"model": Unprocessable,
                                  "description": "The request does not match its schema (a list of errors), or "
                                                 "`from` is not one of the tenant's caller ids (a sentence)."}})
    async def request_call(body: DialRequest, caller: Caller, request: Request) -> DialAccepted:
        tenant, key_id = caller
        try:
            runtime.router.get(tenant.id, body.agent)
        except RoutingError as exc:
            raise HTTPException(404, f"tenant {tenant.id} has no agent {body.agent!r}") from exc
        caller_ids = tenant.dialing.caller_ids
        if not caller_ids:
            raise HTTPException(409, f"tenant {tenant.id} has no caller ids to dial out from (dialing.caller_ids)")
        from_number = body.from_ or caller_ids[0]
        if from_number not in caller_ids:
            raise HTTPException(422, f"{from_number} is not one of tenant {tenant.id}'s caller ids")
        now_us = time.time_ns() // 1000
        dial_id, call_id = new_dial_id(now_us // 1000), new_call_id()
        expires_in_s = body.expires_in_s or tenant.dialing.max_wait_s
        recorder = CallRecorder(runtime.writer, tenant_id=tenant.id, call_id=dial_id, producer=PRODUCER,
                                producer_version=__version__)
        await recorder.record(CallDialRequested(
            agent_id=body.agent, to_number=body.to, from_number=from_number, call_id=call_id,
            parameters=body.parameters, requested_by=key_id, expires_at_us=now_us + expires_in_s * 1_000_000,
            ring_timeout_s=body.ring_timeout_s or tenant.dialing.ring_timeout_s), correlation_id=call_id)
        await runtime.writer.flush()
        await runtime.audit(tenant_id=tenant.id, call_id=call_id, actor=f"api-key:{key_id}", action="dial.requested",
                            resource=dial_id, outcome="accepted", detail=f"agent {body.agent}",
                            remote_addr=request.client.host if request.client else None)
        return DialAccepted(dial_id=dial_id, call_id=call_id,
                            status_url=str(request.url_for("dial_status", dial_id=dial_id)))

    @router.post("/erasures", response_model=ErasureAccepted, status_code=202, responses={400: UNREADABLE_BODY})
    async def erase_caller(body: ErasureRequest, caller: Caller) -> ErasureAccepted:
        """Forget a caller: their memory, and their calls that started before now, in every table and
        recording (the erasure is an event: restarts and rebuilds keep it)."""
        tenant, key_id = caller
        erasure_id, payload = await request_erasure(runtime.writer, runtime.backend.keys, tenant.id, body.number,
                                                    requested_by=f"api-key:{key_id}", reason=body.reason,
                                                    producer=PRODUCER, producer_version=__version__)
        return ErasureAccepted(erasure_id=erasure_id, caller_key=payload.caller_key,
                               erased_before_us=payload.erased_before_us)

    @router.post("/sql", response_model=SqlResult, responses={
        400: refusal("The query cannot run, and why: a syntax error and where, an unknown column, a limit it ran "
                     "into (or the body cannot be read)."),
        403: refusal("Not a query a tenant may run (one SELECT over its own tables, allowed functions only), and why."),
        429: {**TENANT_API_REFUSALS[429], "description": "Over the key's request rate (or this address sent too many "
                                                         "invalid keys), or the tenant has a query running already: "
                                                         "its queries run one at a time."},
        503: refusal("Analytics is unavailable; try again shortly.")})
    async def tenant_sql(body: SqlRequest, caller: Caller, request: Request) -> SqlResult:
        """The tenant's own rows of the analyst tables (docs/analytics.md), read-only and bounded; one query
        of a tenant's at a time."""
        tenant, key_id = caller
        remote = request.client.host if request.client else None

        async def audit(outcome: str, detail: str) -> None:
            await runtime.audit(tenant_id=tenant.id, call_id="-", actor=f"api-key:{key_id}", action="sql.query",
                                resource="analytics", outcome=outcome, detail=detail[:2000], remote_addr=remote)

        try:
            sql = runtime.tenant_sql()
            result = await analytics.tenant_query(sql, tenant.id, body.query)
        except TenantQueryRunning as exc:
            await audit("denied", f"another of the tenant's queries is running: {body.query}")
            raise HTTPException(429, f"tenant {tenant.id} has a SQL query running already; its queries run one at "
                                     "a time: send this one once that one has been answered",
                                headers={"Retry-After": "1"}) from exc
        except ForbiddenQuery as exc:
            await audit("denied", f"{exc}: {body.query}")
            raise HTTPException(403, str(exc)) from exc
        except QueryFailed as exc:
            await audit("failed", f"{exc}: {body.query}")
            raise HTTPException(400, str(exc)) from exc
        except AnalyticsError as exc:  # ClickHouse itself, not the query: its words (paths, hosts) stay in our log
            logging.getLogger(__name__).warning("tenant SQL unavailable: %s", exc)
            await audit("failed", f"analytics unavailable: {body.query}")
            raise HTTPException(503, "analytics is unavailable right now; try again shortly") from exc
        await audit("accepted", f"{len(result.rows)} rows: {body.query}")
        return SqlResult(columns=list(result.columns), rows=[list(r) for r in result.rows],
                         row_count=len(result.rows),
                         limits={k: sql.limits[k] for k in ("max_result_rows", "max_execution_time")})

    @router.get("/calls/{call_id}/recording", response_class=FileResponse, responses={
        200: {"description": "The whole recording.", "content": {"audio/wav": {"schema": {"type": "string",
                                                                                           "format": "binary"}}}},
        206: {"description": "The byte range asked for (`Range: bytes=first-last`).",
              "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}},
        404: refusal("No finished recording of this call for this tenant (live, unknown or another's call)."),
        416: refusal("The byte range is outside the recording."),
        503: refusal("The recording store cannot be reached; try again shortly.")})
    async def recording(call_id: str, caller: Caller, request: Request) -> Response:
        """The call's recording: a stereo WAV, 16 kHz, the caller left and the agent right, once the call ended.

        Byte ranges (`Range: bytes=first-last`) are served, so a player can seek. From an S3 store the
        object is streamed through: the bucket stays private, and each read is checked and audited
        here rather than handed out as a presigned URL anyone holding it could use.
        """
        tenant, key_id = caller
        store = runtime.recordings
        asked = request.headers.get("range")
        byte_range = asked if asked and _BYTE_RANGE.fullmatch(asked) else None  # else the whole file, as HTTP allows

        async def audit(outcome: str, detail: str) -> None:
            await runtime.audit(tenant_id=tenant.id, call_id=call_id, actor=f"api-key:{key_id}",
                                action="recording.read", resource=call_id, outcome=outcome, detail=detail,
                                remote_addr=request.client.host if request.client else None)

        try:
            found = await asyncio.to_thread(store.read, tenant.id, call_id, byte_range)
        except ValueError as exc:
            raise HTTPException(404, "no such recording") from exc
        except RangeNotSatisfiable as exc:
            await audit("failed", str(exc))
            raise HTTPException(416, str(exc)) from exc
        except RecordingStoreError as exc:
            await audit("failed", f"the recording store failed: {exc}")
            raise HTTPException(503, "the recording store cannot be reached; try again shortly") from exc
        if found is None:  # another tenant's call, a live one, or none: the same answer
            await audit("failed", "no finished recording")
            raise HTTPException(404, "no such recording (calls are recorded once they have ended)")
        await audit("accepted", byte_range or "")
        if isinstance(found, Path):
            return FileResponse(found, media_type="audio/wav", filename=f"{call_id}.wav")
        headers = {"Content-Length": str(found.length), "Accept-Ranges": "bytes",
                   "Content-Disposition": f'attachment; filename="{call_id}.wav"'}
        if found.content_range:
            headers["Content-Range"] = found.content_range
        return StreamingResponse(found.chunks, status_code=206 if found.content_range else 200,
                                 media_type="audio/wav", headers=headers, background=BackgroundTask(found.close))

    @router.get("/calls/{call_id}/vcon", response_class=Response, responses={
        200: {"description": "The call as a signed vCon (docs/compliance.md, \"vCon export\").",
              "content": {VCON_MEDIA_TYPE: {"schema": {"type": "object"}}}},
        404: refusal("No such call for this tenant (unknown, or another's call)."),
        503: refusal("The recording store cannot be reached, or the signing key cannot be used; try again shortly.")})
    async def vcon(call_id: str, caller: Caller, request: Request, recording: Annotated[RecordingMode, Query(
            description="`link` (default): the recording dialog names `GET /v1/calls/{call_id}/recording` and the "
                        "WAV's hash; `embed`: the WAV itself, base64url (a signed vCon holds it twice: about three "
                        "times the WAV's size).")] = "link") -> Response:
        """The call as a vCon (IETF draft-ietf-vcon-vcon-container): its parties, its recording, its transcript
        and summary (PII redacted as in the analyst tables) and its events (redacted), signed (JWS RS256).

        A call without a recording yet (live, not assembled, consent refused, erased) is exported without one,
        and the vCon's `voxlog.export` attachment says why. Each read is audited.
        """
        tenant, key_id = caller

        async def audit(outcome: str, detail: str) -> None:
            await runtime.audit(tenant_id=tenant.id, call_id=call_id, actor=f"api-key:{key_id}", action="vcon.read",
                                resource=call_id, outcome=outcome, detail=detail,
                                remote_addr=request.client.host if request.client else None)

        try:
            # Where the call started bounds the log's scan (on Kafka, its partition from 0 else): the tables
            # say, else its recording; an id that is neither is no call of the tenant's, and nothing is read.
            try:
                started_us = await analytics.read(runtime.call_views().started_at, tenant.id, call_id)
                if started_us is None:
                    started_us = await asyncio.to_thread(recording_started, runtime.recordings, tenant.id, call_id)
                    if started_us is None:
                        await audit("failed", "no such call")
                        raise HTTPException(404, "no such call")
            except AnalyticsError:  # the log is the record: the call is read from it alone
                started_us = None
            async with runtime.backend.admin() as admin:
                call = await read_call_material(admin, runtime.recordings, call_id, tenant_id=tenant.id,
                                                started_us=started_us)
        except RecordingStoreError as exc:
            await audit("failed", f"the recording store failed: {exc}")
            raise HTTPException(503, "the recording store cannot be reached; try again shortly") from exc
        if call is None:  # another tenant's call, or none: the same answer
            await audit("failed", "no such call")
            raise HTTPException(404, "no such call")
        try:
            key, _ = await asyncio.to_thread(open_signing_key,
                                             runtime.vcon_signing_key or runtime.home / VCON_KEY_FILE)
        except (VconKeyError, OSError) as exc:
            logging.getLogger(__name__).error("vCon export: %s", exc)  # a path of ours: in our log, not the answer
            await audit("failed", "the vCon signing key cannot be used")
            raise HTTPException(503, "the vCon signing key cannot be used; see the gateway's log") from exc
        base = (runtime.public_url or str(request.base_url)).rstrip("/")
        url = f"{base}/v1/calls/{quote(call_id, safe='')}/recording"
        data = await asyncio.to_thread(export_vcon, call, key, created_at=datetime.now(UTC), recording=recording,
                                       recording_url=url)
        await audit("accepted", f"recording {recording}" if call.recording else "no recording")
        return Response(data, media_type=VCON_MEDIA_TYPE,
                        headers={"Content-Disposition": f'attachment; filename="{call_id}.vcon.json"'})

    @router.get("/calls/dials/{dial_id}", response_model=DialView, name="dial_status",
                responses={404: refusal("No such dial for this tenant.")})
    async def dial_status(dial_id: str, caller: Caller) -> DialView:
        tenant, _ = caller
        if not DIAL_ID.match(dial_id):
            raise HTTPException(404, "no such dial")
        async with runtime.backend.admin() as admin:
            history = await read_call(admin, dial_id, topics=(COMMANDS, CALLS),
                                      since_ms=dial_time_ms(dial_id) - DIAL_LOOKBACK_MS)
        mine = [e for e in history.events if e.tenant_id == tenant.id]
        requested = next((e.payload for e in mine if isinstance(e.payload, CallDialRequested)), None)
        if requested is None:
            raise HTTPException(404, "no such dial")  # another tenant's looks the same as none
        return dial_view(dial_id, requested, mine)

    return router


def dial_view(dial_id: str, requested: CallDialRequested, events: Sequence[Event[EventPayload]]) -> DialView:
    status, attempts, sid, error = "queued", 0, None, None
    rows = []
    for event in events:
        p = event.payload
        detail = ""
        if isinstance(p, CallDialPlaced):
            status, attempts, sid, detail = "placed", p.attempt, p.provider_call_id, p.provider_call_id
        elif isinstance(p, CallDialFailed):
            attempts, error, detail = p.attempt, p.error, p.error
            if p.final:
                status = "failed"
        elif isinstance(p, CallStatus):
            status, detail = p.status, p.status
        elif isinstance(p, CallDialRequested):
            detail = f"agent {p.agent_id}"
        rows.append(DialEvent(seq=event.seq, type=event.type, at_us=event.envelope.event_time_us, detail=detail))
    return DialView(dial_id=dial_id, call_id=requested.call_id, status=status, attempts=attempts,
                    provider_call_id=sid, error=error, events=rows)

