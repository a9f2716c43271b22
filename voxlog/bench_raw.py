"""The raw references `voxlog bench log` measures beside the log: the same messages (already encoded,
so neither pays for encoding) written with nothing of ours around the store's own API.

- embedded: plain SQLite inserts into a scratch file of the log's own schema
  (`producers.embedded_log_file.SCHEMA`: the records table and its key index), WAL,
  `synchronous=NORMAL`, one transaction per 5,000 rows (the producer's largest batch), from one
  thread, no event loop;
- Kafka: aiokafka's batch API (`create_batch`, `append`, `send_batch` per partition, the partition
  ours, `partition_for`), into a scratch topic with as many partitions as voxlog.calls; and Kafka's
  own Java producer benchmark, `org.apache.kafka.tools.ProducerPerformance` (the `kafka-tools` jar,
  which `tools/kafka/broker.sh classpath` fetches beside the broker's), as many records of the
  messages' mean size, acks=all, the producer's 2 ms linger and 256 KiB batches, as ours has.

The ratio, ours over raw, says what the layers above the store cost: recorder, codec and sealing,
the producer's buffering and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from producers.embedded_log_file import SCHEMA
from producers.partitioning import partition_for

RawMessage = tuple[bytes, bytes]
"""A message's key and value, as the log keeps them."""

SQLITE_BATCH = 5_000
"""Rows a transaction: `producers.embedded_producer`'s largest batch."""



def raw_sqlite_append(path: Path, messages: Sequence[RawMessage]) -> float:
    """Inserts `messages` into a new SQLite file at `path`; returns the seconds it took."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        started = time.perf_counter()
        for first in range(0, len(messages), SQLITE_BATCH):
            now_ms = int(time.time() * 1000)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO records (id, key, value, headers, timestamp_ms) VALUES (?, ?, ?, NULL, ?)",
                           [(first + i, key, value, now_ms)
                            for i, (key, value) in enumerate(messages[first:first + SQLITE_BATCH])])
            db.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _scratch_topic(bootstrap: str, topic: str, partitions: int) -> AsyncIterator[None]:
    """A new topic for the time of the block, deleted after."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
        try:
            yield
        finally:
            await admin.delete_topics([topic])
    finally:
        await admin.close()


async def raw_aiokafka_append(bootstrap: str, topic: str, partitions: int, messages: Sequence[RawMessage]) -> float:
    """Sends `messages` to a new topic (deleted after) with aiokafka's batch API and waits for every
    batch's ack (acks=all, as our producer); returns the seconds from the first append to the last ack."""
    async with _scratch_topic(bootstrap, topic, partitions):
        return await _send_batches(bootstrap, topic, partitions, messages)


PRODUCER_PERFORMANCE = "org.apache.kafka.tools.ProducerPerformance"
_PERFORMANCE_LINE = re.compile(r"(\d+) records sent, ([\d.]+) records/sec")


def kafka_tools_classpath() -> str | None:
    """Where the `kafka-tools` jar and its dependencies are: `VOXLOG_KAFKA_TOOLS_CLASSPATH`, else the
    broker's jar cache (`tools/kafka/broker.sh classpath`); None when neither has it."""
    given = os.environ.get("VOXLOG_KAFKA_TOOLS_CLASSPATH")
    if given:
        return given
    cache = Path(os.environ.get("VOXLOG_KAFKA_CACHE", Path.home() / ".cache" / "voxlog-kafka"))
    jars = sorted(cache.glob("*/kafka-tools-[0-9]*.jar"))
    return f"{jars[-1].parent}/*" if jars else None


async def java_producer_performance(bootstrap: str, topic: str, partitions: int, records: int,
                                    record_size: int, classpath: str) -> float:
    """Kafka's own Java producer benchmark on a new topic (deleted after); returns its records/s."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("no java on PATH")
    async with _scratch_topic(bootstrap, topic, partitions):
        process = await asyncio.create_subprocess_exec(
            java, "-cp", classpath, PRODUCER_PERFORMANCE, "--topic", topic, "--num-records", str(records),
            "--record-size", str(record_size), "--throughput", "-1", "--producer-props",
            f"bootstrap.servers={bootstrap}", "acks=all", "linger.ms=2", "batch.size=262144",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
    found = _PERFORMANCE_LINE.findall(output.decode(errors="replace"))
    if process.returncode != 0 or not found or int(found[-1][0]) != records:
        raise RuntimeError(f"{PRODUCER_PERFORMANCE} failed (exit {process.returncode}): "
                           f"{output.decode(errors='replace')[-500:]}")
    return float(found[-1][1])


async def _send_batches(bootstrap: str, topic: str, partitions: int, messages: Sequence[RawMessage]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                                max_batch_size=256 * 1024, max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        await producer.partitions_for(topic)  # the metadata, before the clock starts
        started = time.perf_counter()
        acks: list[asyncio.Future[object]] = []
        open_batches: dict[int, Any] = {}  # aiokafka's BatchBuilder, untyped
        for key, value in messages:
            partition = partition_for(key, partitions)
            batch = open_batches.get(partition)
            if batch is None:
                batch = open_batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                batch.close()
                acks.append(await producer.send_batch(batch, topic, partition=partition))
                batch = open_batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in open_batches.items():
            batch.close()
            acks.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*acks)
        return time.perf_counter() - started
    finally:
        await producer.stop()
