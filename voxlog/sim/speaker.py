"""The loudspeaker at the far end of a simulated call: how a carrier or a browser plays the agent's
audio, for the stand-ins that play them (`twilio_caller`, `widget_page`).

Audio plays in real time as it arrives (or at once, `realtime` False); a mark is acknowledged when
the audio queued before it has played; a clear drops what has not played and acknowledges the marks
still waiting at once, as Twilio does. `hold()` stops playback, so that a test knows exactly what a
clear drops: everything that came since.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable


class Speaker:
    def __init__(self, acknowledge: Callable[[str], Awaitable[None]], *, realtime: bool = True) -> None:
        self._acknowledge = acknowledge
        self._realtime = realtime
        self._held = False
        self._unplayed_s = 0.0  # audio queued and not yet played, as of `_as_of`
        self._as_of = 0.0
        self._marks: deque[tuple[float | None, str]] = deque()  # (when due, name); None: when a clear comes
        self._changed = asyncio.Event()
        self.dropped_s: list[float] = []
        """Seconds of audio each clear dropped unplayed."""

    def _advance(self) -> float:
        now = time.monotonic()
        if not self._held:
            self._unplayed_s = max(0.0, self._unplayed_s - (now - self._as_of)) if self._realtime else 0.0
        self._as_of = now
        return now

    def hold(self) -> None:
        """Stops playing: what arrives from now on waits, with the marks behind it, until a clear."""
        self._advance()
        self._held = True

    def queue(self, seconds: float) -> None:
        """Audio arrived: `seconds` of it."""
        self._advance()
        self._unplayed_s += seconds

    def mark(self, name: str) -> None:
        now = self._advance()
        self._marks.append((None if self._held else now + self._unplayed_s, name))
        self._changed.set()

    def clear(self) -> None:
        now = self._advance()
        self.dropped_s.append(self._unplayed_s)
        self._unplayed_s = 0.0
        self._marks = deque((now, name) for _, name in self._marks)
        self._changed.set()

    async def run(self) -> None:
        """Acknowledges each mark in order when it is due; runs until cancelled."""
        while True:
            due = self._marks[0][0] if self._marks else None
            if due is None or due > time.monotonic():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if due is None else due - time.monotonic())
                continue
            _, name = self._marks.popleft()
            await self._acknowledge(name)
