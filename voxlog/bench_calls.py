"""`voxlog bench calls`: what voxlog adds to each turn's voice-to-voice latency.

N callers at once, each played into the real gateway exactly as Twilio plays one (webhook, media
WebSocket, 20 ms mu-law frames in real time), from a process of their own. The providers answer on scripted timelines
(`streams.providers.timeline`), so for each turn:

    added = (first agent audio at the caller - end of the caller's speech)
            - (VAD end-of-turn silence + ASR final + LLM + TTS first byte)

is the time spent in voxlog itself: the gateway, the session's tasks, the log appends, the core.
Pacing jitter is how far the gaps between the agent's audio frames, as the caller receives them,
stray from 20 ms.

`--history-events N` first writes N events of earlier calls to the log (synthetic, audio and all) and
puts the in-process workers' consumer groups at its end, as on a broker that has served for a while:
the same run on a fresh log and on one with history shows whether a call's cost grows with history.

The demo tenant may have 50 calls at once (`limits.max_concurrent_calls`); when `VOXLOG_AGENTS_DIR` is
not set the benchmark runs on a copy of the demo agents whose tenant may have all `--calls`, so that
what is measured is the gateway's capacity, not a tenant's policy.

`--ramp-s` spreads the callers' first rings over that many seconds (0: all in the same instant).
Past the gateway's capacity (`--calls` above `VOXLOG_MAX_CALLS`) the calls it refuses are counted with
how long their busy answer took; the latency and jitter figures are the admitted calls', which admission
control exists to protect.

With a fallback profile, one capability (the LLM, ASR or TTS) is a chain of two timeline providers
(streams/providers/resilience.py, asr_chain.py, tts_chain.py) and in every `every`-th call the
primary fails on each turn (`stall`: it never answers, so the chain's attempt timeout ends it;
`error`: a 500 after 20 ms); the backup answers on the timeline. (A recogniser's stream goes back
to the primary after each result, so it falls back on each turn too; a voice's failure is before its
first byte, which is what delays a turn.)
The calls that fell back (told by the log's `provider.fallback`) are measured apart, against the
same budget; what a failed primary cost a turn is its added latency less the normal turns' median,
the target being at most the attempt timeout plus 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import itertools
import json
import os
import pickle
import resource
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO, TypeVar

import httpx
import numpy as np

from consumers.backends import LogBackend, ensure_topics
from consumers.processor_runner import read_to_end
from consumers.workers.after_call import GROUP as AFTER_CALL_GROUP
from consumers.workers.dialer import GROUP as DIALER_GROUP
from consumers.workers.summariser import GROUP as SUMMARISER_GROUP
from consumers.workers.tools import GROUP as TOOLS_GROUP
from gateway.loop_lag import watch_loop_lag
from gateway.runtime import GatewayRuntime
from producers.log_producer import TopicPartition
from projections.default_projections import default_projections
from projections.projection_runner import projected
from schemas.events import CallStarted, ProviderFallback
from schemas.topics import CALLS, COMMANDS, TOPICS
from streams.audio.codecs import pcm16_to_mulaw
from streams.audio.vad import END_OF_TURN_SILENCE_MS, VadKind
from streams.call.session import Providers
from streams.channels.twilio_media_protocol import OutboundMedia
from streams.config.agents import AgentSpec
from streams.providers.asr_chain import ChainAsr
from streams.providers.base import AsrProvider, LlmProvider, TtsProvider
from streams.providers.registry import LLM_CHAIN_DEADLINE_S, SPEECH_CHAIN_DEADLINE_S
from streams.providers.resilience import ChainLlm, CircuitBreaker, Guarded, ProviderChain
from streams.providers.timeline import ScriptedFailure, Timeline, TimelineAsr, TimelineLlm, TimelineTts
from streams.providers.tts_chain import ChainTts
from streams.providers.tts_espeak import EspeakTts
from streams.startup_heap import freeze_startup_heap
from voxlog.backends import log_backend
from voxlog.bench import percentile, run_facts
from voxlog.bench_fleet import (
    REPLICAS_PUBLIC_URL,
    SIP_CALLS_PER_GATEWAY,
    gateway_fleet,
    phone_fleet_settings,
    sip_fleet,
    sip_fleet_settings,
)
from voxlog.bench_projections import write_synthetic_calls
from voxlog.progress import progress
from voxlog.serving import run_on_serving_loop
from voxlog.settings import Settings
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.fake_twilio import new_call_sid
from voxlog.sim.sip_caller import SipCaller, free_sip_port
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.twilio_caller import TwilioCaller, parse_stream_twiml

P = TypeVar("P")

GREETING_LINE, LAST_LINE = "hello there", "that is all goodbye"
CALLED = "+15550100"
"""The demo agent's number, which every caller dials."""
DEFAULT_TURNS = 20
"""Per call: 50 calls give 1,000 turns, enough for a p99 that is not the few slowest turns of a run."""
LOOP_LAG_PERIOD_S = 0.005
"""How often the benchmark samples the gateways' and the callers' event loops: a stall of a few ms shows."""


def caller_lines(turns: int) -> tuple[str, ...]:
    """What each caller says, as the timeline recogniser hears it: `turns` turns, the last a goodbye."""
    return (GREETING_LINE,) * (turns - 1) + (LAST_LINE,)
CALLER_SAYS = "book me a visit tomorrow"
"""What each caller's turn sounds like (espeak-ng, about 1.2 s): speech, for the VAD (Silero hears no tone
as speech); what the timeline recogniser answers is its script's, not this."""
MULAW_SILENCE = 0xFF


async def caller_speech() -> bytes:
    """`CALLER_SAYS` as Twilio carries it (8 kHz mu-law), from its first sound to its last."""
    pcm = b"".join([chunk async for chunk in EspeakTts(words_per_minute=170).synthesize(
        CALLER_SAYS, voice="en-us", sample_rate=8000)])
    samples = np.frombuffer(pcm, dtype="<i2")
    loud = np.nonzero(np.abs(samples.astype(np.int32)) > 300)[0]
    return pcm16_to_mulaw(samples[loud[0]:loud[-1] + 1].tobytes())


Capability = Literal["llm", "asr", "tts"]


@dataclass(frozen=True)
class FallbackProfile:
    failure: ScriptedFailure
    every: int = 2
    """Every n-th call's primary fails, on each of its turns."""
    attempt_timeout_ms: int = 800
    """The primary's attempt timeout in the chain."""
    fallback_target_ms: int = 50
    """What a failed primary may cost beyond its attempt timeout."""
    capability: Capability = "llm"


@dataclass
class CallFigures:
    added_ms: list[float] = field(default_factory=list)
    jitter_ms: list[float] = field(default_factory=list)
    error: str | None = None
    refused: bool = False
    """Told busy by admission control (past the gateway's capacity)."""
    webhook_ms: float | None = None
    """How long the voice webhook took to answer."""


async def _one_call(caller: TwilioCaller, speech: bytes, budget_ms: float, turns: int,
                    delay_s: float = 0.0) -> CallFigures:
    figures = CallFigures()
    await asyncio.sleep(delay_s)  # when this caller rings, within the run's ramp
    try:
        asked = time.perf_counter()
        answer = await caller.ring()
        figures.webhook_ms = (time.perf_counter() - asked) * 1000
        if '<Reject reason="busy"' in answer.text:
            figures.refused = True
            return figures
        if answer.status_code != 200:
            raise AssertionError(f"voice webhook answered {answer.status_code}: {answer.text}")
        instructions = parse_stream_twiml(answer.text)
        async with caller:
            await caller.connect(instructions)
            await caller.agent_quiet(0.5, 30)  # the greeting
            for _ in range(turns):
                await caller.send_mulaw(speech)
                spoke_until, heard = time.monotonic() - caller.opened_at, len(caller.agent_audio)
                await caller.send_mulaw(bytes([MULAW_SILENCE]) * int(8000 * 1.5))
                await caller.agent_speaks_beyond(heard, 30)  # a slow answer (a fallback) outlasts the silence
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


async def _one_sip_call(caller: SipCaller, speech: bytes, budget_ms: float, turns: int,
                        delay_s: float = 0.0) -> CallFigures:
    """`_one_call` over SIP: the same turns, timed on the RTP as it arrives (the gateway sends RTP all the
    call long, silence included: a turn's answer begins at its first loud packet)."""
    figures = CallFigures()
    await asyncio.sleep(delay_s)
    try:
        asked = time.perf_counter()
        status = await caller.dial()
        figures.webhook_ms = (time.perf_counter() - asked) * 1000
        if status in (486, 503):
            figures.refused = True
            return figures
        if status != 200:
            raise AssertionError(f"the INVITE was answered {status}")
        await caller.agent_quiet(0.5, 30)  # the greeting
        for _ in range(turns):
            await caller.send_mulaw(speech)
            spoke_until, heard = time.monotonic(), caller.loud_bytes()
            await caller.send_mulaw(bytes([MULAW_SILENCE]) * int(8000 * 1.5))
            await caller.agent_quiet(0.5, 30, beyond=heard)
            after = [frame for frame in caller.agent_frames if frame.at > spoke_until]
            loud = [frame.at for frame in after if frame.loud]
            if loud:
                figures.added_ms.append((loud[0] - spoke_until) * 1000 - budget_ms)
                gaps = [b.at - a.at for a, b in itertools.pairwise(after) if b.at - a.at < 0.2]
                figures.jitter_ms += [abs(g - 0.02) * 1000 for g in gaps]
            if caller.closed.is_set():
                break
        await caller.hangup()
    except Exception as exc:  # a failed call is reported, not hidden
        figures.error = repr(exc)
    finally:
        await caller.close()
    return figures


@contextlib.asynccontextmanager
async def loop_lag_sampled() -> AsyncIterator[list[float]]:
    """This process's event loop's lag (seconds), sampled every `LOOP_LAG_PERIOD_S` while it is open: how
    late a process ran what was due, the gateways' (a late turn's cause) or the callers' (a late stamp's)."""
    lags: list[float] = []
    stop = asyncio.Event()
    sampling = asyncio.create_task(watch_loop_lag(LOOP_LAG_PERIOD_S, lags.append, stop))
    try:
        yield lags
    finally:
        stop.set()
        await sampling


def _lag_ms(lags: list[float]) -> dict[str, float | None]:
    return _latency([lag * 1000 for lag in lags])


async def play_callers(plan: dict[str, Any]) -> tuple[list[CallFigures], dict[str, float | None]]:
    """All the callers of a run, at once (in the callers' own process): their figures, and their loop's
    lag over the calls. Their progress goes to this process's standard error, the benchmark's own."""
    speech = await caller_speech()
    freeze_startup_heap()  # a load generator that stalls for the collector's passes would time itself
    async with loop_lag_sampled() as lags:
        figures = await _play_calls(plan, speech)
    return figures, _lag_ms(lags)


async def _play_calls(plan: dict[str, Any], speech: bytes) -> list[CallFigures]:
    """Phone callers share one HTTP client: a client (and its SSL context) per webhook would cost the
    callers more CPU than the gateway spends."""

    async def counted(call: Awaitable[CallFigures], done: Callable[[int], None]) -> CallFigures:
        figures = await call
        done(1)
        return figures

    if plan.get("sip_port"):
        with progress("bench calls: SIP callers", total=len(plan["calls"]), unit="calls") as ended:
            return await asyncio.gather(*(
                counted(_one_sip_call(SipCaller(plan["sip_host"], plan["sip_port"], plan["to"], from_=number), speech,
                                      plan["budget_ms"], plan["turns"], index * plan["ramp_s"] / len(plan["calls"])),
                        ended)
                for index, (_sid, number, _gateway) in enumerate(plan["calls"])))
    async with contextlib.AsyncExitStack() as clients:
        gateways = [(gateway, await clients.enter_async_context(httpx.AsyncClient(base_url=gateway["base_url"],
                                                                                  timeout=30)))
                    for gateway in plan["gateways"]]

        def phone_caller(sid: str, number: str, index: int) -> TwilioCaller:
            gateway, http = gateways[index]
            return TwilioCaller(gateway["base_url"], gateway["auth_token"], account_sid=gateway["account_sid"],
                                call_sid=sid, from_=number, to=plan["to"], public_url=plan["public_url"], http=http)

        with progress("bench calls: callers", total=len(plan["calls"]), unit="calls") as ended:
            return await asyncio.gather(*(
                counted(_one_call(phone_caller(sid, number, gateway), speech, plan["budget_ms"], plan["turns"],
                                  index * plan["ramp_s"] / len(plan["calls"])),
                        ended)
                for index, (sid, number, gateway) in enumerate(plan["calls"])))


def _phone_calls(calls: int, gateways: int) -> list[tuple[str, str, int]]:
    """Each phone call's sid, its caller's number, and which of `gateways` its webhook reaches: the next in
    turn, as a round-robin balancer sends them."""
    return [(new_call_sid(), _caller_number(index), index % gateways) for index in range(calls)]


def _sip_calls(calls: int) -> list[tuple[str, str, int]]:
    return [(f"sip-{index}", _caller_number(index), 0) for index in range(calls)]


def _caller_number(index: int) -> str:
    return f"+1555{index:07d}"


@dataclass
class CallersRun:
    """What the callers' process did: each call's sid and figures, its CPU seconds, its loop's lag (ms)."""

    sids: list[str]
    results: list[CallFigures]
    cpu_s: float
    loop_lag_ms: dict[str, float | None]


async def _callers_process(target: dict[str, Any], calls: list[tuple[str, str, int]], budget_ms: float,
                           ramp_s: float, turns: int) -> CallersRun:
    """Runs the callers in a process of their own, as Twilio is: only the gateway is measured here,
    and the callers' clocks are not held up by the gateway's event loop. `target`: where they call (by
    phone, `gateways`: each one's URL and Twilio account, and the `public_url` they share, if any; or
    `sip_host` and `sip_port`); `calls`: `_phone_calls` or `_sip_calls`. With the callers' CPU seconds and
    their loop's lag: a load generator that takes the machine's cores, or stamps late, measures itself."""
    plan: dict[str, Any] = {"sip_port": None, "gateways": [], "public_url": None, **target, "to": CALLED,
                            "budget_ms": budget_ms, "ramp_s": ramp_s, "turns": turns, "calls": calls}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxlog.bench_calls", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await child.communicate(json.dumps(plan).encode())
    if child.returncode != 0:
        raise RuntimeError(f"the callers' process failed (exit {child.returncode})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the callers' process, reaped by now
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    played = json.loads(out)
    return CallersRun([sid for sid, _, _ in calls], [CallFigures(**figures) for figures in played["calls"]], cpu_s,
                      played["loop_lag_ms"])


WORKER_GROUPS = ((TOOLS_GROUP, COMMANDS), (DIALER_GROUP, COMMANDS), (AFTER_CALL_GROUP, CALLS),
                 (SUMMARISER_GROUP, CALLS))
"""The consumer groups of the workers a gateway runs in-process, with what each consumes."""
GROUP_JOIN_S = 60.0


async def write_history(settings: Settings, events: int) -> None:
    """`events` events of earlier calls (synthetic, audio and all) on the log the gateway will use, as a
    broker that has served for a while holds them, and each worker group's offsets at their end: those
    calls were handled long ago, and what the run measures is what each new call costs beside them."""
    backend = log_backend(settings)
    async with backend.admin() as admin:
        await ensure_topics(admin)
    with progress("history", total=events, unit="events") as wrote:
        await write_synthetic_calls(backend, f"history-{uuid.uuid4().hex[:8]}", events, None, on_progress=wrote)
    async with backend.admin() as admin:
        ends = {topic: await admin.end_offsets(topic) for topic in (COMMANDS, CALLS)}
    for group, topic in WORKER_GROUPS:
        async with backend.consumer([topic], group_id=group) as consumer:
            deadline = time.monotonic() + GROUP_JOIN_S
            while len(consumer.assignment()) < len(ends[topic]):  # the group's one member: all partitions
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{group} was not given {topic}'s partitions in {GROUP_JOIN_S:.0f} s")
                await consumer.poll(timeout_s=0.5, max_records=1)
            await consumer.commit({TopicPartition(topic, p): end for p, end in ends[topic].items()})


async def _events_in_log(backend: LogBackend) -> int:
    async with backend.admin() as admin:
        return sum([sum((await admin.end_offsets(t)).values()) for t in TOPICS])


def _providers(timeline: Timeline, agent: AgentSpec, fallback: FallbackProfile | None, failing: bool,
               lines: tuple[str, ...]) -> Providers:
    """The timeline providers, hearing `lines`; with a fallback profile, its capability a chain of a
    primary (failing as scripted in a failing call) and a backup."""
    asr: AsrProvider = TimelineAsr(timeline, lines)
    llm: LlmProvider = TimelineLlm(timeline, agent)
    tts: TtsProvider = TimelineTts(timeline)
    if fallback is None:
        return Providers(asr=asr, llm=llm, tts=tts)
    failure = fallback.failure if failing else None
    primary_timeout_s = fallback.attempt_timeout_ms / 1000

    def chain(primary: P, backup: P, backup_timeout_s: float, deadline_s: float) -> ProviderChain[P]:
        # A breaker per call: the failures of one call's primary must not spare the others their timeout.
        return ProviderChain(fallback.capability, [
            Guarded(primary, "timeline-primary", "", CircuitBreaker(), primary_timeout_s),
            Guarded(backup, "timeline-backup", "", CircuitBreaker(), backup_timeout_s)], deadline_s=deadline_s)

    match fallback.capability:
        case "llm":
            llm = ChainLlm(chain(TimelineLlm(timeline, agent, name="timeline-primary", failure=failure),
                                 TimelineLlm(timeline, agent, name="timeline-backup"),
                                 LLM_CHAIN_DEADLINE_S, LLM_CHAIN_DEADLINE_S))
        case "asr":
            heard = deque(lines)  # one call's lines, whichever recogniser hears them
            asr = ChainAsr(chain(TimelineAsr(timeline, heard, name="timeline-primary", failure=failure),
                                 TimelineAsr(timeline, heard, name="timeline-backup"),
                                 SPEECH_CHAIN_DEADLINE_S, SPEECH_CHAIN_DEADLINE_S))
        case "tts":
            tts = ChainTts(chain(TimelineTts(timeline, name="timeline-primary", failure=failure),
                                 TimelineTts(timeline, name="timeline-backup"),
                                 SPEECH_CHAIN_DEADLINE_S, SPEECH_CHAIN_DEADLINE_S), voices=["", ""])
    return Providers(asr=asr, llm=llm, tts=tts)


async def _fallback_calls(backend: LogBackend, call_sids: set[str]) -> set[str]:
    """The Twilio call sids (of `call_sids`) whose call recorded a provider fallback."""
    codec, sid_of, fell_back = backend.codec, {}, set()

    def take(record: Any) -> None:
        event = codec.decode(record.value)
        if isinstance(event.payload, CallStarted) and event.payload.provider_call_id in call_sids:
            sid_of[event.call_id] = event.payload.provider_call_id
        elif isinstance(event.payload, ProviderFallback):
            fell_back.add(event.call_id)

    await read_to_end(backend, CALLS, take, what="finding the calls that fell back")
    return {sid for call_id, sid in sid_of.items() if call_id in fell_back}


class CollectorPauses:
    """The cycle collector's passes in this process while it is on (`with`): each one holds every thread
    that needs the GIL, the event loop's included, for as long as it walks the heap."""

    def __init__(self) -> None:
        self.full_passes = 0
        self.full_pass_longest_ms = self.longest_ms = self.total_ms = 0.0
        self._began = 0.0

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took_ms = (time.perf_counter() - self._began) * 1000
        if info["generation"] == 2:
            self.full_passes += 1
            self.full_pass_longest_ms = max(self.full_pass_longest_ms, took_ms)
        self.longest_ms = max(self.longest_ms, took_ms)
        self.total_ms += took_ms

    def __enter__(self) -> CollectorPauses:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self._observe)

    def figures(self) -> dict[str, Any]:
        """`frozen_objects`: what the process took out of the passes once started (`streams.startup_heap`)."""
        return {"full_passes": self.full_passes, "full_pass_longest_ms": round(self.full_pass_longest_ms, 1),
                "longest_ms": round(self.longest_ms, 1), "total_ms": round(self.total_ms, 1),
                "frozen_objects": gc.get_freeze_count()}


def calls_ended(gateway: GatewayRuntime) -> int:
    """The calls a gateway has ended, every tenant's and agent's: its `voxlog_calls_ended` metric."""
    return int(sum(sample.value for metric in gateway.metrics.calls_ended.collect() for sample in metric.samples
                   if sample.name == "voxlog_calls_ended_total"))


def _rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _latency(values: list[float]) -> dict[str, float | None]:
    return {"p50": round(statistics.median(values), 1) if values else None,
            "p99": round(percentile(values, 0.99), 1) if values else None,
            "max": round(max(values), 1) if values else None}


@dataclass
class GatewaySide:
    """What the gateway (or, past one SIP gateway's calls, the gateways) did in a run."""

    log: str
    capacity: int
    judges: list[str]
    sids: list[str]
    results: list[CallFigures]
    callers_cpu_s: float
    elapsed_s: float
    cpu_s: float
    loop_cpu_s: float  # the busiest gateway's event loop thread: where one gateway's knee is
    loop_lag_ms: dict[str, float | None]
    """Its event loop's lag over the run (of several gateways, the one with the worst p99)."""
    callers_loop_lag_ms: dict[str, float | None]
    peak_rss_mb: float
    rss_before_mb: float
    events: int
    gateways: int = 1
    calls_by_gateway: list[int] = field(default_factory=list)
    """The calls each gateway ran to their end."""
    collector: list[dict[str, Any]] = field(default_factory=list)
    """Each gateway's `CollectorPauses` over the run."""
    front_cpu_s: float | None = None
    analytics: str | None = None
    background_cpu_s: float = 0.0
    projected_after_s: float | None = None
    fell_back: set[str] = field(default_factory=set)


def through_fleet(calls: int, channel: Literal["phone", "sip"], replicas: int, one_gateway_only: bool) -> bool:
    """Whether the calls go through gateway processes (`voxlog.bench_fleet`) rather than this one; a
    ValueError for what cannot be measured so (`one_gateway_only`: a fallback profile, history or analytics)."""
    if channel == "sip" and replicas != 1:
        raise ValueError("over SIP the gateways are as many as the calls need (their PJSIP holds "
                         f"{SIP_CALLS_PER_GATEWAY} each): --gateways is for phone calls")
    fleet = (channel == "sip" and calls > SIP_CALLS_PER_GATEWAY) or replicas > 1
    if fleet and one_gateway_only:
        raise ValueError(f"--fallback, --history-events and --analytics are measured on one gateway: by phone, "
                         f"--gateways 1; over SIP, --calls {SIP_CALLS_PER_GATEWAY} at most")
    return fleet


async def bench_calls(settings: Settings, *, calls: int, timeline: Timeline,
                      fallback: FallbackProfile | None = None, ramp_s: float = 0.0,
                      history_events: int = 0, turns: int = DEFAULT_TURNS,
                      vad: VadKind | None = None, analytics: bool = False,
                      channel: Literal["phone", "sip"] = "phone", replicas: int = 1) -> dict[str, Any]:
    """`vad`: the demo agent's judge for this run (with `settings.agents_dir` unset). `analytics`: the
    projections and the summariser run as `voxlog serve` runs them (its background process, or with
    `settings.background_process` off the gateway's own loop), and the result says what they cost and
    how long after the last call their tables held every event. `channel`: the callers phone in as
    Twilio carries them (`phone`) or over SIP to the gateway's SIP endpoint (`sip`, on a free port); past
    the calls one gateway's PJSIP holds, to gateways enough for them behind a SIP front. `replicas`: by
    phone, the gateway processes behind one public address the calls are spread over (`voxlog.bench_fleet`)."""
    fleet = through_fleet(calls, channel, replicas, fallback is not None or bool(history_events) or analytics)
    if channel == "sip" and settings.sip_bind is None and not fleet:
        settings = settings.model_copy(update={"sip_bind": f"127.0.0.1:{free_sip_port()}"})
    if settings.agents_dir is None:  # the demo tenant's own limit (50 calls) must not cap what is measured
        settings = settings.model_copy(update={"agents_dir": demo_agents_with(
            settings.home / "bench-agents", tenant={"limits": {"max_concurrent_calls": calls}},
            front_desk={"vad": vad} if vad is not None else None)})
    if history_events:
        await write_history(settings, history_events)
    end_of_turn_ms = END_OF_TURN_SILENCE_MS
    budget_ms = end_of_turn_ms + timeline.asr_final_ms + timeline.llm_ms + timeline.tts_first_byte_ms
    if fleet:
        side = await _through_fleet(settings, calls, timeline, budget_ms, ramp_s, turns, channel, replicas)
    else:
        side = await _through_one_gateway(settings, calls, timeline, budget_ms, ramp_s, turns, fallback, analytics)
    return _figures(side, calls=calls, channel=channel, turns=turns, history_events=history_events, ramp_s=ramp_s,
                    timeline=timeline, end_of_turn_ms=end_of_turn_ms, budget_ms=budget_ms, fallback=fallback)


async def _through_one_gateway(settings: Settings, calls: int, timeline: Timeline, budget_ms: float, ramp_s: float,
                               turns: int, fallback: FallbackProfile | None, analytics: bool) -> GatewaySide:
    made = itertools.count()

    def providers(agent: AgentSpec) -> Providers:
        failing = fallback is not None and next(made) % fallback.every == 0
        return _providers(timeline, agent, fallback, failing, caller_lines(turns))

    async with local_stack(settings, providers_factory=providers, analytics=analytics) as stack:
        background = stack.gateway.background
        before = await _events_in_log(stack.gateway.backend)
        rss_before_mb = _rss_mb()
        started, cpu_before, loop_before = time.perf_counter(), time.process_time(), time.thread_time()
        background_before = background.cpu_s() if background is not None else 0.0
        if stack.gateway.sip is not None:
            target: dict[str, Any] = {"sip_host": "127.0.0.1", "sip_port": stack.gateway.sip.port}
            ringing = _sip_calls(calls)
        else:
            target = {"gateways": [_phone_gateway(stack)]}
            ringing = _phone_calls(calls, 1)
            for sid, number, _ in ringing:
                stack.twilio.add_call(number, CALLED, sid=sid)
        with CollectorPauses() as pauses:
            async with loop_lag_sampled() as lags:
                callers = await _callers_process(target, ringing, budget_ms, ramp_s, turns)
                await stack.gateway.wait_idle(60)
        elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_before
        loop_cpu_s = time.thread_time() - loop_before  # this coroutine runs on the gateway's loop
        background_cpu_s = background.cpu_s() - background_before if background is not None else 0.0
        projected_after_s = None
        if analytics and stack.gateway.analytics is not None:
            await projected(stack.gateway.backend, stack.gateway.analytics,
                            default_projections(stack.gateway.router, recordings=stack.gateway.recordings_path),
                            timeout_s=600)
            projected_after_s = round(time.perf_counter() - started - elapsed, 2)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return GatewaySide(
            log=stack.gateway.backend.describe(), capacity=stack.gateway.capacity,
            judges=sorted({agent.vad for agent in stack.gateway.router.agents.values()}),
            sids=callers.sids, results=callers.results, callers_cpu_s=callers.cpu_s, elapsed_s=elapsed, cpu_s=cpu_s,
            loop_cpu_s=loop_cpu_s, peak_rss_mb=peak_mb, rss_before_mb=rss_before_mb, loop_lag_ms=_lag_ms(lags),
            callers_loop_lag_ms=callers.loop_lag_ms,
            events=await _events_in_log(stack.gateway.backend) - before,
            calls_by_gateway=[calls_ended(stack.gateway)], collector=[pauses.figures()],
            analytics=None if not analytics else "background process" if background is not None else "gateway",
            background_cpu_s=background_cpu_s, projected_after_s=projected_after_s,
            fell_back=await _fallback_calls(stack.gateway.backend, set(callers.sids)) if fallback else set())


def _phone_gateway(stack: LocalStack) -> dict[str, Any]:
    """Where a phone caller reaches this gateway, and as which Twilio account."""
    return {"base_url": stack.base_url, "auth_token": stack.auth_token,
            "account_sid": stack.settings.twilio_account_sid}


async def _through_fleet(settings: Settings, calls: int, timeline: Timeline, budget_ms: float, ramp_s: float,
                         turns: int, channel: Literal["phone", "sip"], replicas: int) -> GatewaySide:
    """The calls through gateway processes (`voxlog.bench_fleet`): over SIP, behind the SIP front; by phone,
    `replicas` of them sharing one public address."""
    folder = settings.home / "bench-fleet"
    plan = {"timeline": dataclasses.asdict(timeline), "turns": turns}
    if channel == "sip":
        gateways = sip_fleet_settings(settings, folder, calls)
        ringing = _sip_calls(calls)
        serving = sip_fleet(gateways, plan, folder)
    else:
        gateways = phone_fleet_settings(settings, folder, replicas)
        ringing = _phone_calls(calls, replicas)
        serving = gateway_fleet(gateways, [
            {**plan, "behind": REPLICAS_PUBLIC_URL,
             "twilio_calls": [(sid, number, CALLED) for sid, number, answering in ringing if answering == index]}
            for index in range(replicas)], folder)
    async with serving as fleet:
        before = await _events_in_logs(gateways)
        started = time.perf_counter()
        fleet.start_clock()
        front, front_cpu_before = fleet.front, fleet.front.cpu_s() if fleet.front is not None else 0.0
        target = ({"sip_host": front.host, "sip_port": front.port} if front is not None else
                  {"gateways": [gateway.serving for gateway in fleet.gateways], "public_url": REPLICAS_PUBLIC_URL})
        callers = await _callers_process(target, ringing, budget_ms, ramp_s, turns)
        front_cpu_s = front.cpu_s() - front_cpu_before if front is not None else None
        reports = await asyncio.gather(*(gateway.finish() for gateway in fleet.gateways))
        elapsed = time.perf_counter() - started
    return GatewaySide(
        log=f"{reports[0]['log']} ({len(reports)} gateways)" if len({r["log"] for r in reports}) == 1 else
        f"{len(reports)} logs of their own (e.g. {reports[0]['log']})",
        capacity=sum(r["capacity"] for r in reports), judges=sorted({j for r in reports for j in r["judges"]}),
        sids=callers.sids, results=callers.results, callers_cpu_s=callers.cpu_s, elapsed_s=elapsed,
        cpu_s=sum(r["cpu_s"] for r in reports), loop_cpu_s=max(r["loop_cpu_s"] for r in reports),
        loop_lag_ms=max((r["loop_lag_ms"] for r in reports), key=lambda lag: lag["p99"] or 0.0),
        callers_loop_lag_ms=callers.loop_lag_ms,
        peak_rss_mb=sum(r["peak_rss_mb"] for r in reports),
        rss_before_mb=sum(r["rss_before_mb"] for r in reports), events=await _events_in_logs(gateways) - before,
        gateways=len(reports), calls_by_gateway=[r["calls"] for r in reports],
        collector=[r["collector"] for r in reports], front_cpu_s=front_cpu_s)


async def _events_in_logs(settings: list[Settings]) -> int:
    """The events in the logs these settings name, each log counted once (gateways on one broker share it)."""
    backends: dict[str, LogBackend] = {}
    for one in settings:
        backend = log_backend(one)
        backends.setdefault(backend.describe(), backend)
    return sum([await _events_in_log(backend) for backend in backends.values()])


def _figures(side: GatewaySide, *, calls: int, channel: str, turns: int, history_events: int, ramp_s: float,
             timeline: Timeline, end_of_turn_ms: int, budget_ms: float,
             fallback: FallbackProfile | None) -> dict[str, Any]:
    sids, results, elapsed = side.sids, side.results, side.elapsed_s
    normal = [r for sid, r in zip(sids, results, strict=True) if sid not in side.fell_back and not r.refused]
    added = [ms for r in normal for ms in r.added_ms]
    jitter = [ms for r in results for ms in r.jitter_ms]
    refused = [r for r in results if r.refused]
    admitted_webhooks = [r.webhook_ms for r in results if not r.refused and r.webhook_ms is not None]
    admitted = max(1, calls - len(refused))
    result: dict[str, Any] = {
        **run_facts("calls"),
        "log": side.log,
        "channel": channel,
        "calls": calls,
        "turns_per_call": turns,
        "history_events": history_events,
        "vad": side.judges,
        "ramp_s": ramp_s,
        "capacity": side.capacity,
        "gateways": side.gateways,
        "calls_by_gateway": side.calls_by_gateway,
        "admitted_calls": calls - len(refused),
        "refused_calls": len(refused),
        "refusal_ms": _latency([r.webhook_ms for r in refused if r.webhook_ms is not None]),
        "admitted_webhook_ms": _latency(admitted_webhooks),
        "failed_calls": [r.error for r in results if r.error],
        "turns_measured": len(added),
        "scripted_ms": {"vad_end_of_turn": end_of_turn_ms, "asr_final": timeline.asr_final_ms,
                        "llm": timeline.llm_ms, "tts_first_byte": timeline.tts_first_byte_ms, "total": budget_ms},
        "added_latency_ms": _latency(added),
        "added_latency_ms_by_call": [[round(ms, 1) for ms in r.added_ms] for r in normal],
        "pacing_jitter_ms": {"p50": round(statistics.median(jitter), 2) if jitter else None,
                             "p99": round(percentile(jitter, 0.99), 2) if jitter else None,
                             "frames": len(jitter)},
        "gateway_cpu_s": round(side.cpu_s, 2),
        "gateway_cpu_share": round(side.cpu_s / elapsed, 3),
        "gateway_loop_cpu_share": round(side.loop_cpu_s / elapsed, 3),
        "gateway_loop_lag_ms": side.loop_lag_ms,
        "gateway_cpu_s_per_call_minute": round(side.cpu_s / admitted / (elapsed / 60), 3),
        "gateway_collector": {
            "full_passes": sum(c["full_passes"] for c in side.collector),
            "full_pass_longest_ms": max(c["full_pass_longest_ms"] for c in side.collector),
            "longest_ms": max(c["longest_ms"] for c in side.collector),
            "total_ms": round(sum(c["total_ms"] for c in side.collector), 1),
            "frozen_objects_least": min(c["frozen_objects"] for c in side.collector)},
        "gateway_peak_rss_mb": round(side.peak_rss_mb, 1),
        "gateway_peak_rss_mb_per_call": round((side.peak_rss_mb - side.rss_before_mb) / admitted, 3),
        "front_cpu_s": None if side.front_cpu_s is None else round(side.front_cpu_s, 2),
        "callers_cpu_s": round(side.callers_cpu_s, 2),
        "analytics": side.analytics,
        "background_cpu_s": round(side.background_cpu_s, 2),
        "background_cpu_share": round(side.background_cpu_s / elapsed, 3),
        "projected_after_s": side.projected_after_s,
        "callers_cpu_share": round(side.callers_cpu_s / elapsed, 3),
        "callers_loop_lag_ms": side.callers_loop_lag_ms,
        "events": side.events,
        "seconds": round(elapsed, 1),
        "events_per_s": round(side.events / elapsed),
    }
    if fallback is not None:
        # What a fallback turn took beyond a normal turn: its added latency less the normal turns' median.
        fallback_added = [ms for sid, r in zip(sids, results, strict=True) if sid in side.fell_back
                          for ms in r.added_ms]
        baseline = statistics.median(added) if added else 0.0
        costs = [ms - baseline for ms in fallback_added]
        # The target is about a primary that hangs: what it may cost beyond its timeout. A fast error's
        # cost (two tries and a jittered pause) is reported as measured.
        limit_ms = fallback.attempt_timeout_ms + fallback.fallback_target_ms if fallback.failure == "stall" else None
        p99 = percentile(costs, 0.99) if costs else None
        result["fallback"] = {
            "capability": fallback.capability, "failure": fallback.failure, "every": fallback.every,
            "attempt_timeout_ms": fallback.attempt_timeout_ms,
            "calls_fell_back": len(side.fell_back), "turns_measured": len(costs),
            "added_latency_ms": _latency(fallback_added),
            "cost_ms": _latency(costs),
            "target_ms": limit_ms,
            "met": None if limit_ms is None else p99 is not None and p99 <= limit_ms,
        }
    return result


async def serve_fleet_gateway(settings: Settings, plan: dict[str, Any], report: TextIO) -> None:
    """One gateway of a fleet (`voxlog.bench_fleet`): serves with the scripted providers until its standard
    input closes, then, its calls over, reports what it spent. A phone replica's plan names the public address
    it shares (`behind`) and the calls its fake Twilio knows (`twilio_calls`)."""
    timeline, lines = Timeline(**plan["timeline"]), caller_lines(plan["turns"])
    async with local_stack(settings, providers_factory=lambda agent: _providers(timeline, agent, None, False, lines),
                           behind=plan.get("behind")) as stack:
        for sid, number, called in plan.get("twilio_calls", ()):
            stack.twilio.add_call(number, called, sid=sid)
        rss_before_mb = _rss_mb()
        serving = _phone_gateway(stack) if stack.gateway.sip is None else {"sip_port": stack.gateway.sip.port}
        print(json.dumps(serving), file=report, flush=True)
        with CollectorPauses() as pauses:
            async with loop_lag_sampled() as lags:
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
                await stack.gateway.wait_idle(60)
        print(json.dumps({"cpu_s": time.process_time(), "loop_cpu_s": time.thread_time(), "loop_lag_ms": _lag_ms(lags),
                          "rss_before_mb": rss_before_mb,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "capacity": stack.gateway.capacity, "log": stack.gateway.backend.describe(),
                          "calls": calls_ended(stack.gateway), "collector": pauses.figures(),
                          "judges": sorted({agent.vad for agent in stack.gateway.router.agents.values()})}),
              file=report, flush=True)


def _reports_only() -> TextIO:
    """The standard output this process was given, for its reports alone: whatever else would write there
    (PJSIP's lines, a library's) goes to its standard error, where it cannot break the report's JSON."""
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return report


def _serve_as_fleet_gateway() -> None:
    """`python -m voxlog.bench_calls gateway`: its reports on the standard output it was given."""
    report = _reports_only()
    faulthandler.enable()  # as `voxlog serve`: a native fault leaves each thread's stack in its log
    settings, plan = pickle.load(sys.stdin.buffer)
    run_on_serving_loop(serve_fleet_gateway(settings, plan, report))


if __name__ == "__main__" and sys.argv[1:] == ["gateway"]:
    _serve_as_fleet_gateway()
elif __name__ == "__main__":  # the callers' process: a plan on stdin, their figures on stdout
    figures_out = _reports_only()
    figures, lag = run_on_serving_loop(play_callers(json.loads(sys.stdin.read())))
    print(json.dumps({"calls": [dataclasses.asdict(f) for f in figures], "loop_lag_ms": lag}), file=figures_out,
          flush=True)
