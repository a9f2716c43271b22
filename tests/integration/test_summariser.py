"""The summariser: a summary per finished call on the caller's memory stream, read from the calls
topic alone (the call's audio, most of its events, is never decoded for it)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from consumers.backends import EmbeddedBackend
from consumers.embedded_consumer import EmbeddedAdmin
from consumers.log_consumer import LogAdmin
from consumers.workers.summariser import Summariser
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogRecord
from schemas.events import CallEnded, CallStarted
from schemas.topics import AUDIO, CALLS
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


async def test_a_finished_call_is_summarised_from_the_calls_topic_without_its_audio(tmp_path: Path) -> None:
    backend = NotedBackend(tmp_path / "log.db")
    call_id = f"call-{uuid.uuid4()}"
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        recorder = CallRecorder(writer, tenant_id="demo", call_id=call_id, producer="test", producer_version="0")
        ended = None
        for payload in synthetic_call(0, turns=2, frames_per_utterance=5):  # a phone call, with audio
            if isinstance(payload, CallStarted):
                payload = dataclasses.replace(payload, from_number=NUMBER)
            event = await recorder.record(payload)
            if isinstance(payload, CallEnded):
                ended = event
        await writer.flush()
        assert ended is not None
        async with backend.admin() as admin:
            summary = await Summariser(backend).summarise(writer, admin, ended)
    assert summary is not None
    assert summary.call_id == call_id
    assert summary.summary
    assert backend.seen, "the summariser read the call back"
    assert all(AUDIO not in topics for topics in backend.seen), backend.seen
    assert (CALLS,) in backend.seen
