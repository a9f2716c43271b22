"""Speech synthesis served by a chain of providers (ElevenLabs, then PlayHT, then espeak-ng, say).

With fallbacks, a reply is synthesized sentence by sentence, so a provider that fails midway costs
at most the sentence it was speaking: the next provider of the chain (past open circuits and spent
rate limits, as `ProviderChain.run` goes) says that sentence again from its start, and the rest of
the reply. A provider that stalls mid-stream is given up after `stall_s`, so it does not stall the
call. The next sentence's request is opened while one is playing, so sentences follow each other
without waiting for a first byte. The reply stays with the provider that took over.

Who is speaking and what failed are on the `Speech` (`TtsProvider.speak`), which the session
records as events once the speech is over (where every voice failed, its chunks end with
`ChainExhausted`, whose report is the speech's). Every provider speaks with its own voice: the agent's
`tts.voice` for the first, each fallback's `voice` for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from streams.audio.formats import PCM_RATE
from streams.providers.base import (
    ErrorKind,
    ProviderError,
    Speech,
    SpeechCodec,
    TtsCapabilities,
    TtsProvider,
    close_chunks,
)
from streams.providers.resilience import ChainExhausted, Guarded, Handover, ProviderChain

STALL_TIMEOUT_S = 2.5
"""The longest wait for the next chunk once audio has begun (the cloud adapters' own stall timeouts
are shorter, so they report a stall first, with their own words)."""
MIN_SENTENCE_CHARS = 24
"""Shorter sentences go with the next one: a request per "Sure." is not worth its first byte."""

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+(?=\S)")


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence's end, short ones joined to the next; joined with spaces, the
    parts give back the text's words in order."""
    parts: list[str] = []
    pending = ""
    start = 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start:match.start() + len(match.group(0).rstrip())]
        start = match.end()
        pending = f"{pending} {piece}" if pending else piece
        if len(pending) >= MIN_SENTENCE_CHARS:
            parts.append(pending.strip())
            pending = ""
    rest = text[start:]
    pending = f"{pending} {rest}" if pending else rest
    if pending.strip():
        parts.append(pending.strip())
    return parts


@dataclass(frozen=True)
class _Format:
    codec: SpeechCodec
    rate: int


Opened = tuple[bytes, AsyncIterator[bytes]]
"""A sentence's first chunk, and the rest of its chunks."""


class ChainTts(TtsProvider):
    capabilities = TtsCapabilities(codecs=("pcm_s16le", "mulaw"))
    """(Each member makes mu-law its own way.)"""

    def __init__(self, chain: ProviderChain[TtsProvider], voices: Sequence[str],
                 stall_s: float = STALL_TIMEOUT_S) -> None:
        """`voices[i]`: the voice of `chain.members[i]` where it is not the first (the first speaks
        with the voice asked for)."""
        if len(voices) != len(chain.members):
            raise ValueError("a voice per member of the chain")
        self.chain = chain
        self.voices = tuple(voices)
        self.stall_s = stall_s
        self.name = chain.primary.name

    def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        return self.speak(text, voice=voice, sample_rate=sample_rate).chunks

    def _synthesize_mulaw(self, text: str, voice: str) -> AsyncIterator[bytes]:
        return self.speak(text, voice=voice, codec="mulaw").chunks

    def speak(self, text: str, *, voice: str, sample_rate: int = PCM_RATE, codec: SpeechCodec = "pcm_s16le") -> Speech:
        """Every member speaks in `codec` (at `sample_rate`, for PCM), so that a switch midway does
        not change what the listener gets."""
        speech = Speech(_nothing(), self.name)
        speech.chunks = self._chunks(text, voice, _Format(codec, sample_rate), speech)
        return speech

    async def _chunks(self, text: str, voice: str, fmt: _Format, speech: Speech) -> AsyncIterator[bytes]:
        parts = sentences(text) if len(self.chain.members) > 1 else [text]
        index = 0
        ahead: asyncio.Task[tuple[Opened, Guarded[TtsProvider]]] | None = None
        try:
            for number, part in enumerate(parts):
                failed: Handover | None = None
                while True:
                    if ahead is not None and failed is None:
                        opening, ahead = ahead, None
                        (first, rest), member = await opening
                    else:
                        (first, rest), member = await self._open(part, voice, fmt, speech, index, failed)
                    index = self.chain.index(member)
                    speech.provider = member.name
                    speech.voice = self._voice_of(member, voice)
                    if number + 1 < len(parts) and ahead is None:
                        ahead = asyncio.create_task(
                            self._open(parts[number + 1], voice, fmt, speech, index, None))
                    try:
                        yield first
                        while True:
                            try:
                                async with asyncio.timeout(self.stall_s):  # (no task per chunk)
                                    chunk = await anext(rest)
                            except StopAsyncIteration:
                                break
                            except TimeoutError:
                                raise ProviderError(member.name, ErrorKind.TIMEOUT,
                                                    f"the audio stalled: nothing for {self.stall_s:g} s",
                                                    retryable=True) from None
                            yield chunk
                    except ProviderError as exc:
                        failed = self.chain.failed(member, exc, speech.report)
                        index += 1
                        await _cancelled(ahead)  # it was opened with the provider that failed
                        ahead = None
                        continue
                    finally:
                        await close_chunks(rest)
                    member.breaker.succeeded()
                    break
        finally:
            await _cancelled(ahead)

    def _voice_of(self, member: Guarded[TtsProvider], asked: str) -> str:
        return asked if member is self.chain.primary else self.voices[self.chain.index(member)]

    async def _open(self, text: str, voice: str, fmt: _Format, speech: Speech, start: int,
                    failed: Handover | None) -> tuple[Opened, Guarded[TtsProvider]]:
        """The first member from `start` whose speech of `text` begins (its first chunk in time)."""
        async def first_chunk(member: Guarded[TtsProvider]) -> Opened:
            chunks = member.provider.synthesize(text, voice=self._voice_of(member, voice), sample_rate=fmt.rate,
                                                codec=fmt.codec)
            try:
                return await anext(chunks), chunks
            except StopAsyncIteration:
                return b"", chunks
            except BaseException:
                await close_chunks(chunks)
                raise

        if start >= len(self.chain.members):
            raise ChainExhausted(self.chain.capability, speech.report)
        opened, member, _ = await self.chain.run(first_chunk, start=start, failed=failed, report=speech.report)
        return opened, member


async def _cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancels an opening made ahead, closing the stream it may have opened."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        (_, rest), _ = await task
        await close_chunks(rest)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator with nothing in it
