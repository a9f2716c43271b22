"""The consumer-group loop the side-effect workers (tools, dialer, summariser) and the stream
processors share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent, EventConsumer
from consumers.log_consumer import CommitFailed
from producers.log_producer import LogProducer
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
) -> None:
    """Consumes `topics` in consumer group `group` until `stop`: each event to `handle`, then what
    the handlers sent is flushed and the offsets committed (at-least-once: handlers are idempotent).
    `start` runs before `ready` is set, `finish` before the producer closes."""
    async with backend.producer() as producer, backend.consumer(list(topics), group_id=group) as consumer:
        events = EventConsumer(consumer, producer, name=group, codec=codec)
        try:
            if start is not None:
                await start(producer)
            ready.set()
            while not stop.is_set():
                batch = await events.poll(timeout_s=0.2, max_records=max_records)
                for item in batch:
                    await handle(producer, item)
                if batch:
                    try:
                        await events.commit()  # flushes the producer first: replies and dead letters
                    except CommitFailed as exc:
                        log.warning("%s: %s", group, exc)
        finally:
            if finish is not None:
                await finish()
