"""The event-log contract: one suite, run unchanged against every backend by the `backend` fixture.

These helpers are shared by the suite's modules. Nothing here sleeps to let time pass: every wait
polls for a condition with a deadline and fails the test, saying what it waited for, when the
deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import pytest

from consumers.backends import LogBackend
from consumers.log_consumer import LogAdmin, LogConsumer
from producers.log_producer import LogRecord, TopicPartition

T = TypeVar("T")

# Generous: a Kafka rebalance or a new topic's metadata takes a second or two; a hang is a failure.
DEADLINE_S = 30.0
# How long a consumer must stay quiet before "nothing more is delivered" is believed.
QUIET_S = 0.5


async def eventually(probe: Callable[[], Awaitable[T | None]], *, what: str,
                     timeout_s: float = DEADLINE_S, interval_s: float = 0.0) -> T:
    """Calls `probe` until it returns something other than None; fails at the deadline.

    A probe that polls a consumer waits by itself; one that returns at once wants `interval_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = await probe()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            pytest.fail(f"gave up after {timeout_s:.0f}s waiting for {what}")
        if interval_s:
            await asyncio.sleep(interval_s)


async def create_topics(admin: LogAdmin, topics: Mapping[str, int]) -> None:
    """Creates the topics, then waits until the log reports each with its partitions.

    Kafka creates topics asynchronously: the metadata reaches clients a moment after the call.
    """
    await admin.create_topics(topics)
    for topic, partitions in topics.items():
        async def ready(topic: str = topic, partitions: int = partitions) -> bool | None:
            try:
                ends = await admin.end_offsets(topic)
            except KeyError:  # not in the metadata yet
                return None
            return True if len(ends) == partitions else None
        await eventually(ready, what=f"topic {topic} with {partitions} partitions", interval_s=0.05)


async def consume(consumer: LogConsumer, count: int, *, what: str = "", timeout_s: float = DEADLINE_S,
                  max_records: int = 1000) -> list[LogRecord]:
    """Polls until at least `count` records have arrived; returns all that did, in arrival order."""
    got: list[LogRecord] = []

    async def more() -> list[LogRecord] | None:
        got.extend(await consumer.poll(timeout_s=0.2, max_records=max_records))
        return got if len(got) >= count else None

    if count == 0:
        return got
    return await eventually(more, what=f"{count} records{' ' + what if what else ''} (got {len(got)} so far)",
                            timeout_s=timeout_s)


async def consume_exactly(consumer: LogConsumer, count: int, *, what: str = "") -> list[LogRecord]:
    """`consume`, then checks that nothing more arrives for a while."""
    got = await consume(consumer, count, what=what)
    assert len(got) == count, f"expected {count} records {what}, got {len(got)}"
    await assert_quiet(consumer)
    return got


async def assert_quiet(consumer: LogConsumer, quiet_s: float = QUIET_S) -> None:
    deadline = time.monotonic() + quiet_s
    while (remaining := deadline - time.monotonic()) > 0:
        extra = await consumer.poll(timeout_s=remaining)
        assert extra == [], f"unexpected records: {[(r.topic, r.partition, r.offset) for r in extra][:10]}"


async def read_topic(backend: LogBackend, admin: LogAdmin, topic: str) -> list[LogRecord]:
    """Everything in the topic, read by a fresh consumer in no group, in partition-offset order.

    Checks on the way that each partition arrived in offset order, contiguous from 0.
    """
    total = sum((await admin.end_offsets(topic)).values())
    async with backend.consumer([topic]) as consumer:
        records = await consume_exactly(consumer, total, what=f"from all of {topic}")
    arrived: dict[int, list[int]] = {}
    for r in records:
        arrived.setdefault(r.partition, []).append(r.offset)
    for partition, offsets in arrived.items():
        assert offsets == list(range(len(offsets))), f"partition {partition} arrived as offsets {offsets[:20]}..."
    return sorted(records, key=lambda r: (r.partition, r.offset))


def all_partitions(topic: str, partitions: int) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in range(partitions)}


async def settle_group(consumers: Iterable[LogConsumer], expected: set[TopicPartition], *,
                       what: str, timeout_s: float = DEADLINE_S) -> list[list[LogRecord]]:
    """Polls every member until their assignments are disjoint and together cover `expected`.

    Members take part in a rebalance only while they are polled (the embedded backend heartbeats
    from `poll`), so they are polled in turn. Returns what each member received meanwhile.
    """
    members = list(consumers)
    received: list[list[LogRecord]] = [[] for _ in members]

    async def settled() -> bool | None:
        for member, sink in zip(members, received, strict=True):
            sink.extend(await member.poll(timeout_s=0.1))
        owned = [m.assignment() for m in members]
        union = set().union(*owned)
        if union == expected and sum(len(o) for o in owned) == len(expected) and all(owned):
            return True
        return None

    await eventually(settled, what=what, timeout_s=timeout_s)
    return received
