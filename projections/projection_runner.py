"""The projection runner: log in, rows out into ClickHouse, at-least-once and without doubles.

Each projection reads its topics alone (every partition), from the offsets it stored in
`_projection_offsets`, and writes in batches (5,000 rows or once a second). A batch's rows are
inserted before the offsets that cover them: a crash in between replays some events, whose rows
come out the same (same key, same version) and collapse in the ReplacingMergeTree. So a crash and
restart neither loses nor doubles a row; `rebuild` starts from offset zero and gives the same
tables. A projection whose effects of an event may come after the event's batch (the recordings
projection keeps a call's audio in memory, and finishes a call once its audio has been read) says
which offsets it holds back (`HoldsOffsets`): the offsets stored stop there, so a crash replays those
events. The same runner works on both log backends, in-process (`voxlog workers`, `voxlog sql`)
or in a worker of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import ConsumedEvent, EventConsumer, dead_letter_headers
from producers.log_producer import LogProducer, LogRecord, TopicPartition
from projections.projection import HoldsOffsets, Projection, log_admin
from projections.store import Analytics, AnalyticsStore
from projections.tables import OFFSETS, Output, Statement, Table
from schemas.topics import DEADLETTER
from streams.startup_heap import freeze_startup_heap

log = logging.getLogger(__name__)


class RowBatch:
    """The rows of one batch, per table, one per key: the newest version (the last of equal ones).

    A turn's row is emitted again as each step of the turn arrives; ReplacingMergeTree would keep
    only its newest version anyway, so a batch holds just that one and inserts far fewer rows.
    """

    def __init__(self) -> None:
        self.tables: dict[str, tuple[Table, dict[Any, tuple[Any, ...]]]] = {}
        self.rows = 0
        """Rows held (one per key): what decides when a batch is full."""
        self.statements: list[Statement] = []
        """Run after the batch's rows are written (an erasure must remove what came before it; the
        folds write nothing of an erased call after it)."""

    def add(self, rows: Iterable[Output]) -> None:
        for row in rows:
            if isinstance(row, Statement):
                self.statements.append(row)
                continue
            table, values = row
            held = self.tables.get(table.name)
            if held is None:
                held = self.tables[table.name] = (table, {})
            by_key = held[1]
            key = _key_of(table)(values)
            kept = by_key.get(key)
            if kept is None:
                by_key[key] = values
                self.rows += 1
            elif kept[-1] <= values[-1]:  # the version is every table's last column
                by_key[key] = values

    def per_table(self) -> list[tuple[Table, list[tuple[Any, ...]]]]:
        return [(table, list(by_key.values())) for table, by_key in self.tables.values()]


_keys: dict[str, Callable[[tuple[Any, ...]], Any]] = {}


def _key_of(table: Table) -> Callable[[tuple[Any, ...]], Any]:
    """A function giving a row's key (its ORDER BY columns) for the table."""
    key = _keys.get(table.name)
    if key is None:
        names = table.column_names
        key = _keys[table.name] = itemgetter(*(names.index(column) for column in table.order_by))
    return key


POLL_RECORDS = 2000
"""Records a runner reads from the log at a time."""
POLL_TIMEOUT_S = 0.2
"""How long a runner's read waits for records when there are none."""

ReadProgress = Callable[[int, int | None], None]
"""Told, as a runner reads, the records it has read in this run and, when it reads up to where the log
ended as it began (a rebuild, a catch-up), how many that is in all; else None."""


class ProjectionRunner:
    def __init__(self, backend: LogBackend, store: AnalyticsStore, projection: Projection, *,
                 batch_rows: int = 5000, flush_s: float = 1.0, on_progress: ReadProgress | None = None) -> None:
        self.backend = backend
        self.store = store
        self.projection = projection
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.on_progress = on_progress
        self.positions: dict[TopicPartition, int] = {}
        self.events = 0
        """Records read (of the projection's event types or not)."""
        self.dead_lettered = 0
        """Events the projection could not fold, sent to the dead-letter topic with the reason."""
        self.rows_written = 0

    async def prepare(self) -> None:
        """Makes the topics and tables, reads the stored positions, loads the projection's state."""
        async with log_admin(self.backend) as admin:
            await ensure_topics(admin)
        for table in (OFFSETS, *self.projection.tables):
            await asyncio.to_thread(self.store.create, table)
        result = await asyncio.to_thread(
            self.store.query, f"SELECT topic, log_partition, next_offset FROM {OFFSETS.name} FINAL "
            "WHERE projection_name = {name:String}", {"name": self.projection.name})
        self.positions = {TopicPartition(t, int(p)): int(o) for t, p, o in result.rows}
        await self.projection.load(self.store)

    async def _prepare_rebuild(self) -> None:
        """`prepare` for a rebuild: the offsets forgotten, the tables dropped and made again whole by their
        CREATE (no columns to look up, no positions to read: 45 ms of the 380 of a 16,532-event calls rebuild)."""
        async with log_admin(self.backend) as admin:
            await ensure_topics(admin)
        # Offsets first: a crash before the tables are dropped then replays rows that collapse.
        # Offsets of zero, newer than the stored ones, forget them as a DELETE would, at the cost
        # of an insert rather than a mutation.
        await asyncio.to_thread(self.store.create, OFFSETS)
        stored = await asyncio.to_thread(
            self.store.query, f"SELECT topic, log_partition FROM {OFFSETS.name} FINAL "
            "WHERE projection_name = {name:String} AND next_offset > 0", {"name": self.projection.name})
        version = time.time_ns()
        zeros = [(self.projection.name, topic, partition, 0, version) for topic, partition in stored.rows]
        await asyncio.to_thread(self.store.insert, OFFSETS, zeros)
        await asyncio.to_thread(self._remake_tables)
        self.positions = {}
        self.projection.reset()
        await self.projection.load(self.store)

    def _remake_tables(self) -> None:
        for table in self.projection.tables:
            self.store.drop(table)
            self.store.create(table, new=True)

    async def _ends(self) -> dict[TopicPartition, int]:
        async with log_admin(self.backend) as admin:
            return {TopicPartition(topic, p): end for topic in self.projection.topics
                    for p, end in (await admin.end_offsets(topic)).items()}

    async def run(self, stop: asyncio.Event, *, until_caught_up: bool = False) -> None:
        """Projects until `stop` is set (or, with `until_caught_up`, until it reached where the
        log ended when it began)."""
        await self.prepare()
        await self._consume(stop, until_caught_up=until_caught_up)

    async def _consume(self, stop: asyncio.Event, *, until_caught_up: bool) -> None:
        ends = await self._ends() if until_caught_up else {}
        read_before = self.events
        to_read = sum(max(0, end - self.positions.get(tp, 0)) for tp, end in ends.items()) if until_caught_up else None
        pending = RowBatch()
        last_flush, unwritten = time.monotonic(), False
        flushing: asyncio.Task[None] | None = None

        async def flush() -> None:
            # One batch is written while the next is read; a batch's offsets follow its rows.
            nonlocal pending, last_flush, flushing, unwritten
            if flushing is not None:
                await flushing
            flushing = asyncio.create_task(self._flush(pending, self._storable(self.positions)))
            pending, last_flush, unwritten = RowBatch(), time.monotonic(), False

        async with self.backend.producer() as dead_letters, \
                self.backend.consumer(list(self.projection.topics)) as consumer:
            for tp in consumer.assignment():
                if self.positions.get(tp, 0):
                    await consumer.seek(tp, self.positions[tp])
            events = EventConsumer(consumer, dead_letters, name=f"voxlog-projection-{self.projection.name}")
            reading: asyncio.Task[tuple[list[ConsumedEvent], list[LogRecord]]] | None = None
            try:
                while not stop.is_set():
                    if until_caught_up and all(self.positions.get(tp, 0) >= end for tp, end in ends.items()):
                        unwritten |= await self._settle(pending, ends)  # all the log held then is read
                        break
                    batch, polled = await (reading or self._poll(events))
                    # The next batch is read from the log while this one is folded.
                    reading = asyncio.create_task(self._poll(events)) if polled else None
                    await self._fold(batch, dead_letters, pending)
                    if not polled:  # the log read to its end: all it held when the poll began is read
                        unwritten |= await self._settle(pending, self.positions)
                    self.events += len(polled)
                    if self.on_progress is not None and polled:
                        self.on_progress(self.events - read_before, to_read)
                    for record in _last_per_partition(polled):
                        self.positions[record.tp] = record.offset + 1
                        unwritten = True
                    due = pending.rows >= self.batch_rows or time.monotonic() - last_flush >= self.flush_s or not polled
                    if unwritten and due:
                        await flush()
                if unwritten:
                    await flush()
            finally:
                if reading is not None:
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reading
                if flushing is not None:
                    await flushing

    async def _fold(self, batch: Sequence[ConsumedEvent], dead_letters: LogProducer, into: RowBatch) -> None:
        for item in batch:
            try:
                rows = await self.projection.rows(item.record, item.event, self.backend)
            except Exception as exc:  # one event the projection cannot take must not stop it
                await self._dead_letter(dead_letters, item.record, exc)
                continue
            into.add(rows)

    async def project(self, batch: Sequence[ConsumedEvent], dead_letters: LogProducer,
                      positions: dict[TopicPartition, int]) -> None:
        """Folds one batch and writes its rows, then `positions` (the offsets after it) once its dead
        letters are durable: for a runner that reads the log itself (`projections.faust_projections`)."""
        pending = RowBatch()
        await self._fold(batch, dead_letters, pending)
        await self._settle(pending, None)  # this runner cannot tell when the log is read to its end
        await dead_letters.flush()
        await self._flush(pending, self._storable(positions))

    def _storable(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The offsets that may be stored once the rows folded so far are written: `positions`, less
        what the projection holds back. Taken when a batch is closed, not when it is written: later
        events may release a hold whose rows are only in a later batch."""
        if not isinstance(self.projection, HoldsOffsets):
            return dict(positions)
        held = self.projection.held()
        return {tp: min(offset, held.get(tp, offset)) for tp, offset in positions.items()}

    async def _settle(self, into: RowBatch, read: Mapping[TopicPartition, int] | None) -> bool:
        """Lets a projection that holds offsets finish what waited on the log; True if it gave rows."""
        if not isinstance(self.projection, HoldsOffsets):
            return False
        rows = await self.projection.settle(self.backend, read)
        into.add(rows)
        return bool(rows)

    async def _dead_letter(self, dead_letters: LogProducer, record: LogRecord, exc: Exception) -> None:
        reason = f"projection {self.projection.name} could not fold it: {exc!r}"
        log.warning("%s (%s/%s@%s)", reason, record.topic, record.partition, record.offset)
        await dead_letters.send(DEADLETTER, record.key or b"", record.value,
                                dead_letter_headers(record, reason, f"voxlog-projection-{self.projection.name}"))
        self.dead_lettered += 1

    async def _poll(self, events: EventConsumer) -> tuple[list[ConsumedEvent], list[LogRecord]]:
        batch = await events.poll(timeout_s=POLL_TIMEOUT_S, max_records=POLL_RECORDS, types=self.projection.event_types)
        return batch, events.polled

    async def _flush(self, pending: RowBatch, positions: dict[TopicPartition, int]) -> None:
        for table, rows in pending.per_table():
            await asyncio.to_thread(self._insert, table, rows)
            self.rows_written += len(rows)
        for statement in pending.statements:
            await asyncio.to_thread(self.store.run, statement)
        version = time.time_ns()
        offsets = [(self.projection.name, tp.topic, tp.partition, offset, version)
                   for tp, offset in sorted(positions.items())]
        await asyncio.to_thread(self.store.insert, OFFSETS, offsets)

    def _insert(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        try:
            self.store.insert(table, rows)
            return
        except Exception as exc:  # a value ClickHouse refuses: mend what can be mended, keep the rest
            log.warning("projection %s: a batch for %s was refused (%s); inserting it mended", self.projection.name,
                        table.name, exc)
        mended = [table.sanitize(values) for values in rows]
        try:
            self.store.insert(table, mended)  # one insert still, when mending was all it took
            return
        except Exception as exc:
            log.warning("projection %s: the mended batch for %s was refused too (%s); inserting row by row",
                        self.projection.name, table.name, exc)
        for values in mended:
            try:
                self.store.insert(table, [values])
            except Exception as exc:
                log.error("projection %s: row dropped from %s: %s: %r", self.projection.name, table.name, exc, values)

    async def rebuild(self) -> None:
        """Drops the projection's tables and offsets, and projects the whole log again."""
        freeze_startup_heap()  # a rebuild allocates millions of short-lived objects: passes, many
        await self._prepare_rebuild()
        await self._consume(asyncio.Event(), until_caught_up=True)


def _last_per_partition(records: Iterable[LogRecord]) -> list[LogRecord]:
    last: dict[tuple[str, int], LogRecord] = {}
    for record in records:
        last[record.topic, record.partition] = record  # not `record.tp`: a TopicPartition per record is costly
    return list(last.values())


async def catch_up(backend: LogBackend, store: AnalyticsStore, projections: Sequence[Projection]) -> None:
    """Brings every projection up to where the log is now."""
    for projection in projections:
        await ProjectionRunner(backend, store, projection).run(asyncio.Event(), until_caught_up=True)


async def projected(backend: LogBackend, store: Analytics, projections: Sequence[Projection], *,
                    timeout_s: float) -> None:
    """Waits until the runners of `projections` that run elsewhere (a background process, workers of
    their own) have stored offsets up to where the log ends now: their rows of it are in the tables.
    TimeoutError, naming what is behind, after `timeout_s`."""
    async with log_admin(backend) as admin:
        ends = {(p.name, topic, partition): end for p in projections for topic in p.topics
                for partition, end in (await admin.end_offsets(topic)).items() if end > 0}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        stored = await asyncio.to_thread(store.query, f"SELECT projection_name, topic, log_partition, next_offset "
                                                      f"FROM {OFFSETS.name} FINAL")
        at = {(str(name), str(topic), int(partition)): int(offset) for name, topic, partition, offset in stored.rows}
        behind = sorted(key for key, end in ends.items() if at.get(key, 0) < end)
        if not behind:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s the projections are behind the log in {len(behind)} "
                               f"partitions, e.g. {behind[:3]}")
        await asyncio.sleep(0.1)
