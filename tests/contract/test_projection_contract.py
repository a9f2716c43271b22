"""The projection contract, run against every projection (`default_projections`) on both log backends:
what each must do for the runner's promises (docs/architecture.md, "Projections") to hold.

- Folding the log from its start gives the tables (and files) a rebuild gives, `_version` included.
- A crash before a batch is written, or between a batch's rows and its offsets, and a restart from
  the offsets stored lose and double nothing: the tables end as a run without crashes leaves them.
- An event it cannot fold goes to the dead-letter topic, costs that event alone, and does not stop it.
- The offsets it stores cover what it read: caught up, every partition of its topics is stored at
  least where the log ended (or at a record the projection holds back), and nothing of another topic.

The broker is shared: each test writes calls of a tenant of its own and compares only that tenant's
rows and files; its projections start where the log ended when it began (`begin_here`), as if they
had folded all before it, except a rebuild, which reads the whole log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogRecord, TopicPartition
from projections.default_projections import default_projections
from projections.projection import PROJECTION_NAMES, HoldsOffsets, Projection, log_admin
from projections.projection_runner import ProjectionRunner
from projections.store import AnalyticsStore
from projections.tables import OFFSETS, Output, Table
from schemas.base import Event, EventPayload
from schemas.events import CallStarted, CallSummarized
from schemas.topics import DEADLETTER
from streams.memory import caller_key
from tests.projection_runs import another_store, files, snapshot, stored_offsets
from voxlog.sim.synthetic_calls import synthetic_call

pytestmark = pytest.mark.slow

PROJECTIONS = [projection.name for projection in default_projections(recordings=Path("unused"))]
CALLS = 4
ROUNDS = 4
"""The tenant's calls, written in this many rounds where the test crashes the projection in each."""


def projection_named(name: str, folder: Path) -> Projection:
    """The projection as a process starting anew has it (nothing in memory), its files in `folder`."""
    (projection,) = (p for p in default_projections(recordings=folder) if p.name == name)
    return projection


@pytest.fixture(params=PROJECTIONS)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


class TenantCalls:
    """A tenant's calls as gateways and the summariser write them: their events interleaved, and each
    call's summary on its caller's memory stream once it ended; a round (a share of each call) at a time.

    The calls come from no number: so no summariser on a shared broker summarises them too (which
    one of two runs compared would see and the other not)."""

    def __init__(self, writer: EventWriter, tenant: str) -> None:
        self.writer = writer
        self.tenant = tenant
        self.calls = [(CallRecorder(writer, tenant_id=tenant, call_id=f"call-{uuid.uuid4()}", producer="test",
                                    producer_version="0"), list(map(without_number, synthetic_call(
                                        i, turns=2, frames_per_utterance=5))))
                      for i in range(CALLS)]
        self.per_round = [-(-len(payloads) // ROUNDS) for _, payloads in self.calls]
        self.callers: dict[str, CallRecorder] = {}
        """Each caller's memory stream (two callers)."""

    @property
    def done(self) -> bool:
        return not any(payloads for _, payloads in self.calls)

    async def write_round(self) -> list[Event[EventPayload]]:
        written: list[Event[EventPayload]] = []
        for step in range(max(self.per_round)):
            for index, ((recorder, payloads), share) in enumerate(zip(self.calls, self.per_round, strict=True)):
                if step < share and payloads:
                    written.append(await recorder.record(payloads.pop(0)))
                    if not payloads:
                        written.append(await self._summary(index, recorder.call_id))
        await self.writer.flush()
        return written

    async def write_all(self) -> list[Event[EventPayload]]:
        written: list[Event[EventPayload]] = []
        while not self.done:
            written += await self.write_round()
        return written

    async def _summary(self, index: int, call_id: str) -> Event[EventPayload]:
        key = caller_key(self.tenant, f"+155570000{index % 2:02d}")
        assert key is not None
        memory = self.callers.setdefault(key, CallRecorder(self.writer, tenant_id=self.tenant, call_id=key,
                                                           producer="test", producer_version="0"))
        return await memory.record(CallSummarized(call_id=call_id, agent_id="front-desk", summary=f"call {index}",
                                                  outcome="resolved", source="offline-extractive"))


def without_number(payload: EventPayload) -> EventPayload:
    return dataclasses.replace(payload, from_number=None) if isinstance(payload, CallStarted) else payload


async def log_ends(backend: LogBackend, topics: Sequence[str]) -> dict[TopicPartition, int]:
    async with log_admin(backend) as admin:
        await ensure_topics(admin)
        return {TopicPartition(topic, p): end for topic in topics
                for p, end in (await admin.end_offsets(topic)).items()}


async def store_offsets(store: AnalyticsStore, name: str, offsets: Mapping[TopicPartition, int]) -> None:
    """Stores `offsets` as where the projection is, newer than any stored before."""
    await asyncio.to_thread(store.create, OFFSETS)
    newest = await asyncio.to_thread(store.query, f"SELECT max(_version) FROM {OFFSETS.name}")
    version = max(int(newest.rows[0][0] or 0) + 1, time.time_ns())
    await asyncio.to_thread(store.insert, OFFSETS, [(name, tp.topic, tp.partition, offset, version)
                                                    for tp, offset in offsets.items()])


async def begin_here(backend: LogBackend, projection: Projection, *stores: AnalyticsStore) -> None:
    """The projection, in each store, where the log ends now: its runs fold what the test writes (and,
    on Kafka, what others write meanwhile)."""
    ends = await log_ends(backend, projection.topics)
    for store in stores:
        await store_offsets(store, projection.name, ends)


async def run_to_end(backend: LogBackend, store: AnalyticsStore, projection: Projection) -> ProjectionRunner:
    runner = ProjectionRunner(backend, store, projection)
    await runner.run(asyncio.Event(), until_caught_up=True)
    return runner


def folded_by(projection: Projection, events: Sequence[Event[EventPayload]]) -> list[Event[EventPayload]]:
    return [e for e in events if projection.event_types is None or e.type in projection.event_types]


class Crash(BaseException):
    """The process dies here: nothing catches it, nothing after it runs, nothing is flushed."""


class Faulty:
    """The projection under test, with a fault put in: an event it `refuse`s (raises on, as a projection
    does on an event it cannot fold) or `skip`s (folds to nothing: all refusing it may cost), or a
    crash before folding the event after the first `crash_after`."""

    def __init__(self, projection: Projection, *, refuse: str | None = None, skip: str | None = None,
                 crash_after: int | None = None) -> None:
        self.projection = projection
        self.name = projection.name
        self.topics: tuple[str, ...] = projection.topics
        self.tables: tuple[Table, ...] = projection.tables
        self.event_types: frozenset[str] | None = projection.event_types
        self.refuse, self.skip, self.crash_after = refuse, skip, crash_after
        self.folded = 0
        self.refused: LogRecord | None = None

    async def load(self, store: AnalyticsStore) -> None:
        await self.projection.load(store)

    def reset(self) -> None:
        self.projection.reset()

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> Sequence[Output]:
        if event.envelope.event_id == self.refuse:
            self.refused = record
            raise ValueError("an event this projection cannot fold")
        if event.envelope.event_id == self.skip:
            return []
        if self.folded == self.crash_after:
            raise Crash
        self.folded += 1
        return await self.projection.rows(record, event, backend)


class FaultyHolding(Faulty):
    """`Faulty`, of a projection that holds offsets back."""

    def held(self) -> Mapping[TopicPartition, int]:
        assert isinstance(self.projection, HoldsOffsets)
        return self.projection.held()

    async def settle(self, backend: LogBackend, read: Mapping[TopicPartition, int] | None) -> Sequence[Output]:
        assert isinstance(self.projection, HoldsOffsets)
        return await self.projection.settle(backend, read)


def faulty(projection: Projection, *, refuse: str | None = None, skip: str | None = None,
           crash_after: int | None = None) -> Faulty:
    kind = FaultyHolding if isinstance(projection, HoldsOffsets) else Faulty
    return kind(projection, refuse=refuse, skip=skip, crash_after=crash_after)


async def test_folding_the_log_from_its_start_gives_what_a_rebuild_gives(
        name: str, tenant: str, backend: LogBackend, store: AnalyticsStore, tmp_path: Path) -> None:
    folded = projection_named(name, tmp_path / "folded")
    await begin_here(backend, folded, store)
    async with backend.producer() as producer:
        await TenantCalls(EventWriter(producer), tenant).write_all()
    await run_to_end(backend, store, folded)
    tables = await snapshot(store, folded.tables, versions=True, tenant=tenant)
    assert any(tables.values()), "rows of the tenant's calls"

    await ProjectionRunner(backend, store, projection_named(name, tmp_path / "rebuilt")).rebuild()
    assert await snapshot(store, folded.tables, versions=True, tenant=tenant) == tables
    assert files(tmp_path / "rebuilt" / tenant) == files(tmp_path / "folded" / tenant)


async def test_a_crash_and_a_restart_from_the_stored_offsets_lose_and_double_nothing(
        name: str, tenant: str, backend: LogBackend, store: AnalyticsStore, tmp_path: Path) -> None:
    clean_store, crashed, clean = another_store(store), tmp_path / "crashed", tmp_path / "clean"
    await begin_here(backend, projection_named(name, crashed), store, clean_store)
    crashes = 0
    async with backend.producer() as producer:
        calls = TenantCalls(EventWriter(producer), tenant)
        while not calls.done:
            written = folded_by(projection_named(name, crashed), await calls.write_round())
            if written:  # killed halfway through folding the round: its batch is not written
                runner = ProjectionRunner(backend, store, faulty(projection_named(name, crashed),
                                                                 crash_after=len(written) // 2))
                with pytest.raises(Crash):
                    await runner.run(asyncio.Event(), until_caught_up=True)
                crashes += 1
            # Restarted, it runs to the end; killed between its rows and its offsets, the offsets are
            # those stored before it.
            before = await stored_offsets(store, name)
            await run_to_end(backend, store, projection_named(name, crashed))
            await store_offsets(store, name, before)
            await run_to_end(backend, store, projection_named(name, crashed))
    assert crashes >= 1
    await run_to_end(backend, clean_store, projection_named(name, clean))

    tables = await snapshot(clean_store, projection_named(name, clean).tables, versions=True, tenant=tenant)
    assert any(tables.values()), "rows of the tenant's calls"
    assert await snapshot(store, projection_named(name, crashed).tables, versions=True, tenant=tenant) == tables
    assert files(crashed / tenant) == files(clean / tenant)


async def test_an_event_it_cannot_fold_is_dead_lettered_and_costs_that_event_alone(
        name: str, tenant: str, backend: LogBackend, store: AnalyticsStore, tmp_path: Path) -> None:
    reference_store = another_store(store)
    await begin_here(backend, projection_named(name, tmp_path), store, reference_store)
    since_ms = time.time_ns() // 1_000_000
    async with backend.producer() as producer:
        written = await TenantCalls(EventWriter(producer), tenant).write_all()
    folded = folded_by(projection_named(name, tmp_path), written)
    victim = folded[len(folded) // 2].envelope.event_id

    refusing = faulty(projection_named(name, tmp_path / "refusing"), refuse=victim)
    runner = await run_to_end(backend, store, refusing)
    await run_to_end(backend, reference_store, faulty(projection_named(name, tmp_path / "skipping"), skip=victim))

    refused = refusing.refused
    assert refused is not None
    assert runner.dead_lettered == 1
    async with log_admin(backend) as admin:
        dead = [dict(r.headers) async for r in admin.read_key([DEADLETTER], refused.key or b"", since_ms=since_ms)]
    ours = [(d[DLQ_TOPIC], d[DLQ_PARTITION], d[DLQ_OFFSET]) for d in dead
            if f"projection {name}".encode() in d[DLQ_REASON]]
    assert ours == [(refused.topic.encode(), str(refused.partition).encode(), str(refused.offset).encode())]
    assert runner.positions[refused.tp] > refused.offset, "not stopped at it"
    tables = await snapshot(reference_store, refusing.tables, versions=True, tenant=tenant)
    assert any(tables.values()), "rows of the tenant's calls"
    assert await snapshot(store, refusing.tables, versions=True, tenant=tenant) == tables
    assert files(tmp_path / "refusing" / tenant) == files(tmp_path / "skipping" / tenant)


async def test_the_offsets_it_stores_cover_what_it_read(
        name: str, tenant: str, backend: LogBackend, store: AnalyticsStore, tmp_path: Path) -> None:
    projection = projection_named(name, tmp_path)
    await begin_here(backend, projection, store)
    async with backend.producer() as producer:
        await TenantCalls(EventWriter(producer), tenant).write_all()
    ends = await log_ends(backend, projection.topics)
    await ProjectionRunner(backend, store, projection, batch_rows=1, flush_s=0.0).run(asyncio.Event(),
                                                                                      until_caught_up=True)

    stored = await stored_offsets(store, name)
    assert {tp.topic for tp in stored} == set(projection.topics)
    # Where the log ended, but at a record it holds back (on a shared broker, another's live call).
    held = projection.held() if isinstance(projection, HoldsOffsets) else {}
    assert {tp: offset for tp, offset in stored.items() if offset < ends[tp] and offset != held.get(tp)} == {}


def test_the_command_line_names_every_projection_voxlog_runs() -> None:
    """`voxlog projections rebuild NAME` offers the names without importing the projections."""
    assert sorted(PROJECTIONS) == sorted(PROJECTION_NAMES)
