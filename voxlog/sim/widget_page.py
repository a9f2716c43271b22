"""A test page that behaves as the widget's script (`gateway/static/voxlog-widget.js`) does towards a
running gateway: it opens `/widget/ws` with its key, plays the agent's 16 kHz PCM as it arrives,
answers each mark when the audio before it has played (at once for the marks a clear dropped),
keeps the transcript, speaks into the microphone (`send_pcm16`), and can close or drop the connection."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from streams.audio.formats import FRAME_MS, PCM_FRAME_BYTES
from streams.channels.widget_protocol import mark_message
from voxlog.sim.media_peer import MediaPeer

PCM_BYTES_PER_S = 32_000
"""16 kHz, 16-bit, mono."""


@dataclass
class WidgetPage(MediaPeer):
    """One widget call against the socket at `url` (ws://127.0.0.1:PORT/widget/ws).

    `realtime_playback` False answers marks as soon as they arrive."""

    url: str
    key: str = "demo-widget-key"
    page: str = "http://127.0.0.1/page-with-the-widget"
    realtime_playback: bool = True
    transcript: list[tuple[str, str, bool]] = field(default_factory=list)
    """(speaker, text, final) as the page shows them."""

    def __post_init__(self) -> None:
        self._init_peer(realtime_playback=self.realtime_playback)

    async def connect(self) -> None:
        """Opens the socket and says which widget this is."""
        await self._open(self.url, {"User-Agent": "voxlog-widget-page/1.0"})
        await self._send_text(json.dumps({"type": "start", "key": self.key, "page": self.page}))

    async def _on_message(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            if len(raw) % 2:
                self.protocol_errors.append(f"audio frame of {len(raw)} bytes is not 16-bit PCM")
            self._hear(raw, len(raw) / PCM_BYTES_PER_S)
            return
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            self.protocol_errors.append(f"not a control message: {raw[:120]!r}")
            return
        if kind == "transcript":
            self.transcript.append((message["speaker"], message["text"], message["final"]))
        elif kind == "mark":
            self.speaker.mark(message["name"])
        elif kind == "clear":
            self._clear()
        elif kind not in ("started", "end", "error", "busy"):  # the page only shows these
            self.protocol_errors.append(f"unknown control message {kind!r}")

    async def _send_mark(self, name: str) -> None:
        await self._send_text(mark_message(name))

    async def send_pcm16(self, pcm: bytes, *, realtime: bool = True) -> int:
        """The microphone: 16 kHz PCM in 20 ms frames (the last padded with silence), paced in real time
        unless `realtime` is False, as the script sends it; returns the number of frames."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        step = PCM_FRAME_BYTES
        frames = [pcm[i : i + step].ljust(step, b"\0") for i in range(0, len(pcm), step)]
        for index, frame in enumerate(frames):
            if realtime:
                await asyncio.sleep(max(0.0, started + index * FRAME_MS / 1000 - loop.time()))
            await self._send_text(frame)
        return len(frames)
