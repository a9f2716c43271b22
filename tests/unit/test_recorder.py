"""The call's single writer: gap-free seq, well-formed unique ids, envelopes that match payloads."""

from __future__ import annotations

import uuid

from producers.event_writer import CallRecorder, EventWriter, new_event_id
from schemas.codec import EventCodec
from schemas.topics import AUDIO, CALLS, COMMANDS, topic_for
from tests.fakes import MemoryProducer
from voxlog.sim.synthetic_calls import synthetic_call


def test_event_ids_are_unique_version_4_uuids() -> None:
    ids = [new_event_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:500]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


async def test_recorder_numbers_events_and_routes_them_by_type() -> None:
    producer = MemoryProducer()
    codec = EventCodec()
    recorder = CallRecorder(
        EventWriter(producer, codec),
        tenant_id="t1",
        call_id="call-1",
        producer="test",
        producer_version="9",
        clock_us=iter(range(1000, 10**6)).__next__,
    )
    payloads = list(synthetic_call(1))
    for payload in payloads:
        await recorder.record(payload)
    assert recorder.next_seq == len(payloads)
    decoded = [(topic, key, codec.decode(value)) for topic, key, value, _ in producer.sent]
    assert [e.seq for _, _, e in decoded] == list(range(len(payloads)))
    assert [e.envelope.event_time_us for _, _, e in decoded] == list(range(1000, 1000 + len(payloads)))
    for topic, key, event in decoded:
        assert key == b"call-1"
        assert topic == topic_for(event.type)
        assert (event.tenant_id, event.call_id, event.envelope.producer) == ("t1", "call-1", "test")
    assert {topic for topic, _, _ in decoded} == {CALLS, AUDIO, COMMANDS}
    assert [e.payload for _, _, e in decoded] == payloads
