"""Offline speech synthesis with flite (the Debian package `flite`: CMU's Festival-Lite, under a
BSD-like licence from Carnegie Mellon University).

Each sentence runs `flite -voice VOICE -f /dev/stdin -o FILE` with its text on flite's standard input,
as `LocalTts` runs a program (streams/providers/tts_local.py). flite cannot write its WAV to a pipe (it
writes the header, then seeks back to fill in the sizes), so it writes a file in a private temporary
folder, removed when the speech ends however it ends; the file is read, resampled from the rate its
header gives (16 kHz for slt, 8 kHz for kal) to the rate asked for, and handed on in chunks of
`chunk_ms`. Sentence by sentence, so the first audio is out before the rest of the text is spoken
(what falls short of a whole chunk at a sentence's end goes out with the next sentence's audio).
The default voice, slt, was measured intelligible through an 8 kHz mu-law phone line.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from streams.audio.codecs import read_wav, resample_pcm16
from streams.providers.base import ErrorKind, ProviderError
from streams.providers.tts_local import Deadline, LocalTts

__all__ = ["FliteTts", "sentences"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# flite says this, speaks with its default voice instead, and exits 0.
_VOICE_NOT_LOADED = "Error load voice"


def sentences(text: str) -> list[str]:
    """`text` cut after each . ! or ? that whitespace follows, blank pieces left out."""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece.strip()]


class FliteTts(LocalTts):
    """flite voices (slt, kal, kal16, awb, awb_time, rms, or the absolute path of a .flitevox file),
    16-bit mono PCM at any sample rate.

    Args:
        binary: the flite executable (a name on PATH or a path).
        chunk_ms: size of the chunks yielded.
        timeout_s: the longest flite may take for one text (time the consumer spends between chunks
            does not count).
        default_voice: used when the caller passes an empty voice.
    """

    name = "flite"
    package = "flite"
    voices = re.compile(r"kal|kal16|awb|awb_time|rms|slt|/[A-Za-z0-9_+\-./]*\.flitevox")

    def __init__(
        self, *, binary: str = "flite", chunk_ms: int = 100, timeout_s: float = 20.0, default_voice: str = "slt"
    ) -> None:
        super().__init__(binary=binary, chunk_ms=chunk_ms, timeout_s=timeout_s, default_voice=default_voice)

    async def _pcm(self, text: str, voice: str, sample_rate: int, deadline: Deadline) -> AsyncIterator[bytes]:
        with tempfile.TemporaryDirectory(prefix="voxlog-flite-") as folder:
            for index, sentence in enumerate(sentences(text)):
                wav = Path(folder) / f"{index}.wav"
                async with self._running(["-voice", voice, "-f", "/dev/stdin", "-o", str(wav)], sentence,
                                         deadline) as program:
                    stderr = await program.exited()
                if _VOICE_NOT_LOADED in stderr:
                    raise ProviderError(self.name, ErrorKind.FAILED, stderr.splitlines()[-1])
                yield self._speech(wav, sample_rate)

    def _speech(self, wav: Path, sample_rate: int) -> bytes:
        """The WAV flite wrote, at `sample_rate`; the file is removed."""
        if not wav.exists() or wav.stat().st_size == 0:
            raise ProviderError(self.name, ErrorKind.EMPTY_OUTPUT, "flite wrote no WAV")
        pcm, rate = read_wav(wav)
        wav.unlink()
        return resample_pcm16(pcm, rate, sample_rate)
