"""The projections as faust-streaming workers on Kafka (`voxlog projections run` with `VOXLOG_KAFKA_BOOTSTRAP`).

Each projection is a faust app of its own, whose id (`<prefix>-<projection>`) is its Kafka consumer
group, with one agent over the projection's topics: an independent consumer that no other
projection holds back. All the apps run in one worker process, because the embedded ClickHouse
(chDB) can be open in one process only. The folding and writing are `ProjectionRunner`'s own
(`projections.projection_runner`), so both runners give the same rows.

**Batches.** The agent takes up to `BATCH_RECORDS` events, or what came within `BATCH_WITHIN_S`
(`Stream.take_events`), folds them into rows, inserts the rows, then stores the offsets after the
batch in `_projection_offsets`, like the in-process runner, and only then commits those offsets to
the group itself.

**ClickHouse's offsets are the truth, not faust's acks.** The topics are read with acks off, so
faust commits nothing of its own: its acks cannot say what was written. `take_events` acks its
batch in a `finally`, so also when the agent fails or is cancelled in the middle of a batch, or
skips a batch fetched before a rebalance (below); faust commits acked offsets periodically, when a
task fails and when it stops; and a stop here cancels a batch midway, for it does not wait for the
events already fetched to be folded (`stream_wait_empty` off: catching up, that can take minutes).
With acks on, the group's offsets ran ahead of the rows after a rebalance, and a worker stopped
then (or a reader of the group's lag) took events for written that were not. So the group's
offsets are only ever the ones stored in ClickHouse: after each batch, and at every partition
assignment, for the partitions the worker was given, in `on_rebalance_complete`, which faust awaits
before it seeks the consumer to the committed offsets: reading resumes right after the last batch
whose offsets are stored. A crash between a batch's rows and its offsets replays that batch, whose rows come out the
same and collapse in the ReplacingMergeTree; so a worker killed or stopped anywhere and started
again neither loses nor doubles a row. Events fetched before the assignment (a batch gathered
across a rebalance) carry the old consumer generation and are skipped: the seek reads them again.
An agent that fails crashes the worker (`CrashingSupervisor`) rather than going on past a batch it
did not write; started again, it goes on from ClickHouse's offsets.

**State.** At every assignment the projection is reset and loaded from its tables, as a freshly
started in-process runner is (prompt versions, audit chain heads); a call picked up in the middle
is first folded from its history in the log. One lock orders assignments and batches, so the
state is never reset under a batch being folded.

**One worker.** Run one projections worker per ClickHouse: faust shares a group's partitions among
its live workers and keeps the same partition of several topics together only when the topics
have as many partitions, and `voxlog.calls` (12) and `voxlog.commands` (6) do not, so a second
worker would fold a call's tool requests apart from the rest of the call. A worker given only part
of a projection's partitions says so in its log. A crashed worker's partitions wait for its
session to expire (`SESSION_TIMEOUT_S`) before its restart gets them.

**Rebuild** stays on the in-process runner (`voxlog projections rebuild NAME`, from offset zero, to
the end of the log): stop the worker first (with chDB it has to be stopped, being the one process
that opens it); started again, it goes on from the offsets the rebuild stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import faust
from faust.transport.consumer import Consumer
from faust.types import TP
from mode.supervisors import CrashingSupervisor

from consumers.backends import KafkaBackend
from consumers.event_reader import decode_records
from consumers.faust_common import faust_app, faust_record
from producers.log_producer import LogProducer, TopicPartition
from projections.projection import Projection
from projections.projection_runner import ProjectionRunner
from projections.store import AnalyticsStore

log = logging.getLogger(__name__)

BATCH_RECORDS = 2000
BATCH_WITHIN_S = 1.0
SESSION_TIMEOUT_S = 10.0
"""How long a silent worker keeps its partitions: also how long a restart after a crash waits."""


class ProjectionAgent:
    """One projection on Kafka: its faust agent's body and what it does when given partitions."""

    def __init__(self, app: faust.App, backend: KafkaBackend, store: AnalyticsStore, projection: Projection) -> None:
        self.app = app
        self.projection = projection
        self.runner = ProjectionRunner(backend, store, projection)
        self.codec = backend.codec
        self.name = f"voxlog-projection-{projection.name}"
        self.lock = asyncio.Lock()
        self.generation: int | None = None
        """The consumer generation whose assignment the state and positions belong to."""

    async def on_assigned(self, sender: faust.App, *_: Any, **__: Any) -> None:
        """Resets the state, loads it from ClickHouse, and points the group at the stored offsets."""
        async with self.lock:
            consumer = cast(Consumer, self.app.consumer)
            generation = self.app.consumer_generation_id
            assigned = {tp for tp in consumer.assignment() if tp.topic in self.projection.topics}
            self.projection.reset()
            await self.runner.prepare()
            offsets = {tp: self.runner.positions.get(TopicPartition(tp.topic, tp.partition), 0) for tp in assigned}
            if offsets and not await self._commit(offsets):
                log.warning("%s: rebalanced again before its offsets were committed", self.name)
                return
            self.generation = generation
            partitions = sum(consumer.topic_partitions(topic) or 0 for topic in self.projection.topics)
            if len(assigned) < partitions:
                log.warning("%s holds %d of its %d partitions: its group %s has another member, a worker that "
                            "crashed and whose session has not expired yet, or a second worker (run one: see "
                            "projections.faust_projections)", self.name, len(assigned), partitions, self.app.conf.id)
            log.info("%s: %d partitions, from the offsets stored in ClickHouse", self.name, len(assigned))

    async def consume(self, stream: Any) -> None:
        async with self.runner.backend.producer() as dead_letters:
            async for events in stream.take_events(BATCH_RECORDS, within=BATCH_WITHIN_S):
                async with self.lock:
                    await self._project(events, dead_letters)

    async def _project(self, events: Sequence[Any], dead_letters: LogProducer) -> None:
        records = [faust_record(e.message) for e in events if e.message.generation_id == self.generation]
        if not records:
            return  # fetched before this assignment's seek, which reads them again
        decoded, _ = await decode_records(records, self.codec, dead_letters, self.name, self.projection.event_types)
        after = {record.tp: record.offset + 1 for record in records}
        await self.runner.project(decoded, dead_letters, after)
        if not await self._commit({TP(tp.topic, tp.partition): offset for tp, offset in after.items()}):
            log.info("%s: rebalancing; the next assignment commits the offsets stored in ClickHouse", self.name)

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """Commits `offsets` to the group; False where the group rebalanced meanwhile."""
        consumer = cast(Consumer, self.app.consumer)
        # Faust has no public call to commit given offsets; `_commit` is the one its own commits end in.
        return bool(await consumer._commit(offsets))  # noqa: SLF001


def build_apps(backend: KafkaBackend, store: AnalyticsStore, projections: Sequence[Projection], *,
               app_id_prefix: str, datadir: Path) -> list[faust.App]:
    """A faust app per projection, with the id `<app_id_prefix>-<name>` (`datadir` holds faust's folders)."""
    apps = []
    for projection in projections:
        app_id = f"{app_id_prefix}-{projection.name}"
        (datadir / app_id).mkdir(parents=True, exist_ok=True)
        app = faust_app(
            app_id,
            backend.bootstrap,
            broker_session_timeout=SESSION_TIMEOUT_S,
            # A stop or a rebalance need not wait for the events faust has handed out to be folded
            # (catching up, that can be minutes): the offsets in ClickHouse say where to go on.
            stream_wait_empty=False,
            datadir=str(datadir / app_id),
        )
        agent = ProjectionAgent(app, backend, store, projection)
        source = app.topic(*projection.topics, key_type=bytes, value_type=bytes, acks=False)
        app.agent(source, name=projection.name, supervisor_strategy=CrashingSupervisor)(agent.consume)
        # mode's SignalHandlerT matches no function under mypy, not even `def (sender, *args, **kwargs) -> None`.
        app.on_rebalance_complete.connect(agent.on_assigned)  # type: ignore[arg-type]
        apps.append(app)
    return apps


def run_worker(backend: KafkaBackend, store: AnalyticsStore, projections: Sequence[Projection], *,
               app_id_prefix: str, datadir: Path, loglevel: str = "info") -> NoReturn:
    """Runs every projection's app in one faust worker until it is stopped (SIGINT, SIGTERM)."""
    apps = build_apps(backend, store, projections, app_id_prefix=app_id_prefix, datadir=datadir)
    faust.Worker(*apps, loglevel=loglevel).execute_from_commandline()
