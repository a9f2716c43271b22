"""The Kafka consumer and admin: aiokafka against a real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, TopicAlreadyExistsError

from consumers.log_consumer import CommitFailed, LogAdmin, LogConsumer, TopicInfo
from producers.log_producer import LogRecord, TopicPartition
from producers.partitioning import partition_for


def _record(m: Any) -> LogRecord:  # aiokafka's ConsumerRecord carries no type information
    return LogRecord(m.topic, m.partition, m.offset, m.key, m.value, tuple(m.headers or ()), m.timestamp)


async def _learn_topics(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> None:
    """Fetches metadata for all these topics in one request. Without it a fresh aiokafka consumer
    learns unknown topics one at a time, 100 ms apart (8.6 s for `topics()` on 85 topics)."""
    await consumer._client.set_topics(sorted(set(topics)))  # noqa: SLF001 - aiokafka has no public way


class _ForgetRevoked(ConsumerRebalanceListener):  # type: ignore[misc]
    """A revoked partition's uncommitted positions are not ours to commit any more."""

    def __init__(self, consumed: dict[TopicPartition, int]) -> None:
        self._consumed = consumed

    async def on_partitions_revoked(self, revoked: set[KafkaTopicPartition]) -> None:
        for tp in revoked:
            self._consumed.pop(TopicPartition(tp.topic, tp.partition), None)

    async def on_partitions_assigned(self, assigned: set[KafkaTopicPartition]) -> None:
        pass


class KafkaConsumer(LogConsumer):
    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        session_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
        fetch_max_wait_ms: int = 5,
        client_id: str = "voxlog",
    ) -> None:
        self._topics = list(topics)
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._reset = auto_offset_reset
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            session_timeout_ms=int(session_timeout_s * 1000),
            heartbeat_interval_ms=int(heartbeat_interval_s * 1000),
            fetch_max_wait_ms=fetch_max_wait_ms,
            max_partition_fetch_bytes=2 * 1024 * 1024,
        )
        self._consumed: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        await self._consumer.start()
        if self._group_id is not None:
            self._consumer.subscribe(self._topics, listener=_ForgetRevoked(self._consumed))
            return
        await _learn_topics(self._consumer, self._topics)
        tps = []
        for topic in self._topics:
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions:
                raise LookupError(f"topic {topic!r} does not exist on {self._bootstrap}")
            tps += [KafkaTopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        if self._reset == "earliest":
            await self._consumer.seek_to_beginning(*tps)
        else:
            await self._consumer.seek_to_end(*tps)

    async def stop(self) -> None:
        await self._consumer.stop()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def poll(self, timeout_s: float = 1.0, max_records: int = 1000) -> list[LogRecord]:
        batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[LogRecord] = []
        for tp, messages in batches.items():
            if messages:
                self._consumed[TopicPartition(tp.topic, tp.partition)] = messages[-1].offset + 1
                out.extend(_record(m) for m in messages)
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self._group_id is None:
            raise RuntimeError("commit needs a consumer group")
        to_commit = dict(offsets if offsets is not None else self._consumed)
        if not to_commit:
            return
        try:
            await self._consumer.commit({KafkaTopicPartition(tp.topic, tp.partition): o for tp, o in to_commit.items()})
        except (CommitFailedError, IllegalStateError) as exc:
            raise CommitFailed(str(exc)) from exc

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition), offset)


class KafkaAdmin(LogAdmin):
    def __init__(self, bootstrap: str, client_id: str = "voxlog-admin") -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._admin: AIOKafkaAdminClient | None = None

    async def _client(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id=self._client_id)
            await self._admin.start()
        return self._admin

    async def create_topics(self, topics: Mapping[str, int], *, compacted: Collection[str] = ()) -> None:
        admin = await self._client()
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, partitions, 1, topic_configs={"cleanup.policy": "compact"} if name in compacted else {})
            for name, partitions in topics.items()
            if name not in existing
        ]
        if not new:
            return
        # aiokafka reports per-topic failures inside the response rather than raising.
        response = await admin.create_topics(new)
        for topic, code, *rest in getattr(response, "topic_errors", ()):
            if code not in (0, TopicAlreadyExistsError.errno):
                raise RuntimeError(f"creating topic {topic} failed: error {code} {rest[0] if rest else ''}")

    async def _partition_counts(self) -> dict[str, int]:
        admin = await self._client()
        names = [n for n in await admin.list_topics() if not n.startswith("__")]
        described = await admin.describe_topics(names)
        return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code")}

    async def _offsets(
        self, tps: list[KafkaTopicPartition]
    ) -> tuple[dict[KafkaTopicPartition, int], dict[KafkaTopicPartition, int]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, client_id=self._client_id)
        await consumer.start()
        try:
            await _learn_topics(consumer, {tp.topic for tp in tps})
            return await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        finally:
            await consumer.stop()

    async def topics(self) -> list[TopicInfo]:
        counts = await self._partition_counts()
        tps = [KafkaTopicPartition(t, p) for t, n in counts.items() for p in range(n)]
        begin, end = await self._offsets(tps)
        return [
            TopicInfo(t, n, sum(end[KafkaTopicPartition(t, p)] - begin[KafkaTopicPartition(t, p)] for p in range(n)))
            for t, n in sorted(counts.items())
        ]

    async def end_offsets(self, topic: str) -> dict[int, int]:
        counts = await self._partition_counts()
        if topic not in counts:
            raise KeyError(f"no topic {topic!r}")
        _, end = await self._offsets([KafkaTopicPartition(topic, p) for p in range(counts[topic])])
        return {tp.partition: o for tp, o in end.items()}

    async def read_key(
        self, topics: Sequence[str], key: bytes, *, since_ms: int | None = None
    ) -> AsyncIterator[LogRecord]:
        # Kafka has no index by key: read the one partition the key hashes to, from the start or
        # from the first record at `since_ms`, to the end as of now.
        counts = await self._partition_counts()
        tps = [KafkaTopicPartition(t, partition_for(key, counts[t])) for t in topics if t in counts]
        if not tps:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=5,
        )
        await consumer.start()
        try:
            await _learn_topics(consumer, {tp.topic for tp in tps})
            starts = {tp: 0 for tp in tps}
            ends = await consumer.end_offsets(tps)
            if since_ms is not None:
                for tp, found in (await consumer.offsets_for_times({tp: since_ms for tp in tps})).items():
                    starts[tp] = ends[tp] if found is None else found.offset  # None: nothing that recent
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, starts[tp])
            for tp in [tp for tp in tps if starts[tp] < ends[tp]]:
                consumer.pause(*[other for other in tps if other != tp])
                consumer.resume(tp)
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for message in batch.get(tp, []):
                        if message.offset >= ends[tp]:
                            break
                        if message.key == key:
                            yield _record(message)
        finally:
            await consumer.stop()

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
