"""The Kafka producer: aiokafka, idempotent, acks=all, key = call id."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from producers.base import MAX_MESSAGE_BYTES, Headers, LogProducer, LogWriteError, MessageTooLarge
from producers.partitioning import partition_for


def _partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    # Same placement as Kafka's default partitioner, with the key's partition remembered.
    assert key is not None, "voxlog always keys messages by call id"
    return all_partitions[partition_for(key, len(all_partitions))]


class KafkaProducer(LogProducer):
    def __init__(
        self,
        bootstrap: str,
        *,
        acks: int | str = "all",
        linger_ms: int = 2,
        max_batch_size: int = 256 * 1024,
        client_id: str = "voxlog",
    ) -> None:
        self._bootstrap = bootstrap
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks=acks,
            enable_idempotence=acks == "all",
            linger_ms=linger_ms,
            max_batch_size=max_batch_size,
            max_request_size=MAX_MESSAGE_BYTES + 64 * 1024,
            partitioner=_partitioner,
        )
        self._error: BaseException | None = None
        self._started = False

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        try:
            await self.flush()
        finally:
            self._started = False
            await self._producer.stop()

    def _delivered(self, future: asyncio.Future[object]) -> None:
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> None:
        if self._error is not None:
            raise LogWriteError(f"kafka {self._bootstrap}: earlier sends failed") from self._error
        if len(value) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"message of {len(value)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        try:
            # Waits only when aiokafka's buffer for the partition is full: that is the back-pressure.
            future = await self._producer.send(topic, value=value, key=key, headers=list(headers))
        except KafkaError as exc:
            raise LogWriteError(f"kafka {self._bootstrap}: send to {topic} failed: {exc!r}") from exc
        future.add_done_callback(self._delivered)

    async def flush(self) -> None:
        await self._producer.flush()
        if self._error is not None:
            raise LogWriteError(f"kafka {self._bootstrap}: sends failed") from self._error
