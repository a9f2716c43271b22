"""The Kafka producer: aiokafka, idempotent, acks=all, key = call id.

Messages are appended straight into per-partition record batches (aiokafka's `BatchBuilder`, a C
extension) and each full or lingering batch is handed to aiokafka as a whole. That keeps the cost
per message on the audio hot path to a couple of microseconds, against ~10 for aiokafka's
per-message `send` and its future per message. Each partition has one sender task that hands its
batches over in order, so per-key order holds; aiokafka keeps one batch in flight per partition.

**The broker goes away.** aiokafka's idempotent producer retries a batch in flight until the broker
answers, however long that takes. The next batch of a partition waits for it; aiokafka gives that
wait up after `request_timeout_ms`, but the batch is still ours, untouched: its sender offers it
again, in order. So an outage of any length loses nothing: while it lasts, a busy partition's open
batch fills up instead of being closed every linger, full batches queue up to `max_queued_batches`,
and then `send` waits (back-pressure). `stalled_s` says how long the oldest unacknowledged message
has waited, for the gateway to stop taking calls and to end the ones it cannot record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from producers.log_producer import (
    DEAD_LETTER_HEADROOM,
    MAX_MESSAGE_BYTES,
    Headers,
    LogProducer,
    LogWriteError,
    MessageTooLarge,
    check_message_size,
)
from producers.partitioning import partition_for

TopicPartition = tuple[str, int]
log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0
"""How long `stop` waits for aiokafka to hand over what it holds before closing regardless."""


class KafkaProducer(LogProducer):
    def __init__(
        self,
        bootstrap: str,
        *,
        acks: int | str = "all",
        linger_ms: int = 2,
        max_batch_size: int = 256 * 1024,
        max_queued_batches: int = 256,
        client_id: str = "voxlog",
        request_timeout_ms: int = 40_000,
    ) -> None:
        self._bootstrap = bootstrap
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            request_timeout_ms=request_timeout_ms,
            acks=acks,
            enable_idempotence=acks == "all",
            linger_ms=0,  # batches arrive whole from this class, which does the lingering
            max_batch_size=max_batch_size,
            max_request_size=max(max_batch_size, MAX_MESSAGE_BYTES + DEAD_LETTER_HEADROOM + 32 * 1024),
        )
        self._linger_s = linger_ms / 1000
        self._max_queued = max_queued_batches
        self._partitions: dict[str, int] = {}
        self._open: dict[TopicPartition, Any] = {}  # the batch being filled, per partition
        self._queued: dict[TopicPartition, deque[tuple[Any, float]]] = {}  # closed batches (and when) for the sender
        self._senders: dict[TopicPartition, asyncio.Task[None]] = {}
        self._queued_count = 0
        self._space = asyncio.Condition()
        self._in_flight: dict[asyncio.Future[Any], float] = {}  # handed to aiokafka, not acknowledged: since when
        self._linger_task: asyncio.Task[None] | None = None
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
            if self._linger_task is not None:
                self._linger_task.cancel()
            for sender in self._senders.values():
                sender.cancel()
            try:
                # aiokafka's stop waits for every batch it holds; with the broker away that is for ever
                # (a stop cut short by its caller's deadline comes here too).
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._producer.stop()
            except TimeoutError:
                unsent = self._queued_count + len(self._in_flight) + len(self._open)
                log.error("kafka %s: closed with %d batches the broker never acknowledged (it is away): they are "
                          "lost", self._bootstrap, unsent)
                await self._producer.client.close()

    def _raise_if_failed(self, what: str) -> None:
        if self._error is not None:
            raise LogWriteError(f"kafka {self._bootstrap}: {what}") from self._error

    async def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            try:
                count = self._partitions[topic] = len(await self._producer.partitions_for(topic))
            except KafkaError as exc:
                raise LogWriteError(f"kafka {self._bootstrap}: no metadata for {topic}: {exc!r}") from exc
        return count

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> None:
        self._raise_if_failed("earlier sends failed")
        if not self._started:
            raise LogWriteError("producer is not started")
        check_message_size(topic, key, value, headers)
        tp = (topic, partition_for(key, await self._partition_count(topic)))
        batch = self._open.get(tp)
        if batch is None:
            batch = self._open[tp] = self._producer.create_batch()
        header_list = list(headers)
        if batch.append(key=key, value=value, timestamp=None, headers=header_list) is None:
            await self._close_batch(tp)  # full: hand it over, start the next
            batch = self._open[tp] = self._producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=header_list) is None:
                raise MessageTooLarge(f"message of {len(value)} bytes does not fit an empty batch")
        if self._linger_task is None or self._linger_task.done():
            self._linger_task = asyncio.create_task(self._linger())

    async def _linger(self) -> None:
        await asyncio.sleep(self._linger_s)
        for tp in list(self._open):
            if not self._queued.get(tp):  # a partition whose sender is busy fills its batch; the sender takes it
                await self._close_batch(tp)

    async def _close_batch(self, tp: TopicPartition) -> None:
        batch = self._open.pop(tp, None)
        if batch is None:
            return
        if self._queued_count >= self._max_queued:  # back-pressure: wait for the broker to catch up
            async with self._space:
                await self._space.wait_for(lambda: self._queued_count < self._max_queued or self._error is not None)
        self._queued.setdefault(tp, deque()).append((batch, time.monotonic()))
        self._queued_count += 1
        sender = self._senders.get(tp)
        if sender is None or sender.done():
            self._senders[tp] = asyncio.create_task(self._send_queued(tp))

    async def _send_queued(self, tp: TopicPartition) -> None:
        queue = self._queued[tp]
        while True:
            if not queue:
                if tp not in self._open:
                    return
                # The batch that filled while this sender was busy: it has lingered long enough.
                queue.append((self._open.pop(tp), time.monotonic()))
                self._queued_count += 1
            batch, since = queue[0]
            try:
                # Waits until the partition's previous batch has drained, then enqueues this one.
                future = await self._producer.send_batch(batch, tp[0], partition=tp[1])
            except KafkaTimeoutError:
                continue  # the previous batch is still unacknowledged (the broker is away): offer this one again
            except asyncio.CancelledError:
                raise  # stopped: the batch stays queued
            except Exception as exc:  # surfaced on the next send/flush: never silently dropped
                self._error = self._error or exc
                await self._dequeue(queue)
                return
            await self._dequeue(queue)
            self._in_flight[future] = since
            future.add_done_callback(self._delivered)

    async def _dequeue(self, queue: deque[tuple[Any, float]]) -> None:
        queue.popleft()
        self._queued_count -= 1
        async with self._space:
            self._space.notify_all()

    def _delivered(self, future: asyncio.Future[Any]) -> None:
        self._in_flight.pop(future, None)
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()

    def stalled_s(self) -> float:
        """How long the oldest message not yet acknowledged by the broker has waited (0: none waits)."""
        oldest = min([*self._in_flight.values(), *(q[0][1] for q in self._queued.values() if q)], default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    async def flush(self) -> None:
        for tp in list(self._open):
            await self._close_batch(tp)
        # asyncio.wait, not gather: a flush given up (a caller's timeout) must not cancel the senders.
        senders = [t for t in self._senders.values() if not t.done()]
        if senders:
            await asyncio.wait(senders)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        self._raise_if_failed("sends failed")
