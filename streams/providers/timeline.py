"""Providers with scripted timelines, for benchmarks: they answer after set delays, so what a
measurement finds beyond those delays is what voxlog itself adds. Named as what they are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from streams.agents import AgentSpec
from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    LlmProvider,
    LlmRequest,
    LlmResult,
    ProviderError,
    Recognition,
    TtsCapabilities,
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


class TimelineAsrStream(AsrStream):
    def __init__(self, timeline: Timeline, lines: Sequence[str]) -> None:
        self.timeline = timeline
        self.lines = list(lines)
        self.heard_ms = 0
        self.start_ms = 0

    async def accept(self, pcm: bytes) -> Recognition | None:
        self.heard_ms += len(pcm) // 32
        return None

    async def end_utterance(self) -> Recognition:
        await asyncio.sleep(self.timeline.asr_final_ms / 1000)
        text = self.lines.pop(0) if self.lines else ""
        result = Recognition(text=text, is_final=True, confidence=1.0, start_ms=self.start_ms, end_ms=self.heard_ms)
        self.start_ms = self.heard_ms
        return result

    async def close(self) -> None:
        pass


class TimelineAsr(AsrProvider):
    name = "timeline-asr"
    model = "scripted-lines"
    capabilities = AsrCapabilities(streaming=True, interim_results=False, word_timings=False)

    def __init__(self, timeline: Timeline, lines: Sequence[str]) -> None:
        self.timeline = timeline
        self.lines = lines

    async def open_stream(self, *, keywords: Sequence[str] = (), language: str = "en-US") -> AsrStream:
        return TimelineAsrStream(self.timeline, self.lines)


ScriptedFailure = Literal["stall", "error"]
SCRIPTED_ERROR_AFTER_MS = 20
"""How soon a scripted `error` comes (a refused request: a 500 after a round trip)."""


class TimelineLlm(LlmProvider):
    """The agent's scripted policy, answering after the timeline's delay; or, with `failure`, never
    answering (`stall`: a provider that hangs) or failing at once (`error`: a 500)."""

    def __init__(self, timeline: Timeline, agent: AgentSpec, *, name: str = "timeline-llm",
                 failure: ScriptedFailure | None = None) -> None:
        self.timeline = timeline
        self.policy = ScriptedLlm(agent)
        self.name = name
        self.failure = failure

    async def complete(self, request: LlmRequest) -> LlmResult:
        if self.failure == "stall":
            await asyncio.Event().wait()
        if self.failure == "error":
            await asyncio.sleep(SCRIPTED_ERROR_AFTER_MS / 1000)
            raise ProviderError(self.name, "server", "scripted 500 Internal Server Error", retryable=True)
        await asyncio.sleep(self.timeline.llm_ms / 1000)
        return await self.policy.complete(request)


class TimelineTts(TtsProvider):
    """A 220 Hz tone as long as the text would take to say, after the first-byte delay."""

    name = "timeline-tts"
    capabilities = TtsCapabilities(streaming=True, codecs=("pcm_s16le",))

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    async def synthesize(self, text: str, *, voice: str, sample_rate: int = 16_000) -> AsyncIterator[bytes]:
        await asyncio.sleep(self.timeline.tts_first_byte_ms / 1000)
        samples = sample_rate * self.timeline.speech_ms_per_word * max(1, len(text.split())) // 1000
        chunk = sample_rate // 10
        tone = (6000 * np.sin(2 * np.pi * 220 * np.arange(samples) / sample_rate)).astype("<i2").tobytes()
        for start in range(0, samples, chunk):
            yield tone[2 * start : 2 * min(samples, start + chunk)]
