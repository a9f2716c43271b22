"""The far end of a call's media WebSocket, as the stand-ins play it (`twilio_caller` for Twilio's
network, `widget_page` for the widget's script): the socket's life (open, read until it closes,
close or drop), the agent's audio played by a `Speaker`, and waits for what arrives. Each subclass
speaks its channel's protocol."""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from voxlog.sim.speaker import Speaker


class MediaPeer(ABC):
    def _init_peer(self, *, realtime_playback: bool) -> None:
        """The peer's state; called once from the subclass's constructor."""
        self.agent_audio = bytearray()
        """The agent's audio as received, in the channel's format."""
        self.marks_echoed: list[str] = []
        self.protocol_errors: list[str] = []
        """What the agent sent that the channel's protocol does not allow."""
        self.clears = 0
        self.heard_at_clear = 0
        """How much of the agent's audio had arrived at its last `clear`: what follows is newer speech."""
        self.close_code: int | None = None
        self.closed_by_agent = False
        self.closed = asyncio.Event()
        self.speaker = Speaker(self._acknowledge_mark, realtime=realtime_playback)
        self._ws: ClientConnection | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._opened_at = 0.0
        self._closing = False

    # ------------------------------------------------------------------ the channel's protocol

    @abstractmethod
    async def _on_message(self, raw: str | bytes) -> None:
        """One message from the agent."""

    @abstractmethod
    async def _send_mark(self, name: str) -> None:
        """Tells the agent that playback reached its mark `name`."""

    # ------------------------------------------------------------------ the socket

    async def _open(self, url: str, headers: Mapping[str, str]) -> None:
        self._ws = await connect(url, additional_headers=dict(headers), compression=None, max_size=2**20)
        self._opened_at = time.monotonic()
        self._receiver = asyncio.create_task(self._receive_loop())
        self._player = asyncio.create_task(self.speaker.run())

    @property
    def opened_at(self) -> float:
        """`time.monotonic()` when the WebSocket opened."""
        return self._opened_at

    async def _send_text(self, data: str | bytes) -> None:
        if self._ws is None:
            raise RuntimeError("not connected")
        await self._ws.send(data)

    async def _receive_loop(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                await self._on_message(raw)
                await self._notify()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            self.closed_by_agent = not self._closing
            self.closed.set()
            await self._notify()

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        await self._finish()

    async def abort(self) -> None:
        """Drops the TCP connection without a closing handshake (network loss, a crash)."""
        self._closing = True
        if self._ws is not None:
            self._ws.transport.abort()
        await self._finish()

    async def _finish(self) -> None:
        for task in (self._receiver, self._player):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.closed.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._finish()
        if self._ws is not None:
            self._ws.transport.abort()

    # ------------------------------------------------------------------ what the agent sends

    def _hear(self, audio: bytes, seconds: float) -> None:
        self.agent_audio += audio
        self.speaker.queue(seconds)

    def _clear(self) -> None:
        self.clears += 1
        self.heard_at_clear = len(self.agent_audio)
        self.speaker.clear()

    async def _acknowledge_mark(self, name: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send_mark(name)
            self.marks_echoed.append(name)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ waiting

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Waits until `predicate()` holds (checked whenever something arrives)."""

        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(check(), timeout_s)

    async def agent_quiet(self, quiet_s: float = 1.2, timeout_s: float = 30.0, *, beyond: int = 0) -> bool:
        """Waits until the agent has said more than `beyond` bytes in all (its answer to what the caller
        said when it had said `beyond`: however long the answer takes to begin) and then been silent for
        `quiet_s` (or the call closed, or the timeout passed). Returns whether it said that much."""
        deadline = time.monotonic() + timeout_s
        heard, since = len(self.agent_audio), time.monotonic()
        while time.monotonic() < deadline and not self.closed.is_set():
            await asyncio.sleep(0.05)
            if len(self.agent_audio) != heard:
                heard, since = len(self.agent_audio), time.monotonic()
            elif heard > beyond and time.monotonic() - since >= quiet_s:
                break
        return heard > beyond

    async def agent_speaks_beyond(self, heard: int, timeout_s: float = 30.0) -> bool:
        """Waits for the agent's audio to grow past `heard` bytes (an answer that may be slow in
        coming, a fallback's), the call's end or the timeout; returns whether it grew."""
        for _ in range(int(timeout_s / 0.02)):
            if len(self.agent_audio) != heard or self.closed.is_set():
                break
            await asyncio.sleep(0.02)
        return len(self.agent_audio) > heard
