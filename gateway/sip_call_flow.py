"""SIP's call flow: what the gateway does with an INVITE from a tenant's trunk or PBX.

An INVITE is checked before anything is answered: a source address sending too many is told 503 with
Retry-After; it must come from an address one of the tenants allows (`sip.inbound.allow`), or prove
one of their digest credentials (401 with a challenge, then 403 for a wrong answer, audited); the
number it dials picks the agent (404 when none answers it, or when the agent is another tenant's);
then the call is admitted as a Twilio call is (503 with Retry-After when busy). Answered (200, the
SDP answer from PJSIP), its media runs a session exactly as a phone call's does, `channel: sip`.

Outbound, the dialer places a tenant's calls here when the tenant has a SIP trunk (`sip.outbound`):
`place` takes a seat on the gateway, sends the INVITE to the trunk (PJSIP answers its digest challenge
with the tenant's credential), and the call's progress goes on the dial's stream as `call.status`
(ringing, in-progress, then completed, or busy, no-answer, failed); answered, it runs a session as an
inbound call does, `direction: outbound`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from consumers.workers.dialer import Dial, PlaceFailed
from gateway.admission import retry_after
from gateway.caller_recall import recall
from gateway.runtime import PRODUCER, GatewayRuntime, new_call_id, while_running
from gateway.sip_endpoint import (
    NARROWBAND_RATE,
    IncomingInvite,
    SipDialError,
    SipEndpoint,
    SipEndpointConfig,
    ip_of,
)
from gateway.sip_media_transport import SipMediaTransport
from producers.event_writer import CallRecorder
from schemas.events import CallStarted, CallStatus
from schemas.version import __version__
from streams.audio.codecs import Resampler, pcm16_to_mulaw
from streams.audio.formats import PCM_RATE
from streams.call.session import CallSession
from streams.call.transport import InboundCall
from streams.channels.sip_digest import DigestAuthority, number_of
from streams.channels.sip_screening import InviteScreen, Refused, Routed
from streams.config.agents import RoutingError
from streams.connectors.base import ConnectorError

log = logging.getLogger(__name__)

REFUSED_REQUEST_ACTIONS = {"REFER": "sip.refer_refused", "INVITE with Replaces": "sip.replaces_refused",
                           "redirect": "sip.redirect_refused"}
"""The audit action of each request `SipEndpoint` refuses a peer within a call (`SipEvents.peer_request_refused`)."""

REALM = "voxlog"
MEDIA_WAIT_S = 32.0
"""An answered call whose ACK (and so its media) has not come by then is ended (RFC 3261's timer H)."""
HEARD_FRAMES_MAX = 250
"""Caller frames waiting for the loop (5 s); past it the oldest are dropped and counted (a stalled loop)."""
DIAL_SENT_S = 10.0
"""How long the endpoint's thread may take to send a placed call's INVITE (it polls every 10 ms)."""
BUSY_RETRY_S = 5.0
"""What Retry-After says when the gateway is full: calls last minutes, this is when to try again."""


BUSY_CODES = frozenset({486, 600, 603})
UNANSWERED_CODES = frozenset({480, 487})
"""Final statuses of a call we placed that read as Twilio's busy and no-answer (else: failed)."""


@dataclass
class SipLeg:
    """One SIP call on its way through the gateway."""

    handle: int
    peer: str
    """Where its signalling comes from: the caller's address, or the trunk a call we placed went to."""
    media: asyncio.Event = field(default_factory=asyncio.Event)
    rate: int = NARROWBAND_RATE
    """Its audio's sample rate both ways, once `media` is set: 16 kHz on G.722, else 8 kHz."""
    heard: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    progress: asyncio.Queue[tuple[str, int]] = field(default_factory=asyncio.Queue)
    """How a call we placed gets on: (ringing, 180 or 183), (answered, 200), (ended, its status)."""
    session: CallSession | None = None
    transport: SipMediaTransport | None = None
    ended: tuple[int, str] | None = None
    dropped_frames: int = 0


class SipCallFlow:
    """The gateway's SIP side: an endpoint (`gateway.sip_endpoint`) whose events this handles on the loop,
    and the dialer's way out for tenants with a SIP trunk (a `CallPlacer`)."""

    provider = "sip"

    def __init__(self, runtime: GatewayRuntime, config: SipEndpointConfig) -> None:
        self.runtime = runtime
        self.endpoint = SipEndpoint(config, self)
        # Nonces under a key of this process's own: the answers it took are remembered only here, so an
        # answer copied off the wire is good nowhere else (another gateway, this one restarted) and its
        # nonce is merely asked for anew there (`UnknownNonce`).
        digest = DigestAuthority(REALM, secrets.token_bytes(32))
        self.door = InviteScreen(runtime.router, runtime.tenants, runtime.secrets, digest)
        self.legs: dict[int, SipLeg] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()

    async def start(self) -> None:
        await self.endpoint.start()
        self._started.set()
        config = self.endpoint.config
        log.info("SIP: listening on %s:%d (UDP, TCP)%s", config.host, config.port,
                 f", TLS on {config.tls_port}" if config.tls_port else "")

    def health(self) -> dict[str, object]:
        config = self.endpoint.config
        body: dict[str, object] = {"status": "ok" if self.endpoint.running else "unavailable",
                                   "listening": f"{config.host}:{config.port}", "calls": len(self.legs),
                                   "media_ports": self.endpoint.media_ports}
        if config.tls_port is not None:
            body["tls"] = f"{config.host}:{config.tls_port}"
        return body

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.endpoint.stop()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the endpoint's events

    def screen(self, invite: IncomingInvite) -> Refused | Routed:
        return self.door.screen(invite.source_ip, invite.to_uri, invite.message)

    def refused(self, invite: IncomingInvite, refusal: Refused) -> None:
        """Audits a refusal that matters, as many as a source's allowance of failures (a flood writes no more)."""
        denial = refusal.denial
        if denial is None or self.runtime.rate_limits.failed_auth(f"sip:{invite.source_ip}") is not None:
            return
        self._spawn(self.runtime.audit(
            tenant_id=denial.tenant_id, call_id=f"sip:{invite.sip_call_id[:200]}", actor="sip", action=denial.action,
            resource=invite.to_uri[:200], outcome="denied", detail=denial.detail[:500], remote_addr=invite.source_ip),
            f"sip-audit-{invite.handle}")

    def invited(self, invite: IncomingInvite, routed: Routed) -> None:
        leg = SipLeg(invite.handle, invite.source)
        self.legs[invite.handle] = leg
        self._spawn(self._take(leg, self._call_of(invite, routed)), f"sip-{invite.handle}")

    def ringing(self, handle: int, code: int) -> None:
        leg = self.legs.get(handle)
        if leg is not None:
            leg.progress.put_nowait(("ringing", code))

    def answered(self, handle: int) -> None:
        leg = self.legs.get(handle)
        if leg is not None:
            leg.progress.put_nowait(("answered", 200))

    def media_ready(self, handle: int, rate: int) -> None:
        leg = self.legs.get(handle)
        if leg is not None:
            leg.rate = rate
            leg.media.set()

    def heard(self, handle: int, pcm: bytes) -> None:
        leg = self.legs.get(handle)
        if leg is None or leg.session is None:
            return
        if leg.heard.qsize() >= HEARD_FRAMES_MAX:
            leg.heard.get_nowait()
            leg.dropped_frames += 1
        leg.heard.put_nowait(pcm)

    def dtmf(self, handle: int, digit: str) -> None:
        leg = self.legs.get(handle)
        if leg is not None and leg.session is not None:
            leg.session.dtmf(digit)

    def transfer_status(self, handle: int, code: int, reason: str, final: bool) -> None:
        leg = self.legs.get(handle)
        if leg is not None and leg.transport is not None:
            leg.transport.transfer_status(code, reason, final)

    def peer_request_refused(self, handle: int, request: str, target: str) -> None:
        """Recorded in the call as bad input from the channel (a peer that keeps at it has its call ended) and
        audited, as many as the peer's allowance of failures. A call not yet answered has no session: a
        redirect of a call we placed fails its dial, which the dial's own events record."""
        leg = self.legs.get(handle)
        detail = f"{request} from the peer refused: a peer's request does not move a call"
        if target:
            detail += f"; it named {target[:200]}"
        log.warning("SIP call %d: %s", handle, detail)
        if leg is None or leg.session is None:
            return
        leg.session.bad_input("sip", detail)
        if self.runtime.rate_limits.failed_auth(f"sip:{ip_of(leg.peer)}") is not None:
            return
        call = leg.session.call
        self._spawn(self.runtime.audit(
            tenant_id=call.tenant_id, call_id=call.call_id, actor="sip", action=REFUSED_REQUEST_ACTIONS[request],
            resource=target[:200] or request, outcome="denied", detail=detail[:500], remote_addr=ip_of(leg.peer)),
            f"sip-audit-refused-{handle}")

    def rtp_stopped(self, handle: int, silent_s: float) -> None:
        leg = self.legs.get(handle)
        if leg is not None and leg.session is not None:
            leg.session.end_now("rtp_timeout", f"no RTP from the caller for {silent_s:.0f} s")

    def ended(self, handle: int, code: int, reason: str) -> None:
        leg = self.legs.get(handle)
        if leg is None:
            return
        leg.ended = (code, reason)
        leg.media.set()
        if leg.transport is not None:
            leg.transport.ended()
        leg.heard.put_nowait(None)
        leg.progress.put_nowait(("ended", code))

    # ------------------------------------------------------------------ an INVITE

    async def _take(self, leg: SipLeg, call: InboundCall) -> None:
        try:
            if await self.runtime.admit(call) is not None:
                self.endpoint.respond(leg.handle, 503, "Busy", {"Retry-After": retry_after(BUSY_RETRY_S)})
                return
            self.endpoint.respond(leg.handle, 200)
            await self._converse(leg, call)
        except Exception:
            log.exception("SIP call %d from %s failed", leg.handle, leg.peer)
            self.endpoint.respond(leg.handle, 500, "Server Internal Error")
        finally:
            self.legs.pop(leg.handle, None)

    # ------------------------------------------------------------------ a call we place

    async def place(self, dial: Dial, status_seq: int) -> str:
        """The dialer's way out through the tenant's trunk: the INVITE's Call-ID once it is sent. Raises
        PlaceFailed (retryable when the gateway is full)."""
        await self._started.wait()
        trunk = self.runtime.tenants.get(dial.tenant_id).sip.outbound
        if trunk is None:
            raise PlaceFailed(f"tenant {dial.tenant_id} has no SIP trunk (sip.outbound)", code=None, retryable=False)
        try:
            agent = self.runtime.router.get(dial.tenant_id, dial.agent_id)
            credential = None
            if trunk.username is not None and trunk.password is not None:
                credential = (trunk.username, self.runtime.secrets.resolve(
                    trunk.password, f"SIP trunk credential {trunk.username}").get_secret_value())
        except (RoutingError, ConnectorError) as exc:
            raise PlaceFailed(str(exc), code=None, retryable=False) from exc
        # A seat first, not recorded as a refusal when there is none: the dialer tries again, and the
        # call's stream begins with its call.started only once someone answers.
        refusal = self.runtime.admission.admit(dial.call_id, dial.tenant_id)
        if refusal is not None:
            raise PlaceFailed(f"the gateway cannot take the call now: {refusal.detail}", code=503, retryable=True)
        handle, placed = self.endpoint.dial(trunk.target(dial.to_number), trunk.caller(dial.from_number), credential)
        leg = SipLeg(handle, trunk.proxy)
        self.legs[handle] = leg  # before the INVITE is out: its progress may come before `placed` is seen
        try:
            sip_call_id = await asyncio.wait_for(placed, DIAL_SENT_S)
        except (SipDialError, TimeoutError) as exc:
            self.legs.pop(handle, None)
            self.endpoint.hangup(handle)  # queued behind the placing: a late INVITE is cancelled, not left ringing
            self.runtime.admission.release(dial.call_id)
            raise PlaceFailed(str(exc) or "the SIP endpoint did not say whether it sent the INVITE", code=None,
                              retryable=False) from exc
        call = InboundCall(
            call_id=dial.call_id, tenant_id=dial.tenant_id,
            started=CallStarted(channel="sip", direction="outbound", agent_id=agent.id, agent_version=agent.version,
                                routed_by="outbound_request", from_number=dial.from_number, to_number=dial.to_number,
                                provider_call_id=sip_call_id, parameters={**dial.parameters, "dial_id": dial.dial_id}))
        statuses = CallRecorder(self.runtime.writer, tenant_id=dial.tenant_id, call_id=dial.dial_id,
                                producer=PRODUCER, producer_version=__version__, next_seq=status_seq)
        self._spawn(self._ring(leg, call, statuses, dial.ring_timeout_s), f"sip-out-{handle}")
        return sip_call_id

    async def _ring(self, leg: SipLeg, call: InboundCall, statuses: CallRecorder, ring_timeout_s: float) -> None:
        """A call we placed, from its INVITE to its end: its statuses on the dial's stream."""
        loop = asyncio.get_running_loop()

        async def status(name: str, code: int | None, **more: Any) -> None:
            await statuses.record(CallStatus(status=name, provider="sip", sip_response_code=code, **more))
            await self.runtime.writer.flush()

        answered_at: float | None = None
        try:
            deadline, gave_up, rang = loop.time() + ring_timeout_s, False, False
            while answered_at is None:
                try:
                    step, code = await asyncio.wait_for(leg.progress.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    if gave_up:  # the stack never ended it (its own timers should have): nothing more to wait for
                        await status("failed", None, raw={"reason": "no final answer after the CANCEL"})
                        self.runtime.admission.release(call.call_id)
                        return
                    # Nobody answered in time: CANCEL, whose 487 ends the call (where the trunk has said nothing
                    # at all, PJSIP ends it at once, 487 too, and sends the CANCEL if a response ever comes).
                    gave_up, deadline = True, loop.time() + MEDIA_WAIT_S + 5
                    self.endpoint.hangup(leg.handle)
                    continue
                if step == "ringing" and not rang:  # once: a 183 after a 180 is the same ringing
                    rang = True
                    await status("ringing", code)
                elif step == "answered":
                    answered_at = loop.time()
                elif step == "ended":
                    reason = leg.ended[1] if leg.ended is not None else ""
                    if gave_up and not rang and code == 487:  # PJSIP ends a call nothing answered at once
                        await status("failed", None, raw={"reason": "the trunk sent no response by the ring timeout"})
                    else:
                        await status(_status_of(code, rang), code or None, raw={"reason": reason})
                    self.runtime.admission.release(call.call_id)
                    return
            await status("in-progress", 200)
            await self._converse(leg, call)
            await status("completed", None, duration_s=int(loop.time() - answered_at))
        except Exception:
            log.exception("SIP call %d to %s failed", leg.handle, leg.peer)
            self.endpoint.hangup(leg.handle)
            if answered_at is None:
                self.runtime.admission.release(call.call_id)
        finally:
            self.legs.pop(leg.handle, None)

    def _call_of(self, invite: IncomingInvite, routed: Routed) -> InboundCall:
        agent = routed.agent
        return InboundCall(
            call_id=new_call_id(), tenant_id=agent.tenant,
            started=CallStarted(channel="sip", direction="inbound", agent_id=agent.id, agent_version=agent.version,
                                routed_by="number", from_number=number_of(invite.from_uri) or invite.from_uri[:200],
                                to_number=routed.number, provider_call_id=invite.sip_call_id[:200],
                                parameters={"sip_source": invite.source}))

    # ------------------------------------------------------------------ the call

    async def _converse(self, leg: SipLeg, call: InboundCall) -> None:
        """An answered call: once its media is up, a session until either side ends it."""
        runtime, handle = self.runtime, leg.handle
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leg.media.wait(), MEDIA_WAIT_S)
        if leg.ended is not None or not leg.media.is_set():
            runtime.admission.release(call.call_id)
            if leg.ended is None:
                self.endpoint.hangup(handle)
            return
        agent = runtime.router.get(call.tenant_id, call.started.agent_id)
        transport = SipMediaTransport(self.endpoint, handle, leg.peer, leg.rate)
        leg.transport = transport
        session = runtime.open_session(call, agent, transport, memory=await recall(runtime.analytics, call))
        leg.session = session
        running = asyncio.create_task(runtime.run_session(session))
        up = Resampler(NARROWBAND_RATE, PCM_RATE)
        wide = leg.rate == PCM_RATE
        try:
            async for pcm in while_running(running, leg.heard.get):
                if pcm is None:
                    session.closed(_end_reason(leg.ended))
                    break
                if wide:  # G.722, decoded by PJSIP: what the recogniser hears is what the record keeps
                    await session.hear(pcm, pcm, "pcm_s16le", PCM_RATE)
                    continue
                # PJSIP hands over linear PCM (PCMU's levels, decoded): the record keeps it as G.711
                # mu-law, the recogniser hears it upsampled, with no decode of the mu-law just made.
                await session.hear(up.process(pcm), pcm16_to_mulaw(pcm), "mulaw", NARROWBAND_RATE)
        finally:
            session.closed("shutdown" if runtime.draining else "socket_closed")
            await running
            if leg.dropped_frames:
                log.warning("SIP call %s: %d caller frames dropped (the loop fell behind)", call.call_id,
                            leg.dropped_frames)
            await transport.hangup()


def _status_of(code: int, rang: bool) -> str:
    """What a call we placed that ended before anyone answered it was: its final SIP status read as
    Twilio's (a timeout is no answer where it rang, a trunk that said nothing where it did not)."""
    if code in BUSY_CODES:
        return "busy"
    if code in UNANSWERED_CODES or (code == 408 and rang):
        return "no-answer"
    return "failed"


def _end_reason(ended: tuple[int, str] | None) -> Literal["caller_hangup", "carrier_error"]:
    """How the far end's leaving reads in `call.ended`: a BYE or CANCEL is a hang-up, an error status not."""
    if ended is None or ended[0] < 300 or ended[0] in (487,):
        return "caller_hangup"
    return "carrier_error"


