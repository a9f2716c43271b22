"""The embedded log's producer: batches appends to the SQLite log file off the event loop.

An append that fails for a reason that can pass (the disk full, the file locked by another
process for longer than SQLite's busy timeout) is tried again, with a growing pause, until it
succeeds: the messages stay buffered, in order, and `send` waits once the buffer is full. Any
other failure is kept and raised by the next `send` or `flush`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from pathlib import Path

from producers.embedded_log_file import LogFile, Message
from producers.log_producer import Headers, LogProducer, LogWriteError, check_message_size
from producers.notify import notifier_for
from schemas.topics import TOPICS

log = logging.getLogger(__name__)

RETRY_PAUSES_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Pauses between tries of an append that failed for a passing reason; the last repeats."""


def open_log_file(path: Path) -> LogFile:
    return LogFile(path, default_partitions={name: spec.partitions for name, spec in TOPICS.items()},
                   compacted=[name for name, spec in TOPICS.items() if spec.compacted])


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
        self._waiting_since: float | None = None  # when the oldest message not yet written was sent
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
        if not self._pending:
            self._waiting_since = time.monotonic()
        self._pending.append((topic, key, value, tuple(headers)))
        self._sent += 1
        self._wake.set()

    def stalled_s(self) -> float:
        since = self._waiting_since
        return 0.0 if since is None else time.monotonic() - since

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
            batch = [self._pending[i] for i in range(min(self._max_batch, len(self._pending)))]
            since = self._waiting_since
            failures = 0
            while True:
                try:
                    ends = await asyncio.to_thread(self._log.append, batch)
                    break
                except sqlite3.OperationalError as exc:  # full, locked, I/O: may pass; the batch stays first
                    pause = RETRY_PAUSES_S[min(failures, len(RETRY_PAUSES_S) - 1)]
                    failures += 1
                    log.error("embedded log %s: append of %d messages failed (%s); trying again in %g s",
                              self._path, len(batch), exc, pause)
                    await asyncio.sleep(pause)
                except BaseException as exc:  # surfaced on the next send/flush: never silently dropped
                    self._error = exc
                    async with self._progress:
                        self._progress.notify_all()
                    return
            for _ in batch:
                self._pending.popleft()
            self._waiting_since = time.monotonic() if self._pending else None
            if since is not None and failures:
                log.warning("embedded log %s: appends go through again after %.1f s", self._path,
                            time.monotonic() - since)
            self._written += len(batch)
            notifier.notify(ends)
            async with self._progress:
                self._progress.notify_all()
