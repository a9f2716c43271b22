"""Events through the log on every backend: Avro round trips, dead letters, schema refusals.

`EventWriter` routes events to the real topic map (`schemas.topics`), so these tests use the real
topics and keep apart from each other (and from other runs on a shared broker) by call id: every
call id is fresh, and what is read back is read by call id or from offsets taken before writing.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.backends import LogBackend
from consumers.event_reader import (
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_TOPIC,
    ConsumedEvent,
    EventConsumer,
    read_call,
)
from consumers.log_consumer import LogAdmin, LogConsumer
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import MAX_MESSAGE_BYTES, LogProducer, TopicPartition
from schemas.base import Event, EventPayload
from schemas.codec import HEADER_LEN, EventCodec, SchemaViolation
from schemas.envelope import Envelope
from schemas.events import (
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    LlmDecided,
    ToolCallSpec,
    TranscriptFinal,
    Word,
)
from schemas.registry import SINGLE_OBJECT_MAGIC, load_registry
from schemas.topics import CALL_TOPICS, DEADLETTER, TOPICS

from . import assert_quiet, create_topics, eventually, read_topic

STANDARD_TOPICS = {name: spec.partitions for name, spec in TOPICS.items()}
GROUP_OPTIONS = {"heartbeat_interval_s": 0.2}
CODEC = EventCodec()


@pytest.fixture
async def admin(backend: LogBackend) -> AsyncIterator[LogAdmin]:
    async with backend.admin() as log_admin:
        await create_topics(log_admin, STANDARD_TOPICS)
        yield log_admin


def new_call_id() -> str:
    return f"call-{uuid.uuid4()}"


async def consume_events(events: EventConsumer, count: int, *, call_id: str | None = None,
                         what: str) -> list[ConsumedEvent]:
    """Polls until `count` events (of `call_id`, when given) have been yielded."""
    got: list[ConsumedEvent] = []

    async def more() -> list[ConsumedEvent] | None:
        got.extend(c for c in await events.poll(timeout_s=0.2) if call_id is None or c.event.call_id == call_id)
        return got if len(got) >= count else None

    return await eventually(more, what=f"{count} events {what} (got {len(got)} so far)")


# Strategies ----------------------------------------------------------------------------------------

INT = st.integers(-(2**31), 2**31 - 1)
LONG = st.integers(-(2**63), 2**63 - 1)
COUNT = st.integers(0, 2**31 - 1)
IDS = st.uuids().map(str)
NAMES = st.text(min_size=1, max_size=24)
TEXT = st.text(max_size=300)
# Avro `float` is 32 bits: only values a float32 holds exactly survive the trip unchanged.
CONFIDENCE = st.floats(0.0, 1.0, width=32)

caller_audio_chunks = st.builds(
    CallerAudioChunk, codec=st.sampled_from(["pcm_s16le", "mulaw"]), sample_rate=st.sampled_from([8000, 16000]) | INT,
    chunk_index=LONG, offset_ms=LONG, duration_ms=INT, audio=st.binary(max_size=3200))
words = st.builds(Word, word=NAMES, start_ms=INT, end_ms=INT, confidence=CONFIDENCE)
transcripts = st.builds(
    TranscriptFinal, utterance_id=IDS, text=TEXT, confidence=CONFIDENCE, provider=NAMES, model=NAMES,
    start_ms=LONG, end_ms=LONG, latency_ms=INT,
    words=st.lists(words, max_size=12).map(tuple),
    language=st.none() | st.sampled_from(["en-US", "fr-FR", "de"]))
decisions = st.builds(
    LlmDecided, request_id=IDS, provider=NAMES, model=NAMES, text=TEXT,
    finish_reason=st.sampled_from(["stop", "tool_calls", "length", "content_filter", "error"]),
    input_tokens=COUNT, output_tokens=COUNT, time_to_first_token_ms=INT, total_ms=INT,
    tool_calls=st.lists(st.builds(ToolCallSpec, id=IDS, name=NAMES,
                                  arguments_json=st.dictionaries(NAMES, TEXT | INT, max_size=4).map(json.dumps)),
                        max_size=4).map(tuple))
endings = st.builds(
    CallEnded, reason=st.sampled_from(["caller_hangup", "agent_hangup", "handoff", "timeout", "error"]),
    duration_ms=LONG, outcome=st.none() | NAMES, detail=st.none() | TEXT)
payloads = st.one_of(caller_audio_chunks, transcripts, decisions, endings)


@st.composite
def calls(draw: st.DrawFn, call_id: str) -> list[Event[EventPayload]]:
    """One call's events: a tenant, a producer, payloads numbered by `seq` from 0 with envelopes."""
    tenant_id, producer, producer_version = draw(NAMES), draw(NAMES), draw(NAMES)
    events: list[Event[EventPayload]] = []
    for seq, payload in enumerate(draw(st.lists(payloads, min_size=1, max_size=6))):
        envelope = Envelope(
            event_id=draw(IDS), tenant_id=tenant_id, call_id=call_id, seq=seq, type=payload.EVENT_TYPE,
            schema_version=payload.EVENT_VERSION, event_time_us=draw(LONG),
            causation_id=draw(st.none() | IDS), correlation_id=draw(st.none() | IDS),
            producer=producer, producer_version=producer_version)
        events.append(Event(envelope, payload))
    return events


# 9. Encoding round trip through the log -------------------------------------------------------------

@pytest.fixture
async def tail(backend: LogBackend, admin: LogAdmin, producer: LogProducer) -> AsyncIterator[EventConsumer]:
    """An EventConsumer over the call topics that starts where the log ends now."""
    async with backend.consumer(list(CALL_TOPICS)) as consumer:
        for topic in CALL_TOPICS:
            for partition, end in (await admin.end_offsets(topic)).items():
                await consumer.seek(TopicPartition(topic, partition), end)
        yield EventConsumer(consumer, producer, name="contract-tail")


@settings(max_examples=25, deadline=None,
          # The backend, producer and consumer are shared by every example on purpose.
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_events_round_trip_through_the_log(admin: LogAdmin, producer: LogProducer, tail: EventConsumer,
                                                 data: st.DataObject) -> None:
    call_id = new_call_id()
    events = data.draw(calls(call_id), label="events")
    writer = EventWriter(producer, CODEC)
    for event in events:
        await writer.append(event)
    await writer.flush()

    history = await read_call(admin, call_id, CODEC)
    assert history.undecodable == []
    assert history.events == events

    consumed = await consume_events(tail, len(events), call_id=call_id, what="from the tail consumer")
    assert sorted((c.event for c in consumed), key=lambda e: e.seq) == events
    assert tail.dead_lettered == 0


# 10. Dead letters and schema refusals ---------------------------------------------------------------

def recorder_for(writer: EventWriter, call_id: str) -> CallRecorder:
    return CallRecorder(writer, tenant_id="tenant-contract", call_id=call_id, producer="tests.contract",
                        producer_version="1", clock_us=lambda: 1_700_000_000_000_000)


def unknown_fingerprint() -> bytes:
    known = set(load_registry().by_fingerprint)
    while (fingerprint := os.urandom(8)) in known:  # 2**-64 per draw, but be exact
        pass
    return fingerprint


async def test_undecodable_messages_are_dead_lettered_and_consumption_goes_on(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    await create_topics(admin, {topic_name: 3})
    call_id = new_call_id()
    key = call_id.encode()
    recorder = recorder_for(EventWriter(producer, CODEC), call_id)
    good = [
        recorder.make(CallStarted(channel="phone", direction="inbound", agent_id="a", agent_version="1",
                                  routed_by="number")),
        recorder.make(TranscriptFinal("u1", "hello", 0.5, "sphinx", "en-us", 0, 900, 120,
                                      words=(Word("hello", 0, 900, 0.5),))),
        recorder.make(LlmDecided("r1", "scripted", "policy", "hi", "stop", 10, 2, 5, 9)),
        recorder.make(CallEnded(reason="caller_hangup", duration_ms=5_000)),
    ]
    encoded = [CODEC.encode(e) for e in good]
    garbage = b"this is not an event at all"
    unknown_schema = SINGLE_OBJECT_MAGIC + unknown_fingerprint() + encoded[1][HEADER_LEN:]
    truncated = encoded[2][:-3]
    bad = [garbage, unknown_schema, truncated]
    stream = [encoded[0], garbage, encoded[1], unknown_schema, encoded[2], truncated, encoded[3]]
    origin = ("x-origin", b"contract-test")
    for value in stream:
        await producer.send(topic_name, key, value, [origin] if value in bad else [])
    await producer.flush()
    where = {r.value: r for r in await read_topic(backend, admin, topic_name)}

    group = f"group.{uuid.uuid4().hex[:12]}"
    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        events = EventConsumer(consumer, producer, name="contract-dlq")
        consumed = await consume_events(events, len(good), what="around the bad messages")
        assert [c.event for c in consumed] == good
        assert [c.record.value for c in consumed] == encoded
        await assert_events_quiet(events, consumer)
        assert events.dead_lettered == len(bad)
        await events.commit()

    dead = [r async for r in admin.read_key([DEADLETTER], key)]
    assert [r.value for r in dead] == bad, "dead letters must carry the original bytes, in order"
    reasons = []
    for letter, original in zip(dead, bad, strict=True):
        headers = dict(letter.headers)
        source = where[original]
        assert headers[DLQ_TOPIC] == topic_name.encode()
        assert headers[DLQ_PARTITION] == str(source.partition).encode()
        assert headers[DLQ_OFFSET] == str(source.offset).encode()
        assert origin in letter.headers, "the original headers must travel with the dead letter"
        reasons.append(headers[DLQ_REASON].decode())
    assert "marker" in reasons[0]
    assert "fingerprint" in reasons[1]
    assert "corrupt" in reasons[2]

    # Committed: a restarted member of the group sees only what came after, and no bad message again.
    later = recorder.make(CallEnded(reason="timeout", duration_ms=6_000))
    await producer.send(topic_name, key, CODEC.encode(later))
    await producer.flush()
    async with backend.consumer([topic_name], group_id=group, **GROUP_OPTIONS) as consumer:
        events = EventConsumer(consumer, producer, name="contract-dlq")
        consumed = await consume_events(events, 1, what="written after the commit")
        assert [c.event for c in consumed] == [later]
        await assert_events_quiet(events, consumer)
        assert events.dead_lettered == 0
    assert len([r async for r in admin.read_key([DEADLETTER], key)]) == len(bad)


async def test_an_undecodable_message_as_large_as_the_log_accepts_is_still_dead_lettered(
        backend: LogBackend, admin: LogAdmin, producer: LogProducer, topic_name: str) -> None:
    """The dead letter adds headers to the original: it must still fit, or one big bad message
    would stop its consumer for good."""
    await create_topics(admin, {topic_name: 1})
    key = new_call_id().encode()
    huge = bytes(MAX_MESSAGE_BYTES - len(key))  # key and value together exactly at the limit
    await producer.send(topic_name, key, huge)
    await producer.flush()

    async with backend.consumer([topic_name], group_id=f"group.{uuid.uuid4().hex[:12]}", **GROUP_OPTIONS) as consumer:
        events = EventConsumer(consumer, producer, name="contract-dlq")

        async def dead_lettered() -> bool | None:
            assert await events.poll(timeout_s=0.2) == []
            return True if events.dead_lettered else None

        await eventually(dead_lettered, what="the large message to be dead-lettered")
        await events.commit()
    [letter] = [r async for r in admin.read_key([DEADLETTER], key)]
    assert letter.value == huge


async def assert_events_quiet(events: EventConsumer, consumer: LogConsumer) -> None:
    """Nothing more arrives: no event, and no dead letter either."""
    before = events.dead_lettered
    assert await events.poll(timeout_s=0.3) == []
    assert events.dead_lettered == before
    await assert_quiet(consumer, 0.2)


async def test_an_event_that_breaks_its_schema_never_reaches_the_log(
        admin: LogAdmin, producer: LogProducer) -> None:
    call_id = new_call_id()
    writer = EventWriter(producer, CODEC)
    recorder = recorder_for(writer, call_id)

    wrong_type = recorder.make(CallEnded(reason=42, duration_ms=10))  # type: ignore[arg-type]
    with pytest.raises(SchemaViolation) as refused:
        await writer.append(wrong_type)
    assert refused.value.field == "reason"
    assert "reason" in str(refused.value)

    with pytest.raises(SchemaViolation) as refused:
        await recorder.record(CallerAudioChunk(codec="opus", sample_rate=8000, chunk_index=0,  # type: ignore[arg-type]
                                               offset_ms=0, duration_ms=20, audio=b"\0" * 160))
    assert refused.value.field == "codec"
    with pytest.raises(SchemaViolation) as refused:
        await recorder.record(CallEnded(reason="timeout", duration_ms=2**63))
    assert refused.value.field == "duration_ms"
    assert recorder.next_seq == 0, "a refused event must not use up a sequence number"

    accepted = await recorder.record(CallEnded(reason="caller_hangup", duration_ms=1_000))
    assert accepted.seq == 0
    assert recorder.next_seq == 1
    await writer.flush()

    history = await read_call(admin, call_id, CODEC)
    assert history.undecodable == []
    assert history.events == [accepted], "only the valid event may be in the log"
