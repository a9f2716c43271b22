"""Offline speech synthesis with espeak-ng (the Debian package `espeak-ng`).

Each request runs `espeak-ng --stdout -v VOICE -s WPM` with the text on its standard input (how,
and what may go wrong, is `LocalTts`'s, streams/providers/tts_local.py). espeak-ng writes a WAV
stream (22.05 kHz, 16-bit mono, placeholder sizes) as it synthesises, sentence by sentence; it is
resampled as it arrives to the rate asked for and handed on in chunks of `chunk_ms`, so the first
audio is out before the whole text is spoken.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from streams.audio.codecs import WavChunks
from streams.providers.base import ErrorKind, ProviderError
from streams.providers.tts_local import Deadline, LocalTts

__all__ = ["EspeakTts"]

_READ_SIZE = 8192


class EspeakTts(LocalTts):
    """espeak-ng voices ("en-us", "en-gb", "en-us+f3" ...), 16-bit mono PCM at any sample rate.

    Args:
        binary: the espeak-ng executable (a name on PATH or a path).
        words_per_minute: speaking rate (espeak-ng's -s; its own default is 175).
        chunk_ms: size of the chunks yielded.
        timeout_s: the longest espeak-ng may take for one text (time the consumer spends between
            chunks does not count).
        default_voice: used when the caller passes an empty voice.
    """

    name = "espeak-ng"
    package = "espeak-ng"
    voices = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-./]*")

    def __init__(
        self,
        *,
        binary: str = "espeak-ng",
        words_per_minute: int = 160,
        chunk_ms: int = 100,
        timeout_s: float = 20.0,
        default_voice: str = "en-us",
    ) -> None:
        if not 80 <= words_per_minute <= 500:
            raise ValueError(f"words_per_minute must be within 80..500, got {words_per_minute}")
        super().__init__(binary=binary, chunk_ms=chunk_ms, timeout_s=timeout_s, default_voice=default_voice)
        self.words_per_minute = words_per_minute

    async def _pcm(self, text: str, voice: str, sample_rate: int, deadline: Deadline) -> AsyncIterator[bytes]:
        wav = WavChunks(sample_rate)
        received = 0
        args = ["--stdout", "-v", voice, "-s", str(self.words_per_minute)]
        async with self._running(args, text, deadline, stdout=True) as program:
            while data := await program.read(_READ_SIZE):
                received += len(data)
                yield wav.feed(data)
            await program.exited()
        if wav.header is None:
            raise ProviderError(self.name, ErrorKind.BAD_OUTPUT if received else ErrorKind.EMPTY_OUTPUT,
                                "espeak-ng wrote no WAV")
        yield wav.end()
