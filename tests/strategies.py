"""Hypothesis strategies derived from the Avro schemas themselves, so every event type is covered."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import PAYLOAD_TYPES
from schemas.registry import load_registry

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def for_avro(schema: Any) -> st.SearchStrategy[Any]:
    """Values of the Python shape fastavro reads and writes for this Avro type."""
    if isinstance(schema, list):
        return st.one_of(*[for_avro(branch) for branch in schema])
    if isinstance(schema, str):
        schema = {"type": schema}
    kind = schema["type"]
    if kind == "null":
        return st.none()
    if kind == "string":
        return st.text(max_size=40)
    if kind == "int":
        return st.integers(*INT32)
    if kind == "long":
        return st.integers(*INT64)
    if kind == "float":
        return st.floats(width=32, allow_nan=False)
    if kind == "double":
        return st.floats(allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "bytes":
        return st.binary(max_size=700)
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(for_avro(schema["items"]), max_size=4)
    if kind == "map":
        return st.dictionaries(st.text(max_size=10), for_avro(schema["values"]), max_size=3)
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: for_avro(f["type"]) for f in schema["fields"]})
    raise ValueError(f"no strategy for {schema}")


def payload_records(event_type: str) -> st.SearchStrategy[dict[str, Any]]:
    return for_avro(load_registry().latest[event_type].schema)


def events(event_type: str) -> st.SearchStrategy[Event[EventPayload]]:
    """Whole events of one type: envelope consistent with the payload, everything else arbitrary."""
    sv = load_registry().latest[event_type]

    def build(record: dict[str, Any]) -> Event[EventPayload]:
        # Sealing is the codec's to do: writers hand it events with nothing sealed.
        env = dict(record["envelope"], type=event_type, schema_version=sv.version, pii_key_id=None, pii_sealed=None)
        return Event(Envelope.from_avro(env), PAYLOAD_TYPES[event_type].from_avro(record))

    return payload_records(event_type).map(build)


any_event = st.sampled_from(sorted(PAYLOAD_TYPES)).flatmap(events)
