"""The embedded log's producer: batches appends to the SQLite log file off the event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

from producers.base import Headers, LogProducer, LogWriteError, check_message_size
from producers.embedded_store import LogFile, Message
from producers.notify import notifier_for
from schemas.topics import TOPICS


def open_log_file(path: Path) -> LogFile:
    return LogFile(path, default_partitions={name: spec.partitions for name, spec in TOPICS.items()})


class EmbeddedProducer(LogProducer):
    """Buffers sends and appends them in batches, one transaction each, from a worker thread.

    A batch is written as soon as the previous one is done (or after `linger_s` when idle), so
    under load batches grow by themselves and under light load latency stays low.
    """

    def __init__(
        self, path: Path, *, max_buffered: int = 100_000, max_batch: int = 5_000, linger_s: float = 0.0
    ) -> None:
        self._path = path
        self._max_buffered = max_buffered
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._log: LogFile | None = None
        self._pending: deque[Message] = deque()
        self._sent = 0  # messages handed to send()
        self._written = 0  # of those, durable in the file
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._log = await asyncio.to_thread(open_log_file, self._path)
        self._writer = asyncio.create_task(self._write_loop(), name="embedded-producer-writer")

    async def stop(self) -> None:
        if self._writer is None:
            return
        try:
            await self.flush()
        finally:
            self._closing = True
            self._wake.set()
            await self._writer
            self._writer = None
            assert self._log is not None
            await asyncio.to_thread(self._log.close)

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> None:
        if self._error is not None:
            raise LogWriteError(f"embedded log {self._path}: earlier appends failed") from self._error
        if self._writer is None:
            raise LogWriteError("producer is not started")
        check_message_size(topic, key, value, headers)
        if len(self._pending) >= self._max_buffered:
            async with self._progress:
                await self._progress.wait_for(
                    lambda: len(self._pending) < self._max_buffered or self._error is not None
                )
        self._pending.append((topic, key, value, tuple(headers)))
        self._sent += 1
        self._wake.set()

    async def flush(self) -> None:
        target = self._sent
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target or self._error is not None)
        if self._error is not None:
            raise LogWriteError(f"embedded log {self._path}: appends failed") from self._error

    async def _write_loop(self) -> None:
        assert self._log is not None
        notifier = notifier_for(self._path)
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if self._linger_s:
                    await asyncio.sleep(self._linger_s)
                continue
            batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
            try:
                await asyncio.to_thread(self._log.append, batch)
            except BaseException as exc:  # surfaced on the next send/flush: never silently dropped
                self._error = exc
                self._pending.extendleft(reversed(batch))
                async with self._progress:
                    self._progress.notify_all()
                return
            self._written += len(batch)
            notifier.notify({topic for topic, _, _, _ in batch})
            async with self._progress:
                self._progress.notify_all()
