"""The FastAPI application: Twilio webhooks and media streams, the web widget, health.

`create_app(gateway)` wires the gateway runtime (`gateway.calls.Gateway`) into the routes; it starts
and stops with the app's lifespan. `voxlog serve` runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal
from urllib.parse import urlencode

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api import api_router
from gateway.calls import PRODUCER, Gateway, new_call_id
from gateway.twilio_media import Dtmf, Malformed, Media, Stop, TwilioMediaTransport, iterate_media, wait_for_start
from gateway.twilio_webhooks import (
    DIAL_ACTION_PATH,
    CallRejected,
    RejectedWebhook,
    dial_outcome_payload,
    dial_twiml,
    public_base_url,
    twilio_router,
    validate_media_handshake,
)
from gateway.widget import widget_router
from producers.events import CallRecorder
from schemas.base import EventPayload
from schemas.events import CallStatus
from schemas.version import __version__
from streams.call.core import RETURNED_FROM_HANDOFF, handoff_id_of
from streams.call.transport import InboundCall
from streams.channels.twilio_outbound import OutboundRouteError, dial_status_route, outbound_route
from streams.config.agents import RoutingError

log = logging.getLogger(__name__)

LATE_STATUS_CALLS = 1000
"""Calls whose recorder is kept after they end, for the carrier's final status callbacks."""
PENDING_CALLS = 10_000
"""Calls answered by the voice webhook whose media stream has not connected yet."""


class GatewayServer(uvicorn.Server):
    """uvicorn, telling the gateway first when it is asked to stop (SIGTERM, SIGINT): its calls end with
    reason `shutdown` (the callers are hung up) before uvicorn closes their sockets, and everything is
    over within about `drain_s`, whatever the log or the carrier does."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.begin_drain()
        await super().shutdown(sockets)


def create_app(runtime: Gateway) -> FastAPI:
    pending: OrderedDict[str, InboundCall] = OrderedDict()
    ended: OrderedDict[str, CallRecorder] = OrderedDict()  # provider call id -> the call's recorder
    token = runtime.twilio_auth_token
    rest = runtime.rest

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="voxlog gateway", lifespan=lifespan)
    app.state.gateway = runtime

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus' text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus: calls, turns, voice-to-voice and provider latencies, errors, fallbacks, tool calls."""
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", responses={503: {"description": "not ready: the log cannot be written, or the gateway "
                                                        "is starting or shutting down",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def health() -> JSONResponse:
        """Readiness: 200 when the gateway takes calls, 503 (with the reason) when it does not."""
        problem = runtime.not_ready()
        body = {"status": "ok" if problem is None else "unavailable", "log": runtime.backend.describe(),
                "live_calls": len(runtime.sessions), "capacity": runtime.capacity, "instance": runtime.instance_id}
        if problem is not None:
            body["problem"] = problem
        return JSONResponse(body, status_code=200 if problem is None else 503)

    def remember_pending(call: InboundCall) -> None:
        pending[call.call_id] = call
        while len(pending) > PENDING_CALLS:
            pending.popitem(last=False)

    async def on_inbound(form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        try:
            outbound = outbound_route(query)
            agent = (runtime.router.get(outbound.tenant_id, outbound.agent_id) if outbound is not None
                     else runtime.router.by_number(form.get("To", "")))
        except (RoutingError, OutboundRouteError) as exc:
            raise CallRejected(str(exc)) from exc
        direction: Literal["inbound", "outbound"] = (
            "outbound" if form.get("Direction", "inbound").startswith("outbound") else "inbound"
        )
        call = InboundCall(
            call_id=outbound.call_id if outbound is not None else new_call_id(), channel="phone",
            direction=direction, tenant_id=agent.tenant, agent_id=agent.id,
            routed_by="outbound_request" if outbound is not None else "number",
            from_number=form.get("From"), to_number=form.get("To"), provider_call_id=form.get("CallSid"),
            parameters={**outbound.parameters, "dial_id": outbound.dial_id} if outbound is not None else {})
        refusal = await runtime.admit(call)
        if refusal is not None:
            raise CallRejected(refusal.detail, busy=True)
        remember_pending(call)
        return call.call_id, {"tenant": agent.tenant, "agent": agent.id}

    async def record_late(call_sid: str, payload: EventPayload) -> bool:
        """Records what the carrier reports about a call into that call: live, or recently ended."""
        for session in runtime.sessions.values():
            if session.call.provider_call_id == call_sid:
                session.observe(payload)
                return True
        recorder = ended.get(call_sid)
        if recorder is not None:
            await recorder.record(payload)
            await recorder.writer.flush()
            return True
        return False

    async def on_status(call_sid: str, status: CallStatus, query: Mapping[str, str]) -> None:
        if await record_late(call_sid, status):
            return
        try:
            dial = dial_status_route(query)
        except OutboundRouteError as exc:
            raise ValueError(str(exc)) from exc
        if dial is not None:
            # Not answered (yet): the dial's stream. Twilio's SequenceNumber makes a retried callback the same event.
            sequence = int(status.raw.get("SequenceNumber", "0") or 0)
            recorder = CallRecorder(runtime.writer, tenant_id=dial.tenant_id, call_id=dial.dial_id, producer=PRODUCER,
                                    producer_version=__version__, next_seq=dial.first_seq + sequence)
            await recorder.record(status)
            await runtime.writer.flush()
            return
        await runtime.audit(tenant_id="platform", call_id="-", actor="twilio-webhook", action="status.unknown_call",
                            resource=call_sid, outcome="failed", detail=f"status {status.status} for no known call",
                            remote_addr=None)

    async def on_dial_action(form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, dict[str, str]] | None:
        call_id, tenant, agent_id = query.get("call_id", ""), query.get("tenant", ""), query.get("agent", "")
        if not (call_id and tenant and agent_id):
            raise ValueError("dial action URL needs call_id, tenant and agent")
        outcome = dial_outcome_payload(handoff_id_of(call_id), form)
        call_sid = form.get("CallSid", "")
        if not await record_late(call_sid, outcome):
            await runtime.audit(tenant_id=tenant, call_id=call_id, actor="twilio-webhook",
                                action="dial_action.unknown_call", resource=call_sid, outcome="failed",
                                detail=f"handoff outcome {outcome.outcome} arrived after the call was forgotten",
                                remote_addr=None)
        if outcome.outcome == "connected":
            return None  # the caller talked with a human; when they hang up the call is over
        try:
            agent = runtime.router.get(tenant, agent_id)
        except RoutingError:
            return None
        # Nobody took the call: the caller comes back to the agent, as a new call linked to this one.
        direction: Literal["inbound", "outbound"] = "outbound" if query.get("direction") == "outbound" else "inbound"
        back = InboundCall(
            call_id=new_call_id(), channel="phone", direction=direction, tenant_id=tenant, agent_id=agent.id,
            routed_by="handoff_return", from_number=form.get("From"), to_number=form.get("To"),
            provider_call_id=call_sid or None,
            parameters={RETURNED_FROM_HANDOFF: call_id, "handoff_outcome": outcome.outcome})
        if await runtime.admit(back) is not None:
            return None  # no room to take the caller back: they are hung up (recorded as call.refused)
        remember_pending(back)
        return back.call_id, {"tenant": tenant, "agent": agent.id}

    async def on_rejected(info: RejectedWebhook) -> None:
        await runtime.audit(tenant_id="platform", call_id=info.call_sid or "-", actor="twilio-webhook",
                            action="webhook.rejected", resource=info.path, outcome="denied", detail=info.reason,
                            remote_addr=info.remote)

    app.include_router(twilio_router(lambda: token, runtime.public_url, on_inbound, on_status,
                                     on_rejected=on_rejected, on_dial_action=on_dial_action))
    app.include_router(widget_router(runtime))
    app.include_router(api_router(runtime))

    @app.websocket("/twilio/media")
    async def twilio_media(websocket: WebSocket) -> None:
        if token and not validate_media_handshake(token, websocket, runtime.public_url):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        events = iterate_media(websocket)
        start = await wait_for_start(events)
        call = pending.pop(start.custom_parameters.get("call_id", ""), None) if start is not None else None
        if start is None or call is None:
            with contextlib.suppress(Exception):
                await websocket.close(code=1008)
            return
        if call.provider_call_id and start.call_sid != call.provider_call_id:
            # A stream must belong to the call its voice webhook answered; another call's stream
            # (a replayed or forged start) gets nothing, and the answered call keeps its place.
            pending[call.call_id] = call
            await runtime.audit(tenant_id=call.tenant_id, call_id=call.call_id, actor="twilio-media",
                                action="media.call_mismatch", resource=start.call_sid, outcome="denied",
                                detail=f"the stream's start names CallSid {start.call_sid}, the call is "
                                       f"{call.provider_call_id}", remote_addr=None)
            with contextlib.suppress(Exception):
                await websocket.close(code=1008)
            return
        agent = runtime.router.get(call.tenant_id, call.agent_id)
        action = f"{public_base_url(websocket, runtime.public_url)}{DIAL_ACTION_PATH}?" + urlencode(
            {"call_id": call.call_id, "tenant": call.tenant_id, "agent": call.agent_id, "direction": call.direction})
        transport = TwilioMediaTransport.from_start(websocket, start, rest=rest,
                                                    transfer_twiml=partial(dial_twiml, action=action))
        session = runtime.open_session(call, agent, transport, memory=await runtime.recall(call))
        running = asyncio.create_task(runtime.run_session(session))
        try:
            async for event in events:
                if isinstance(event, Media):
                    await session.hear(event.pcm, event.payload, "mulaw", 8000)
                elif isinstance(event, Dtmf):
                    session.dtmf(event.digit)
                elif isinstance(event, Stop):
                    session.closed("caller_hangup")
                    break
                elif isinstance(event, Malformed):
                    runtime.bad_input(session, "gateway.twilio", f"{event.reason}: {event.excerpt}")
                if running.done():
                    break
        finally:
            # No-op when the call already ended; uvicorn closes the sockets first when it shuts down.
            session.closed("shutdown" if runtime.draining else "socket_closed")
            await running
            if call.provider_call_id:
                ended[call.provider_call_id] = session.recorder
                while len(ended) > LATE_STATUS_CALLS:
                    ended.popitem(last=False)
            await transport.close()

    return app
