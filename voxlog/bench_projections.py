"""`voxlog bench projections`: how fast the log becomes tables, and how fresh the tables are.

Two phases, on the configured log and a ClickHouse of the benchmark's own (embedded chDB in
`VOXLOG_HOME/bench/clickhouse`, unless `VOXLOG_CLICKHOUSE_DSN` names a server):
1. rebuild: N events of synthetic calls (the realistic mix: mostly audio) are in the log; every
   projection (calls, audit, memory, recordings; or those named with `--only`) rebuilds from
   offset zero. Reported per projection: the events it read, per second, beside its reference measured
   in the same run: the same topics read and the events of the types it folds decoded, as its runner
   reads and decodes them, with nothing folded or written (a rebuild cannot be faster; how much slower
   it is, is what its fold and its writes cost).
2. lag: calls flow at a steady rate (default 5,000 events/s) while the projections run as they do
   in production (batches of 5,000 rows or one a second); a poller asks ClickHouse every 50 ms
   which turns exist yet. Lag = when a turn's row could first be read - when its event was written.
   Turns come from the calls projection: without it there is no lag phase.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import EventConsumer
from producers.event_writer import CallRecorder, EventWriter
from projections.default_projections import default_projections
from projections.projection import Projection
from projections.projection_runner import POLL_RECORDS, POLL_TIMEOUT_S, ProjectionRunner
from projections.store import AnalyticsStore
from projections.tables import Column, Table
from schemas.events import TurnTaken
from schemas.version import __version__
from voxlog.bench import PROGRESS_EVERY, percentile, run_facts
from voxlog.progress import progress
from voxlog.sim.synthetic_calls import concurrent_calls

POLL_S = 0.05
EMPTY_POLLS_AT_THE_END = 25
"""Polls in a row that find nothing after which the reference stops short of the rebuild's records (5 s: a
log that lost records meanwhile, to retention, rather than a consumer still finding its partitions)."""


async def write_synthetic_calls(backend: LogBackend, run: str, events: int, rate: float | None,
                                written: dict[tuple[str, int], float] | None = None,
                                on_progress: Callable[[int], None] | None = None) -> float:
    """Appends `events` events of concurrent synthetic calls (at `rate` a second, or flat out);
    records when each turn was written; advances `on_progress` as it goes. Returns the seconds taken."""
    started = time.perf_counter()
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        recorders: dict[int, CallRecorder] = {}
        for count, (index, payload) in enumerate(concurrent_calls(100, seed=11)):
            if count >= events:
                break
            recorder = recorders.get(index)
            if recorder is None:
                recorder = recorders[index] = CallRecorder(writer, tenant_id="bench", call_id=f"bench-{run}-{index}",
                                                           producer="voxlog.bench", producer_version=__version__)
            await recorder.record(payload)
            if written is not None and isinstance(payload, TurnTaken):
                written[(recorder.call_id, payload.turn_index)] = time.time()
            if on_progress is not None and count % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                on_progress(PROGRESS_EVERY)
            if rate is not None and count % 100 == 99:
                await producer.flush()
                ahead = started + (count + 1) / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await producer.flush()
    return time.perf_counter() - started


def _warm_up(store: AnalyticsStore) -> None:
    """The first insert of a process imports pandas (clickhouse-connect checks whether the rows
    are a DataFrame): about 0.2 s, paid once per process, that is no projection's rebuild rate.
    It is paid here, before anything is timed, rather than by whichever projection comes first."""
    scratch = Table("_bench_warm_up", "The benchmark's scratch table.",
                    (Column("_version", "UInt64", "A row to insert."),), ("_version",), "")
    store.create(scratch)
    store.insert(scratch, [(0,)])
    store.drop(scratch)


async def bench_projections(backend: LogBackend, store: AnalyticsStore, recordings: Path, *, events: int,
                            rate: int, seconds: float, only: Collection[str] = ()) -> dict[str, Any]:
    """Rebuild and lag of every projection, or of those named in `only`."""
    projections = default_projections(recordings=recordings)
    unknown = set(only) - {p.name for p in projections}
    if unknown:
        known = ", ".join(p.name for p in projections)
        raise ValueError(f"no projection {', '.join(sorted(unknown))}; there are {known}")
    chosen = {p.name for p in projections if not only or p.name in only}
    async with backend.admin() as admin:
        await ensure_topics(admin)
    with progress("bench projections: writing the log", total=events, unit="events") as wrote:
        await write_synthetic_calls(backend, uuid.uuid4().hex[:8], events, None, on_progress=wrote)
        wrote.update(events)
    await asyncio.to_thread(_warm_up, store)

    rebuild: dict[str, Any] = {}
    for projection in (p for p in projections if p.name in chosen):
        with progress(f"bench projections: rebuild {projection.name}", unit="events") as read:
            runner = ProjectionRunner(backend, store, projection, on_progress=read.update)
            started, cpu_before = time.perf_counter(), time.process_time()
            await runner.rebuild()
            elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_before
        reference = await read_and_decode(backend, projection, runner.events)
        rebuild[projection.name] = {"events": runner.events, "rows": runner.rows_written,
                                    "seconds": round(elapsed, 2), "cpu_s": round(cpu_s, 2),
                                    "events_per_s": round(runner.events / elapsed),
                                    "reference": reference,
                                    "of_reference": round(runner.events / elapsed / reference["events_per_s"], 3)
                                    if reference["events_per_s"] else None}
    return {
        **run_facts("projections"),
        "log": backend.describe(),
        "store": store.describe(),
        "rebuild": rebuild,
        "lag": await _lag(backend, store, recordings, chosen, rate, seconds) if "calls" in chosen else None,
    }


async def read_and_decode(backend: LogBackend, projection: Projection, events: int) -> dict[str, Any]:
    """A rebuild's reference: the first `events` records of the projection's topics read and those of the
    types it folds decoded, as its runner reads and decodes them, with nothing folded or written."""
    read = decoded = 0
    started, cpu_before = time.perf_counter(), time.process_time()
    async with backend.producer() as dead_letters, backend.consumer(list(projection.topics)) as consumer:
        reader = EventConsumer(consumer, dead_letters, name=f"voxlog-bench-reference-{projection.name}")
        empty_polls = 0  # a Kafka consumer's first polls may come back empty while it finds its partitions
        while read < events and empty_polls < EMPTY_POLLS_AT_THE_END:
            decoded += len(await reader.poll(timeout_s=POLL_TIMEOUT_S, max_records=POLL_RECORDS,
                                             types=projection.event_types))
            read += len(reader.polled)
            empty_polls = 0 if reader.polled else empty_polls + 1
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_before
    return {"events": read, "decoded": decoded, "seconds": round(elapsed, 2), "cpu_s": round(cpu_s, 2),
            "events_per_s": round(read / elapsed)}


async def _lag(backend: LogBackend, store: AnalyticsStore, recordings: Path, chosen: Collection[str], rate: int,
               seconds: float) -> dict[str, Any]:
    """Event-to-row lag of turns while calls flow at `rate` for `seconds`, the `chosen` projections running;
    the process's CPU time (writer, projections, chDB and the poller together) while they run."""
    run = uuid.uuid4().hex[:8]
    written: dict[tuple[str, int], float] = {}
    seen: dict[tuple[str, int], float] = {}
    stop = asyncio.Event()
    runners = [ProjectionRunner(backend, store, p) for p in default_projections(recordings=recordings)
               if p.name in chosen]
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]

    async def poll() -> None:
        while not stop.is_set() or len(seen) < len(written):
            result = await asyncio.to_thread(
                store.query, "SELECT call_id, turn_index FROM turns WHERE call_id LIKE {p:String}",
                {"p": f"bench-{run}-%"})
            now = time.time()
            for call_id, turn in result.rows:
                seen.setdefault((call_id, int(turn)), now)
            if stop.is_set() and now - stopped_at > 30:
                return
            await asyncio.sleep(POLL_S)

    stopped_at = 0.0
    started, cpu_before = time.perf_counter(), time.process_time()
    polling = asyncio.create_task(poll())
    with progress(f"bench projections: lag at {rate} events/s", total=int(rate * seconds), unit="events") as wrote:
        wrote_s = await write_synthetic_calls(backend, run, int(rate * seconds), float(rate), written,
                                              on_progress=wrote)
        wrote.update(int(rate * seconds))
    await asyncio.sleep(3)  # the last batches
    stopped_at = time.time()
    stop.set()
    await asyncio.gather(*tasks)
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_before
    await polling
    lags = [(seen[k] - t) * 1000 for k, t in written.items() if k in seen]
    return {
        "target_rate": rate,
        "achieved_rate": round(int(rate * seconds) / wrote_s),
        "turns": len(written),
        "turns_seen": len(lags),
        "p50_ms": round(statistics.median(lags), 1) if lags else None,
        "p99_ms": round(percentile(lags, 0.99), 1) if lags else None,
        "max_ms": round(max(lags), 1) if lags else None,
        "poll_ms": POLL_S * 1000,
        "cpu_s": round(cpu_s, 2),
        "cpu_share": round(cpu_s / elapsed, 3),
    }
