"""The raw references of `voxlog bench log` write what they are given, with the store's own API, and
leave nothing behind: the scratch SQLite file and the scratch Kafka topic are gone after."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from consumers.backends import KafkaBackend
from producers.partitioning import partition_for
from voxlog import bench_raw
from voxlog.bench_raw import java_producer_performance, kafka_tools_classpath, raw_aiokafka_append, raw_sqlite_append


async def _topic_exists(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


MESSAGES = [(f"call-{i % 7}".encode(), bytes([i % 256]) * (100 + i % 300)) for i in range(12_000)]


def test_plain_sqlite_inserts_write_every_message_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    committed: list[int] = []
    real_connect = sqlite3.connect

    def counting_connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = real_connect(*args, **kwargs)  # type: ignore[arg-type]
        db.set_trace_callback(lambda sql: committed.append(1) if sql == "COMMIT" else None)
        return db

    monkeypatch.setattr(bench_raw.sqlite3, "connect", counting_connect)
    seconds = raw_sqlite_append(tmp_path / "raw.db", MESSAGES)
    assert seconds > 0
    assert len(committed) == -(-len(MESSAGES) // bench_raw.SQLITE_BATCH), "one transaction per batch"
    assert not list(tmp_path.iterdir()), "the scratch file (and its WAL) is gone"


@pytest.mark.kafka
async def test_aiokafka_batches_reach_our_partitions_and_the_topic_is_deleted(kafka_backend: KafkaBackend) -> None:
    topic = f"voxlog.test.raw-{uuid.uuid4().hex[:8]}"
    landed: dict[int, int] = {}

    real_send = bench_raw._send_batches

    async def send_then_read(bootstrap: str, name: str, partitions: int, messages: list[tuple[bytes, bytes]]) -> float:
        seconds = await real_send(bootstrap, name, partitions, messages)
        consumer = AIOKafkaConsumer(name, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            while sum(landed.values()) < len(messages):
                for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                    for record in records:
                        assert tp.partition == partition_for(record.key, partitions)
                    landed[tp.partition] = landed.get(tp.partition, 0) + len(records)
        finally:
            await consumer.stop()
        return seconds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_raw, "_send_batches", send_then_read)
        seconds = await raw_aiokafka_append(kafka_backend.bootstrap, topic, 12, MESSAGES)

    assert seconds > 0
    assert sum(landed.values()) == len(MESSAGES)
    assert not await _topic_exists(kafka_backend.bootstrap, topic), "the scratch topic is deleted"


@pytest.mark.slow
@pytest.mark.kafka
async def test_kafkas_own_java_producer_benchmark_runs_on_a_scratch_topic(kafka_backend: KafkaBackend) -> None:
    classpath = kafka_tools_classpath()
    assert classpath is not None, "tools/kafka/broker.sh fetches the kafka-tools jar with the broker's"
    topic = f"voxlog.test.java-{uuid.uuid4().hex[:8]}"
    per_s = await java_producer_performance(kafka_backend.bootstrap, topic, 3, 5000, 200, classpath)
    assert per_s > 0
    assert not await _topic_exists(kafka_backend.bootstrap, topic), "the scratch topic is deleted"


@pytest.mark.kafka
async def test_a_failing_java_benchmark_says_why(kafka_backend: KafkaBackend, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="ProducerPerformance failed"):
        await java_producer_performance(kafka_backend.bootstrap, f"voxlog.test.java-{uuid.uuid4().hex[:8]}", 1,
                                        10, 10, str(tmp_path / "no-jars-here" / "*"))
