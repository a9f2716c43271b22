"""Providers with scripted timelines, for benchmarks: they answer after set delays, so what a
measurement finds beyond those delays is what voxlog itself adds. Named as what they are."""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from streams.config.agents import AgentSpec
from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    ErrorKind,
    LlmCapabilities,
    LlmProvider,
    LlmRequest,
    LlmResult,
    ProviderError,
    Recognition,
    TtsProvider,
)
from streams.providers.llm_scripted import ScriptedLlm


@dataclass(frozen=True)
class Timeline:
    asr_final_ms: int = 150
    """From the end of an utterance to its final transcript."""
    llm_ms: int = 300
    """From request to the whole decision."""
    tts_first_byte_ms: int = 120
    """From request to the first audio."""
    speech_ms_per_word: int = 250


ScriptedFailure = Literal["stall", "error"]
SCRIPTED_ERROR_AFTER_MS = 20
"""How soon a scripted `error` comes (a refused request: a 500 after a round trip)."""


async def scripted_failure(provider: str, failure: ScriptedFailure | None) -> None:
    """Where a provider scripted to fail fails: `stall` never returns (a provider that hangs, which
    only a timeout ends), `error` raises a 500 after a round trip; no failure returns at once."""
    if failure == "stall":
        await asyncio.Event().wait()
    if failure == "error":
        await asyncio.sleep(SCRIPTED_ERROR_AFTER_MS / 1000)
        raise ProviderError(provider, ErrorKind.SERVER, "scripted 500 Internal Server Error", retryable=True)


class TimelineAsrStream(AsrStream):
    def __init__(self, asr: TimelineAsr) -> None:
        super().__init__(asr.name)
        self.asr = asr
        self.start_ms = 0

    async def _accept(self, pcm: bytes) -> Recognition | None:
        return None

    async def _end_utterance(self) -> Recognition:
        await scripted_failure(self.asr.name, self.asr.failure)
        await asyncio.sleep(self.asr.timeline.asr_final_ms / 1000)
        text = self.asr.lines.popleft() if self.asr.lines else ""
        result = Recognition(text=text, is_final=True, confidence=1.0, start_ms=self.start_ms, end_ms=self.fed_ms)
        self.start_ms = self.fed_ms
        return result

    async def _close(self) -> None:
        pass


class TimelineAsr(AsrProvider):
    """Recognises each utterance as the next of `lines`, after the timeline's delay; or, with
    `failure`, stalls or errs at each utterance's end. Its streams take from one queue of lines,
    which a chain's members may share (`lines` a deque): an utterance is heard once, whoever hears it."""

    model = "scripted-lines"
    capabilities = AsrCapabilities(interim_results=False)

    def __init__(self, timeline: Timeline, lines: Sequence[str], *, name: str = "timeline-asr",
                 failure: ScriptedFailure | None = None) -> None:
        self.timeline = timeline
        self.lines = lines if isinstance(lines, deque) else deque(lines)
        self.name = name
        self.failure = failure

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> AsrStream:
        return TimelineAsrStream(self)


class TimelineLlm(LlmProvider):
    """The agent's scripted policy, answering after the timeline's delay; or, with `failure`, never
    answering (`stall`: a provider that hangs) or failing at once (`error`: a 500)."""

    capabilities = LlmCapabilities(prompted=False)

    def __init__(self, timeline: Timeline, agent: AgentSpec, *, name: str = "timeline-llm",
                 failure: ScriptedFailure | None = None) -> None:
        self.timeline = timeline
        self.policy = ScriptedLlm(agent)
        self.name = name
        self.failure = failure

    async def _complete(self, request: LlmRequest) -> LlmResult:
        await scripted_failure(self.name, self.failure)
        await asyncio.sleep(self.timeline.llm_ms / 1000)
        return await self.policy.complete(request)


class TimelineTts(TtsProvider):
    """A 220 Hz tone as long as the text would take to say, after the first-byte delay; or, with
    `failure`, a stall or an error before the first byte."""

    def __init__(self, timeline: Timeline, *, name: str = "timeline-tts",
                 failure: ScriptedFailure | None = None) -> None:
        self.timeline = timeline
        self.name = name
        self.failure = failure

    async def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        await scripted_failure(self.name, self.failure)
        await asyncio.sleep(self.timeline.tts_first_byte_ms / 1000)
        samples = sample_rate * self.timeline.speech_ms_per_word * max(1, len(text.split())) // 1000
        chunk = sample_rate // 10
        tone = _tone(samples, sample_rate)
        for start in range(0, samples, chunk):
            yield tone[2 * start : 2 * min(samples, start + chunk)]


@functools.lru_cache(maxsize=64)
def _tone(samples: int, sample_rate: int) -> bytes:
    """Made once per length: a benchmark's voice must cost the gateway what a network voice does, next to nothing."""
    return (6000 * np.sin(2 * np.pi * 220 * np.arange(samples) / sample_rate)).astype("<i2").tobytes()
