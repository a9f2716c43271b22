"""The embedded log's consumer and admin, over the SQLite log file."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from pathlib import Path
from typing import Literal

from consumers.embedded_log_watch import log_watch
from consumers.log_consumer import CommitFailed, LogAdmin, LogConsumer, TopicInfo
from producers.embedded_log_file import CommitRejected, LogFile
from producers.embedded_producer import open_log_file
from producers.log_producer import LogRecord, TopicPartition
from producers.notify import notifier_for


class EmbeddedConsumer(LogConsumer):
    def __init__(
        self,
        path: Path,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        session_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
        max_poll_interval_s: float = 300.0,
    ) -> None:
        self._path = path
        self._topics = list(topics)
        self._group_id = group_id
        self._member_id = f"{group_id}-{uuid.uuid4()}" if group_id else None
        self._reset = auto_offset_reset
        self._session_timeout_ms = int(session_timeout_s * 1000)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._max_poll_interval_s = max_poll_interval_s
        self._last_poll = time.monotonic()
        self._keepalive: asyncio.Task[None] | None = None
        self._log: LogFile | None = None
        self._positions: dict[TopicPartition, int] = {}
        self._consumed: dict[TopicPartition, int] = {}
        self._last_heartbeat = 0.0
        self._stale = True  # positions the log has not been looked at from yet
        self._wake = asyncio.Event()  # set by an append to our topics, in this process or (the watch) another
        self._next_tp = 0  # round-robin start, so no partition starves

    @property
    def log(self) -> LogFile:
        if self._log is None:
            raise RuntimeError("consumer is not started")
        return self._log

    async def start(self) -> None:
        self._log = await asyncio.to_thread(open_log_file, self._path)
        notifier_for(self._path).subscribe(self._wake, self._topics)
        log_watch(self._path).subscribe(self._wake, self._topics)
        if self._group_id is None:
            for topic in self._topics:
                pairs = [(topic, p) for p in range(await asyncio.to_thread(self.log.ensure_topic, topic))]
                ends = [0] * len(pairs) if self._reset == "earliest" else await asyncio.to_thread(
                    self.log.end_offsets, pairs)
                self._positions.update((TopicPartition(*pair), end) for pair, end in zip(pairs, ends, strict=True))
        else:
            await self._heartbeat()
            self._keepalive = asyncio.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        """Like Kafka's background heartbeat: a member busy between polls stays in its group, up to
        `max_poll_interval_s` without a poll. Reassignment itself happens only inside `poll`."""
        group_id, member_id = self._group_id, self._member_id
        assert group_id is not None
        assert member_id is not None
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            if time.monotonic() - self._last_poll < self._max_poll_interval_s:
                await asyncio.to_thread(self.log.touch, group_id, member_id, self._session_timeout_ms)

    async def stop(self) -> None:
        if self._log is None:
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        notifier_for(self._path).unsubscribe(self._wake)
        await log_watch(self._path).unsubscribe(self._wake)
        if self._group_id is not None and self._member_id is not None:
            await asyncio.to_thread(self.log.leave, self._group_id, self._member_id)
        await asyncio.to_thread(self.log.close)
        self._log = None

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    async def _heartbeat(self) -> None:
        assert self._group_id is not None
        assert self._member_id is not None
        mine = await asyncio.to_thread(
            self.log.heartbeat, self._group_id, self._member_id, self._topics, self._session_timeout_ms
        )
        self._last_heartbeat = time.monotonic()
        assigned = {TopicPartition(t, p) for t, p in mine}
        if assigned == set(self._positions):
            return
        for tp in set(self._positions) - assigned:  # revoked: its new owner resumes from the last commit
            del self._positions[tp]
            self._consumed.pop(tp, None)
        added = assigned - set(self._positions)
        committed = await asyncio.to_thread(self.log.committed, self._group_id, added)
        for tp in added:
            if tp in committed:
                self._positions[tp] = committed[tp]
            elif self._reset == "earliest":
                self._positions[tp] = 0
            else:
                self._positions[tp] = await asyncio.to_thread(self.log.end_offset, tp.topic, tp.partition)
        self._stale = True  # new partitions: look at them now

    async def poll(self, timeout_s: float = 1.0, max_records: int = 1000) -> list[LogRecord]:
        deadline = time.monotonic() + timeout_s
        self._last_poll = time.monotonic()
        while True:
            if self._group_id is not None and time.monotonic() - self._last_heartbeat >= self._heartbeat_interval_s:
                await self._heartbeat()
            if self._stale or self._wake.is_set():
                self._stale = False
                self._wake.clear()  # before the read: an append during it wakes the next look
                records = await asyncio.to_thread(self._fetch, max_records)
                if records:
                    # A short read took every partition to the end it saw; later appends wake us.
                    self._stale = len(records) >= max_records
                    return records
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return []
            if self._group_id is not None:  # reassignment is learnt by heartbeats, here in poll
                remaining = min(remaining, self._last_heartbeat + self._heartbeat_interval_s - now)
            # Not asyncio.wait_for: on Python 3.11 a cancel that comes as it times out is swallowed,
            # and a cancelled consumer (a projector killed in a test) went on polling for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(remaining, 0.0)):
                    await self._wake.wait()

    def _fetch(self, max_records: int) -> list[LogRecord]:
        tps = sorted(self._positions)
        out: list[LogRecord] = []
        if not tps:
            return out
        start = self._next_tp % len(tps)
        ends = dict(zip(tps, self.log.end_offsets([(tp.topic, tp.partition) for tp in tps]), strict=True))
        for tp in tps[start:] + tps[:start]:
            if len(out) >= max_records:
                break
            if ends[tp] <= self._positions[tp]:
                continue
            rows = self.log.read(tp.topic, tp.partition, self._positions[tp], max_records - len(out))
            if rows:
                self._positions[tp] = rows[-1].offset + 1
                self._consumed[tp] = rows[-1].offset + 1
                out.extend(rows)
        self._next_tp += 1
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self._group_id is None:
            raise RuntimeError("commit needs a consumer group")
        to_commit = dict(offsets if offsets is not None else self._consumed)
        if not to_commit:
            return
        try:
            await asyncio.to_thread(
                self.log.commit,
                self._group_id,
                self._member_id,
                {(tp.topic, tp.partition): o for tp, o in to_commit.items()},
            )
        except CommitRejected as exc:
            await self._heartbeat()
            raise CommitFailed(str(exc)) from exc

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._positions:
            raise KeyError(f"{tp} is not assigned to this consumer")
        self._positions[tp] = offset
        self._stale = True


class EmbeddedAdmin(LogAdmin):
    def __init__(self, path: Path) -> None:
        self._log = open_log_file(path)

    async def create_topics(self, topics: Mapping[str, int], *, compacted: Collection[str] = ()) -> None:
        # The embedded log keeps every message; readers of a compacted topic take the latest per key.
        for name, partitions in topics.items():
            await asyncio.to_thread(self._log.create_topic, name, partitions)

    async def topics(self) -> list[TopicInfo]:
        out = []
        for name, partitions in (await asyncio.to_thread(self._log.topics)).items():
            ends = await self.end_offsets(name)
            out.append(TopicInfo(name, partitions, sum(ends.values())))
        return out

    async def end_offsets(self, topic: str) -> dict[int, int]:
        partitions = await asyncio.to_thread(self._log.partitions, topic)
        if partitions is None:
            raise KeyError(f"no topic {topic!r}")
        ends = await asyncio.to_thread(self._log.end_offsets, [(topic, p) for p in range(partitions)])
        return dict(enumerate(ends))

    async def read_key(
        self, topics: Sequence[str], key: bytes, *, since_ms: int | None = None
    ) -> AsyncIterator[LogRecord]:
        for record in await asyncio.to_thread(self._log.read_key, topics, key):
            if since_ms is None or record.timestamp_ms >= since_ms:
                yield record

    async def close(self) -> None:
        await asyncio.to_thread(self._log.close)
