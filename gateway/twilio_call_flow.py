"""Twilio's call flow: what the gateway does with Twilio's webhooks and media streams.

A ringing call (the voice webhook) is routed to an agent (by the number dialled, or by the query of
a call the dialer placed), admitted, and kept pending until its media stream connects; the stream's
`start` claims it (only the call whose webhook named that CallSid) and a session runs it.
Status callbacks and a transfer's `<Dial>` outcome are recorded into their call, live or recently
ended; a transfer nobody answered brings the caller back to the agent as a new call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Literal
from urllib.parse import urlencode

from fastapi import APIRouter, WebSocket

from gateway.caller_recall import recall
from gateway.runtime import PRODUCER, GatewayRuntime, new_call_id
from gateway.twilio_media_transport import TwilioMediaTransport, iterate_media, wait_for_start
from gateway.twilio_webhook_routes import (
    CallRejected,
    RejectedWebhook,
    public_base_url,
    twilio_router,
    validate_media_handshake,
)
from producers.event_writer import CallRecorder
from schemas.base import EventPayload
from schemas.events import CallStarted, CallStatus
from schemas.version import __version__
from streams.call.core import RETURNED_FROM_HANDOFF, handoff_id_of
from streams.call.transport import InboundCall
from streams.channels.twilio_media_protocol import Dtmf, Malformed, Media, MediaEvent, Start, Stop
from streams.channels.twilio_outbound import OutboundRouteError, dial_status_route, outbound_route
from streams.channels.twilio_webhook_protocol import (
    CALL_ID_PARAMETER,
    DIAL_ACTION_PATH,
    MEDIA_PATH,
    dial_outcome_payload,
    dial_twiml,
)
from streams.config.agents import RoutingError

log = logging.getLogger(__name__)

LATE_STATUS_CALLS = 1000
"""Calls whose recorder is kept after they end, for the carrier's final status callbacks."""
PENDING_CALLS = 10_000
"""Calls answered by the voice webhook whose media stream has not connected yet."""


class TwilioCallFlow:
    """Twilio's side of the gateway's calls; `router()` serves it."""

    def __init__(self, runtime: GatewayRuntime) -> None:
        self.runtime = runtime
        self._pending: OrderedDict[str, InboundCall] = OrderedDict()
        self._ended: OrderedDict[str, CallRecorder] = OrderedDict()  # provider call id -> the call's recorder

    def router(self) -> APIRouter:
        """The signed webhooks (`gateway.twilio_webhook_routes`) and the media stream's WebSocket."""
        router = twilio_router(lambda: self.runtime.twilio_auth_token, self.runtime.public_url, self.answer,
                               self.status, on_rejected=self.rejected, on_dial_action=self.dial_action,
                               replica_url=self.runtime.replica_url)
        router.add_api_websocket_route(MEDIA_PATH, self.media_stream)
        return router

    # ------------------------------------------------------------------ webhooks

    async def answer(self, form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        """The voice webhook: routes and admits the call; raises CallRejected when it cannot be taken."""
        try:
            outbound = outbound_route(query)
            agent = (self.runtime.router.get(outbound.tenant_id, outbound.agent_id) if outbound is not None
                     else self.runtime.router.by_number(form.get("To", "")))
        except (RoutingError, OutboundRouteError) as exc:
            raise CallRejected(str(exc)) from exc
        direction: Literal["inbound", "outbound"] = (
            "outbound" if form.get("Direction", "inbound").startswith("outbound") else "inbound"
        )
        call = InboundCall(
            call_id=outbound.call_id if outbound is not None else new_call_id(), tenant_id=agent.tenant,
            started=CallStarted(
                channel="phone", direction=direction, agent_id=agent.id, agent_version=agent.version,
                routed_by="outbound_request" if outbound is not None else "number",
                from_number=form.get("From"), to_number=form.get("To"), provider_call_id=form.get("CallSid"),
                parameters={**outbound.parameters, "dial_id": outbound.dial_id} if outbound is not None else {}))
        refusal = await self.runtime.admit(call)
        if refusal is not None:
            raise CallRejected(refusal.detail, busy=True)
        return self._await_stream(call)

    async def status(self, call_sid: str, status: CallStatus, query: Mapping[str, str]) -> None:
        """A status callback: into its call, else into its dial's stream (placed, not yet answered),
        else audited."""
        if await self._record_late(call_sid, status):
            return
        try:
            dial = dial_status_route(query)
        except OutboundRouteError as exc:
            raise ValueError(str(exc)) from exc
        if dial is not None:
            # Twilio's SequenceNumber makes a retried callback the same event.
            sequence = int(status.raw.get("SequenceNumber", "0") or 0)
            recorder = CallRecorder(self.runtime.writer, tenant_id=dial.tenant_id, call_id=dial.dial_id,
                                    producer=PRODUCER, producer_version=__version__,
                                    next_seq=dial.first_seq + sequence)
            await recorder.record(status)
            await self.runtime.writer.flush()
            return
        await self.runtime.audit(tenant_id="platform", call_id="-", actor="twilio-webhook",
                                 action="status.unknown_call", resource=call_sid, outcome="failed",
                                 detail=f"status {status.status} for no known call", remote_addr=None)

    async def dial_action(self, form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, dict[str, str]] | None:
        """A transfer's leg ended: its outcome into the call; when nobody took the caller, they come
        back to the agent as a new call linked to this one (None: the call is over)."""
        call_id, tenant, agent_id = query.get("call_id", ""), query.get("tenant", ""), query.get("agent", "")
        if not (call_id and tenant and agent_id):
            raise ValueError("dial action URL needs call_id, tenant and agent")
        outcome = dial_outcome_payload(handoff_id_of(call_id), form)
        call_sid = form.get("CallSid", "")
        if not await self._record_late(call_sid, outcome):
            await self.runtime.audit(tenant_id=tenant, call_id=call_id, actor="twilio-webhook",
                                     action="dial_action.unknown_call", resource=call_sid, outcome="failed",
                                     detail=f"handoff outcome {outcome.outcome} arrived after the call was forgotten",
                                     remote_addr=None)
        if outcome.outcome == "connected":
            return None  # the caller talked with a human; when they hang up the call is over
        try:
            agent = self.runtime.router.get(tenant, agent_id)
        except RoutingError:
            return None
        direction: Literal["inbound", "outbound"] = "outbound" if query.get("direction") == "outbound" else "inbound"
        back = InboundCall(
            call_id=new_call_id(), tenant_id=tenant,
            started=CallStarted(
                channel="phone", direction=direction, agent_id=agent.id, agent_version=agent.version,
                routed_by="handoff_return", from_number=form.get("From"), to_number=form.get("To"),
                provider_call_id=call_sid or None,
                parameters={RETURNED_FROM_HANDOFF: call_id, "handoff_outcome": outcome.outcome}))
        if await self.runtime.admit(back) is not None:
            return None  # no room to take the caller back: they are hung up (recorded as call.refused)
        return self._await_stream(back)

    async def rejected(self, info: RejectedWebhook) -> None:
        await self.runtime.audit(tenant_id="platform", call_id=info.call_sid or "-", actor="twilio-webhook",
                                 action="webhook.rejected", resource=info.path, outcome="denied", detail=info.reason,
                                 remote_addr=info.remote)

    def _await_stream(self, call: InboundCall) -> tuple[str, dict[str, str]]:
        """Keeps an admitted call for its media stream; returns what `<Stream>` passes back to us."""
        self._pending[call.call_id] = call
        while len(self._pending) > PENDING_CALLS:
            self._pending.popitem(last=False)
        return call.call_id, {"tenant": call.tenant_id, "agent": call.started.agent_id}

    async def _record_late(self, call_sid: str, payload: EventPayload) -> bool:
        """Records what the carrier reports about a call into that call: live, or recently ended."""
        for session in self.runtime.sessions.values():
            if session.call.started.provider_call_id == call_sid:
                session.observe(payload)
                return True
        recorder = self._ended.get(call_sid)
        if recorder is None:
            return False
        await recorder.record(payload)
        await recorder.writer.flush()
        return True

    # ------------------------------------------------------------------ the media stream

    async def media_stream(self, websocket: WebSocket) -> None:
        """`WS /twilio/media`: the stream of a call the voice webhook answered, run as its session."""
        token = self.runtime.twilio_auth_token
        if token and not validate_media_handshake(token, websocket, self.runtime.public_url, self.runtime.replica_url):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        events = iterate_media(websocket)
        start = await wait_for_start(events)
        call = await self._claim(start) if start is not None else None
        if start is None or call is None:
            with contextlib.suppress(Exception):
                await websocket.close(code=1008)
            return
        await self._converse(call, start, websocket, events)

    async def _claim(self, start: Start) -> InboundCall | None:
        """The pending call a stream's `start` names, if the stream is that call's."""
        call_id = start.custom_parameters.get(CALL_ID_PARAMETER, "")
        call = self._pending.pop(call_id, None)
        if call is None:
            # Answered by another gateway (or never): the stream was sent to the wrong one, which cannot run it.
            log.warning("the media stream of call %.64r (CallSid %.64r) reached a gateway that did not answer it: "
                        "behind one public URL, each gateway needs VOXLOG_REPLICA_URL", call_id, start.call_sid)
            return None
        if not call.started.provider_call_id or start.call_sid == call.started.provider_call_id:
            return call
        # Another call's stream (a replayed or forged start) gets nothing; the answered call keeps its place.
        self._pending[call.call_id] = call
        await self.runtime.audit(tenant_id=call.tenant_id, call_id=call.call_id, actor="twilio-media",
                                 action="media.call_mismatch", resource=start.call_sid, outcome="denied",
                                 detail=f"the stream's start names CallSid {start.call_sid}, the call is "
                                        f"{call.started.provider_call_id}", remote_addr=None)
        return None

    async def _converse(self, call: InboundCall, start: Start, websocket: WebSocket,
                        events: AsyncIterator[MediaEvent]) -> None:
        runtime = self.runtime
        agent = runtime.router.get(call.tenant_id, call.started.agent_id)
        # To this replica, which holds the call (VOXLOG_REPLICA_URL), not to whichever the public URL picks.
        base = public_base_url(websocket, runtime.replica_url or runtime.public_url)
        action = f"{base}{DIAL_ACTION_PATH}?" + urlencode(
            {"call_id": call.call_id, "tenant": call.tenant_id, "agent": call.started.agent_id,
             "direction": call.started.direction})
        transport = TwilioMediaTransport.from_start(websocket, start, rest=runtime.rest,
                                                    transfer_twiml=partial(dial_twiml, action=action))
        session = runtime.open_session(call, agent, transport, memory=await recall(runtime.analytics, call))
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
            if call.started.provider_call_id:
                self._ended[call.started.provider_call_id] = session.recorder
                while len(self._ended) > LATE_STATUS_CALLS:
                    self._ended.popitem(last=False)
            await transport.close()
