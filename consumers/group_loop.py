"""The consumer-group loop the side-effect workers (tools, dialer, summariser) and the stream
processors share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent, EventConsumer
from consumers.log_consumer import CommitFailed
from producers.log_producer import LogProducer, TopicPartition
from schemas.codec import EventCodec

log = logging.getLogger(__name__)

Handler = Callable[[LogProducer, ConsumedEvent], Awaitable[None]]


async def run_in_group(
    backend: LogBackend,
    topics: Sequence[str],
    group: str,
    stop: asyncio.Event,
    handle: Handler,
    *,
    ready: asyncio.Event,
    start: Callable[[LogProducer], Awaitable[None]] | None = None,
    finish: Callable[[], Awaitable[None]] | None = None,
    codec: EventCodec | None = None,
    max_records: int = 1000,
    concurrency: int = 1,
    types: frozenset[str] | None = None,
) -> None:
    """Consumes `topics` in consumer group `group` until `stop`: each event to `handle`, then what
    the handlers sent is flushed and the offsets committed (at-least-once: handlers are idempotent).
    `start` runs before `ready` is set, `finish` before the producer closes. With `concurrency` > 1, up
    to that many events are handled at once (`_Pipeline`). With `types`, only events of those types are
    decoded and handled (the others are passed over undecoded, their offsets committed all the same)."""
    async with backend.producer() as producer, backend.consumer(list(topics), group_id=group) as consumer:
        events = EventConsumer(consumer, producer, name=group, codec=codec)
        try:
            if start is not None:
                await start(producer)
            ready.set()
            if concurrency > 1:
                await _Pipeline(events, producer, handle, group, concurrency, types).run(stop)
                return
            while not stop.is_set():
                batch = await events.poll(timeout_s=0.2, max_records=max_records, types=types)
                for item in batch:
                    await handle(producer, item)
                if events.polled:  # a poll of only events passed over is committed too, or read again after a restart
                    try:
                        await events.commit()  # flushes the producer first: replies and dead letters
                    except CommitFailed as exc:
                        log.warning("%s: %s", group, exc)
        finally:
            if finish is not None:
                await finish()


class _Pipeline:
    """Events handled at once, so that one slow handler (a vendor taking its time) holds up no other:
    events of one key in the order they came (a call's commands), different keys side by side, at most
    `limit` in flight. An offset is committed once every event up to it in its partition is handled, so
    a crash redelivers only what was not finished (at-least-once, as one at a time)."""

    def __init__(self, events: EventConsumer, producer: LogProducer, handle: Handler, group: str,
                 limit: int, types: frozenset[str] | None = None) -> None:
        self.events = events
        self.producer = producer
        self.handle = handle
        self.group = group
        self.limit = limit
        self.types = types
        self.pending: dict[TopicPartition, dict[int, bool]] = {}
        """Per partition, the offsets polled and not yet committed: whether each is handled."""
        self.last_of_key: dict[bytes | None, asyncio.Task[None]] = {}
        self.in_flight: set[asyncio.Task[None]] = set()
        self.room = asyncio.Semaphore(limit)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                if len(self.in_flight) >= self.limit:
                    await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                batch = await self.events.poll(timeout_s=0.2, max_records=self.limit - len(self.in_flight),
                                               types=self.types)
                handled = {(item.record.tp, item.record.offset) for item in batch}
                for record in self.events.polled:  # undecodable (dead-lettered) or not of `types`: handled
                    self.pending.setdefault(record.tp, {})[record.offset] = (record.tp, record.offset) not in handled
                for item in batch:
                    self._start(item)
                await self._commit()
        finally:
            if self.in_flight:
                await asyncio.wait(self.in_flight)
            await self._commit()

    def _start(self, item: ConsumedEvent) -> None:
        before = self.last_of_key.get(item.record.key)
        task = asyncio.create_task(self._handle(item, before))
        self.last_of_key[item.record.key] = task
        self.in_flight.add(task)
        task.add_done_callback(self._finished)

    async def _handle(self, item: ConsumedEvent, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait({before})
        try:
            await self.handle(self.producer, item)
        except Exception:  # a handler's bug: logged, its event counted handled (as one at a time would stop)
            log.exception("%s: handling %s", self.group, item.event.type)
        finally:
            self.pending[item.record.tp][item.record.offset] = True

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        for key, last in list(self.last_of_key.items()):
            if last is task:
                del self.last_of_key[key]

    async def _commit(self) -> None:
        offsets: dict[TopicPartition, int] = {}
        for tp, polled in self.pending.items():
            done = None
            for offset in sorted(polled):
                if not polled[offset]:
                    break
                done = offset
            if done is not None:
                offsets[tp] = done + 1
                for offset in [o for o in polled if o <= done]:
                    del polled[offset]
        if not offsets:
            return
        try:
            await self.producer.flush()  # what the handlers sent is in the log before their offsets are
            await self.events.consumer.commit(offsets)
        except CommitFailed as exc:
            log.warning("%s: %s", self.group, exc)
