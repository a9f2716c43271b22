"""An embedded consumer hears of another process's appends through its loop's watch of the file, and
an idle consumer does not read the log because other topics are being written (the gateway's
workers used to read all their partitions twenty times a second while calls wrote audio)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from consumers.embedded_consumer import EmbeddedConsumer
from consumers.embedded_log_watch import LogWatch, log_watch
from producers.embedded_log_file import LogFile
from producers.embedded_producer import EmbeddedProducer, open_log_file
from producers.log_producer import LogRecord


def foreign_writer(path: Path) -> LogFile:
    """A connection of its own, which no notifier of this process hears: as another process appends."""
    return open_log_file(path)


async def poll_until(consumer: EmbeddedConsumer, count: int) -> list[LogRecord]:
    got: list[LogRecord] = []
    async with asyncio.timeout(30):
        while len(got) < count:
            got += await consumer.poll(timeout_s=5.0)
    return got


async def test_a_consumer_gets_what_another_process_appends(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    consumer = EmbeddedConsumer(path, ["voxlog.commands"], group_id="tools")
    await consumer.start()
    other = foreign_writer(path)
    try:
        assert await consumer.poll(timeout_s=0.2) == []
        waiting = asyncio.create_task(poll_until(consumer, 3))
        await asyncio.sleep(0.2)  # the consumer is asleep in poll when the foreign append lands
        await asyncio.to_thread(other.append, [("voxlog.commands", f"call-{i}".encode(), b"v", ()) for i in range(3)])
        got = await waiting
        assert sorted(r.key for r in got) == [b"call-0", b"call-1", b"call-2"]
    finally:
        await asyncio.to_thread(other.close)
        await consumer.stop()


async def test_an_idle_consumer_reads_nothing_while_other_topics_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log.db"
    consumer = EmbeddedConsumer(path, ["voxlog.commands"], group_id="tools")
    await consumer.start()
    producer = EmbeddedProducer(path)
    await producer.start()
    other = foreign_writer(path)
    looks = 0
    fetch = consumer._fetch

    def counted_fetch(max_records: int) -> list[LogRecord]:
        nonlocal looks
        looks += 1
        return fetch(max_records)

    try:
        await consumer.poll(timeout_s=0.3)  # its first look, and the watch's first (which wakes it once)
        await consumer.poll(timeout_s=0.3)
        monkeypatch.setattr(consumer, "_fetch", counted_fetch)
        polling = asyncio.create_task(consumer.poll(timeout_s=30.0))
        for i in range(40):  # both this process and "another" write audio and calls, for about a second
            await producer.send("voxlog.audio", f"call-{i % 5}".encode(), b"frame")
            await asyncio.to_thread(other.append, [("voxlog.calls", f"call-{i % 5}".encode(), b"event", ())])
            await asyncio.sleep(0.025)
        await producer.flush()
        assert not polling.done()
        assert looks == 0, f"the idle consumer read the log {looks} times"
        # ...and it still hears its own topic, from this process and from the other.
        await producer.send("voxlog.commands", b"call-1", b"mine")
        assert [r.value for r in await polling] == [b"mine"]
        await asyncio.to_thread(other.append, [("voxlog.commands", b"call-2", b"theirs", ())])
        assert [r.value for r in await poll_until(consumer, 1)] == [b"theirs"]
    finally:
        await asyncio.to_thread(other.close)
        await producer.stop()
        await consumer.stop()


async def test_consumers_on_two_loops_each_have_a_watch(tmp_path: Path) -> None:
    """`asyncio.run` twice in one process (a CLI command, a test): the second loop's consumer is woken by
    its own loop's watch, not by the first loop's, which ended with its loop."""
    path = tmp_path / "log.db"
    other = foreign_writer(path)

    async def one_round(value: bytes) -> list[bytes]:
        consumer = EmbeddedConsumer(path, ["voxlog.commands"], auto_offset_reset="latest")
        await consumer.start()
        try:
            assert await consumer.poll(timeout_s=0.1) == []
            threading.Timer(0.2, other.append, [[("voxlog.commands", b"k", value, ())]]).start()
            return [r.value for r in await poll_until(consumer, 1)]
        finally:
            await consumer.stop()

    try:
        assert await asyncio.to_thread(lambda: asyncio.run(one_round(b"first"))) == [b"first"]
        assert await asyncio.to_thread(lambda: asyncio.run(one_round(b"second"))) == [b"second"]
    finally:
        other.close()


async def test_a_watch_that_cannot_look_logs_once_and_keeps_waking_its_consumers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A file the watch cannot read: its consumers are woken at every look (their own reads then raise
    what is wrong), and the log gets the failure once, not twenty times a second."""
    looks = 0

    def broken(self: LogWatch, topics: frozenset[str]) -> set[str]:
        nonlocal looks
        looks += 1
        raise sqlite3.DatabaseError("file is not a database")

    monkeypatch.setattr(LogWatch, "_grown_topics", broken)
    watch = log_watch(tmp_path / "log.db")
    woken = asyncio.Event()
    watch.subscribe(woken, ["voxlog.commands"])
    try:
        with caplog.at_level(logging.WARNING, logger="consumers.embedded_log_watch"):
            async with asyncio.timeout(30):
                while looks < 5:
                    await woken.wait()
                    woken.clear()
        failures = [r for r in caplog.records if "looking for other processes' appends" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert failures[0].exc_info is not None, "the first failure is logged with its trace"
    finally:
        await watch.unsubscribe(woken)
