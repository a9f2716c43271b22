"""Runs stream processors in-process on any log backend (the embedded log's way of running them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import ConsumedEvent
from consumers.group_loop import run_in_group
from producers.log_producer import LogProducer, LogRecord
from streams.processors.call_registry import CallRegistry
from streams.processors.processor import EventProcessor

log = logging.getLogger(__name__)


async def restore(backend: LogBackend, processor: EventProcessor) -> int:
    """Feeds the processor's output topic back to it, start to end as of now; returns messages read."""
    if processor.output_topic is None:
        return 0

    def handle(record: LogRecord) -> None:
        if record.key is not None:
            processor.restore(record.key, record.value)

    return await read_to_end(backend, processor.output_topic, handle, what=f"restoring {processor.name}")


async def read_to_end(backend: LogBackend, topic: str, handle: Callable[[LogRecord], None], *, what: str) -> int:
    """Hands every record of `topic`, start to end as of now, to `handle`; returns how many."""
    async with backend.admin() as admin:
        ends = await admin.end_offsets(topic)
    remaining = {p: end for p, end in ends.items() if end > 0}
    count = 0
    async with backend.consumer([topic], auto_offset_reset="earliest") as consumer:
        while remaining:
            records: list[LogRecord] = await consumer.poll(timeout_s=5.0, max_records=5000)
            if not records:
                raise TimeoutError(f"{what}: {topic} stopped short of {remaining}")
            for record in records:
                if record.offset < ends[record.partition]:
                    handle(record)
                    count += 1
                if record.offset + 1 >= ends[record.partition]:
                    remaining.pop(record.partition, None)
    return count


def default_processors() -> list[EventProcessor]:
    """The stream processors `voxlog workers` runs."""
    return [CallRegistry()]


class ProcessorRunner:
    """Consumes a processor's topics in its consumer group; sends what it emits; commits after.

    Emitted messages are flushed before offsets are committed, so a crash at any point replays
    events rather than losing them; processors make replays harmless (see `restore` and seq checks).
    """

    def __init__(self, backend: LogBackend, processor: EventProcessor, *, max_batch: int = 2000) -> None:
        self.backend = backend
        self.processor = processor
        self.max_batch = max_batch
        self.processed = 0
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        async with self.backend.admin() as admin:
            await ensure_topics(admin)
        restored = await restore(self.backend, self.processor)
        log.info("%s restored %d entries", self.processor.name, restored)

        async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
            for emit in self.processor.process(item.event):
                await producer.send(emit.topic, emit.key, emit.value)
            self.processed += 1

        await run_in_group(self.backend, self.processor.topics, self.processor.name, stop, handle, ready=self.ready,
                           max_records=self.max_batch)


async def run_processors(backend: LogBackend, processors: Sequence[EventProcessor], stop: asyncio.Event) -> None:
    async with asyncio.TaskGroup() as group:
        for processor in processors:
            group.create_task(ProcessorRunner(backend, processor).run(stop), name=processor.name)
