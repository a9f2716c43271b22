"""Events off the log: decode, and dead-letter what cannot be decoded without stopping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from consumers.backends import LogBackend
from consumers.log_consumer import LogAdmin, LogConsumer
from producers.log_producer import LogProducer, LogRecord, TopicPartition
from schemas.base import Event, EventPayload
from schemas.codec import EventCodec, UndecodableMessage
from schemas.slot_init import slot_init
from schemas.topics import CALL_TOPICS, DEADLETTER

DLQ_REASON = "vx-dlq-reason"
DLQ_TOPIC = "vx-dlq-topic"
DLQ_PARTITION = "vx-dlq-partition"
DLQ_OFFSET = "vx-dlq-offset"
DLQ_CONSUMER = "vx-dlq-consumer"


@slot_init  # one a record read
@dataclass(frozen=True, slots=True)
class ConsumedEvent:
    record: LogRecord
    event: Event[EventPayload]


MAX_REASON_CHARS = 2000  # keeps the dead letter within its headroom over the original's size


def dead_letter_headers(record: LogRecord, reason: str, consumer: str) -> list[tuple[str, bytes]]:
    return [
        (DLQ_REASON, reason[:MAX_REASON_CHARS].encode()),
        (DLQ_TOPIC, record.topic.encode()),
        (DLQ_PARTITION, str(record.partition).encode()),
        (DLQ_OFFSET, str(record.offset).encode()),
        (DLQ_CONSUMER, consumer.encode()),
        *record.headers,
    ]


async def decode_records(
    records: Sequence[LogRecord], codec: EventCodec, dead_letters: LogProducer, consumer: str,
    types: frozenset[str] | None = None,
) -> tuple[list[ConsumedEvent], int]:
    """The records decoded (with `types`, only those of these types: the type is in each message's
    header) and how many were dead-lettered: an undecodable one (unknown schema, corrupt bytes) is
    copied, original bytes and all, to the dead-letter topic with the reason and where it came from."""
    out = []
    dead_lettered = 0
    for record in records:
        try:
            if types is not None and codec.schema_of(record.value)[0] not in types:
                continue
            out.append(ConsumedEvent(record, codec.decode(record.value)))
        except UndecodableMessage as exc:
            await dead_letters.send(
                DEADLETTER, record.key or b"", record.value, dead_letter_headers(record, str(exc), consumer)
            )
            dead_lettered += 1
    return out, dead_lettered


class EventConsumer:
    """Wraps a `LogConsumer`: yields decoded events; an undecodable message (unknown schema,
    corrupt bytes) is copied, original bytes and all, to the dead-letter topic with the reason
    and where it came from, and consumption goes on. `commit` first makes the dead letters
    durable, so a message is either processed, or dead-lettered, before its offset is committed.
    """

    def __init__(
        self, consumer: LogConsumer, dead_letters: LogProducer, *, name: str, codec: EventCodec | None = None
    ) -> None:
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.name = name
        self.codec = codec or consumer.event_codec
        self.dead_lettered = 0
        self.polled: list[LogRecord] = []
        """Every record of the last poll, decoded or not."""

    async def poll(
        self, timeout_s: float = 1.0, max_records: int = 1000, *, types: frozenset[str] | None = None
    ) -> list[ConsumedEvent]:
        """The records polled, decoded; with `types`, only events of those types are decoded and
        returned (the type is in each message's header), though `polled` still has every record."""
        self.polled = await self.consumer.poll(timeout_s, max_records)
        out, dead_lettered = await decode_records(self.polled, self.codec, self.dead_letters, self.name, types)
        self.dead_lettered += dead_lettered
        return out

    async def commit(self) -> None:
        await self.dead_letters.flush()
        await self.consumer.commit()


@dataclass(frozen=True)
class CallHistory:
    """One call's events in `seq` order, merged across topics, each seq once, and what could not be read."""

    call_id: str
    events: list[Event[EventPayload]]
    undecodable: list[tuple[LogRecord, str]]


CALL_LOOKBACK_MS = 3 * 3600 * 1000
"""How far before one of its events a call's start is looked for in the log (longer than any call)."""


def call_start_bound_ms(seen: Event[EventPayload]) -> int:
    """The earliest a call that wrote `seen` can have started: `since_ms` for reading it back."""
    return seen.envelope.event_time_us // 1000 - CALL_LOOKBACK_MS


async def read_call(
    admin: LogAdmin,
    call_id: str,
    codec: EventCodec | None = None,
    topics: Sequence[str] = CALL_TOPICS,
    since_ms: int | None = None,
) -> CallHistory:
    """One call from the log; `since_ms` (no later than the call's start) bounds Kafka's scan."""
    codec = codec or admin.event_codec
    events: list[Event[EventPayload]] = []
    bad: list[tuple[LogRecord, str]] = []
    if since_ms is not None:
        since_ms = max(0, since_ms)  # an event stamped near (or before) the epoch must not break the scan
    async for record in admin.read_key(topics, call_id.encode(), since_ms=since_ms):
        try:
            events.append(codec.decode(record.value))
        except UndecodableMessage as exc:
            bad.append((record, str(exc)))
    events.sort(key=lambda e: e.seq)
    # A call's seq is unique, so a repeat is a redelivery (a carrier's retried callback, a resend
    # after a crash): the first copy stands.
    unique = [e for i, e in enumerate(events) if i == 0 or e.seq != events[i - 1].seq]
    return CallHistory(call_id, unique, bad)



async def records_until_now(backend: LogBackend, topics: Sequence[str]) -> AsyncIterator[LogRecord]:
    """Every record of the topics (every partition), from the start to where each ended when asked."""
    async with backend.admin() as admin:
        ends = {TopicPartition(t, p): end for t in topics for p, end in (await admin.end_offsets(t)).items() if end}
    remaining = set(ends)
    async with backend.consumer(list(topics)) as consumer:
        while remaining:
            records = await consumer.poll(timeout_s=2.0, max_records=5000)
            if not records:
                return
            for record in records:
                if record.offset < ends.get(record.tp, 0):
                    yield record
                if record.offset + 1 >= ends.get(record.tp, 0):
                    remaining.discard(record.tp)
