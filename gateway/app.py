"""The FastAPI application: Twilio webhooks and media streams, the web widget, health.

`create_app(settings)` wires the gateway runtime (`gateway.calls.Gateway`) into the routes; it starts
and stops with the app's lifespan. `voxlog serve` runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, WebSocket

from gateway.calls import Gateway, new_call_id
from gateway.twilio_media import Dtmf, Malformed, Media, Stop, TwilioMediaTransport, iterate_media, wait_for_start
from gateway.twilio_rest import TwilioRest
from gateway.twilio_webhooks import CallRejected, RejectedWebhook, twilio_router, validate_media_handshake
from gateway.widget import widget_router
from producers.events import CallRecorder
from schemas.events import CallStatus
from streams.agents import DEFAULT_AGENTS_DIR, AgentRouter, RoutingError, load_agents
from streams.transport import InboundCall
from voxlog.backends import log_backend
from voxlog.settings import Settings

log = logging.getLogger(__name__)

LATE_STATUS_CALLS = 1000
"""Calls whose recorder is kept after they end, for the carrier's final status callbacks."""
PENDING_CALLS = 10_000
"""Calls answered by the voice webhook whose media stream has not connected yet."""


def build_gateway(settings: Settings) -> Gateway:
    router = AgentRouter(load_agents(settings.agents_dir or DEFAULT_AGENTS_DIR))
    return Gateway(backend=log_backend(settings), router=router, home=settings.home,
                   run_workers=settings.run_workers, webhook_secret=settings.webhook_secret.get_secret_value().encode())


def create_app(settings: Settings | None = None, *, gateway: Gateway | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = gateway or build_gateway(settings)
    pending: OrderedDict[str, InboundCall] = OrderedDict()
    ended: OrderedDict[str, CallRecorder] = OrderedDict()  # provider call id -> the call's recorder
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    rest = (TwilioRest(settings.twilio_account_sid, token, base_url=settings.twilio_api_base)
            if settings.twilio_account_sid and token else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="voxlog gateway", lifespan=lifespan)
    app.state.gateway = runtime

    @app.get("/healthz")
    async def health() -> dict[str, object]:
        return {"status": "ok", "log": runtime.backend.describe(), "live_calls": len(runtime.sessions)}

    async def on_inbound(form: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        try:
            agent = runtime.router.by_number(form.get("To", ""))
        except RoutingError as exc:
            raise CallRejected(str(exc)) from exc
        call_id = new_call_id()
        direction: Literal["inbound", "outbound"] = (
            "outbound" if form.get("Direction", "inbound").startswith("outbound") else "inbound"
        )
        pending[call_id] = InboundCall(
            call_id=call_id, channel="phone", direction=direction, tenant_id=agent.tenant, agent_id=agent.id,
            routed_by="number", from_number=form.get("From"), to_number=form.get("To"),
            provider_call_id=form.get("CallSid"))
        while len(pending) > PENDING_CALLS:
            pending.popitem(last=False)
        return call_id, {"tenant": agent.tenant, "agent": agent.id}

    async def on_status(call_sid: str, status: CallStatus) -> None:
        for session in runtime.sessions.values():
            if session.call.provider_call_id == call_sid:
                session.observe(status)
                return
        recorder = ended.get(call_sid)
        if recorder is not None:
            await recorder.record(status)
            await recorder.writer.flush()
            return
        await runtime.audit(tenant_id="platform", call_id="-", actor="twilio-webhook", action="status.unknown_call",
                            resource=call_sid, outcome="failed", detail=f"status {status.status} for no known call",
                            remote_addr=None)

    async def on_rejected(info: RejectedWebhook) -> None:
        await runtime.audit(tenant_id="platform", call_id=info.call_sid or "-", actor="twilio-webhook",
                            action="webhook.rejected", resource=info.path, outcome="denied", detail=info.reason,
                            remote_addr=info.remote)

    app.include_router(twilio_router(lambda: token, settings.public_url, on_inbound, on_status,
                                     on_rejected=on_rejected))
    app.include_router(widget_router(runtime))

    @app.websocket("/twilio/media")
    async def twilio_media(websocket: WebSocket) -> None:
        if token and not validate_media_handshake(token, websocket, settings.public_url):
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
        agent = runtime.router.get(call.tenant_id, call.agent_id)
        transport = TwilioMediaTransport.from_start(websocket, start, rest=rest)
        session = runtime.open_session(call, agent, transport)
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
            session.closed("socket_closed")  # no-op when the call already ended
            await running
            if call.provider_call_id:
                ended[call.provider_call_id] = session.recorder
                while len(ended) > LATE_STATUS_CALLS:
                    ended.popitem(last=False)
            await transport.close()

    return app
