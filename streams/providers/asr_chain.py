"""Speech recognition served by a chain of providers (Deepgram, then Whisper, then pocketsphinx, say).

A recognition stream lives as long as the call, so a provider can fail in the middle of it: its
socket drops, or it stalls and no final result comes. The chain's stream keeps the audio of the
utterance in progress; when its provider fails, the next provider of the chain (past open circuits
and spent rate limits, as `ProviderChain.run` goes) opens a stream, hears that audio again and
gives the utterance's result, so the caller's turn is recognised within its turn. After each
result the chain reconnects to the first provider in the background, once its circuit lets a
request through (a socket that dropped once should not leave the rest of a long call with a slower
recogniser), and moves to it at the next frame, with the audio heard since; until then the call
stays with the one that took over.

Every final result says who recognised it and what failed since the previous one
(`Recognition.provider`, `report`), which the session records as events. Where every provider failed,
the utterance's `end_utterance` raises `ChainExhausted` with that report; the next utterance starts
again from the top of the chain, whose circuits may have closed by then. So the session hears of
failures only from `end_utterance`: opening and taking frames never raise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import replace

from streams.audio.formats import PCM_BYTES_PER_MS
from streams.providers.base import (
    AsrProvider,
    AsrStream,
    ChainReport,
    ErrorKind,
    ProviderError,
    Recognition,
    RecognizedWord,
)
from streams.providers.resilience import ChainExhausted, Guarded, Handover, ProviderChain

MAX_REPLAYED_MS = 60_000
"""The most of an utterance a fallback hears again (an utterance is rarely longer)."""


class ChainAsr(AsrProvider):
    def __init__(self, chain: ProviderChain[AsrProvider]) -> None:
        self.chain = chain
        self.name = chain.primary.name
        self.model = chain.primary.model or chain.primary.provider.model
        self.capabilities = chain.primary.provider.capabilities

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> AsrStream:
        """A stream, even when no recogniser answers yet (the machine busy starting many calls' recognisers,
        the providers away): it keeps the audio, and the end of the first utterance tries the chain again;
        what failed meanwhile comes with that utterance's result, or its ChainExhausted."""
        stream = ChainAsrStream(self.chain, keywords, language)
        with contextlib.suppress(ChainExhausted):
            await stream.start()
        return stream


class ChainAsrStream(AsrStream):
    def __init__(self, chain: ProviderChain[AsrProvider], keywords: tuple[str, ...], language: str) -> None:
        super().__init__(chain.primary.name)
        self.chain = chain
        self.keywords = keywords
        self.language = language
        self._member: Guarded[AsrProvider] | None = None
        self._stream: AsrStream | None = None
        self._utterance: deque[bytes] = deque()
        """The audio since the last final result, for a fallback to hear again."""
        self._utterance_bytes = 0
        self._origin_ms = 0
        """Where the serving stream's audio began, in the chain stream's audio: its times are shifted by it."""
        self._report = ChainReport()
        """What failed since the last final result."""
        self._returning: asyncio.Task[AsrStream] | None = None
        """The first provider's stream being opened again, after a fallback."""

    async def start(self) -> None:
        """Opens the first provider that answers; ChainExhausted when none does (yet)."""
        await self._take_over(start=0, failed=None)

    async def _accept(self, pcm: bytes) -> Recognition | None:
        self._keep(pcm)
        if self._returning is not None and self._returning.done():
            opening, self._returning = self._returning, None
            if await self._back_to_primary(opening):
                return None  # (this frame went to the first provider with the audio before it)
        if self._stream is None:
            return None  # every provider failed during this utterance: its end tries the chain again
        assert self._member is not None
        try:
            # asyncio.timeout, not wait_for: this is every 20 ms frame, and wait_for makes a task of each.
            async with asyncio.timeout(self._member.attempt_timeout_s):
                result = await self._stream.accept(pcm)
        except (ProviderError, TimeoutError) as exc:
            await self._hand_over(self._member, _as_provider_error(self._member, exc))
            return None
        return None if result is None else self._ours(result, self._member)

    async def _end_utterance(self) -> Recognition:
        try:
            return await self._final()
        except ChainExhausted:
            self._forget_utterance()  # reported lost; the next utterance must not carry it
            raise

    async def _final(self) -> Recognition:
        member = self._member
        if self._stream is None or member is None:
            await self._take_over(start=0, failed=None)
            return await self._final()
        try:
            async with asyncio.timeout(member.attempt_timeout_s):
                result = await self._stream.end_utterance()
        except (ProviderError, TimeoutError) as exc:
            await self._hand_over(member, _as_provider_error(member, exc))
            return await self._final()
        member.breaker.succeeded()
        recognition = self._ours(result, member, final=True)
        self._forget_utterance()
        self._report = ChainReport()
        primary = self.chain.primary
        if member is not primary and self._returning is None and primary.breaker.allow(self.chain.clock()):
            self._returning = asyncio.create_task(self._reopen(primary))
        return recognition

    async def _reopen(self, primary: Guarded[AsrProvider]) -> AsrStream:
        # (the opening made here, not before the task: a task cancelled before it runs never awaits it)
        opening = primary.provider.open_stream(keywords=self.keywords, language=self.language)
        return await asyncio.wait_for(opening, primary.attempt_timeout_s)

    async def _back_to_primary(self, opening: asyncio.Task[AsrStream]) -> bool:
        """Whether the first provider's stream, opened again, took over (with the audio since the last
        result); where it could not, that is reported with the next result."""
        primary = self.chain.primary
        stream: AsrStream | None = None
        try:
            stream = opening.result()
            for earlier in self._utterance:
                async with asyncio.timeout(primary.attempt_timeout_s):
                    await stream.accept(earlier)
        except (ProviderError, TimeoutError) as exc:
            self.chain.failed(primary, _as_provider_error(primary, exc), self._report)
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
            return False
        primary.breaker.succeeded()  # (a half-open circuit's probe, answered)
        await self._drop_stream()
        self._stream, self._member = stream, primary
        self._origin_ms = self.fed_ms - self._utterance_bytes // PCM_BYTES_PER_MS
        return True

    def _forget_utterance(self) -> None:
        self._utterance.clear()
        self._utterance_bytes = 0

    async def _close(self) -> None:
        if self._returning is not None:
            self._returning.cancel()
            with contextlib.suppress(BaseException):
                await (await self._returning).close()
        await self._drop_stream()

    def _keep(self, pcm: bytes) -> None:
        self._utterance.append(pcm)
        self._utterance_bytes += len(pcm)
        while self._utterance_bytes > MAX_REPLAYED_MS * PCM_BYTES_PER_MS and len(self._utterance) > 1:
            self._utterance_bytes -= len(self._utterance.popleft())

    async def _hand_over(self, member: Guarded[AsrProvider], error: ProviderError) -> None:
        """The serving provider failed midway: the next ones, from the one after it."""
        failed = self.chain.failed(member, error, self._report)
        await self._drop_stream()
        await self._take_over(start=self.chain.index(member) + 1, failed=failed)

    async def _take_over(self, *, start: int, failed: Handover | None) -> None:
        """Opens the first member from `start` that answers, and has it hear the utterance so far.
        Where none does, the stream has no provider until the utterance ends, and the report of what
        failed goes with ChainExhausted."""
        replayed = list(self._utterance)

        async def open_and_replay(member: Guarded[AsrProvider]) -> AsrStream:
            stream = await member.provider.open_stream(keywords=self.keywords, language=self.language)
            try:
                for pcm in replayed:
                    await stream.accept(pcm)
            except BaseException:
                with contextlib.suppress(Exception):
                    await stream.close()
                raise
            return stream

        try:
            stream, member, _ = await self.chain.run(open_and_replay, start=start, failed=failed, report=self._report)
        except ChainExhausted:
            self._member = None
            if start == 0 and not self.fed_ms:  # opening: the failures wait for the first utterance's end
                raise
            report, self._report = self._report, ChainReport()
            raise ChainExhausted(self.chain.capability, report) from None
        self._stream, self._member = stream, member
        self._origin_ms = self.fed_ms - sum(len(pcm) for pcm in replayed) // PCM_BYTES_PER_MS

    async def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.close()

    def _ours(self, result: Recognition, member: Guarded[AsrProvider], *, final: bool = False) -> Recognition:
        """The member's result in the chain stream's time, saying who gave it (and, final, what failed)."""
        shift = self._origin_ms
        return replace(
            result,
            start_ms=result.start_ms + shift,
            end_ms=result.end_ms + shift,
            words=tuple(RecognizedWord(w.word, w.start_ms + shift, w.end_ms + shift, w.confidence)
                        for w in result.words),
            provider=result.provider or member.name,
            model=result.model or member.model or member.provider.model,
            report=self._report if final else ChainReport(),
        )


def _as_provider_error(member: Guarded[AsrProvider], exc: BaseException) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    return ProviderError(member.name, ErrorKind.TIMEOUT, f"no answer within {member.attempt_timeout_s:g} s",
                         retryable=True)
