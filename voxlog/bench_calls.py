"""`voxlog bench calls`: what voxlog adds to each turn's voice-to-voice latency.

N callers at once, each played into the real gateway exactly as Twilio plays one (webhook, media
WebSocket, 20 ms mu-law frames in real time). The providers answer on scripted timelines
(`streams.providers.timeline`), so for each turn:

    added = (first agent audio at the caller - end of the caller's speech)
            - (VAD end-of-turn silence + ASR final + LLM + TTS first byte)

is the time spent in voxlog itself: the gateway, the session's tasks, the log appends, the core.
Pacing jitter is how far the gaps between the agent's audio frames, as the caller receives them,
stray from 20 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.twilio_media import OutboundMedia
from producers.synthetic import mulaw_tone
from schemas.topics import TOPICS
from streams.agents import AgentSpec
from streams.providers.timeline import Timeline, TimelineAsr, TimelineLlm, TimelineTts
from streams.session import Providers
from streams.vad import Vad
from voxlog import __version__
from voxlog.backends import LogBackend
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

LINES = ("hello there", "that is all goodbye")
SPEECH_S = 1.0
MULAW_SILENCE = 0xFF


def _tone_mulaw(seconds: float) -> bytes:
    """Loud enough for the VAD: the timeline ASR does not listen to what is said."""
    return mulaw_tone(int(8000 * seconds), 0, freq=300.0)


@dataclass
class CallFigures:
    added_ms: list[float] = field(default_factory=list)
    jitter_ms: list[float] = field(default_factory=list)
    error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _one_call(stack: LocalStack, index: int, budget_ms: float) -> CallFigures:
    figures = CallFigures()
    caller = stack.caller(from_=f"+1555{index:07d}")
    try:
        instructions = await caller.dial()
        async with caller:
            await caller.connect(instructions)
            await caller.agent_quiet(0.5, 30)  # the greeting
            for _ in LINES:
                await caller.send_mulaw(_tone_mulaw(SPEECH_S))
                spoke_until = time.monotonic() - caller.opened_at
                await caller.send_mulaw(bytes([MULAW_SILENCE]) * int(8000 * 1.5))
                await caller.agent_quiet(0.5, 30)
                frames = [r.at for r in caller.log if isinstance(r.message, OutboundMedia) and r.at > spoke_until]
                if frames:
                    figures.added_ms.append((frames[0] - spoke_until) * 1000 - budget_ms)
                    gaps = [b - a for a, b in itertools.pairwise(frames) if b - a < 0.2]
                    figures.jitter_ms += [abs(g - 0.02) * 1000 for g in gaps]
                if caller.closed.is_set():
                    break
    except Exception as exc:  # a failed call is reported, not hidden
        figures.error = repr(exc)
    return figures


async def _events_in_log(backend: LogBackend) -> int:
    admin = backend.admin()
    try:
        return sum([sum((await admin.end_offsets(t)).values()) for t in TOPICS])
    finally:
        await admin.close()


async def bench_calls(settings: Settings, *, calls: int, timeline: Timeline) -> dict[str, Any]:
    def providers(agent: AgentSpec) -> Providers:
        return Providers(asr=TimelineAsr(timeline, LINES), llm=TimelineLlm(timeline, agent), tts=TimelineTts(timeline))

    end_of_turn_ms = Vad().end_of_turn_silence_ms
    budget_ms = end_of_turn_ms + timeline.asr_final_ms + timeline.llm_ms + timeline.tts_first_byte_ms
    async with local_stack(settings, providers_factory=providers) as stack:
        before = await _events_in_log(stack.gateway.backend)
        started = time.perf_counter()
        results = await asyncio.gather(*(_one_call(stack, i, budget_ms) for i in range(calls)))
        await stack.gateway.wait_idle(60)
        elapsed = time.perf_counter() - started
        events = await _events_in_log(stack.gateway.backend) - before
        backend = stack.gateway.backend.describe()
    added = [ms for r in results for ms in r.added_ms]
    jitter = [ms for r in results for ms in r.jitter_ms]
    return {
        "benchmark": "calls",
        "log": backend,
        "version": __version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "calls": calls,
        "failed_calls": [r.error for r in results if r.error],
        "turns_measured": len(added),
        "scripted_ms": {"vad_end_of_turn": end_of_turn_ms, "asr_final": timeline.asr_final_ms,
                        "llm": timeline.llm_ms, "tts_first_byte": timeline.tts_first_byte_ms, "total": budget_ms},
        "added_latency_ms": {"p50": round(statistics.median(added), 1) if added else None,
                             "p99": round(_percentile(added, 0.99), 1) if added else None,
                             "max": round(max(added), 1) if added else None},
        "pacing_jitter_ms": {"p50": round(statistics.median(jitter), 2) if jitter else None,
                             "p99": round(_percentile(jitter, 0.99), 2) if jitter else None,
                             "frames": len(jitter)},
        "events": events,
        "seconds": round(elapsed, 1),
        "events_per_s": round(events / elapsed),
    }
