"""What every `MediaTransport` (streams/call/transport.py) must do, whatever its channel.

Each channel's transport runs over a real socket: uvicorn on a free port serves a minimal endpoint
that builds the transport and reads the channel as the gateway does, and a stand-in from
`voxlog.sim` plays the far end (Twilio's network, the widget's page), checking each message as
strictly as the real one would. SIP joins the channels here when it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pytest
from fastapi import FastAPI, WebSocket

from gateway.twilio_media_transport import TwilioMediaTransport, iterate_media, wait_for_start
from gateway.widget import WidgetTransport, iterate_page
from streams.audio.codecs import Resampler, pcm16_to_mulaw
from streams.audio.formats import FRAME_MS, PCM_FRAME_BYTES
from streams.call.transport import MediaTransport, TransportClosed
from streams.channels.twilio_media_protocol import Mark
from streams.channels.twilio_webhook_protocol import MEDIA_PATH
from streams.channels.widget_protocol import MarkReached, parse_hello
from voxlog.sim.media_peer import MediaPeer
from voxlog.sim.stack import serve_app
from voxlog.sim.twilio_caller import StreamInstructions, TwilioCaller
from voxlog.sim.widget_page import WidgetPage

pytestmark = pytest.mark.timeout(60)

WIDGET_PATH = "/widget/ws"
WAIT_S = 10.0
"""A bound on waiting for what must come, so that a transport that hangs fails instead."""


@dataclass
class Served:
    """The transport's side of one call, as the endpoint under test saw it."""

    transport: MediaTransport
    acknowledged: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    """The marks the far end acknowledged, read off the channel."""
    far_gone: asyncio.Event = field(default_factory=asyncio.Event)
    """The channel's reader saw the far end's socket close."""


class Channel(Protocol):
    name: str
    shows_transcript: bool

    def app(self, served: asyncio.Queue[Served]) -> FastAPI:
        """An endpoint that puts each call's transport on `served` and reads the channel until it closes."""
        ...

    async def dial(self, base_url: str) -> MediaPeer:
        """A far end connected to the endpoint at `base_url`."""
        ...

    def heard(self, pcm_frames: list[bytes]) -> bytes:
        """What the far end receives for these frames given to `play`: the channel's format."""
        ...

    def shown(self, far: MediaPeer) -> list[tuple[str, str, bool]]:
        """The transcript the far end shows (speaker, text, final)."""
        ...


class TwilioChannel:
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

    def shown(self, far: MediaPeer) -> list[tuple[str, str, bool]]:
        return []  # a phone has no screen


class WidgetChannel:
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

    def shown(self, far: MediaPeer) -> list[tuple[str, str, bool]]:
        assert isinstance(far, WidgetPage)
        return far.transcript


@dataclass
class Link:
    """One call's media: the transport under test, its far end, and what the channel read back."""

    channel: Channel
    far: MediaPeer
    served: Served

    @property
    def transport(self) -> MediaTransport:
        return self.served.transport

    async def acknowledged(self) -> str:
        return await asyncio.wait_for(self.served.acknowledged.get(), WAIT_S)

    async def far_has(self, audio_bytes: int) -> None:
        await self.far.wait_until(lambda: len(self.far.agent_audio) >= audio_bytes, WAIT_S)


@pytest.fixture(params=[TwilioChannel(), WidgetChannel()], ids=lambda channel: channel.name)
async def link(request: pytest.FixtureRequest) -> AsyncIterator[Link]:
    channel: Channel = request.param
    served: asyncio.Queue[Served] = asyncio.Queue()
    async with serve_app(channel.app(served)) as base_url:
        far = await channel.dial(base_url)
        async with far:
            yield Link(channel, far, await asyncio.wait_for(served.get(), WAIT_S))


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
    await link.far_has(len(expected))
    assert bytes(link.far.agent_audio) == expected

    native = native_frames(link.transport, 10)
    for frame in native:
        await link.transport.play_speech(frame)
    await link.far_has(len(expected) + sum(map(len, native)))
    assert bytes(link.far.agent_audio) == expected + b"".join(native)
    assert link.far.protocol_errors == []


async def test_clear_drops_buffered_agent_audio(link: Link) -> None:
    link.far.speaker.hold()  # the far end plays nothing: all it has is buffered until a clear
    for frame in speech_frames(25):
        await link.transport.play(frame)
    await link.transport.mark("before-clear")
    await link.transport.clear()
    assert await link.acknowledged() == "before-clear", "a mark whose audio a clear dropped is answered"

    for frame in speech_frames(5):
        await link.transport.play(frame)
    await link.transport.mark("after-clear")
    await link.transport.clear()
    assert await link.acknowledged() == "after-clear"
    assert link.far.clears == 2
    assert link.far.speaker.dropped_s == [pytest.approx(25 * FRAME_MS / 1000), pytest.approx(5 * FRAME_MS / 1000)]
    assert link.far.protocol_errors == []


async def test_a_mark_is_acknowledged_once_played(link: Link) -> None:
    for frame in speech_frames(5):
        await link.transport.play(frame)
    await link.transport.mark("greeting-done")
    assert await link.acknowledged() == "greeting-done"
    assert link.far.marks_echoed == ["greeting-done"]
    assert link.far.protocol_errors == []


async def test_hangup_closes_and_later_sends_raise(link: Link) -> None:
    await link.transport.hangup()
    await asyncio.wait_for(link.far.closed.wait(), WAIT_S)
    assert link.far.closed_by_agent
    for send in every_send(link.transport):
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(send(), WAIT_S)
    await link.transport.hangup()  # again: nothing left to do, nothing raised


async def test_a_closed_far_end_raises_transport_closed_rather_than_hanging(link: Link) -> None:
    await link.far.abort()
    await asyncio.wait_for(link.served.far_gone.wait(), WAIT_S)
    for send in every_send(link.transport):
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(send(), WAIT_S)


async def test_send_transcript_is_harmless_where_unsupported(link: Link) -> None:
    await link.transport.send_transcript("agent", "How can I help?", True)
    frame = native_frames(link.transport, 1)[0]
    await link.transport.play_speech(frame)
    await link.far_has(len(frame))
    assert bytes(link.far.agent_audio) == frame
    assert link.far.protocol_errors == []
    shown = [("agent", "How can I help?", True)] if link.channel.shows_transcript else []
    assert link.channel.shown(link.far) == shown
