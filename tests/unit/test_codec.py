"""The codec: every event type round-trips; bad events and bad bytes fail clearly, never otherwise."""

from __future__ import annotations

import contextlib
import io
import json
import uuid

import avro.io
import avro.schema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.base import Event, EventPayload
from schemas.codec import HEADER_LEN, EventCodec, SchemaViolation, UndecodableMessage
from schemas.envelope import Envelope
from schemas.events import PAYLOAD_TYPES, CallStarted, TranscriptFinal, Word
from schemas.registry import SINGLE_OBJECT_MAGIC, load_registry
from tests.strategies import any_event, events
from voxlog.sim.synthetic_calls import synthetic_call

codec = EventCodec()


def envelope_for(payload: EventPayload, **overrides: object) -> Envelope:
    fields: dict[str, object] = dict(
        event_id=str(uuid.uuid4()),
        tenant_id="t1",
        call_id="c1",
        seq=0,
        type=payload.EVENT_TYPE,
        schema_version=payload.EVENT_VERSION,
        event_time_us=1_790_000_000_000_000,
        producer="test",
        producer_version="0",
    )
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


def started(**overrides: object) -> CallStarted:
    fields: dict[str, object] = dict(
        channel="phone", direction="inbound", agent_id="a", agent_version="h", routed_by="number"
    )
    fields.update(overrides)
    return CallStarted(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("event_type", sorted(PAYLOAD_TYPES))
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_event_type_round_trips(event_type: str, data: st.DataObject) -> None:
    event = data.draw(events(event_type))
    encoded = codec.encode(event)
    assert encoded[:2] == SINGLE_OBJECT_MAGIC
    assert codec.schema_of(encoded) == (event_type, event.payload.EVENT_VERSION)
    assert codec.decode(encoded) == event


@given(any_event)
@settings(max_examples=200)
def test_the_body_is_standard_avro(event: Event[EventPayload]) -> None:
    """The reference implementation (the `avro` package) reads our bytes to the same record."""
    encoded = codec.encode(event)
    sv = load_registry().latest[event.type]
    reader = avro.io.DatumReader(avro.schema.parse(json.dumps(sv.schema)))
    record = reader.read(avro.io.BinaryDecoder(io.BytesIO(encoded[HEADER_LEN:])))
    expected = event.payload.to_avro()
    expected["envelope"] = event.envelope.to_avro()
    assert record == expected


@given(any_event, st.data())
@settings(max_examples=200)
def test_any_truncation_is_undecodable(event: Event[EventPayload], data: st.DataObject) -> None:
    encoded = codec.encode(event)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(UndecodableMessage):
        codec.decode(encoded[:cut])


@given(any_event, st.data())
@settings(max_examples=300)
def test_corrupt_bytes_fail_only_as_undecodable(event: Event[EventPayload], data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(event))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    # Either it still decodes, or it fails the one way a consumer expects (and dead-letters).
    with contextlib.suppress(UndecodableMessage):
        codec.decode(bytes(encoded))


@given(st.binary(max_size=300))
def test_random_bytes_fail_only_as_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableMessage):
        codec.decode(data)


def test_unknown_schema_version_is_named() -> None:
    body = codec.encode(Event(envelope_for(started()), started()))[HEADER_LEN:]
    with pytest.raises(UndecodableMessage, match="unknown schema fingerprint 0102030405060708"):
        codec.decode(SINGLE_OBJECT_MAGIC + bytes(range(1, 9)) + body)


@given(any_event, st.binary(min_size=1, max_size=40))
@settings(max_examples=300)
def test_any_trailing_bytes_are_corruption(event: Event[EventPayload], tail: bytes) -> None:
    """Whatever follows a whole body, even a byte that would continue a varint, is refused: shorter and
    longer than what the codec reads after a body to tell its end."""
    with pytest.raises(UndecodableMessage, match="trailing bytes"):
        codec.decode(codec.encode(event) + tail)


@pytest.mark.parametrize(
    ("payload", "envelope_overrides", "field", "detail"),
    [
        (started(channel="fax"), {}, "channel", "expected one of phone, sip, widget, unknown"),
        (started(agent_id=3), {}, "agent_id", "is 3 (int), expected string"),
        (started(from_number=5), {}, "from_number", "expected null or string"),
        (started(routed_by=None), {}, "routed_by", "is None"),
        (started(), {"call_id": None}, "Envelope.call_id", "expected string"),
        (started(), {"seq": "7"}, "Envelope.seq", "expected long"),
        (
            TranscriptFinal(
                utterance_id="u",
                text="hi",
                confidence=0.5,
                provider="p",
                model="m",
                start_ms=0,
                end_ms=1,
                latency_ms=1,
                words=(Word(word="x", start_ms="a", end_ms=1, confidence=1.0),),
            ),  # type: ignore[arg-type]
            {},
            "Word.start_ms",
            "expected int",
        ),
    ],
)
def test_schema_violation_names_the_field(
    payload: EventPayload, envelope_overrides: dict[str, object], field: str, detail: str
) -> None:
    with pytest.raises(SchemaViolation) as raised:
        codec.encode(Event(envelope_for(payload, **envelope_overrides), payload))
    assert raised.value.field == field
    assert detail in str(raised.value)
    assert str(raised.value).startswith(f"{payload.EVENT_TYPE}: field '{field}'")


def test_envelope_must_describe_its_payload() -> None:
    with pytest.raises(SchemaViolation, match=r"payload is call\.started"):
        codec.encode(Event(envelope_for(started(), type="call.ended"), started()))


def test_synthetic_calls_encode() -> None:
    """The demo's source produces only valid events."""
    for index in range(6):
        for payload in synthetic_call(index):
            assert codec.decode(codec.encode(Event(envelope_for(payload), payload))).payload == payload
