"""`voxlog replay verify` is QA's look at a log it must not change: it opens no producer and writes nothing,
not even a dead letter for a record it cannot read (its call's replay reports that record instead)."""

from __future__ import annotations

from typing import Any

from consumers.backends import EmbeddedBackend, ensure_topics
from consumers.log_consumer import LogAdmin
from producers.event_writer import EventWriter
from producers.log_producer import LogProducer
from schemas.events import CallEnded
from schemas.topics import CALLS
from streams.config.agents import AgentRouter
from tests.unit.test_core import AGENT, conversation
from voxlog.replaying import verify_calls


class ReadOnlyBackend(EmbeddedBackend):
    """The embedded log as a reader sees it: asked for a producer, it refuses."""

    def producer(self, **options: Any) -> LogProducer:
        raise PermissionError("this log is read only")


async def everything_in(admin: LogAdmin) -> dict[tuple[str, int], int]:
    """Each partition's end offset, for every topic of the log."""
    return {(topic.name, partition): end for topic in await admin.topics()
            for partition, end in (await admin.end_offsets(topic.name)).items()}


async def test_replay_verify_reads_the_log_and_writes_nothing_to_it(embedded_backend: EmbeddedBackend) -> None:
    # The embedded log: listing the calls reads the whole calls topic, which on the shared test broker
    # holds every test's calls.
    writer = embedded_backend
    path = writer.path
    sim = conversation()
    sim.feed(CallEnded(reason="caller_hangup", duration_ms=5000, outcome="booked"))
    async with writer.admin() as admin:
        await ensure_topics(admin)
        async with writer.producer() as producer:
            events = EventWriter(producer)
            for event in sim.events:
                await events.append(event)
            await producer.send(CALLS, b"call-unreadable", b"not an event")
        before = await everything_in(admin)

        results = await verify_calls(ReadOnlyBackend(path, writer.keys), AgentRouter([AGENT]), None)

        assert await everything_in(admin) == before
    assert {r.call_id: r.identical for r in results} == {sim.call_id: True, "call-unreadable": False}
    unreadable = next(r for r in results if r.call_id == "call-unreadable")
    assert unreadable.divergence is not None
    assert unreadable.divergence.event_type == "(undecodable)"
