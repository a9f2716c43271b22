"""The summariser: a summary per finished call on the caller's memory stream, folded from the calls
topic as the events pass: nothing is read back by key (a scan on Kafka, growing with the log's history),
except a call whose start this worker never saw, and then from the calls topic alone (the call's
audio, most of its events, is never decoded for it)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from consumers.backends import EmbeddedBackend
from consumers.embedded_consumer import EmbeddedAdmin
from consumers.event_reader import read_call
from consumers.log_consumer import LogAdmin
from consumers.workers.summariser import FOLDED_TYPES, GROUP, Summariser, SummaryStore
from producers.embedded_producer import open_log_file
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogRecord
from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted, CallSummarized
from schemas.topics import AUDIO, CALLS, topic_for
from streams.memory import caller_key
from voxlog.sim.synthetic_calls import synthetic_call

NUMBER = "+15557000123"


class ReadsSeen(EmbeddedAdmin):
    """The embedded log's admin, noting which topics each point read asks for."""

    def __init__(self, path: Path, seen: list[tuple[str, ...]]) -> None:
        super().__init__(path)
        self.seen = seen

    def read_key(self, topics: Sequence[str], key: bytes, *, since_ms: int | None = None) -> AsyncIterator[LogRecord]:
        self.seen.append(tuple(topics))
        return super().read_key(topics, key, since_ms=since_ms)


class NotedBackend(EmbeddedBackend):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.seen: list[tuple[str, ...]] = []

    def admin(self) -> LogAdmin:
        return ReadsSeen(self.path, self.seen)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SummaryStore]:
    """The worker's own file, closed after the test whatever its end."""
    opened = SummaryStore(tmp_path / "summaries.db")
    yield opened
    opened.close()


async def record_call(writer: EventWriter, index: int = 0, number: str | None = NUMBER) -> list[Event[EventPayload]]:
    """A phone call with audio, on the log: its events as recorded."""
    recorder = CallRecorder(writer, tenant_id="demo", call_id=f"call-{uuid.uuid4()}", producer="test",
                            producer_version="0")
    events = []
    for payload in synthetic_call(index, turns=2, frames_per_utterance=5):
        if isinstance(payload, CallStarted):
            payload = dataclasses.replace(payload, from_number=number, channel="phone")
        events.append(await recorder.record(payload))
    await writer.flush()
    return events


def on_calls_topic(events: list[Event[EventPayload]]) -> list[Event[EventPayload]]:
    """What the summariser's group consumes of them (`voxlog.calls`), as it would be handed the events."""
    return [e for e in events if topic_for(e.envelope.type) == CALLS]


async def memory_of(backend: EmbeddedBackend) -> list[Event[EventPayload]]:
    async with backend.admin() as admin:
        return (await read_call(admin, caller_key("demo", NUMBER) or "", topics=(CALLS,))).events


async def test_a_call_folded_as_it_passed_is_summarised_without_reading_the_log(
        tmp_path: Path, store: SummaryStore) -> None:
    backend = NotedBackend(tmp_path / "log.db")
    summariser = Summariser(backend, store)
    async with backend.producer() as producer, backend.admin() as admin:
        writer = EventWriter(producer)
        calls = [await record_call(writer, index) for index in (0, 1)]
        for events in calls:
            for event in on_calls_topic(events):
                await summariser.fold(writer, admin, event)
        assert backend.seen == [], "the summariser read the log back"
        # A redelivered call.ended (a crash before the offset's commit) writes nothing again.
        await summariser.fold(writer, admin, calls[0][-1])
    memory = await memory_of(backend)
    summaries = [e for e in memory if isinstance(e.payload, CallSummarized)]
    assert [e.payload.call_id for e in summaries] == [events[0].call_id for events in calls]  # type: ignore[attr-defined]
    # Numbered by the calls' ends: in their order, and the same number for the same call's end.
    assert [e.seq for e in summaries] == [events[-1].envelope.event_time_us for events in calls]
    assert all(e.payload.summary for e in summaries)  # type: ignore[attr-defined]
    assert summariser.summarised == 2
    assert summariser.read_back == 0
    assert store.notes(calls[0][0].call_id) == []  # the call's words go once its summary is written


async def test_a_call_whose_start_passed_elsewhere_is_read_back_from_the_calls_topic_alone(
        tmp_path: Path, store: SummaryStore) -> None:
    """Its partition was another gateway's until a rebalance: its notes are not here."""
    backend = NotedBackend(tmp_path / "log.db")
    folded_here = Summariser(backend, SummaryStore(tmp_path / "here.db"))  # another gateway's worker
    async with backend.producer() as producer, backend.admin() as admin:
        writer = EventWriter(producer)
        events = await record_call(writer)
        for event in on_calls_topic(events):
            await folded_here.fold(writer, admin, event)
        await writer.flush()
    here = (await memory_of(backend))[-1].payload
    backend.seen.clear()
    async with backend.producer() as producer, backend.admin() as admin:
        summariser = Summariser(backend, store)
        await summariser.fold(EventWriter(producer), admin, events[-1])  # the end alone
    assert summariser.read_back == 1
    assert backend.seen == [(CALLS,)]
    assert AUDIO not in backend.seen[0]
    memory = [e for e in await memory_of(backend) if isinstance(e.payload, CallSummarized)]
    assert len(memory) == 1  # written twice, one seq: read once
    assert memory[0].payload == here  # the same summary either way


async def test_a_call_with_no_number_to_remember_keeps_no_words(
        tmp_path: Path, store: SummaryStore) -> None:
    backend = NotedBackend(tmp_path / "log.db")
    summariser = Summariser(backend, store)
    async with backend.producer() as producer, backend.admin() as admin:
        writer = EventWriter(producer)
        events = await record_call(writer, number=None)
        for event in on_calls_topic(events)[:-1]:
            await summariser.fold(writer, admin, event)
        assert store.notes(events[0].call_id) == []
        ended = await summariser.summarise(writer, admin, events[-1])
    assert ended is None
    assert isinstance(events[-1].payload, CallEnded)
    assert backend.seen == []


async def test_the_worker_in_its_group_decodes_only_what_it_folds_and_commits_every_record(
        tmp_path: Path, store: SummaryStore) -> None:
    """Its group passes the calls topic's other events (interim transcripts, LLM requests...) over
    undecoded; their offsets are committed with the rest, so a restart reads none of them again. Its
    own summary, on the caller's partition, comes back to it alone in a poll: passed over, and
    committed too."""
    backend = NotedBackend(tmp_path / "log.db")
    summariser = Summariser(backend, store)
    stop = asyncio.Event()
    worker = asyncio.create_task(summariser.run(stop))
    try:
        await asyncio.wait_for(summariser.ready.wait(), 30)
        async with backend.producer() as producer:
            events = await record_call(EventWriter(producer))
        assert {e.type for e in on_calls_topic(events)} - FOLDED_TYPES, "the call has events the worker passes over"
        for _ in range(600):
            if summariser.summarised:
                break
            await asyncio.sleep(0.05)  # the worker's poll's interval, not a guess at how long it takes
        assert summariser.summarised == 1
        async with backend.admin() as admin:
            ends = await admin.end_offsets(CALLS)  # the summary included
        log = open_log_file(backend.path)
        try:
            tps = [(CALLS, p) for p in ends]
            everything = {(CALLS, p): end for p, end in ends.items() if end}
            for _ in range(600):
                if log.committed(GROUP, tps) == everything:
                    break
                await asyncio.sleep(0.05)
            assert log.committed(GROUP, tps) == everything
        finally:
            log.close()
    finally:
        stop.set()
        await worker
        assert backend.seen == []
