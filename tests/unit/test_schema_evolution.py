"""Schema evolution: the newest version of each event type reads what every older version wrote.

Compatibility is checked by the Avro reference implementation (the `avro` package), both by its
compatibility checker and by actually writing with the old schema and reading with the new.
"""

from __future__ import annotations

import io
import json
from typing import Any

import avro.io
import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codegen
from schemas.codec import EventCodec
from schemas.events import PAYLOAD_TYPES, CallEnded
from schemas.registry import SchemaVersion, load_registry
from schemas.topics import TOPICS, topic_for
from tests.strategies import for_avro

REGISTRY = load_registry()
# Older versions of payloads, and every version as the older envelopes framed it.
OLDER_VERSIONS = [sv for versions in REGISTRY.versions.values() for sv in versions[:-1]] + list(REGISTRY.legacy)


def version_id(sv: SchemaVersion) -> str:
    return f"{sv.event_type}-v{sv.version}-envelope-v{sv.envelope_version}"


def parse(sv: SchemaVersion) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(sv.schema))


def avro_write(sv: SchemaVersion, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    avro.io.DatumWriter(parse(sv)).write(record, avro.io.BinaryEncoder(out))
    return out.getvalue()


def test_some_event_type_has_evolved() -> None:
    """Keeps this suite honest: there is at least one older version to be compatible with."""
    assert OLDER_VERSIONS


@pytest.mark.parametrize("old", OLDER_VERSIONS, ids=version_id)
def test_newest_reads_every_older_version(old: SchemaVersion) -> None:
    newest = REGISTRY.latest[old.event_type]
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader=parse(newest), writer=parse(old))
    assert result.compatibility is SchemaCompatibilityType.compatible, result.messages


@pytest.mark.parametrize("old", OLDER_VERSIONS, ids=version_id)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_old_data_decodes_into_the_newest_shape(old: SchemaVersion, data: st.DataObject) -> None:
    """Bytes the avro package writes with the old schema, framed as single-object messages, decode
    with our codec into the newest payload class (Avro resolution plus upcasters)."""
    record = data.draw(for_avro(old.schema))
    record["envelope"].update(type=old.event_type, schema_version=old.version)
    if old.envelope_version > 1:
        record["envelope"].update(pii_key_id=None, pii_sealed=None)  # sealed events: tests/unit/test_sealing.py
    message = old.header + avro_write(old, record)
    event = EventCodec().decode(message)
    assert event.envelope.schema_version == old.version  # the envelope keeps who wrote it
    newest = REGISTRY.latest[old.event_type]
    resolved = avro.io.DatumReader(parse(old), parse(newest)).read(
        avro.io.BinaryDecoder(io.BytesIO(avro_write(old, record)))
    )
    for name, value in resolved.items():
        if name not in ("envelope", "outcome"):  # outcome is upcast, see below
            assert event.payload.to_avro()[name] == value


@pytest.mark.parametrize(("reason", "outcome"), [("handoff", "handed_off"), ("caller_hangup", None)])
def test_call_ended_v1_outcome_is_upcast(reason: str, outcome: str | None) -> None:
    v1 = REGISTRY.versions["call.ended"][0]
    record = {
        "envelope": {
            "event_id": "e",
            "tenant_id": "t",
            "call_id": "c",
            "seq": 9,
            "type": "call.ended",
            "schema_version": 1,
            "event_time_us": 1,
            "causation_id": None,
            "correlation_id": None,
            "producer": "old",
            "producer_version": "0",
        },
        "reason": reason,
        "duration_ms": 1234,
    }
    event = EventCodec().decode(v1.header + avro_write(v1, record))
    assert event.payload == CallEnded(reason=reason, duration_ms=1234, outcome=outcome, detail=None)


def test_every_schema_is_valid_for_the_reference_implementation() -> None:
    for versions in REGISTRY.versions.values():
        for sv in versions:
            parse(sv)


def test_catalogue_matches_generated_classes_and_topics() -> None:
    assert set(PAYLOAD_TYPES) == set(REGISTRY.versions)
    for event_type in REGISTRY.versions:
        assert topic_for(event_type) in TOPICS
        assert REGISTRY.latest[event_type].version == PAYLOAD_TYPES[event_type].EVENT_VERSION


def test_generated_modules_are_fresh() -> None:
    """schemas/events.py and schemas/envelope.py are what `python -m schemas.codegen` makes now."""
    assert codegen.main(check=True) == 0


def test_pii_fields_are_marked() -> None:
    """Redaction (projections) relies on the schemas saying which fields carry personal data."""
    marked = {(sv.event_type, f["name"]) for sv in REGISTRY.latest.values() for f in sv.schema["fields"] if "pii" in f}
    assert {
        ("call.started", "from_number"),
        ("transcript.final", "text"),
        ("audio.caller_chunk", "audio"),
        ("llm.decided", "text"),
        ("tool.requested", "arguments_json"),
    } <= marked
