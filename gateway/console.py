"""The QA console: a page in the browser (`GET /console`, its script and style from `static/`, nothing
from elsewhere) over the tenant API's call views. `GET /v1/console/calls` lists a tenant's calls
(filtered, paged); `GET /v1/console/calls/{id}` gives one call: its turns and latencies, transcript
aligned to the recording, tool calls, errors and fallbacks, the event timeline, and the replay check
(identical, the first divergence, or erased for a call whose keys retention destroyed); `POST
/v1/calls/{id}/whatif` runs the call through another agent file (`streams.call.whatif`, in a child
process killed at its deadline: `gateway.whatif_isolation`) and compares turn by turn. The recording
comes from `GET /v1/calls/{id}/recording` (gateway.api).

The page is public and shows nothing without a tenant API key, which it keeps in the tab's
sessionStorage and sends as `Authorization: Bearer KEY`; every route filters by the key's tenant,
and another tenant's call is answered as an unknown one (404). Text comes from the redacted
analyst tables (`projections.call_views`); the timeline names each event's type, position and time
with a few fields that are never personal; the replay's divergence shows its payloads redacted.
The page builds its DOM from text nodes only and is served under a Content-Security-Policy without
inline script, so nothing a caller said can become markup or script.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from consumers.event_reader import read_call
from gateway.api import TENANT_API_REFUSALS, UNREADABLE_BODY, AnalyticsReads, Caller, Unprocessable, refusal
from gateway.pages import CSS, JAVASCRIPT, page_file, text_file
from gateway.runtime import GatewayRuntime
from gateway.whatif_isolation import WhatIfBusy, WhatIfFailed
from projections.audit import epoch_us
from projections.call_views import CallFilter
from projections.store import AnalyticsError
from projections.tables import EARLIEST_US, LATEST_US
from projections.vcon_export import redacted_payload
from schemas.base import Event, EventPayload
from schemas.events import CallStarted
from schemas.topics import CALLS, COMMANDS
from streams.call.replay import agent_for, verify_call
from streams.config.agents import AgentConfigError, AgentSpec, RoutingError
from streams.redaction import default_redactor

log = logging.getLogger(__name__)

PAGE_SIZE_MAX = 200
AGENT_FILE_MAX = 200_000
"""Characters of an agent file a what-if takes (the demo's is about 3,000)."""
LOOKBACK_MS = 60_000
"""A call's events start at its `call.started`; reading the log from a minute before its start time bounds
Kafka's scan."""

# Fields of each event type the timeline shows: never a personal one (no text, number, digit, JSON
# argument or result, free-form error message); all else is the event's type, seq and time.
TIMELINE_FIELDS: dict[str, tuple[str, ...]] = {
    "call.started": ("channel", "direction", "agent_id", "routed_by"),
    "call.answered": ("answered_by",),
    "call.ended": ("reason", "outcome", "duration_ms"),
    "call.hangup_requested": ("reason",),
    "call.status": ("status",),
    "consent.given": ("kind", "method"),
    "consent.refused": ("kind", "method"),
    "speech.started": ("offset_ms",),
    "speech.stopped": ("offset_ms", "duration_ms"),
    "transcript.interim": ("provider",),
    "transcript.final": ("provider", "model", "confidence", "latency_ms", "start_ms", "end_ms"),
    "turn.taken": ("turn_index", "end_of_turn_ms"),
    "turn.barge_in": ("offset_ms", "played_ms"),
    "llm.requested": ("turn_index", "provider", "model", "message_count"),
    "llm.decided": ("provider", "model", "finish_reason", "time_to_first_token_ms", "total_ms"),
    "tool.requested": ("tool", "tool_call_id"),
    "tool.succeeded": ("tool", "attempt", "latency_ms"),
    "tool.failed": ("tool", "attempt", "retryable", "dead_lettered", "latency_ms"),
    "tts.requested": ("provider", "voice"),
    "tts.completed": ("provider", "voice", "time_to_first_byte_ms", "audio_ms", "interrupted"),
    "handoff.completed": ("outcome",),
    "handoff.outcome": ("outcome", "duration_s"),
    "guardrail.triggered": ("stage", "rule", "action", "turn_index"),
    "provider.fallback": ("capability", "from_provider", "to_provider", "turn_index"),
    "error.raised": ("component", "provider", "kind", "retryable", "fatal"),
    "timer.set": ("name",),
    "timer.fired": ("name",),
    "timer.cancelled": ("name",),
    "memory.loaded": ("source",),
    "dtmf.received": ("offset_ms",),
}


class CallSummary(BaseModel):
    """One call in the list. Times are microseconds since the epoch (UTC)."""

    call_id: str
    agent_id: str
    agent_version: str
    channel: str
    direction: str
    started_at: int
    ended_at: int | None = Field(description="None while the call is live.")
    duration_ms: int | None
    outcome: str
    end_reason: str
    turns: int
    tool_calls: int
    barge_ins: int
    errors: int
    fallbacks: int = Field(description="Times a provider fell back to another.")
    handoff: int
    consent: str
    recording_withheld: str
    recording: bool = Field(description="Whether its recording is complete (GET /v1/calls/{id}/recording).")


class CallChoices(BaseModel):
    """The values the filters can take, from the tenant's calls."""

    agents: list[str]
    agent_versions: list[str]
    outcomes: list[str]


class CallList(BaseModel):
    calls: list[CallSummary]
    total: int = Field(description="Calls that pass the filters, in all.")
    limit: int
    offset: int
    choices: CallChoices


class CallRow(CallSummary):
    fallbacks: int = 0
    recording: bool = False
    routed_by: str
    from_number: str = Field(description="Masked but for its last 2 digits.")
    to_number: str = Field(description="Masked but for its last 2 digits.")
    handoff_outcome: str
    consent_mode: str
    consent_method: str


class TurnView(BaseModel):
    """A caller turn, what was said (redacted) and what each step cost, in milliseconds."""

    turn_index: int
    at: int
    caller_text: str
    agent_text: str
    asr_provider: str
    asr_model: str
    asr_confidence: float
    asr_latency_ms: int
    llm_provider: str
    llm_model: str
    llm_calls: int
    input_tokens: int
    output_tokens: int
    llm_first_token_ms: int
    llm_total_ms: int
    tts_provider: str
    tts_voice: str
    tts_first_byte_ms: int
    voice_to_voice_ms: float | None
    barge_in: int
    guardrail: str


class TranscriptLine(BaseModel):
    seq: int
    at: int
    speaker: str
    text: str = Field(description="What was said, PII redacted.")
    start_ms: int | None
    end_ms: int | None
    confidence: float | None
    position_ms: int | None = Field(description="Where the line is in the recording.")


class ToolCallView(BaseModel):
    tool_call_id: str
    tool: str
    requested_at: int | None
    arguments: str = Field(description="JSON, PII redacted.")
    result: str = Field(description="JSON, PII redacted; empty unless it succeeded.")
    outcome: str
    error: str
    attempts: int
    latency_ms: int


class ErrorView(BaseModel):
    """An error, or a provider's fallback (kind `fallback`)."""

    seq: int
    at: int
    component: str
    provider: str
    kind: str
    message: str = Field(description="PII redacted.")
    retryable: int
    fatal: int
    fallback_to: str


class RecordingView(BaseModel):
    complete: int
    duration_ms: int
    started_at: int = Field(description="The recording's time zero.")
    channels: int
    sample_rate: int


class TimelineEvent(BaseModel):
    seq: int
    type: str
    at: int = Field(description="Event time, microseconds since the epoch.")
    producer: str
    fields: dict[str, str | int | float | bool | None] = Field(
        description="A few fields that are never personal (providers, tools, reasons, timings).")
    pii_withheld: bool = Field(description="Its personal fields no longer open (erased, or past retention).")


class Divergence(BaseModel):
    seq: int
    event_type: str
    reason: str = Field(description="What was recorded and what the core decides now; payloads PII redacted.")


class ReplayView(BaseModel):
    """The call's inputs run through the core again (streams.call.replay)."""

    status: Literal["identical", "diverged", "erased", "unavailable"]
    decisions: int = Field(description="Decisions checked.")
    divergence: Divergence | None
    detail: str


class CallDetail(BaseModel):
    call_id: str
    call: CallRow = Field(description="Its row of `calls`.")
    turns: list[TurnView]
    transcript: list[TranscriptLine]
    tool_calls: list[ToolCallView]
    errors: list[ErrorView]
    recording: RecordingView | None
    timeline: list[TimelineEvent] = Field(description="The call's events but its audio (voxlog.calls and "
                                                      "voxlog.commands), in seq order.")
    replay: ReplayView


class WhatIfRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=AGENT_FILE_MAX,
                       description="An agent file (YAML, as in the agents folder) of the key's tenant.")


class WhatIfAct(BaseModel):
    """What the agent did that a caller or a system would notice (text and arguments PII redacted)."""

    kind: Literal["say", "tool", "handoff", "hangup", "guardrail"]
    text: str
    tool: str
    arguments: str
    target: str
    reason: str


class WhatIfTurn(BaseModel):
    index: int = Field(description="0 is the opening; turn k follows the caller's k-th turn.")
    caller: str = Field(description="What the caller said to open the turn (redacted).")
    then: list[WhatIfAct] = Field(description="What the recorded agent did.")
    now: list[WhatIfAct] = Field(description="What the agent file does.")
    same: bool
    after_difference: bool = Field(description="After the first difference: counterfactual, since the caller "
                                               "spoke to the old agent.")
    answered_by: str = Field(description="Who answered the new agent's LLM requests in this turn.")
    notes: list[str]


class AgentVersion(BaseModel):
    id: str
    version: str


class WhatIfView(BaseModel):
    call_id: str
    agent_then: AgentVersion
    agent_now: AgentVersion
    changed: bool
    first_difference: int | None
    summary: str
    llm: str = Field(description="What answered the requests that were not the recorded ones.")
    problem: str | None = Field(description="Why the call could not be compared (erased, not ended), if so.")
    turns: list[WhatIfTurn]


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors and aliases: an agent file has no use for them, and a few nested aliases make a
    document that is small to send and enormous to walk."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in an agent file",
                                              self.peek_event().start_mark)  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        return super().compose_node(parent, index)


def parse_agent(text: str) -> AgentSpec:
    """The agent an agent file's text defines; AgentConfigError saying what is wrong with it."""
    try:
        raw = yaml.load(text, Loader=_NoAliases)  # a SafeLoader that also refuses aliases
    except yaml.YAMLError as exc:
        raise AgentConfigError(f"the agent file is not YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise AgentConfigError("the agent file is not a mapping of fields (id, tenant, prompts, greeting, ...)")
    try:
        return AgentSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}"
                             for e in exc.errors()[:10])
        raise AgentConfigError(f"the agent file is not a valid agent: {problems}") from exc


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: object) -> object:
    """Only a date-time as RFC 3339 writes it, offset and all (not a number of seconds, nor a date alone,
    which pydantic would take too): what the OpenAPI document's `date-time` says."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("a date and time as RFC 3339 writes it, e.g. 2025-01-31T00:00:00Z")
    return value


Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339)]


def _epoch_us(value: datetime | None) -> int | None:
    """A filter's time (naive: UTC), held within what ClickHouse's DateTime64 can hold."""
    return None if value is None else min(max(epoch_us(value), EARLIEST_US), LATEST_US)


def timeline(events: Sequence[Event[EventPayload]]) -> list[TimelineEvent]:
    out = []
    for event in events:
        payload = event.payload
        shown: dict[str, str | int | float | bool | None] = {}
        for name in TIMELINE_FIELDS.get(event.type, ()):
            value = getattr(payload, name, None)
            if value is None or isinstance(value, str | int | float | bool):
                shown[name] = value
        out.append(TimelineEvent(seq=event.seq, type=event.type, at=event.envelope.event_time_us,
                                 producer=event.envelope.producer, fields=shown, pii_withheld=event.pii_withheld))
    return out


def payload_told(payload: EventPayload) -> str:
    """An event payload as a replay's reason names it (`type {...}`), every personal field redacted by the
    kind its schema marks, as the vCon export redacts events."""
    record = redacted_payload(payload, default_redactor())
    return f"{payload.EVENT_TYPE} {json.dumps(record, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))}"


def replay_view(events: Sequence[Event[EventPayload]], runtime: GatewayRuntime) -> ReplayView:
    if not events:
        return ReplayView(status="unavailable", decisions=0, divergence=None, detail="the log holds no events of it")
    try:
        agent = agent_for(events, runtime.router)
    except RoutingError as exc:
        return ReplayView(status="unavailable", decisions=0, divergence=None, detail=str(exc))
    result = verify_call(events, agent)
    if result.erased:
        return ReplayView(status="erased", decisions=0, divergence=None,
                          detail="its personal data was destroyed (erasure or retention): nothing to replay it from")
    if result.divergence is None:
        return ReplayView(status="identical", decisions=result.decisions, divergence=None,
                          detail=f"the core decides the same {result.decisions} decisions again")
    d = result.divergence
    return ReplayView(status="diverged", decisions=result.decisions,
                      divergence=Divergence(seq=d.seq, event_type=d.event_type, reason=d.told(payload_told)),
                      detail=f"first divergence at seq {d.seq} ({d.event_type}), after {result.decisions} "
                             "identical decisions")


def console_router() -> APIRouter:
    """`GET /console` and its files."""
    router = APIRouter(tags=["QA console"])

    @router.get("/console", response_class=HTMLResponse,
                responses={200: {"description": "The QA console: give it a tenant API key."}})
    async def console() -> Response:
        """The QA console, for a browser: a tenant's calls, each with its recording, transcript,
        latencies, tool calls, errors, event timeline, replay check and what-if."""
        return page_file("console.html", "text/html")

    @router.get("/console/console.js", response_class=FileResponse,
                responses={200: text_file(JAVASCRIPT, "The console's script.")})
    async def script() -> FileResponse:
        return page_file("console.js", JAVASCRIPT)

    @router.get("/console/console.css", response_class=FileResponse,
                responses={200: text_file(CSS, "The console's style sheet.")})
    async def style() -> FileResponse:
        return page_file("console.css", CSS)

    return router


def call_views_router(runtime: GatewayRuntime, analytics: AnalyticsReads) -> APIRouter:
    """`GET /v1/console/calls`, `GET /v1/console/calls/{call_id}` and `POST /v1/calls/{call_id}/whatif`, in
    the tenant API. (The call views sit apart from `/v1/calls`, whose POST asks for a dial: a dial's call
    is no call of the tables until it is answered.)"""
    router = APIRouter(prefix="/v1", tags=["tenant API"], responses=TENANT_API_REFUSALS)

    async def audit(request: Request, caller: tuple[Any, str], call_id: str, action: str, outcome: str,
                    detail: str) -> None:
        tenant, key_id = caller
        await runtime.audit(tenant_id=tenant.id, call_id=call_id, actor=f"api-key:{key_id}", action=action,
                            resource=call_id if call_id != "-" else "calls", outcome=outcome, detail=detail[:2000],
                            remote_addr=request.client.host if request.client else None)

    unavailable = refusal("Analytics is unavailable; try again shortly.")

    async def call_events(tenant_id: str, call_id: str, started_us: int | None) -> tuple[list[Event[EventPayload]],
                                                                                         int]:
        """The call's events but its audio, if it is the tenant's (else none), and how many of its records
        cannot be decoded. `started_us` (its start) bounds Kafka's scan of the call's partitions."""
        since_ms = started_us // 1000 - LOOKBACK_MS if started_us is not None else None
        async with runtime.backend.admin() as admin:
            history = await read_call(admin, call_id, topics=(CALLS, COMMANDS), since_ms=since_ms)
        if history.events and history.events[0].tenant_id != tenant_id:
            return [], 0  # another tenant's call: as unknown as none
        return history.events, len(history.undecodable)

    @router.get("/console/calls", response_model=CallList, responses={503: unavailable})
    async def list_calls(
        caller: Caller, request: Request,
        agent: Annotated[str | None, Query(max_length=64, description="Only this agent's calls.")] = None,
        agent_version: Annotated[str | None, Query(max_length=100,
                                                   description="Only calls under this version of the agent.")] = None,
        outcome: Annotated[str | None, Query(max_length=64, description="booked, ticket_created, ...")] = None,
        since: Annotated[Rfc3339 | None, Query(
            description="Started at or after (RFC 3339: 2025-01-31T08:00:00Z).")] = None,
        until: Annotated[Rfc3339 | None, Query(description="Started before (RFC 3339).")] = None,
        errors: Annotated[bool | None, Query(description="true: only calls with errors; false: only without.")] = None,
        fallbacks: Annotated[bool | None, Query(
            description="true: only calls where a provider fell back to another; false: only without.")] = None,
        limit: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX)] = 25,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> CallList:
        """The tenant's calls, newest first, a page at a time (`limit` from `offset`; `total` says how many
        pass the filters), with what the filters can be. Every listing is audited (`calls.listed`)."""
        tenant, _ = caller
        filters = CallFilter(agent=agent or None, agent_version=agent_version or None, outcome=outcome or None,
                             since_us=_epoch_us(since), until_us=_epoch_us(until), errors=errors, fallbacks=fallbacks)
        try:
            page = await analytics.read(runtime.call_views().list_calls, tenant.id, filters, limit=limit,
                                        offset=offset)
        except AnalyticsError as exc:
            log.warning("the call list is unavailable: %s", exc)
            await audit(request, caller, "-", "calls.listed", "failed", "analytics unavailable")
            raise HTTPException(503, "analytics is unavailable right now; try again shortly") from exc
        await audit(request, caller, "-", "calls.listed", "accepted",
                    f"{len(page.calls)} of {page.total}: {request.url.query}")
        return CallList(calls=[CallSummary.model_validate(c) for c in page.calls], total=page.total, limit=limit,
                        offset=offset, choices=CallChoices.model_validate(page.choices))

    @router.get("/console/calls/{call_id}", response_model=CallDetail, responses={
        404: refusal("No such call for this tenant (unknown, or another's)."), 503: unavailable})
    async def call_detail(call_id: str, caller: Caller, request: Request) -> CallDetail:
        """One call: its row, turns with their latencies, transcript (aligned to the recording), tool
        calls, errors and fallbacks from the redacted tables; its event timeline from the log; and the
        replay check (identical, the first divergence, or erased). Audited (`call.read`)."""
        tenant, _ = caller
        try:
            rows = await analytics.read(runtime.call_views().call, tenant.id, call_id)
        except AnalyticsError as exc:
            log.warning("call %s is unavailable: %s", call_id, exc)
            raise HTTPException(503, "analytics is unavailable right now; try again shortly") from exc
        if rows.call is None:  # unknown, another tenant's, or erased (its rows deleted)
            await audit(request, caller, call_id, "call.read", "failed", "no such call")
            raise HTTPException(404, "no such call")
        events, undecodable = await call_events(tenant.id, call_id, rows.call["started_at"])
        await audit(request, caller, call_id, "call.read", "accepted", "")
        replay = await asyncio.to_thread(replay_view, events, runtime)
        if undecodable and replay.status != "unavailable":
            replay = ReplayView(status="unavailable", decisions=0, divergence=None,
                                detail=f"{undecodable} of its records cannot be decoded")
        return CallDetail(
            call_id=call_id,
            call=CallRow.model_validate(rows.call),
            turns=[TurnView.model_validate(t) for t in rows.turns],
            transcript=[TranscriptLine.model_validate(t) for t in rows.transcript],
            tool_calls=[ToolCallView.model_validate(t) for t in rows.tool_calls],
            errors=[ErrorView.model_validate(e) for e in rows.errors],
            recording=RecordingView.model_validate(rows.recording) if rows.recording else None,
            timeline=timeline(events), replay=replay)

    @router.post("/calls/{call_id}/whatif", response_model=WhatIfView, responses={
        400: UNREADABLE_BODY, 404: refusal("No such call for this tenant (unknown, or another's)."),
        422: {"model": Unprocessable, "description": "The request does not match its schema (a list of errors), or "
                                                     "the agent file is not a valid agent of the key's tenant, or "
                                                     "its what-if did not finish in time (a sentence saying why)."},
        503: {**refusal("The gateway cannot record requests now, or runs as many what-ifs as it runs at once."),
              "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}}})
    async def whatif(call_id: str, body: WhatIfRequest, caller: Caller, request: Request) -> WhatIfView:
        """The call's caller turns run through another agent file (its tenant's), compared turn by turn with
        what happened: the first difference marked, the turns after it counterfactual (the caller spoke
        to the old agent), and who answered each turn's LLM requests (the recorded answer where the
        request is the same, else the file's LLM where its key is set, else the offline policy). No tool
        runs and nothing is written to the call. Audited (`call.whatif`)."""
        tenant, _ = caller
        try:
            started_us = await analytics.read(runtime.call_views().started_at, tenant.id, call_id)
            known = started_us is not None
        except AnalyticsError:  # the log is the record: the call is read from it alone, unbounded
            started_us, known = None, True
        events = (await call_events(tenant.id, call_id, started_us))[0] if known else []
        if not any(isinstance(e.payload, CallStarted) for e in events):
            await audit(request, caller, call_id, "call.whatif", "failed", "no such call")
            raise HTTPException(404, "no such call")
        try:
            agent = parse_agent(body.agent)
        except AgentConfigError as exc:
            await audit(request, caller, call_id, "call.whatif", "failed", "not a valid agent file")
            raise HTTPException(422, str(exc)) from exc
        if agent.tenant != tenant.id:
            await audit(request, caller, call_id, "call.whatif", "failed", f"an agent of tenant {agent.tenant}")
            raise HTTPException(422, f"the agent file is tenant {agent.tenant!r}'s; this key is tenant "
                                     f"{tenant.id!r}'s")
        try:
            recorded: AgentSpec | None = agent_for(events, runtime.router)
        except RoutingError:
            recorded = None  # changed since, or gone: requests are compared by their recorded summary
        try:  # in a child process, killed at its deadline: the tenant's patterns cannot stall this gateway
            result = await runtime.whatif_children.run(events, agent, recorded, runtime.provider_registry.settings)
        except WhatIfBusy as exc:
            await audit(request, caller, call_id, "call.whatif", "failed", str(exc))
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
        except WhatIfFailed as exc:
            await audit(request, caller, call_id, "call.whatif", "failed", str(exc))
            raise HTTPException(422, str(exc)) from exc
        await audit(request, caller, call_id, "call.whatif", "accepted",
                    f"agent {agent.id} {agent.version}: {result.summary}")
        return WhatIfView.model_validate(result.as_dict(redact=True))

    return router

