"""The log contract (`producers.log_producer`, `consumers.log_consumer`), run unchanged against every backend.

Each test creates its own topics (the `topic_name` fixture) so tests never see each other's
messages on a shared broker, and waits by polling with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend
from consumers.log_consumer import LogAdmin
from producers.log_producer import MAX_MESSAGE_BYTES, LogProducer, LogRecord, MessageTooLarge, TopicPartition

from . import (
    DEADLINE_S,
    all_partitions,
    assert_quiet,
    consume,
    consume_exactly,
    create_topics,
    eventually,
    read_topic,
    settle_group,
)

# Key -> partition of a 6-partition topic, as Kafka's own Java client places them
# (`Utils.toPositive(Utils.murmur2(key)) % 6`, computed with kafka-clients 4.1.1). Both backends
# must agree with it, so a call lands on the same partition number whichever backend holds it.
KAFKA_PARTITION_OF_6 = {
    "key-0": 1, "key-1": 0, "key-2": 2, "key-3": 5, "key-4": 3, "key-5": 2, "key-6": 2, "key-7": 1,
    "key-8": 1, "key-9": 3, "key-10": 2, "key-11": 1, "key-12": 2, "key-13": 1, "key-14": 4,
    "key-15": 3, "key-16": 1, "key-17": 0, "key-18": 5, "key-19": 0, "key-20": 1, "key-21": 3,
    "key-22": 1, "key-23": 2,
}
# One key for each partition of a 6-partition topic.
KEY_FOR_PARTITION = {0: "key-1", 1: "key-0", 2: "key-2", 3: "key-4", 4: "key-14", 5: "key-3"}

# Consumer-group options both backends accept: heartbeat often, so rebalances settle quickly.
GROUP_OPTIONS = {"heartbeat_interval_s": 0.2}
# The shortest session a member may have: Kafka refuses one below the broker's
# group.min.session.timeout.ms (6 s by default); the embedded log has no lower bound.
SHORT_SESSION_S = {"embedded": 1.0, "kafka": 6.0}


@pytest.fixture
async def admin(backend: LogBackend) -> AsyncIterator[LogAdmin]:
    async with backend.admin() as log_admin:
        yield log_admin


def group_name() -> str:
    return f"group.{uuid.uuid4().hex[:12]}"


def positions(records: list[LogRecord]) -> set[tuple[int, int]]:
    return {(r.partition, r.offset) for r in records}


async def send_round(producer: LogProducer, topic: str, keys: list[str], per_key: int,
                     tag: str) -> list[tuple[str, bytes]]:
    """Sends `per_key` values for each key, keys interleaved; returns (key, value) in send order."""
    sent = []
    for i in range(per_key):
        for key in keys:
            value = f"{tag}:{key}:{i}".encode()
            await producer.send(topic, key.encode(), value)
            sent.append((key, value))
    await producer.flush()
    return sent


# 1. Ordering per key -----------------------------------------------------------------------------

async def test_each_key_keeps_send_order_in_the_one_partition_murmur2_picks(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 6})
    rng = random.Random(20240611)
    pending = {key: 40 for key in KAFKA_PARTITION_OF_6}
    sent: dict[str, list[bytes]] = defaultdict(list)
    while pending:  # keys interleaved at random, each key's own values in a known order
        key = rng.choice(sorted(pending))
        value = f"{key}#{len(sent[key])}".encode()
        await producer.send(topic_name, key.encode(), value)
        sent[key].append(value)
        pending[key] -= 1
        if not pending[key]:
            del pending[key]
    await producer.flush()

    records = await read_topic(backend, admin, topic_name)

    by_key: dict[str, list[LogRecord]] = defaultdict(list)
    for r in records:
        assert r.key is not None
        by_key[r.key.decode()].append(r)
    assert set(by_key) == set(sent)
    for key, values in sent.items():
        got = by_key[key]
        assert [r.value for r in got] == values, f"{key}: values out of send order"
        assert {r.partition for r in got} == {KAFKA_PARTITION_OF_6[key]}, f"{key}: not in Kafka's partition"


# 2. Offsets ------------------------------------------------------------------------------------

async def test_offsets_are_contiguous_from_zero_and_seek_rereads(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 6})
    counts = {0: 7, 1: 3, 2: 11, 3: 1, 4: 5, 5: 0}  # partition 5 stays empty
    for partition, count in counts.items():
        for i in range(count):
            await producer.send(topic_name, KEY_FOR_PARTITION[partition].encode(), f"p{partition}-{i}".encode())
    await producer.flush()

    assert await admin.end_offsets(topic_name) == counts
    [info] = [t for t in await admin.topics() if t.name == topic_name]
    assert (info.partitions, info.messages) == (6, sum(counts.values()))

    async with backend.consumer([topic_name]) as consumer:
        assert consumer.assignment() == all_partitions(topic_name, 6)
        records = await consume_exactly(consumer, sum(counts.values()))
        for partition, count in counts.items():
            mine = [r for r in records if r.partition == partition]
            assert [r.offset for r in mine] == list(range(count)), f"partition {partition}: offsets not 0..n-1"
            assert [r.value for r in mine] == [f"p{partition}-{i}".encode() for i in range(count)]

        # Seek back into one partition: exactly the rest of it comes again.
        await consumer.seek(TopicPartition(topic_name, 2), 4)
        again = await consume_exactly(consumer, 7, what="after seeking partition 2 to offset 4")
        assert [(r.partition, r.offset) for r in again] == [(2, o) for o in range(4, 11)]

        # Seek one partition to its start and another to its end: only the first is re-read.
        await consumer.seek(TopicPartition(topic_name, 0), 0)
        await consumer.seek(TopicPartition(topic_name, 1), counts[1])
        again = await consume_exactly(consumer, counts[0], what="after seeking partition 0 to 0")
        assert [(r.partition, r.offset) for r in again] == [(0, o) for o in range(counts[0])]


# 3. Consumer groups ----------------------------------------------------------------------------

async def test_group_members_split_partitions_and_a_survivor_takes_over(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 6})
    everything = all_partitions(topic_name, 6)
    group = group_name()
    first = backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS)
    second = backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS)
    await first.start()
    await second.start()
    try:
        await settle_group([first, second], everything, what="two members to split 6 partitions")
        owned_first, owned_second = first.assignment(), second.assignment()
        assert owned_first.isdisjoint(owned_second)
        assert owned_first | owned_second == everything

        keys = list(KEY_FOR_PARTITION.values())
        sent = await send_round(producer, topic_name, keys, 5, "round1")
        expect_first = [v for k, v in sent if TopicPartition(topic_name, KAFKA_PARTITION_OF_6[k]) in owned_first]
        expect_second = [v for k, v in sent if TopicPartition(topic_name, KAFKA_PARTITION_OF_6[k]) in owned_second]
        got_first = await consume(first, len(expect_first), what="by the first member")
        got_second = await consume(second, len(expect_second), what="by the second member")
        await assert_quiet(first)
        await assert_quiet(second)
        assert sorted(r.value for r in got_first) == sorted(expect_first)
        assert sorted(r.value for r in got_second) == sorted(expect_second)
        await first.commit()
        await second.commit()

        # The first member leaves: the second takes over its partitions from the committed offsets.
        await first.stop()
        # Well within the 10 s session: a member that stops leaves the group, it is not timed out.
        [early] = await settle_group([second], everything, what="the survivor to own all 6 partitions",
                                     timeout_s=5.0)
        assert early == [], "the takeover re-read committed records"
        sent = await send_round(producer, topic_name, keys, 3, "round2")
        got = await consume_exactly(second, len(sent), what="after the takeover")
        assert sorted(r.value for r in got) == sorted(v for _, v in sent), "the takeover re-read committed records"
    finally:
        await first.stop()
        await second.stop()


async def test_committed_offsets_resume_after_restart_and_groups_are_independent(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 6})
    keys = list(KEY_FOR_PARTITION.values())
    await send_round(producer, topic_name, keys, 6, "data")
    total = 6 * len(keys)
    group = group_name()
    cut = {TopicPartition(topic_name, p): p % 4 for p in range(6)}  # 0, 1, 2, 3, 0, 1

    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        records = await consume_exactly(consumer, total)
        assert len(positions(records)) == total
        await consumer.commit(cut)

    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        resumed = await consume_exactly(consumer, total - sum(cut.values()), what="after the committed offsets")
        assert positions(resumed) == {(p, o) for p in range(6) for o in range(cut[TopicPartition(topic_name, p)], 6)}
        await consumer.commit()  # everything polled so far

    await producer.send(topic_name, keys[0].encode(), b"late")
    await producer.flush()
    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        [late] = await consume_exactly(consumer, 1, what="written after the last commit")
        assert late.value == b"late"

    async with backend.consumer([topic_name], group_id=group_name(), **GROUP_OPTIONS) as other:
        independent = await consume_exactly(other, total + 1, what="by a group that committed nothing")
        assert len(positions(independent)) == total + 1


@pytest.mark.slow
async def test_each_member_is_judged_by_its_own_session_timeout(
        backend: LogBackend, admin: LogAdmin, topic_name: str) -> None:
    """A live member that heartbeats within its own session keeps its partitions, even when another
    member of the group runs with a session shorter than this member's heartbeat interval."""
    await create_topics(admin, {topic_name: 4})
    everything = all_partitions(topic_name, 4)
    group = group_name()
    patient = backend.consumer([topic_name], group_id=group, session_timeout_s=10.0, heartbeat_interval_s=1.5)
    hasty = backend.consumer([topic_name], group_id=group, session_timeout_s=SHORT_SESSION_S[backend.name],
                             heartbeat_interval_s=0.2)
    await patient.start()
    await hasty.start()
    try:
        await settle_group([patient, hasty], everything, what="two members to split 4 partitions")
        settled = (patient.assignment(), hasty.assignment())
        # Both keep polling for several of the patient member's heartbeat intervals.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            await patient.poll(timeout_s=0.1)
            await hasty.poll(timeout_s=0.1)
            assert (patient.assignment(), hasty.assignment()) == settled, "a live member lost its partitions"
    finally:
        await patient.stop()
        await hasty.stop()


# 4. At-least-once across a crash -----------------------------------------------------------------

async def test_a_stopped_consumer_loses_nothing_and_uncommitted_records_come_again(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 3})
    await send_round(producer, topic_name, [f"key-{i}" for i in range(12)], 5, "data")
    total = 60
    group = group_name()

    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        processed = await consume(consumer, 20, max_records=5, what="before the commit")
        await consumer.commit()  # the positions after all 20-odd records polled so far
        committed = positions(processed)
        processed += await consume(consumer, 20, max_records=5, what="processed, never committed")
        uncommitted = positions(processed) - committed
        assert uncommitted
    # ... and the consumer stopped without committing the rest.

    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        redelivered = await consume_exactly(consumer, total - len(committed), what="after the restart")
    assert positions(redelivered) >= uncommitted, "records processed but not committed were not delivered again"
    assert positions(redelivered).isdisjoint(committed), "committed records were delivered again"
    assert len(positions(processed) | positions(redelivered)) == total, "records were lost"


# A member in a process of its own: reads everything, commits part, then keeps polling (alive,
# heartbeating) until the test kills it with SIGKILL, so it never leaves the group.
CRASHING_MEMBER = """
import asyncio, json, sys
from pathlib import Path
from producers.log_producer import TopicPartition
from consumers.backends import EmbeddedBackend, KafkaBackend

async def main(kind, where, topic, group, session_s, total, cut):
    backend = EmbeddedBackend(Path(where)) if kind == "embedded" else KafkaBackend(where)
    consumer = backend.consumer([topic], group_id=group, session_timeout_s=session_s, heartbeat_interval_s=0.2)
    await consumer.start()
    got = []
    while len(got) < total:
        got += await consumer.poll(timeout_s=0.2)
    await consumer.commit({TopicPartition(topic, int(p)): o for p, o in cut.items()})
    print(json.dumps(sorted([r.partition, r.offset] for r in got)), flush=True)
    while True:
        await consumer.poll(timeout_s=0.2)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6]),
                 json.loads(sys.argv[7])))
"""


@pytest.mark.slow
async def test_a_killed_member_that_never_leaves_loses_nothing(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 3})
    await send_round(producer, topic_name, [f"key-{i}" for i in range(12)], 5, "data")
    ends = await admin.end_offsets(topic_name)
    total = sum(ends.values())
    cut = {p: end // 2 for p, end in ends.items()}
    group = group_name()
    session_s = SHORT_SESSION_S[backend.name]
    if isinstance(backend, EmbeddedBackend):
        where = str(backend.path)
    else:
        assert isinstance(backend, KafkaBackend)
        where = backend.bootstrap

    member = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_MEMBER, backend.name, where, topic_name, group, str(session_s),
        str(total), json.dumps(cut), stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert member.stdout is not None
        line = await asyncio.wait_for(member.stdout.readline(), DEADLINE_S)
        assert line, "the crashing member exited before it committed"
        consumed_before = {tuple(po) for po in json.loads(line)}
        assert len(consumed_before) == total
    finally:
        if member.returncode is None:
            member.send_signal(signal.SIGKILL)  # no leave-group, no commit: a hard crash
        await member.wait()

    survivor = backend.consumer([topic_name], group_id=group, session_timeout_s=session_s, heartbeat_interval_s=0.2)
    async with survivor:
        # The dead member still holds its partitions until its session expires; then they move.
        got = await settle_group([survivor], all_partitions(topic_name, 3),
                                 what="the dead member's partitions to move to the survivor")
        redelivered = got[0] + await consume(survivor, total - sum(cut.values()) - len(got[0]),
                                             what="after the dead member's last commit")
        await assert_quiet(survivor)
    assert len(redelivered) == len(positions(redelivered)), "the survivor got a record twice"
    assert positions(redelivered) == {(p, o) for p, end in ends.items() for o in range(cut[p], end)}
    assert consumed_before | positions(redelivered) == {(p, o) for p, end in ends.items() for o in range(end)}


# 5. Batching and flush ---------------------------------------------------------------------------

async def test_twenty_thousand_sends_then_one_flush_are_all_durable_and_readable(
        backend: LogBackend, admin: LogAdmin, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 4})
    count, keys = 20_000, [f"key-{i}" for i in range(16)]
    async with backend.producer() as producer:
        for i in range(count):
            await producer.send(topic_name, keys[i % len(keys)].encode(), i.to_bytes(4, "big"))
        await producer.flush()
        # No waiting here: once flush returns, everything sent before it is in the log.
        assert sum((await admin.end_offsets(topic_name)).values()) == count

    records = await read_topic(backend, admin, topic_name)
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for r in records:
        assert r.key is not None
        by_key[r.key].append(int.from_bytes(r.value, "big"))
    assert sorted(v for vs in by_key.values() for v in vs) == list(range(count))
    for key, values in by_key.items():
        assert values == sorted(values), f"{key!r}: out of send order"


async def test_flush_returns_only_once_a_fresh_consumer_can_read_everything(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 2})
    for round_ in range(3):
        for i in range(200):
            await producer.send(topic_name, f"key-{i % 7}".encode(), f"{round_}:{i}".encode())
        await producer.flush()
        # No waiting: what flush covered is in the log the moment it returns.
        assert sum((await admin.end_offsets(topic_name)).values()) == 200 * (round_ + 1)
        async with backend.consumer([topic_name]) as fresh:
            records = await consume_exactly(fresh, 200 * (round_ + 1), what=f"after flush {round_}")
        assert {r.value for r in records} >= {f"{round_}:{i}".encode() for i in range(200)}


# 6. Large payloads -----------------------------------------------------------------------------

async def test_large_payloads_round_trip_and_oversized_ones_are_refused_at_send(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 1})
    big = os.urandom(900 * 1024)
    largest = os.urandom(MAX_MESSAGE_BYTES - 1024)  # room for key and record overhead
    await producer.send(topic_name, b"big", big)
    await producer.send(topic_name, b"largest", largest)
    with pytest.raises(MessageTooLarge):
        await producer.send(topic_name, b"too-big", os.urandom(MAX_MESSAGE_BYTES + 1))
    await producer.send(topic_name, b"small", b"after")  # the producer is still usable
    await producer.flush()

    records = await read_topic(backend, admin, topic_name)
    assert [r.key for r in records] == [b"big", b"largest", b"small"], "the refused message was written"
    assert records[0].value == big
    assert records[1].value == largest
    assert records[2].value == b"after"


async def test_a_message_whose_headers_push_it_over_the_limit_is_refused_at_send(
        backend: LogBackend, admin: LogAdmin, topic_name: str) -> None:
    """Key and headers count towards the limit too: the broker stores and limits the whole record."""
    await create_topics(admin, {topic_name: 1})
    headers = [("padding", bytes(100_000))]
    async with backend.producer() as producer:
        with pytest.raises(MessageTooLarge):
            await producer.send(topic_name, b"k", bytes(MAX_MESSAGE_BYTES - 1024), headers)
        await producer.send(topic_name, b"k", b"fine", headers)
        await producer.flush()
    records = await read_topic(backend, admin, topic_name)
    assert [r.value for r in records] == [b"fine"], "the refused message was written"


# 7. Headers ----------------------------------------------------------------------------------

async def test_headers_round_trip_in_order(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 1})
    cases: list[tuple[tuple[str, bytes], ...]] = [
        (),
        (("trace-id", b"abc123"),),
        (("dup", b"1"), ("dup", b"2"), ("empty", b""), ("binary", bytes(range(256)))),
        (("näme-ü", "värde".encode()), ("z", b"\x00\xff")),
    ]
    for i, headers in enumerate(cases):
        await producer.send(topic_name, b"k", str(i).encode(), headers)
    await producer.flush()

    records = await read_topic(backend, admin, topic_name)
    assert [r.headers for r in records] == cases


# 8. Point reads by key ---------------------------------------------------------------------------

async def test_read_key_returns_exactly_one_keys_records_in_order_across_topics(
        admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    calls, audio, other = f"{topic_name}.calls", f"{topic_name}.audio", f"{topic_name}.other"
    await create_topics(admin, {calls: 3, audio: 5, other: 2})
    keys = [b"call-a", b"call-b", b"call-c"]
    sent: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    for i in range(30):
        for key in keys:
            for topic in (calls, audio, other):
                if (i + len(topic)) % 3:  # uneven counts per topic
                    value = f"{topic}/{key.decode()}/{i}".encode()
                    await producer.send(topic, key, value)
                    sent[(topic, key)].append(value)
    await producer.flush()

    for key in keys:
        got = [r async for r in admin.read_key([calls, audio], key)]
        assert all(r.key == key for r in got)
        for topic in (calls, audio):
            mine = [r for r in got if r.topic == topic]
            assert [r.value for r in mine] == sent[(topic, key)]
            assert [r.offset for r in mine] == sorted(r.offset for r in mine)
        assert len(got) == len(sent[(calls, key)]) + len(sent[(audio, key)]), "read_key strayed outside its topics"

    assert [r async for r in admin.read_key([calls, audio], b"call-never")] == []


async def test_read_key_since_a_time_skips_what_came_before(
        admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    """The bound a replay passes on Kafka so it does not scan a partition from offset 0."""
    await create_topics(admin, {topic_name: 2})
    for i in range(20):
        await producer.send(topic_name, b"call-x", f"old-{i}".encode())
    await producer.flush()
    old = [r async for r in admin.read_key([topic_name], b"call-x")]
    since_ms = max(r.timestamp_ms for r in old) + 1

    async def clock_moved_on() -> bool | None:
        return True if time.time() * 1000 > since_ms + 5 else None

    await eventually(clock_moved_on, what="the clock to move past the old records", interval_s=0.005)
    for i in range(5):
        await producer.send(topic_name, b"call-x", f"new-{i}".encode())
    await producer.flush()

    recent = [r.value async for r in admin.read_key([topic_name], b"call-x", since_ms=since_ms)]
    assert recent == [f"new-{i}".encode() for i in range(5)]
    everything = [r async for r in admin.read_key([topic_name], b"call-x")]
    assert len(everything) == 25
    assert [r async for r in admin.read_key([topic_name], b"call-x", since_ms=int(time.time() * 1000) + 60_000)] == []
