"""Assembling a recording: a call's two sides, each 16-bit mono PCM at its own rate, resampled to
`PCM_RATE` and interleaved into one stereo WAV (caller left, agent right) as long as the longer side (a
missing side is silence).

Each side is resampled once, as one stream: so chunk edges leave no trace (resampling each 20 ms
chunk alone would put a 50 Hz buzz 27 dB under the voice), and a restart changes nothing. A short
call's sides are in memory and go in one block; a long one's are read from its working files a
block at a time, so memory stays bounded however long the call.
"""

from __future__ import annotations

import contextlib
import wave
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from streams.audio.codecs import Resampler, resample_pcm16
from streams.audio.formats import PCM_RATE

"""The recordings' sample rate."""
FORMAT = f"wav/pcm_s16le/{PCM_RATE}/stereo"
BLOCK_FRAMES = PCM_RATE * 10
"""Frames interleaved at a time when the WAV is assembled from files (10 s: 640 KB)."""

Runs = Iterable[tuple[int, bytes]]
"""A side held in memory: (first sample, 16-bit PCM) runs in order, a later one overwriting an
earlier one where they overlap."""


class _Direction:
    """One side read back at PCM_RATE, in order, a block at a time (resampled as one stream)."""

    def __init__(self, source: BinaryIO, samples: int, rate: int) -> None:
        self.source = source
        self.resampler = Resampler(rate, PCM_RATE, aligned=True) if rate not in (0, PCM_RATE) else None
        self.frames = samples if self.resampler is None else -(-samples * PCM_RATE // rate)
        self.held = np.zeros(0, dtype="<i2")

    def read(self, count: int) -> np.ndarray:
        """The next `count` samples (fewer at the end)."""
        while self.held.size < count:
            data = self.source.read(2 * BLOCK_FRAMES)
            at_end = not data
            if self.resampler is not None:
                data = self.resampler.flush() if at_end else self.resampler.process(data)
            self.held = np.concatenate([self.held, np.frombuffer(data, dtype="<i2")])
            if at_end:
                break
        taken, self.held = self.held[:count], self.held[count:]
        return taken


def _in_memory(side: Runs, rate: int) -> np.ndarray | None:
    """The side at PCM_RATE: resampled in one go, which is what `_Direction` gives a block at a time."""
    runs = list(side)
    if not runs:
        return None
    if len(runs) == 1 and runs[0][0] == 0:
        data = runs[0][1]
    else:
        buffer = bytearray(2 * max(start + len(pcm) // 2 for start, pcm in runs))
        for start, pcm in runs:
            buffer[2 * start : 2 * start + len(pcm)] = pcm
        data = bytes(buffer)
    if rate not in (0, PCM_RATE):
        data = resample_pcm16(data, rate, PCM_RATE)
    return np.frombuffer(data, dtype="<i2")


@contextlib.contextmanager
def _stereo_wav(path: Path) -> Iterator[wave.Wave_write]:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(PCM_RATE)
        yield wav


def wav_from_memory(path: Path, sides: Sequence[tuple[Runs, int]]) -> int:
    """Writes the WAV of two sides held in memory, each (its runs, its rate), in one block; returns its frames."""
    with _stereo_wav(path) as wav:
        resampled = [_in_memory(runs, rate) for runs, rate in sides]
        frames = max((side.size for side in resampled if side is not None), default=0)
        stereo = np.zeros((frames, 2), dtype="<i2")
        for channel, side in enumerate(resampled):
            if side is not None:
                stereo[: side.size, channel] = side
        wav.writeframes(stereo.tobytes())
    return frames


def wav_from_files(path: Path, sides: Sequence[tuple[Path, int]]) -> int:
    """Writes the WAV of two sides in part files, each (its file, its rate; a file that does not
    exist is silence), a block at a time; returns its frames."""
    with contextlib.ExitStack() as stack:
        wav = stack.enter_context(_stereo_wav(path))
        directions: list[_Direction | None] = []
        for part, rate in sides:
            if part.exists():
                source = stack.enter_context(part.open("rb"))
                directions.append(_Direction(source, part.stat().st_size // 2, rate))
            else:
                directions.append(None)
        frames = max((d.frames for d in directions if d is not None), default=0)
        for first in range(0, frames, BLOCK_FRAMES):
            count = min(BLOCK_FRAMES, frames - first)
            block = np.zeros((count, 2), dtype="<i2")
            for channel, direction in enumerate(directions):
                if direction is not None:
                    samples = direction.read(count)
                    block[: samples.size, channel] = samples
            wav.writeframes(block.tobytes())
    return frames
