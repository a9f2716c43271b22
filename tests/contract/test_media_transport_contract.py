"""What every `MediaTransport` (streams/call/transport.py) must do, whatever its channel.

Each channel's transport runs over real sockets against a far end that checks it as strictly as the real
one would. Twilio's and the widget's: uvicorn on a free port serves a minimal endpoint that builds the
transport and reads the channel as the gateway does, and a stand-in from `voxlog.sim` plays the far end
(Twilio's network, the widget's page). SIP's: a minimal SIP endpoint (PJSIP, `gateway.sip_endpoint`)
that answers every INVITE, and a real softphone (Debian's baresip, `tests.baresip_peer`) that dials it
and records what it hears: there, what the far end received is compared as audio (G.711 and a jitter
buffer between), strictly enough that a frame dropped, repeated or out of order fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pytest
from fastapi import FastAPI, WebSocket

from gateway.sip_endpoint import NARROWBAND_RATE, IncomingInvite, SipEndpoint, SipEndpointConfig, frame_bytes
from gateway.sip_media_transport import SipMediaTransport
from gateway.twilio_media_transport import TwilioMediaTransport, iterate_media, wait_for_start
from gateway.widget import WidgetTransport, iterate_page
from streams.audio.codecs import Resampler, mulaw_to_pcm16, pcm16_to_mulaw
from streams.audio.formats import FRAME_MS, PCM_FRAME_BYTES, PCM_RATE
from streams.call.transport import MediaTransport, TransportClosed
from streams.channels.sip_screening import Refused, Routed
from streams.channels.twilio_media_protocol import Mark
from streams.channels.twilio_webhook_protocol import MEDIA_PATH
from streams.channels.widget_protocol import MarkReached, parse_hello
from streams.config.agents import load_agents
from tests.baresip_peer import BaresipPeer, baresip_peer
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.media_peer import MediaPeer
from voxlog.sim.stack import serve_app
from voxlog.sim.twilio_caller import StreamInstructions, TwilioCaller
from voxlog.sim.widget_page import WidgetPage

pytestmark = pytest.mark.timeout(60)

WIDGET_PATH = "/widget/ws"
WAIT_S = 10.0
"""A bound on waiting for what must come, so that a transport that hangs fails instead."""
SIP_NUMBER = "+15550100"
MATCH = 0.99
"""How alike (normalised cross-correlation) audio a SIP far end recorded must be to what was sent: one
frame of 25 dropped, repeated or swapped scores 0.96 at best."""
SILENT = 64
"""The loudest sample a SIP far end may record where nothing was sent (G.711's silence decodes to 0)."""


@dataclass
class Served:
    """The transport's side of one call, as the endpoint under test saw it."""

    transport: MediaTransport
    acknowledged: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    """The marks the far end acknowledged, read off the channel (SIP: reached by the media clock)."""
    far_gone: asyncio.Event = field(default_factory=asyncio.Event)
    """The channel's reader saw the far end's socket close (SIP: the call ended)."""
    queued_at_mark: list[int] = field(default_factory=list)
    """SIP: the frames still queued for the media clock as each mark was reported."""


class Link(ABC):
    """One call's media: the transport under test, its far end, and what the channel read back. What a
    test checks of the far end is said here, each channel in its own terms."""

    channel: Channel
    served: Served

    @property
    def transport(self) -> MediaTransport:
        return self.served.transport

    async def acknowledged(self) -> str:
        return await asyncio.wait_for(self.served.acknowledged.get(), WAIT_S)

    @abstractmethod
    async def far_heard(self, pieces: list[bytes]) -> None:
        """Waits until the far end has received these pieces of audio (as `Channel.heard`/`heard_speech` make
        them), in order, and asserts it received nothing else."""

    @abstractmethod
    def hold(self) -> None:
        """Nothing the far end buffers plays any more, so that a clear drops all that came since."""

    @abstractmethod
    async def far_cleared(self, batches: list[list[bytes]]) -> None:
        """Asserts that a clear after each batch of frames given to `play` dropped what had not played."""

    @abstractmethod
    async def far_played_to(self, name: str, frames: list[bytes]) -> None:
        """Asserts that the mark `name`, acknowledged, came once `frames` (given to `play`) had played."""

    @abstractmethod
    async def far_closed(self) -> bool:
        """Waits until the far end saw the call close; whether the agent's side closed it."""

    @abstractmethod
    async def abort(self) -> None:
        """The far end goes without a word (network loss, a crash; SIP: it hangs up)."""

    @property
    @abstractmethod
    def protocol_errors(self) -> list[str]:
        """What the agent sent that the channel does not allow."""

    @abstractmethod
    def shown(self) -> list[tuple[str, str, bool]]:
        """The transcript the far end shows (speaker, text, final)."""


class Channel(Protocol):
    name: str
    shows_transcript: bool

    def connect(self, workdir: Path) -> contextlib.AbstractAsyncContextManager[Link]:
        """A served endpoint and a far end that called it, for the block."""
        ...

    def heard(self, pcm_frames: list[bytes]) -> bytes:
        """What the far end receives for these frames given to `play`: the channel's format."""
        ...

    def heard_speech(self, frames: list[bytes]) -> bytes:
        """What the far end receives for these frames given to `play_speech`."""
        ...


# -- over a WebSocket: Twilio's media stream, the widget ------------------------------------------


class WebSocketLink(Link):
    def __init__(self, channel: Channel, far: MediaPeer, served: Served) -> None:
        self.channel = channel
        self.far = far
        self.served = served

    async def far_heard(self, pieces: list[bytes]) -> None:
        expected = b"".join(pieces)
        await self.far.wait_until(lambda: len(self.far.agent_audio) >= len(expected), WAIT_S)
        assert bytes(self.far.agent_audio) == expected

    def hold(self) -> None:
        self.far.speaker.hold()

    async def far_cleared(self, batches: list[list[bytes]]) -> None:
        assert self.far.clears == len(batches)
        assert self.far.speaker.dropped_s == [pytest.approx(len(batch) * FRAME_MS / 1000) for batch in batches]

    async def far_played_to(self, name: str, frames: list[bytes]) -> None:
        assert self.far.marks_echoed == [name]

    async def far_closed(self) -> bool:
        await asyncio.wait_for(self.far.closed.wait(), WAIT_S)
        return self.far.closed_by_agent

    async def abort(self) -> None:
        await self.far.abort()

    @property
    def protocol_errors(self) -> list[str]:
        return self.far.protocol_errors

    def shown(self) -> list[tuple[str, str, bool]]:
        if not self.channel.shows_transcript:
            return []  # a phone has no screen
        assert isinstance(self.far, WidgetPage)
        return self.far.transcript


class WebSocketChannel(ABC):
    name: str
    shows_transcript: bool

    @abstractmethod
    def app(self, served: asyncio.Queue[Served]) -> FastAPI:
        """An endpoint that puts each call's transport on `served` and reads the channel until it closes."""

    @abstractmethod
    async def dial(self, base_url: str) -> MediaPeer:
        """A far end connected to the endpoint at `base_url`."""

    @contextlib.asynccontextmanager
    async def connect(self, workdir: Path) -> AsyncIterator[Link]:
        served: asyncio.Queue[Served] = asyncio.Queue()
        async with serve_app(self.app(served)) as base_url:
            far = await self.dial(base_url)
            async with far:
                side = await asyncio.wait_for(served.get(), WAIT_S)
                yield WebSocketLink(self, far, side)

    @abstractmethod
    def heard(self, pcm_frames: list[bytes]) -> bytes:
        """What the far end receives for these frames given to `play`: the channel's format."""

    def heard_speech(self, frames: list[bytes]) -> bytes:
        return b"".join(frames)  # as played


class TwilioChannel(WebSocketChannel):
    name = "twilio"
    shows_transcript = False

    def app(self, served: asyncio.Queue[Served]) -> FastAPI:
        app = FastAPI()

        @app.websocket(MEDIA_PATH)
        async def media(websocket: WebSocket) -> None:
            await websocket.accept()
            events = iterate_media(websocket)
            start = await wait_for_start(events)
            assert start is not None
            side = Served(TwilioMediaTransport.from_start(websocket, start))
            await served.put(side)
            async for event in events:
                if isinstance(event, Mark):
                    side.acknowledged.put_nowait(event.name)
            side.far_gone.set()

        return app

    async def dial(self, base_url: str) -> MediaPeer:
        caller = TwilioCaller(base_url, "contract-auth-token")
        stream_url = base_url.replace("http://", "ws://") + MEDIA_PATH
        await caller.connect(StreamInstructions(url=stream_url, parameters={}, twiml=""))
        return caller

    def heard(self, pcm_frames: list[bytes]) -> bytes:
        # 8 kHz mu-law, as streams.audio's streaming resampler and G.711 encoder make it.
        resampler = Resampler(16_000, 8_000)
        return b"".join(pcm16_to_mulaw(resampler.process(frame)) for frame in pcm_frames)


class WidgetChannel(WebSocketChannel):
    name = "widget"
    shows_transcript = True

    def app(self, served: asyncio.Queue[Served]) -> FastAPI:
        app = FastAPI()

        @app.websocket(WIDGET_PATH)
        async def socket(websocket: WebSocket) -> None:
            await websocket.accept()
            parse_hello(await websocket.receive_text())
            side = Served(WidgetTransport(websocket))
            await served.put(side)
            async for event in iterate_page(websocket):
                if isinstance(event, MarkReached):
                    side.acknowledged.put_nowait(event.name)
            side.far_gone.set()

        return app

    async def dial(self, base_url: str) -> MediaPeer:
        page = WidgetPage(base_url.replace("http://", "ws://") + WIDGET_PATH)
        await page.connect()
        return page

    def heard(self, pcm_frames: list[bytes]) -> bytes:
        return b"".join(pcm_frames)  # 16 kHz PCM, as played


# -- SIP: PJSIP answering a real softphone ----------------------------------------------------------


def free_sip_port() -> int:
    """A loopback port free for both UDP and TCP (PJSIP binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for UDP and TCP")


class AnswerEveryCall:
    """`SipEvents` of a minimal endpoint: every INVITE answered 200, each call's transport served once its
    media is up, its end seen."""

    def __init__(self, served: asyncio.Queue[Served]) -> None:
        self.served = served
        self.endpoint: SipEndpoint | None = None
        self.sides: dict[int, Served] = {}
        self.routed = Routed(load_agents(DEFAULT_AGENTS_DIR)[0], SIP_NUMBER)
        self.sources: dict[int, str] = {}

    def screen(self, invite: IncomingInvite) -> Refused | Routed:
        return self.routed

    def refused(self, invite: IncomingInvite, refusal: Refused) -> None:
        raise AssertionError(f"an INVITE was refused: {refusal}")

    def invited(self, invite: IncomingInvite, routed: Routed) -> None:
        assert self.endpoint is not None
        self.sources[invite.handle] = invite.source_ip
        self.endpoint.respond(invite.handle, 200)

    def ringing(self, handle: int, code: int) -> None:
        raise AssertionError("this endpoint places no calls")

    def answered(self, handle: int) -> None:
        pass  # the media is what the tests wait for

    def media_ready(self, handle: int, rate: int) -> None:
        endpoint = self.endpoint
        assert endpoint is not None
        acknowledged: asyncio.Queue[str] = asyncio.Queue()
        side = Served(SipMediaTransport(endpoint, handle, self.sources[handle], rate), acknowledged)

        def reached(name: str) -> None:
            side.queued_at_mark.append(endpoint.queued_frames(handle))
            acknowledged.put_nowait(name)

        assert isinstance(side.transport, SipMediaTransport)
        side.transport.on_mark = reached
        self.sides[handle] = side
        self.served.put_nowait(side)

    def heard(self, handle: int, pcm: bytes) -> None:
        pass

    def dtmf(self, handle: int, digit: str) -> None:
        pass

    def transfer_status(self, handle: int, code: int, reason: str, final: bool) -> None:
        pass

    def rtp_stopped(self, handle: int, silent_s: float) -> None:
        pass

    def ended(self, handle: int, code: int, reason: str) -> None:
        side = self.sides.get(handle)
        if side is not None:
            assert isinstance(side.transport, SipMediaTransport)
            side.transport.ended()
            side.far_gone.set()


Samples = npt.NDArray[np.float64]


def _samples(pcm: bytes) -> Samples:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def best_match(heard: Samples, expected: Samples) -> tuple[int, float]:
    """Where in `heard` audio most like `expected` begins, and how alike (normalised cross-correlation, 1.0
    for the same samples)."""
    n = len(expected)
    if n == 0 or len(heard) < n:
        return -1, 0.0
    size = 1 << (len(heard) + n).bit_length()
    dots = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(expected, size)), size)[: len(heard) - n + 1]
    energy = np.concatenate(([0.0], np.cumsum(heard * heard)))
    windows = np.sqrt(np.maximum(energy[n:] - energy[:-n], 0.0))
    scores = dots / (windows * float(np.linalg.norm(expected)) + 1e-9)
    at = int(np.argmax(scores))
    return at, float(scores[at])


def locate(heard: Samples, pieces: list[Samples]) -> tuple[list[tuple[int, int]], list[float]]:
    """Where each piece is in `heard`, each after the one before (spans found while they match)."""
    spans: list[tuple[int, int]] = []
    scores: list[float] = []
    after = 0
    for piece in pieces:
        at, score = best_match(heard[after:], piece)
        scores.append(score)
        if score < MATCH:
            break
        spans.append((after + at, after + at + len(piece)))
        after += at + len(piece)
    return spans, scores


class SipLink(Link):
    def __init__(self, channel: Channel, peer: BaresipPeer, served: Served) -> None:
        self.channel = channel
        self.peer = peer
        self.served = served
        self.aborted = False

    @property
    def sip(self) -> SipMediaTransport:
        assert isinstance(self.served.transport, SipMediaTransport)
        return self.served.transport

    def recorded(self) -> Samples:
        try:
            pcm, rate = self.peer.received_audio()
        except (AssertionError, OSError):  # nothing recorded yet
            return _samples(b"")
        assert rate == 8000
        return _samples(pcm)

    async def far_heard(self, pieces: list[bytes]) -> None:
        wanted = [_samples(piece) for piece in pieces if piece]
        deadline = time.monotonic() + WAIT_S
        while True:
            heard = self.recorded()
            spans, scores = locate(heard, wanted)
            if len(spans) == len(wanted):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"baresip did not record the audio sent, in order, in {WAIT_S} s: each piece "
                                     f"alike at best {scores} (of {len(heard)} samples)\n{self.peer.diagnostics()}")
            await asyncio.sleep(0.05)

        elsewhere = heard.copy()
        for begin, end in spans:
            elsewhere[begin:end] = 0
        loud = np.flatnonzero(np.abs(elsewhere) > SILENT)
        assert not len(loud), f"baresip heard what was not sent, at samples {loud[:10]}... (spans {spans})"

    def hold(self) -> None:
        """The far end buffers nothing worth the name (a jitter buffer): what waits is our queue, which the
        test fills faster than the media clock empties it."""

    async def far_cleared(self, batches: list[list[bytes]]) -> None:
        cleared = self.sip.frames_cleared
        assert len(cleared) == len(batches)
        heard: list[bytes] = []
        for batch, dropped in zip(batches, cleared, strict=True):
            sent = self.channel.heard(batch)
            size = frame_bytes(NARROWBAND_RATE)
            queued = len(sent) // size
            assert 0 < dropped <= queued, f"a clear dropped {dropped} of {queued} frames queued"
            heard.append(sent[: (queued - dropped) * size])  # what the media clock had taken: sent
        # Then something else: once it is heard, so is all that went before; what was dropped never is.
        coda = native_frames(self.transport, 3)
        for frame in coda:
            await self.transport.play_speech(frame)
        await self.far_heard([*heard, self.channel.heard_speech(coda)])

    async def far_played_to(self, name: str, frames: list[bytes]) -> None:
        assert self.served.queued_at_mark == [0], "a mark reported before the audio queued ahead of it went out"
        await self.far_heard([self.channel.heard(frames)])

    async def far_closed(self) -> bool:
        closed = await self.peer.wait_event("CALL_CLOSED", WAIT_S)
        return not self.aborted and "by peer" in str(closed.get("param", ""))

    async def abort(self) -> None:
        self.aborted = True
        await self.peer.hangup()

    @property
    def protocol_errors(self) -> list[str]:
        return [str(event.get("param")) for event in self.peer.events if event.get("type") == "AUDIO_ERROR"]

    def shown(self) -> list[tuple[str, str, bool]]:
        return []  # a phone has no screen


class SipChannel:
    name = "sip"
    shows_transcript = False

    @contextlib.asynccontextmanager
    async def connect(self, workdir: Path) -> AsyncIterator[Link]:
        served: asyncio.Queue[Served] = asyncio.Queue()
        events = AnswerEveryCall(served)
        port = free_sip_port()
        endpoint = SipEndpoint(SipEndpointConfig(host="127.0.0.1", port=port), events)
        events.endpoint = endpoint
        await endpoint.start()  # one per process: started and stopped around each test
        try:
            async with baresip_peer(workdir, user="far") as peer:
                await peer.dial(f"sip:{SIP_NUMBER}@127.0.0.1:{port}")
                side = await asyncio.wait_for(served.get(), WAIT_S)
                await peer.wait_event("CALL_ESTABLISHED", WAIT_S)
                yield SipLink(self, peer, side)
                await endpoint.stop()
        finally:
            await endpoint.stop()

    def heard(self, pcm_frames: list[bytes]) -> bytes:
        """8 kHz PCM in 20 ms frames, as the transport resamples and queues it, through G.711 (PCMU)."""
        resampler = Resampler(PCM_RATE, 8_000)
        pcm = b"".join(resampler.process(frame) for frame in pcm_frames)
        return mulaw_to_pcm16(pcm16_to_mulaw(pcm[: len(pcm) - len(pcm) % frame_bytes(NARROWBAND_RATE)]))

    def heard_speech(self, frames: list[bytes]) -> bytes:
        return mulaw_to_pcm16(b"".join(frames))  # the mu-law frames, as G.711 decodes them


@pytest.fixture(params=[TwilioChannel(), WidgetChannel(), SipChannel()], ids=lambda channel: channel.name)
async def link(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Link]:
    channel: Channel = request.param
    async with channel.connect(tmp_path) as link:
        yield link


def speech_frames(count: int) -> list[bytes]:
    """Agent audio, 20 ms frames of 16 kHz PCM, each unlike the others."""
    samples = np.random.default_rng(20).integers(-12_000, 12_000, count * PCM_FRAME_BYTES // 2, dtype="<i2")
    audio = samples.tobytes()
    return [audio[i : i + PCM_FRAME_BYTES] for i in range(0, len(audio), PCM_FRAME_BYTES)]


def native_frames(transport: MediaTransport, count: int) -> list[bytes]:
    """Frames in the channel's own speech format (`play_speech`), each unlike the others."""
    bytes_per_sample = 1 if transport.speech_codec == "mulaw" else 2
    size = transport.speech_rate * FRAME_MS // 1000 * bytes_per_sample
    return [bytes([(index * 7 + offset) % 251 + 1 for offset in range(size)]) for index in range(count)]


def every_send(transport: MediaTransport) -> list[Callable[[], Awaitable[None]]]:
    """Each way of sending something to the far end."""
    return [lambda: transport.play(speech_frames(1)[0]), lambda: transport.play_speech(native_frames(transport, 1)[0]),
            transport.clear, lambda: transport.mark("too-late")]


async def test_play_delivers_frames_in_order_in_the_channels_format(link: Link) -> None:
    frames = speech_frames(25)
    for frame in frames:
        await link.transport.play(frame)
    expected = link.channel.heard(frames)
    await link.far_heard([expected])

    native = native_frames(link.transport, 10)
    for frame in native:
        await link.transport.play_speech(frame)
    await link.far_heard([expected, link.channel.heard_speech(native)])
    assert link.protocol_errors == []


async def test_clear_drops_buffered_agent_audio(link: Link) -> None:
    link.hold()  # the far end plays nothing: all it has is buffered until a clear
    first = speech_frames(25)
    for frame in first:
        await link.transport.play(frame)
    await link.transport.mark("before-clear")
    await link.transport.clear()
    assert await link.acknowledged() == "before-clear", "a mark whose audio a clear dropped is answered"

    second = speech_frames(5)
    for frame in second:
        await link.transport.play(frame)
    await link.transport.mark("after-clear")
    await link.transport.clear()
    assert await link.acknowledged() == "after-clear"
    await link.far_cleared([first, second])
    assert link.protocol_errors == []


async def test_a_mark_is_acknowledged_once_played(link: Link) -> None:
    frames = speech_frames(5)
    for frame in frames:
        await link.transport.play(frame)
    await link.transport.mark("greeting-done")
    assert await link.acknowledged() == "greeting-done"
    await link.far_played_to("greeting-done", frames)
    assert link.protocol_errors == []


async def test_hangup_closes_and_later_sends_raise(link: Link) -> None:
    await link.transport.hangup()
    assert await link.far_closed(), "the far end saw the agent's side close the call"
    for send in every_send(link.transport):
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(send(), WAIT_S)
    await link.transport.hangup()  # again: nothing left to do, nothing raised


async def test_a_closed_far_end_raises_transport_closed_rather_than_hanging(link: Link) -> None:
    await link.abort()
    await asyncio.wait_for(link.served.far_gone.wait(), WAIT_S)
    for send in every_send(link.transport):
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(send(), WAIT_S)


async def test_send_transcript_is_harmless_where_unsupported(link: Link) -> None:
    await link.transport.send_transcript("agent", "How can I help?", True)
    frame = native_frames(link.transport, 1)[0]
    await link.transport.play_speech(frame)
    await link.far_heard([link.channel.heard_speech([frame])])
    assert link.protocol_errors == []
    shown = [("agent", "How can I help?", True)] if link.channel.shows_transcript else []
    assert link.shown() == shown
