"""`voxlog bench replay`: QA's replays over many recorded calls, beside merely reading them.

Writes `calls` calls played through the core (`voxlog.sim.core_calls.play_call`: the demo agent, a mix of
bookings, tickets, transfers, silences and barge-ins, both sides' audio as 20 ms frames) to a fresh log,
then times, each over every call: reading and decoding them (`read_call`, all of each call, and what a replay
reads of it: `voxlog.replaying.REPLAY_TOPICS`, no audio), `replay verify`, `replay whatif`
with the same agent (every answer reused), and with a reworded greeting (every LLM request after it new,
answered by the offline policy), with and without the report's PII redaction. Wall and CPU seconds, calls
and events a second, and each as a ratio to reading; medians of `passes`, the phases taken in turn in each, each
first in one of them (a phase's place changes its time by as much as a tenth)."""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from consumers.backends import LogBackend
from consumers.event_reader import read_call
from producers.event_writer import EventWriter
from schemas.topics import CALL_TOPICS
from streams.config.agents import AgentRouter, AgentSpec
from streams.providers.registry import ProviderRegistry
from voxlog.bench import run_facts
from voxlog.replaying import REPLAY_TOPICS, recorded_call_ids, verify_calls, whatif_calls
from voxlog.sim.core_calls import CallerStep, play_call

SCENARIOS: tuple[tuple[CallerStep, ...], ...] = (
    (CallerStep("say", "i would like to book an appointment for tomorrow at 10 am"), CallerStep("say", "no thank you")),
    (CallerStep("say", "my internet is down again"), CallerStep("say", "goodbye")),
    (CallerStep("say", "can i talk to a person"),),
    (CallerStep("barge", "sorry my router is broken"), CallerStep("silence", silence_s=10), CallerStep("say", "bye")),
    (CallerStep("say", "hello"), CallerStep("say", "book a visit for friday at 2 pm"), CallerStep("say", "that's all")),
)


async def write_calls(backend: LogBackend, agent: AgentSpec, calls: int, seed: int) -> int:
    """Writes the calls; returns how many events."""
    chooser = random.Random(seed)
    events = 0
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        for index in range(calls):
            call = await play_call(agent, chooser.choice(SCENARIOS), call_id=f"bench-replay-{seed}-{index}", audio=True)
            for event in call.events:
                await writer.append(event)
            events += len(call.events)
        await writer.flush()
    return events


async def bench_replay(backend: LogBackend, router: AgentRouter, agent: AgentSpec, *, calls: int, seed: int = 7,
                       passes: int = 3) -> dict[str, Any]:
    events = await write_calls(backend, agent, calls, seed)
    ids = [call_id for call_id in await recorded_call_ids(backend) if call_id.startswith(f"bench-replay-{seed}-")]
    reworded = agent.model_copy(update={"greeting": "Acme here. What can we fix for you today?"})
    registry = ProviderRegistry()

    async def read_all(topics: tuple[str, ...]) -> int:
        read = 0
        async with backend.admin() as admin:
            for call_id in ids:
                read += len((await read_call(admin, call_id, topics=topics)).events)
        return read

    async def whatif_redacted(tried: AgentSpec) -> list[Any]:
        return [result.redacted() for result in await whatif_calls(backend, router, tried, registry, ids)]

    async def read_count() -> list[int]:
        return [await read_all(CALL_TOPICS)]

    async def read_replayed_count() -> list[int]:
        return [await read_all(REPLAY_TOPICS)]

    async def verify() -> list[Any]:
        return await verify_calls(backend, router, ids)

    async def whatif(tried: AgentSpec) -> list[Any]:
        return await whatif_calls(backend, router, tried, registry, ids)

    work: dict[str, Callable[[], Awaitable[list[Any]]]] = {
        "read_and_decode": read_count,
        "read_and_decode_replayed_topics": read_replayed_count,
        "replay_verify": verify,
        "whatif_same_agent": lambda: whatif(agent),
        "whatif_reworded_greeting": lambda: whatif(reworded),
        "whatif_reworded_greeting_redacted": lambda: whatif_redacted(reworded),
    }
    # Round-robin, a collection before each: a phase's garbage is not the next one's cost, nor is its place.
    walls: dict[str, list[float]] = {name: [] for name in work}
    cpus: dict[str, list[float]] = {name: [] for name in work}
    results: dict[str, list[Any]] = {}
    names = list(work)
    for turn in range(passes):
        for name in names[turn % len(names):] + names[:turn % len(names)]:  # each phase first in its turn
            run = work[name]
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = await run()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    read, replayed = results["read_and_decode"][0], results["read_and_decode_replayed_topics"][0]
    phases: dict[str, dict[str, Any]] = {
        name: {"wall_s": round(statistics.median(walls[name]), 3), "cpu_s": round(statistics.median(cpus[name]), 3)}
        for name in work}
    phases["replay_verify"]["identical"] = sum(1 for r in results["replay_verify"] if r.identical)
    for name in ("whatif_same_agent", "whatif_reworded_greeting", "whatif_reworded_greeting_redacted"):
        phases[name]["changed"] = sum(1 for r in results[name] if r.changed)
    reading, reading_replayed = phases["read_and_decode"], phases["read_and_decode_replayed_topics"]
    await registry.aclose()
    for phase in phases.values():
        phase["calls_per_s"] = round(len(ids) / phase["wall_s"])
        phase["events_per_s"] = round(read / phase["wall_s"])
        phase["wall_ratio_to_reading"] = round(phase["wall_s"] / reading["wall_s"], 2)
        phase["wall_ratio_to_reading_replayed_topics"] = round(phase["wall_s"] / reading_replayed["wall_s"], 2)
    return {
        **run_facts("replay"),
        "backend": backend.name,
        "target": backend.describe(),
        "calls": len(ids),
        "events_written": events,
        "events_read": read,
        "events_read_by_replay": replayed,
        "passes": passes,
        "phases": phases,
    }
