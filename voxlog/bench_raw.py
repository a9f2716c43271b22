"""The raw references `voxlog bench log` measures beside the log: the same messages (already encoded,
so neither pays for encoding) written with nothing of ours around the store's own API.

- embedded: plain SQLite inserts into a scratch file of the same schema (the records table and its
  key index), WAL, `synchronous=NORMAL`, one transaction per 5,000 rows (the producer's largest
  batch), from one thread, no event loop;
- Kafka: aiokafka's batch API (`create_batch`, `append`, `send_batch` per partition, the partition
  ours, `partition_for`), into a scratch topic with as many partitions as voxlog.calls.

The ratio, ours over raw, says what the layers above the store cost: recorder, codec and sealing,
the producer's buffering and threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from producers.partitioning import partition_for

RawMessage = tuple[bytes, bytes]
"""A message's key and value, as the log keeps them."""

SQLITE_BATCH = 5_000
"""Rows a transaction: `producers.embedded_producer`'s largest batch."""

_SQLITE_SCHEMA = """
CREATE TABLE records (id INTEGER PRIMARY KEY, key BLOB, value BLOB NOT NULL, headers BLOB,
                      timestamp_ms INTEGER NOT NULL);
CREATE INDEX records_by_key ON records (key);
"""


def raw_sqlite_append(path: Path, messages: Sequence[RawMessage]) -> float:
    """Inserts `messages` into a new SQLite file at `path`; returns the seconds it took."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SQLITE_SCHEMA)
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


async def raw_aiokafka_append(bootstrap: str, topic: str, partitions: int, messages: Sequence[RawMessage]) -> float:
    """Sends `messages` to a new topic (deleted after) with aiokafka's batch API and waits for every
    batch's ack (acks=all, as our producer); returns the seconds from the first append to the last ack."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
        return await _send_batches(bootstrap, topic, partitions, messages)
    finally:
        await admin.delete_topics([topic])
        await admin.close()


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
