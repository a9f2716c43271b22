"""What one audio event is: a chunk of up to `CHUNK_FRAMES` consecutive 20 ms frames of one direction.

A channel delivers 20 ms frames, and the first design wrote each as an `audio.*_chunk` event: 50
events a second per direction per call, each encoded, sealed, numbered and appended. At 200 calls
that was 10,000 caller events a second and most of the gateway's CPU (issue 17's profile). Writing
five frames (100 ms) as one event cuts that per-event work five-fold and keeps every frame heard or
played in the log; what it costs is that a gateway that dies loses the frames it holds, at most
`CHUNK_FRAMES - 1` per direction (80 ms), and that a chunk's seq comes after the events (VAD,
interim transcripts) decided while its frames were gathered. Its `offset_ms` still places it
exactly, and its `event_time_us` is when its first frame was heard or played.

Recording, playing and hearing are untouched: every frame still goes to the VAD, the recogniser
and the caller the moment it arrives; only the writing to the log is gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from streams.audio.formats import FRAME_MS

CHUNK_FRAMES = 5
"""Frames in one audio chunk event (100 ms)."""


@dataclass(frozen=True)
class GatheredChunk:
    """Consecutive frames of one format, ready to be written as one audio chunk event."""

    index: int
    """The chunk's index among those written for its direction, from 0."""
    offset_ms: int
    """Where its first frame is in its direction's audio."""
    duration_ms: int
    audio: bytes
    codec: str
    sample_rate: int
    first_at_us: int
    """When its first frame was heard or played."""


class FrameChunker:
    """Gathers one direction's frames into chunks: `add` answers a chunk when one is full (or when a
    frame of another format, or not next to the last, starts a new one); `take` answers what is
    held (the end of a speech, of the kept audio, or of the call)."""

    def __init__(self, clock_us: Callable[[], int], frames: int = CHUNK_FRAMES) -> None:
        self._clock_us = clock_us
        """Read once a chunk, for its first frame (`first_at_us`), not once a frame."""
        self._limit = frames
        self._frames: list[bytes] = []
        self._format = ("", 0)
        self._offset_ms = 0
        self._first_at_us = 0
        self.written = 0
        """Chunks answered so far: the next chunk's index."""

    def add(self, frame: bytes, codec: str, sample_rate: int, offset_ms: int) -> GatheredChunk | None:
        broken = self._frames and ((codec, sample_rate) != self._format
                                   or offset_ms != self._offset_ms + len(self._frames) * FRAME_MS)
        ready = self.take() if broken else None
        if not self._frames:
            self._format, self._offset_ms, self._first_at_us = (codec, sample_rate), offset_ms, self._clock_us()
        self._frames.append(frame)
        if ready is None and len(self._frames) >= self._limit:
            ready = self.take()
        return ready

    def take(self) -> GatheredChunk | None:
        if not self._frames:
            return None
        frames, self._frames = self._frames, []
        codec, rate = self._format
        self.written += 1
        return GatheredChunk(index=self.written - 1, offset_ms=self._offset_ms, duration_ms=len(frames) * FRAME_MS,
                             audio=b"".join(frames), codec=codec, sample_rate=rate, first_at_us=self._first_at_us)

    def drop(self) -> None:
        """Forgets what is held (the caller's audio may no longer be kept)."""
        self._frames = []
