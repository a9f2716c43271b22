"""The recordings projection under the runner: a call's audio held in memory and a `call.ended` that
waits for its audio hold the stored offsets back, so a crash anywhere loses and doubles nothing, and
the recordings come out as a run without crashes makes them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from consumers.backends import EmbeddedBackend, LogBackend
from producers.log_producer import LogRecord, TopicPartition
from projections.projection import HoldsOffsets
from projections.projection_runner import ProjectionRunner
from projections.recordings import RecordingsProjection
from projections.store import AnalyticsStore
from projections.tables import RECORDINGS, Output, Table, at
from schemas.base import Event, EventPayload
from schemas.events import CallEnded
from schemas.topics import CALLS
from tests.projection_runs import another_store, files, snapshot, stored_offsets, write_calls

pytestmark = pytest.mark.slow


async def test_killing_the_recordings_projector_loses_and_doubles_nothing(
        embedded_backend: EmbeddedBackend, tmp_path: Path, store: AnalyticsStore) -> None:
    log = embedded_backend
    rng = random.Random(7)
    writing = asyncio.create_task(write_calls(log, "demo", 30, pause_every=40))
    killed = tmp_path / "killed"
    for _ in range(16):
        runner = ProjectionRunner(log, store, RecordingsProjection(killed), batch_rows=rng.choice([5, 50, 500]),
                                  flush_s=rng.choice([0.05, 0.2]))
        running = asyncio.create_task(runner.run(asyncio.Event()))
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        running.cancel()  # a crash: wherever it was, no flush, no goodbye
        with pytest.raises(asyncio.CancelledError):
            await running
        await asyncio.sleep(0.1)  # a crash ends its threads too: let the cancelled run's WAV writer finish
    await writing
    await ProjectionRunner(log, store, RecordingsProjection(killed)).run(asyncio.Event(), until_caught_up=True)

    clean_store = another_store(store)
    await ProjectionRunner(log, clean_store, RecordingsProjection(tmp_path / "clean")).run(
        asyncio.Event(), until_caught_up=True)
    after_kills = await snapshot(store, (RECORDINGS,))
    assert len(after_kills["recordings"]) == 30
    assert all(row[RECORDINGS.column_names.index("ended_at")] is not None for row in after_kills["recordings"])
    assert after_kills == await snapshot(clean_store, (RECORDINGS,)), "every call once, as without crashes"
    assert files(killed) == files(tmp_path / "clean"), "the same WAVs, and no working file left"


class HoldsFirstCallsRecord:
    """Holds the first `voxlog.calls` record of each partition until the runner settles, and gives a
    row then: what the recordings projection does with a `call.ended` whose audio is not read yet."""

    name = "holds-first"
    topics: tuple[str, ...] = (CALLS,)
    tables: tuple[Table, ...] = (RECORDINGS,)
    event_types: frozenset[str] | None = frozenset({CallEnded.EVENT_TYPE})

    def __init__(self) -> None:
        self.first: dict[TopicPartition, tuple[int, Event[EventPayload]]] = {}
        self.settled: list[Mapping[TopicPartition, int] | None] = []
        self.settling = asyncio.Event()

    async def load(self, store: AnalyticsStore) -> None:
        pass

    def reset(self) -> None:
        self.first.clear()

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> Sequence[Output]:
        self.first.setdefault(record.tp, (record.offset, event))
        return []

    def held(self) -> Mapping[TopicPartition, int]:
        return {tp: offset for tp, (offset, _) in self.first.items()}

    async def settle(self, backend: LogBackend, read: Mapping[TopicPartition, int] | None) -> Sequence[Output]:
        self.settled.append(None if read is None else {tp: offset for tp, offset in read.items() if offset})
        self.settling.set()
        rows: list[Output] = [(RECORDINGS, (e.tenant_id, e.call_id, "", "", 2, 16000, 0, 0, 0, 0,
                                            at(e.envelope.event_time_us), at(e.envelope.event_time_us), 1, e.seq))
                              for _, e in self.first.values()]
        self.first.clear()
        return rows


class HoldsForever(HoldsFirstCallsRecord):
    name = "holds-forever"

    async def settle(self, backend: LogBackend, read: Mapping[TopicPartition, int] | None) -> Sequence[Output]:
        self.settled.append(None if read is None else {tp: offset for tp, offset in read.items() if offset})
        return []


async def test_the_runner_stores_no_offset_past_what_a_projection_holds(embedded_backend: EmbeddedBackend,
                                                                        tmp_path: Path, store: AnalyticsStore) -> None:
    log = embedded_backend
    await write_calls(log, "demo", 6)
    projection = HoldsFirstCallsRecord()
    assert isinstance(projection, HoldsOffsets)
    runner = ProjectionRunner(log, store, projection, batch_rows=1, flush_s=0.0)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    await asyncio.wait_for(projection.settling.wait(), 30)  # once the log is read to its end
    stop.set()
    await running

    # Settled after an empty poll, with all the log read: every partition at its end.
    async with log.admin() as admin:
        ends = {TopicPartition(CALLS, p): end for p, end in (await admin.end_offsets(CALLS)).items() if end}
    assert projection.settled[0] == ends
    ended = await snapshot(store, (RECORDINGS,))
    assert len(ended["recordings"]) == len(ends)  # a row per partition's first record, given at settling
    assert await stored_offsets(store, projection.name) == ends  # released: stored in full

    # Held and never released (as if it crashed before settling): the offsets stop at the held records.
    held = HoldsForever()
    runner = ProjectionRunner(log, store, held, batch_rows=1, flush_s=0.0)
    await runner.run(asyncio.Event(), until_caught_up=True)
    assert held.settled == [ends]  # settled once, at the ends it was to read to
    stored = await stored_offsets(store, held.name)
    assert stored == {tp: held.held().get(tp, end) for tp, end in ends.items()}  # each at its first call.ended
    assert all(stored[tp] < ends[tp] for tp in held.held())
