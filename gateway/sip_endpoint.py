"""PJSIP (its pjsua2 binding) as the gateway's SIP user agent, in a thread of its own.

PJSIP does SIP and RTP: parsing, transactions and retransmissions, SDP offer/answer (G.711 PCMU and
PCMA, G.722, RFC 4733 telephone-events), the jitter buffer, symmetric RTP, session timers, REFER. Its
endpoint is one per process and wants one thread to own it: `SipEndpoint` runs that thread, polls
SIP from it, and runs there what the event loop asks (`respond`, `answer`, `hangup`, `transfer`).
What happens to calls comes back to the loop as calls on `SipEvents`, through `call_soon_threadsafe`.

Audio stays off the loop's critical path: PJSIP's media clock (a thread of PJSIP's) takes each call's
20 ms of caller audio from the conference bridge (16-bit, at the call's codec's rate: 8 kHz for G.711,
16 kHz for G.722) and asks for 20 ms of the agent's;
the agent's frames wait in a per-call queue that the clock empties at its own steady pace, so RTP
goes out every 20 ms whatever the loop is doing, and a clear (barge-in) drops what is queued at once.
A mark (`mark`) waits in that queue behind the audio queued before it: the clock that reaches it, or
the clear that drops it, tells the loop (as Twilio echoes a mark once its audio has played or been
cleared).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ipaddress
import itertools
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pjsua2 as pj

from gateway import rtp_source_lock
from gateway.admission import RateLimits
from streams.channels.sip_screening import SOURCE_HEADER, Denial, Refused, Routed, vouched_source
from streams.config.sip_trunks import IpNetwork

log = logging.getLogger(__name__)

NARROWBAND_RATE = 8000
WIDEBAND_RATE = 16000


def frame_bytes(rate: int) -> int:
    """20 ms of 16-bit mono at `rate`: what the media clock hands over and asks for, a call's port at its rate."""
    return rate * 20 // 1000 * 2


SILENCES = {rate: pj.ByteVector(bytes(frame_bytes(rate))) for rate in (NARROWBAND_RATE, WIDEBAND_RATE)}
"""What the media clock sends while nothing is queued: made once per rate, not at every tick of every call."""
QUEUED_FRAMES_MAX = 3000
"""A minute of agent audio; past it (a loop that outruns the clock) the oldest frames go."""
POLL_MS = 10
REFUSAL_SPACING_S = 0.05
"""At most 20 refusals a second leave the endpoint (see `SipEndpoint._refuse`)."""
OUTBOUND_ACCOUNTS_MAX = 6
"""Trunk credentials kept as accounts at once (the wheel's PJSUA_MAX_ACC is 8, one is the inbound's)."""
RTP_CHECK_S = 1.0
NAT_PROBATION_PACKETS = 10
"""RTP packets a call takes from an address its SDP does not name before it is latched there: PJSIP's own
count before it switches (`PJMEDIA_RTP_NAT_PROBATION_CNT`)."""
PORT_HOLD_S = 1.0
"""How long an ended call's media port rests before another call takes it: fifty ticks of the media clock."""
CODECS = {"PCMU": "PCMU/8000/1", "PCMA": "PCMA/8000/1", "G722": "G722/16000/1"}
"""The codecs that may be offered and accepted (`SipEndpointConfig.codecs`), by PJSIP's names for them;
every other one PJSIP has is disabled."""


PJ_ETOOBIG = 70017
"""PJSIP's status for a socket its select() cannot take (numbered past FD_SETSIZE), among others."""


def _descriptors_open() -> int | str:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return "an unknown number of"


_Made = TypeVar("_Made")


class SipDialError(RuntimeError):
    """A call that could not be placed at all (a bad URI, no transport to the trunk, no call slot)."""


class SipStartError(RuntimeError):
    """The endpoint could not start (a port taken, a certificate that does not load)."""


@dataclass(frozen=True)
class SipEndpointConfig:
    host: str = "127.0.0.1"
    """The address SIP and RTP bind to."""
    port: int = 5060
    """UDP and TCP."""
    public_host: str | None = None
    """The address peers reach us at, put in Contact and SDP; None: `host`."""
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """The CA bundle a peer's certificate must chain to when we connect to it over TLS (a trunk): its name
    is checked too. None: none named (`voxlog.serving.sip_config` always names one)."""
    rtp_port: int = 20000
    rtp_port_range: int = 10000
    max_calls: int = 64
    user_agent: str = "voxlog"
    session_expires_s: int = 1800
    """RFC 4028 session timers, when the peer supports them: a call whose peer vanished ends after this."""
    rtp_timeout_s: float = 30.0
    """A call that brings no RTP for this long (and is not on hold) is reported (`SipEvents.rtp_stopped`)."""
    invites_per_minute: float = 120.0
    """INVITEs one source address may send; past it they are answered 503 with Retry-After."""
    invite_burst: int = 30
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of SIP proxies in front of the gateways (deploy/kamailio): an INVITE from one of them is taken to
    come from the address it names (`sip_screening.SOURCE_HEADER`), for screening, rate limits and audits."""
    codecs: tuple[str, ...] = ("PCMU", "PCMA")
    """Offered and accepted, in order of preference (of `CODECS`). With G722 among them PJSIP's bridge
    runs at 16 kHz, and a G.711 call's audio passes through its resampling filter, to 16 kHz and back:
    heard alike, but no longer sample for sample (without it, the agent's G.711 is sent as it was made)."""
    log_level: int = 2
    """What PJSIP prints on standard output: 1 errors, 2 warnings too, up to 6 (every message)."""

    def __post_init__(self) -> None:
        try:
            self.proxy_networks()
        except ValueError as exc:
            raise ValueError(f"VOXLOG_SIP_TRUSTED_PROXIES: {exc}") from None
        unknown = [name for name in self.codecs if name not in CODECS]
        if unknown or not self.codecs or len(set(self.codecs)) != len(self.codecs):
            raise ValueError(f"SIP codecs (VOXLOG_SIP_CODECS) {', '.join(self.codecs) or 'none'}: name each of "
                             f"{', '.join(CODECS)} at most once, at least one")

    @property
    def advertised(self) -> str:
        return self.public_host or self.host

    def proxy_networks(self) -> tuple[IpNetwork, ...]:
        return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in self.trusted_proxies)

    @property
    def bridge_rate(self) -> int:
        return WIDEBAND_RATE if "G722" in self.codecs else NARROWBAND_RATE


@dataclass(frozen=True)
class IncomingInvite:
    handle: int
    source: str
    """The address the INVITE came from, `ip:port` (what the network says, not what the message claims)."""
    to_uri: str
    from_uri: str
    sip_call_id: str
    message: str
    """The INVITE as received, for what the stack does not parse for us (Authorization)."""

    @property
    def source_ip(self) -> str:
        return ip_of(self.source)


def ip_of(source: str) -> str:
    """The address of `ip:port`, `[v6]:port` or a bare address."""
    host = source.rsplit(":", 1)[0] if source.count(":") == 1 or "]" in source else source
    return host.strip("[]")


def _vector_bytes_copied(vector: Any) -> bytes:
    return bytes(vector)  # element by element through the binding: about 240 us for 20 ms of audio


def _vector_bytes_read(vector: Any) -> bytes:
    """The bytes of a ByteVector (a C++ std::vector<unsigned char>) read where they lie: its first member
    is the pointer to its data (libstdc++'s layout, which the wheel is built against). About 2 us."""
    start = ctypes.c_void_p.from_address(int(vector.this)).value
    return ctypes.string_at(start, vector.size()) if start else b""


def _reads_in_place() -> bool:
    probe = bytes(range(256))
    try:
        return _vector_bytes_read(pj.ByteVector(probe)) == probe
    except (ValueError, TypeError, OSError):
        return False


vector_bytes: Callable[[Any], bytes] = _vector_bytes_read if _reads_in_place() else _vector_bytes_copied
"""A ByteVector's bytes: read in place where this build's layout is the one checked here, else copied.
Converting each frame element by element cost more CPU than the rest of a call's audio path."""


class _Mark:
    """A mark in a call's queue of agent frames: not audio; `reached` is posted to the loop when the media
    clock gets to it, or when a clear (or an overflowing queue) drops it."""

    __slots__ = ("reached",)

    def __init__(self, reached: Callable[[], None]) -> None:
        self.reached = reached


class SipEvents(Protocol):
    """What the endpoint asks and tells: `screen` on the endpoint's thread (it must not block), the rest on
    the event loop."""

    def screen(self, invite: IncomingInvite) -> Refused | Routed: ...

    def refused(self, invite: IncomingInvite, refusal: Refused) -> None: ...

    def invited(self, invite: IncomingInvite, routed: Routed) -> None: ...

    def ringing(self, handle: int, code: int) -> None:
        """A call we placed is ringing (180) or bringing early media (183)."""

    def answered(self, handle: int) -> None:
        """A call is up: the 200 and its ACK are through."""

    def media_ready(self, handle: int, rate: int) -> None:
        """The call's audio flows, in 20 ms frames of 16-bit PCM at `rate` both ways (`heard`, `play`)."""

    def heard(self, handle: int, pcm: bytes) -> None: ...

    def dtmf(self, handle: int, digit: str) -> None: ...

    def transfer_status(self, handle: int, code: int, reason: str, final: bool) -> None: ...

    def rtp_stopped(self, handle: int, silent_s: float) -> None: ...

    def peer_request_refused(self, handle: int, request: str, target: str) -> None:
        """The peer asked, within the call, for what the gateway never does on a peer's word (`_Call`): a
        REFER (PJSIP would call its target), an INVITE that replaces the call, a redirect of a call we
        placed. Answered 403 (a redirect: the call fails); the call goes on."""

    def ended(self, handle: int, code: int, reason: str) -> None: ...


class _AgentAudio(pj.AudioMediaPort):  # type: ignore[misc]
    """One call's media port on the bridge: caller frames out to the loop, agent frames from a queue."""

    def __init__(self, handle: int, rate: int, post: Callable[..., None], events: SipEvents) -> None:
        super().__init__()
        self.handle = handle
        """The call it serves now (ports outlive calls: `SipEndpoint.port_for`)."""
        self.rate = rate
        self._silence = SILENCES[rate]
        self._post = post
        self._events = events
        self.queued: collections.deque[Any | _Mark] = collections.deque(maxlen=QUEUED_FRAMES_MAX)
        """Agent frames and marks; appended on the loop, taken from the left by the clock and by a clear
        (each `popleft` atomic: an entry goes to exactly one of them)."""

    def onFrameRequested(self, frame: Any) -> None:
        queued = self.queued
        while True:
            try:
                entry = queued.popleft()
            except IndexError:
                entry = self._silence
            if not isinstance(entry, _Mark):
                break
            self._post(entry.reached)  # a mark: every frame queued before it has gone out
        # (a ByteVector made on the loop as it was queued: this thread, every 20 ms, only hands it over)
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = entry
        frame.size = entry.size()

    def onFrameReceived(self, frame: Any) -> None:
        if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
            self._post(self._events.heard, self.handle, vector_bytes(frame.buf))


class _Call(pj.Call):  # type: ignore[misc]
    def __init__(self, endpoint: SipEndpoint, account: pj.Account, call_id: int, handle: int) -> None:
        super().__init__(account, call_id)
        endpoint.made(self)
        self.endpoint = endpoint
        self.account = account
        self.handle = handle
        self.port: _AgentAudio | None = None
        self.bridged: int | None = None
        self.rx_packets = -1
        self.rx_changed = time.monotonic()
        self.told_silent = False
        self.ended = False
        self.rtp_socket: int | None = None
        """The descriptor of PJSIP's socket for this call's RTP (`rtp_source_lock`), once its media is up."""
        self.rtp_media = 0
        self.rtp_packets_unlatched = 0
        """The stream's RTP packet count when it was last unlatched: only packets after it latch it anew."""

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.ended:
            self.ended = True
            self.endpoint.finished(self, info.lastStatusCode, info.lastReason)
        elif info.state == pj.PJSIP_INV_STATE_EARLY and info.role == pj.PJSIP_ROLE_UAC:
            self.endpoint.post(self.endpoint.events.ringing, self.handle, int(info.lastStatusCode))
        elif info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.endpoint.post(self.endpoint.events.answered, self.handle)

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO or media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            audio = self.getAudioMedia(index)
            first = self.port is None
            if self.port is None:
                # The port keeps the rate of the codec the call began with (a re-INVITE that changes it is
                # resampled by the bridge), so that a G.711 call's audio is not resampled to 16 kHz and back.
                wide = int(self.getStreamInfo(index).codecClockRate) > NARROWBAND_RATE
                self.port = self.endpoint.port_for(self.handle, WIDEBAND_RATE if wide else NARROWBAND_RATE)
            if self.bridged != audio.getPortId():  # a re-INVITE may give the call a new slot
                audio.startTransmit(self.port)
                self.port.startTransmit(audio)
                self.bridged = audio.getPortId()
            self.endpoint.unlatch(self, index)
            if first:
                self.endpoint.post(self.endpoint.events.media_ready, self.handle, self.port.rate)
            return

    # A peer's word does not move a call. PJSIP's defaults would: a REFER from the caller has it INVITE
    # whatever the Refer-To says (measured: a caller's REFER to sip:+1900...@anywhere was dialled, outside
    # admission, screening, the trunk's credentials and the log: toll fraud), an INVITE with Replaces takes
    # over the call without passing the INVITE screening, and a 3xx sends a call we placed elsewhere.
    def onCallTransferRequest(self, prm: Any) -> None:
        prm.statusCode = 403
        self.endpoint.post(self.endpoint.events.peer_request_refused, self.handle, "REFER", str(prm.dstUri))

    def onCallReplaceRequest(self, prm: Any) -> None:
        prm.statusCode = 403
        prm.reason = "Replaces is not accepted"
        self.endpoint.post(self.endpoint.events.peer_request_refused, self.handle, "INVITE with Replaces", "")

    def onCallRedirected(self, prm: Any) -> int:
        self.endpoint.post(self.endpoint.events.peer_request_refused, self.handle, "redirect", str(prm.targetUri))
        return int(pj.PJSIP_REDIRECT_REJECT)

    def onDtmfDigit(self, prm: Any) -> None:
        self.endpoint.post(self.endpoint.events.dtmf, self.handle, str(prm.digit))

    def onCallTransferStatus(self, prm: Any) -> None:
        self.endpoint.post(self.endpoint.events.transfer_status, self.handle, int(prm.statusCode),
                            str(prm.reason), bool(prm.finalNotify))

    def receiving(self) -> bool:
        """Whether RTP is coming in (or the call is on hold, when none need come)."""
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            if media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                return True  # held, or not yet up: silence is expected
            packets = int(self.getStreamStat(index).rtcp.rxStat.pkt)
            now = time.monotonic()
            if packets != self.rx_packets:
                self.rx_packets, self.rx_changed, self.told_silent = packets, now, False
            return False if self.told_silent else now - self.rx_changed < self.endpoint.config.rtp_timeout_s
        return True


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, endpoint: SipEndpoint) -> None:
        super().__init__()
        endpoint.made(self)
        self.endpoint = endpoint

    def onIncomingCall(self, prm: Any) -> None:
        self.endpoint.incoming(self, prm)

    def onIncomingSubscribe(self, prm: Any) -> None:
        # PJSIP accepted a presence SUBSCRIBE from anyone, unscreened, for as long as it asked (an hour), and
        # kept sending it NOTIFYs: a dialog held per datagram, and a reflector towards a forged source.
        # An agent has no presence to offer.
        prm.code = 489
        prm.reason = "Bad Event"


@dataclass
class SipEndpoint:
    """The SIP user agent: `start()` from the event loop, whose `events` it tells; `stop()` ends it."""

    config: SipEndpointConfig
    events: SipEvents
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _commands: queue.SimpleQueue[Callable[[], None] | None] = field(default_factory=queue.SimpleQueue)
    _calls: dict[int, _Call] = field(default_factory=dict)
    _latching: dict[int, _Call] = field(default_factory=dict)
    """Calls whose media is up and whose RTP source is not yet latched (`rtp_source_lock`), by handle."""
    _gone: list[_Call] = field(default_factory=list)
    _idle_ports: collections.deque[tuple[float, _AgentAudio]] = field(default_factory=collections.deque)
    """Media ports of ended calls, with when they ended, for the calls to come (`port_for`)."""
    _ports_made: int = 0
    _handles: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _ready: threading.Event = field(default_factory=threading.Event)
    _problem: str | None = None
    _account: _Account | None = None
    _outbound: dict[tuple[str, str], _Account] = field(default_factory=dict)
    """The accounts that place calls with a trunk's credential, by credential."""
    _made: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    """Every pjsua2 object of ours (calls, ports, accounts) still alive: see `_shutdown`."""
    _invites: RateLimits = field(default_factory=RateLimits)
    _proxies: tuple[IpNetwork, ...] = ()
    """`config.trusted_proxies`, parsed once."""

    def __post_init__(self) -> None:
        self._proxies = self.config.proxy_networks()
    _refusals: collections.deque[tuple[_Call, Refused]] = field(default_factory=collections.deque)
    _next_refusal: float = 0.0
    """Per source address, used on the endpoint's thread only."""

    # ------------------------------------------------------------------ the loop's side

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sip-endpoint", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._problem is not None:
            raise SipStartError(self._problem)

    async def stop(self) -> None:
        """Hangs up what is left and destroys the endpoint."""
        if self._thread is None:
            return
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join, 10)
        self._thread = None

    @property
    def media_ports(self) -> int:
        """The media ports made so far: never more than the most calls held at once and a few resting,
        however many calls come and go (`port_for`)."""
        return self._ports_made

    @property
    def running(self) -> bool:
        """Its thread is up and serving (it stops only when told to, or when PJSIP fails)."""
        return self._thread is not None and self._thread.is_alive() and self._problem is None

    def respond(self, handle: int, code: int, reason: str = "", headers: dict[str, str] | None = None) -> None:
        """Answers a ringing call: 200 takes it (SDP answer from the stack), anything else refuses it."""
        self._command(handle, lambda call: self._respond(call, code, reason, headers or {}))

    def hangup(self, handle: int) -> None:
        """Ends the call: BYE once it is up, CANCEL while a call we placed still rings."""
        self._command(handle, lambda call: call.hangup(pj.CallOpParam()))

    def dial(self, target: str, caller: str, credential: tuple[str, str] | None) -> tuple[int, asyncio.Future[str]]:
        """Places a call to `target` (a SIP URI) from `caller` (the From URI), answering the far end's
        digest challenge with `credential` (username, password): the call's handle at once, and a future
        of its Call-ID once the INVITE is sent (or of a SipDialError). What follows comes as `ringing`,
        `answered`, `media_ready` and `ended` (a final refusal: its status), perhaps before the future is
        seen done."""
        assert self._loop is not None, "start() first"
        placed: asyncio.Future[str] = self._loop.create_future()
        handle = next(self._handles)

        def settle(outcome: str | BaseException) -> None:
            if placed.done():
                return
            if isinstance(outcome, BaseException):
                placed.set_exception(outcome)
            else:
                placed.set_result(outcome)

        def place() -> None:
            call = _Call(self, self._outbound_account(credential), pj.PJSUA_INVALID_ID, handle)
            operation = pj.CallOpParam(True)
            operation.txOption.localUri = caller
            try:
                call.makeCall(target, operation)
            except pj.Error as exc:
                self._gone.append(call)
                self.post(settle, SipDialError(f"{target}: {exc.reason} ({exc.status})"))
                return
            if not call.ended:
                self._calls[handle] = call
            self.post(settle, str(call.getInfo().callIdString))

        if not self.running:
            settle(SipDialError("the SIP endpoint is not running"))
        else:
            self._commands.put(place)
        return handle, placed

    def transfer(self, handle: int, target: str) -> None:
        """A blind transfer (REFER); its NOTIFYs come back as `transfer_status`."""

        def refer(call: _Call) -> None:
            try:
                call.xfer(target, pj.CallOpParam(True))
            except pj.Error as exc:
                self.post(self.events.transfer_status, call.handle, 500, exc.reason, True)

        self._command(handle, refer)

    def play(self, handle: int, pcm: bytes) -> bool:
        """Queues 20 ms of the agent's 8 kHz PCM for the call; False when the call has no media (yet, or any more)."""
        return self._queue(handle, pj.ByteVector(pcm))

    def mark(self, handle: int, reached: Callable[[], None]) -> bool:
        """Queues a mark behind the call's queued frames: `reached` is called on the loop once the media
        clock has taken every frame before it (or a clear dropped them); False when the call has no media."""
        return self._queue(handle, _Mark(reached))

    def _queue(self, handle: int, entry: Any | _Mark) -> bool:
        """`entry`: a ByteVector of audio, or a mark."""
        call = self._calls.get(handle)
        if call is None or call.port is None:
            return False
        queued = call.port.queued
        while len(queued) >= QUEUED_FRAMES_MAX:  # the oldest go, a mark among them reported, not lost
            try:
                oldest = queued.popleft()
            except IndexError:
                break
            if isinstance(oldest, _Mark):
                self.post(oldest.reached)
        queued.append(entry)
        return True

    def clear(self, handle: int) -> int | None:
        """Drops the call's queued frames: how many (None when the call has no media); the marks among them
        are reported reached, in order."""
        call = self._calls.get(handle)
        if call is None or call.port is None:
            return None
        queued, dropped = call.port.queued, 0
        while True:
            try:
                entry = queued.popleft()
            except IndexError:
                return dropped
            if isinstance(entry, _Mark):
                self.post(entry.reached)
            else:
                dropped += 1

    def queued_frames(self, handle: int) -> int:
        """Frames (and marks) waiting for the media clock."""
        call = self._calls.get(handle)
        return len(call.port.queued) if call is not None and call.port is not None else 0

    def _command(self, handle: int, action: Callable[[_Call], None]) -> None:
        def run() -> None:
            call = self._calls.get(handle)
            if call is not None and not call.ended:
                action(call)

        self._commands.put(run)

    def made(self, thing: _Made) -> _Made:
        """`thing`, a pjsua2 object just made on the endpoint's thread, kept track of (see `_shutdown`)."""
        self._made.add(thing)
        return thing

    def post(self, method: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(method, *args)

    # ------------------------------------------------------------------ the endpoint's thread

    def _run(self) -> None:
        endpoint = pj.Endpoint()
        try:
            endpoint.libCreate()
            self._configure(endpoint)
        except pj.Error as exc:
            self._problem = f"the SIP endpoint cannot start on {self.config.host}:{self.config.port}: {exc.info()}"
            if exc.status == PJ_ETOOBIG:
                self._problem += (f"; this process holds {_descriptors_open()} descriptors, and PJSIP's select() "
                                  "takes no socket numbered past 1023")
            with contextlib.suppress(pj.Error):
                endpoint.libDestroy()
            self._ready.set()
            return
        self._ready.set()
        checked = time.monotonic()
        try:
            while True:
                endpoint.libHandleEvents(POLL_MS)
                if not self._run_commands():
                    break
                if self._latching:
                    self._latch_rtp_sources()
                self._gone.clear()  # the callbacks that ended them have returned
                self._answer_refusals()
                if time.monotonic() - checked >= RTP_CHECK_S:
                    checked = time.monotonic()
                    self._check_rtp()
        finally:
            self._shutdown(endpoint)

    def _configure(self, endpoint: pj.Endpoint) -> None:
        config = self.config
        ep_config = pj.EpConfig()
        ua = ep_config.uaConfig
        ua.threadCnt = 0  # SIP is polled by this thread alone
        ua.mainThreadOnly = False
        ua.maxCalls = config.max_calls
        ua.userAgent = config.user_agent
        logging_config = ep_config.logConfig
        # (the binding's LogWriter is never called: PJSIP writes its own lines to standard output)
        logging_config.level = logging_config.consoleLevel = self.config.log_level
        media = ep_config.medConfig
        media.clockRate = media.sndClockRate = config.bridge_rate
        media.noVad = True
        media.ecTailLen = 0  # no echo canceller: the far end is a phone, not our loudspeaker
        endpoint.libInit(ep_config)
        for kind in (pj.PJSIP_TRANSPORT_UDP, pj.PJSIP_TRANSPORT_TCP):
            transport = pj.TransportConfig()
            transport.port = config.port
            transport.boundAddress = config.host
            transport.publicAddress = config.advertised
            endpoint.transportCreate(kind, transport)
        if config.tls_port is not None and config.tls_cert is not None and config.tls_key is not None:
            tls = pj.TransportConfig()
            tls.port = config.tls_port
            tls.boundAddress = config.host
            tls.publicAddress = config.advertised
            tls.tlsConfig.certFile = str(config.tls_cert)
            tls.tlsConfig.privKeyFile = str(config.tls_key)
            tls.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
            # PJSIP's default trusts any certificate a server shows: a trunk's digest credential and the call's
            # signalling would go to whoever sat between. Peers calling in are screened by address and digest.
            tls.tlsConfig.verifyServer = True
            if config.tls_ca is not None:
                tls.tlsConfig.CaListFile = str(config.tls_ca)
            endpoint.transportCreate(pj.PJSIP_TRANSPORT_TLS, tls)
        endpoint.audDevManager().setNullDev()
        wanted = [CODECS[name] for name in config.codecs]
        present = [codec.codecId for codec in endpoint.codecEnum2()]
        for codec_id in present:
            endpoint.codecSetPriority(codec_id, 255 - wanted.index(codec_id) if codec_id in wanted else 0)
            if codec_id in wanted:
                # PJSIP's loss concealment (WSOLA) holds back 5 ms of every frame it decodes, lost or not: the
                # caller was heard 5 ms late and out of step with its packets, so the end of each turn
                # reached into one more 20 ms frame and the VAD's silence began a frame later (up to 25 ms a turn,
                # docs/performance.md). A lost packet is heard as the silence it was, as on Twilio's path.
                param = endpoint.codecGetParam(codec_id)
                param.setting.plc = False
                endpoint.codecSetParam(codec_id, param)
        if missing := [name for name in config.codecs if CODECS[name] not in present]:
            log.error("sip: this PJSIP has no %s: calls are offered and answered without it", ", ".join(missing))
        endpoint.libStart()
        if not rtp_source_lock.SUPPORTED:
            log.warning("sip: socket filters are Linux's: calls' RTP is not latched to its first source, and PJSIP "
                        "sends a call's audio wherever ten RTP packets in a row come from (docs/sip.md)")
        self._account = _Account(self)
        self._account.create(self._account_config("voxlog"), True)

    def _account_config(self, user: str) -> pj.AccountConfig:
        """An account's settings: `user` at this endpoint, RTP in the configured ports, session timers."""
        config = self.config
        account = pj.AccountConfig()
        account.idUri = f"sip:{user}@{config.advertised}:{config.port}"
        rtp = account.mediaConfig.transportConfig
        rtp.port = config.rtp_port
        rtp.portRange = config.rtp_port_range
        rtp.boundAddress = config.host
        rtp.publicAddress = config.advertised
        calls = account.callConfig
        calls.timerUse = pj.PJSUA_SIP_TIMER_OPTIONAL
        calls.timerSessExpiresSec = config.session_expires_s
        return account

    def _outbound_account(self, credential: tuple[str, str] | None) -> _Account:
        """The account whose digest credential answers a trunk's challenge (PJSIP keeps credentials per
        account): one per credential, the idle ones past `OUTBOUND_ACCOUNTS_MAX` let go, oldest first."""
        assert self._account is not None
        if credential is None:
            return self._account
        account = self._outbound.pop(credential, None)
        if account is None:
            busy = {id(call.account) for call in self._calls.values()}
            while len(self._outbound) >= OUTBOUND_ACCOUNTS_MAX:
                idle = next((key for key, kept in self._outbound.items() if id(kept) not in busy), None)
                if idle is None:
                    break  # each has a call (more than the stack takes at once): PJSIP's own limit answers
                with contextlib.suppress(pj.Error):
                    self._outbound.pop(idle).shutdown()
            username, password = credential
            settings = self._account_config(username)
            settings.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", username, 0, password))
            account = _Account(self)
            account.create(settings, False)
        self._outbound[credential] = account  # the most recently used last
        return account

    def _run_commands(self) -> bool:
        """Runs what the loop asked; False once it asked the endpoint to stop."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command is None:
                return False
            try:
                command()
            except pj.Error as exc:
                log.warning("sip: %s", exc.info())

    def incoming(self, account: _Account, prm: Any) -> None:
        handle = next(self._handles)
        call = _Call(self, account, prm.callId, handle)
        rdata = prm.rdata
        network_source = str(rdata.srcAddress)
        # (read here only when proxies are trusted: otherwise a flood past its allowance costs no copy of it)
        message = str(rdata.wholeMsg) if self._proxies else None
        source = vouched_source(network_source, message, self._proxies) if message is not None else network_source
        wait = self._invites.take(ip_of(source or network_source), self.config.invites_per_minute,
                                  self.config.invite_burst)
        if wait is not None:
            self._refuse(call, Refused(503, "Too Many Calls", {"Retry-After": str(max(1, math.ceil(wait)))}))
            return
        info = call.getInfo()
        invite = IncomingInvite(handle=handle, source=source or network_source, to_uri=str(info.localUri),
                                from_uri=str(info.remoteUri), sip_call_id=str(info.callIdString),
                                message=message if message is not None else str(rdata.wholeMsg))
        if source is None:
            unvouched = Refused(403, "Forbidden", denial=Denial(
                "platform", "sip.proxy_unvouched",
                f"the trusted proxy {network_source} named no caller's address in {SOURCE_HEADER}"))
            self._refuse(call, unvouched)
            self.post(self.events.refused, invite, unvouched)
            return
        try:
            screened = self.events.screen(invite)
        except Exception:
            log.exception("sip: the INVITE from %s could not be screened", source)
            screened = Refused(500, "Server Internal Error")
        if isinstance(screened, Refused):
            self._refuse(call, screened)
            self.post(self.events.refused, invite, screened)
            return
        self._calls[handle] = call
        self.post(self.events.invited, invite, screened)

    def _refuse(self, call: _Call, refusal: Refused) -> None:
        """Answers a refused INVITE once its turn comes: refusals are spaced (`REFUSAL_SPACING_S`), so that
        a flood holds the stack's few call slots, and the stack itself answers the rest 486 before it opens
        their media ports (each INVITE it takes opens two, which its 64 I/O handles get back only 500 ms
        after they close: a burst past that aborts PJSIP, and the gateway with it)."""
        self._refusals.append((call, refusal))

    def _answer_refusals(self) -> None:
        now = time.monotonic()
        while self._refusals and now >= self._next_refusal:
            call, refusal = self._refusals.popleft()
            self._gone.append(call)
            self._next_refusal = max(self._next_refusal, now - REFUSAL_SPACING_S) + REFUSAL_SPACING_S
            try:
                self._respond(call, refusal.code, refusal.reason, dict(refusal.headers))
            except pj.Error as exc:  # the caller gave up meanwhile (CANCEL)
                log.debug("sip: refusal not sent: %s", exc.info())

    def _respond(self, call: _Call, code: int, reason: str, headers: dict[str, str]) -> None:
        operation = pj.CallOpParam()
        operation.statusCode = code
        if reason:
            operation.reason = reason
        for name, value in headers.items():
            header = pj.SipHeader()
            header.hName = name
            header.hValue = value
            operation.txOption.headers.append(header)
        # An answer keeps its headers even from within onIncomingCall (pjsua queues it); a hang-up there would not.
        call.answer(operation)

    def unlatch(self, call: _Call, index: int) -> None:
        """The call's media is (again) up: RTP from anyone reaches its socket until the first packet of the
        new stream says whose it is (`_latch_rtp_sources`). A socket PJSIP kept from an earlier call, or this
        call's before a re-INVITE, loses its old filter."""
        if not rtp_source_lock.SUPPORTED:
            return
        self._latching.pop(call.handle, None)
        named = str(call.getMedTransportInfo(index).localRtpName)
        local = rtp_source_lock.host_port(named)
        fd = None if local is None else rtp_source_lock.udp_socket_at(*local)
        call.rtp_socket, call.rtp_media = fd, index
        try:  # a re-INVITE that changes little keeps the stream, and its count, with the old peer's packets in it
            call.rtp_packets_unlatched = int(call.getStreamStat(index).rtcp.rxStat.pkt)
        except pj.Error:
            call.rtp_packets_unlatched = 0
        if fd is None:
            log.warning("sip: call %s: its RTP socket (%s) was not found: RTP from any address reaches it",
                        call.handle, named)
            return
        try:
            rtp_source_lock.unlock(fd)
        except OSError as exc:
            log.warning("sip: call %s: its RTP socket's old filter stays (%s): not latched", call.handle, exc)
            return
        self._latching[call.handle] = call

    def _latch_rtp_sources(self) -> None:
        """Each call awaiting its RTP is latched to where it comes from: at once when that is the address its
        SDP names, else (a peer behind NAT) once `NAT_PROBATION_PACKETS` have come, as PJSIP itself would
        switch to it (a re-INVITE that moves the peer's media may leave the old address sending a while)."""
        for handle, call in list(self._latching.items()):
            if call.ended or call.rtp_socket is None:
                del self._latching[handle]
                continue
            try:  # this stream's own count: a socket PJSIP kept may remember an earlier call's source
                counted = int(call.getStreamStat(call.rtp_media).rtcp.rxStat.pkt)
                source = rtp_source_lock.host_port(str(call.getMedTransportInfo(call.rtp_media).srcRtpName))
                declared = rtp_source_lock.host_port(str(call.getStreamInfo(call.rtp_media).remoteRtpAddress))
            except pj.Error:
                continue
            if counted < call.rtp_packets_unlatched:  # a new stream since: its count started again
                call.rtp_packets_unlatched = 0
            packets = counted - call.rtp_packets_unlatched
            if packets <= 0 or source is None or (source != declared and packets < NAT_PROBATION_PACKETS):
                continue
            del self._latching[handle]
            try:
                rtp_source_lock.lock_to(call.rtp_socket, *source)
            except OSError as exc:
                log.warning("sip: call %s: RTP could not be latched to %s:%s (%s)", handle, *source, exc)
                continue
            log.info("sip: call %s: RTP latched to %s:%s", handle, *source)

    def finished(self, call: _Call, code: int, reason: str) -> None:
        self._calls.pop(call.handle, None)
        self._latching.pop(call.handle, None)
        self._gone.append(call)  # deleted after this callback returns
        if call.port is not None:
            call.port.queued.clear()
            self._idle_ports.append((time.monotonic(), call.port))
            call.port = None
        self.post(self.events.ended, call.handle, int(code), str(reason))

    def _check_rtp(self) -> None:
        for call in list(self._calls.values()):
            if call.port is None or call.ended:
                continue
            try:
                receiving = call.receiving()
            except pj.Error:
                continue
            if not receiving and not call.told_silent:
                call.told_silent = True
                self.post(self.events.rtp_stopped, call.handle, time.monotonic() - call.rx_changed)

    def port_for(self, handle: int, rate: int) -> _AgentAudio:
        """A media port on the bridge for the call `handle`, at `rate`: one an ended call left, idle for
        `PORT_HOLD_S` (the media clock's thread may still be in its callback as its call ends), or a new
        one. No port is destroyed while the endpoint runs, so there are never more than the most calls
        held at once, and a few resting. PJSIP 2.15.1's bridge removes a port on its clock's next tick,
        after pjsua2's destructor has freed it (pjproject pull request 4200 fixed this later): each port
        destroyed as its call ended wrote to freed memory, and crashed a gateway now and then."""
        settled = time.monotonic() - PORT_HOLD_S
        for index, (ended_at, idle) in enumerate(self._idle_ports):
            if idle.rate == rate and ended_at < settled:
                del self._idle_ports[index]
                idle.handle = handle
                idle.queued.clear()
                return idle
        port = self.made(_AgentAudio(handle, rate, self.post, self.events))
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.clockRate = rate
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = 20000
        self._ports_made += 1
        port.createPort(f"agent-{self._ports_made}", fmt)
        return port

    def _forget_calls(self) -> None:
        for call in [*self._calls.values(), *self._gone]:
            call.port = None
        self._calls.clear()
        self._gone.clear()
        self._idle_ports.clear()

    def _shutdown(self, endpoint: pj.Endpoint) -> None:
        with contextlib.suppress(pj.Error):
            endpoint.hangupAllCalls()
            deadline = time.monotonic() + 1.0
            while self._calls and time.monotonic() < deadline:
                endpoint.libHandleEvents(POLL_MS)
        # None of our pjsua2 objects is destroyed from here on: each is disowned (its C++ destructor never
        # runs) and held through libDestroy, whose callbacks may still reach it, then left to Python alone.
        # A port destroyed while the library runs is removed from the bridge on the media clock's next tick,
        # after pjsua2 freed it (see `port_for`): the clock thread then ran in freed memory, and CI's process
        # crashed at an endpoint's shutdown, when forgetting the calls destroyed their ports. Destroyed once
        # the library is gone, a port or a call aborts the process, against it or the next endpoint's. And no
        # collection here: one run on this thread finalises the whole process's garbage (the event loop's
        # transports and coroutines among it) off its thread. What is kept is a few objects an endpoint.
        survivors = list(self._made)
        for made in survivors:
            made.thisown = False
        self._refusals.clear()  # INVITEs refused but not yet answered: the stack ends them with itself
        self._forget_calls()
        for account in [*self._outbound.values(), self._account]:
            if account is not None:
                with contextlib.suppress(pj.Error):
                    account.shutdown()
        self._outbound.clear()
        self._account = None
        with contextlib.suppress(pj.Error):
            endpoint.libDestroy()
        survivors.clear()
