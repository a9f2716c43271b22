"""Encoding events to bytes and back: Avro binary in single-object encoding.

Every message starts with the marker C3 01 and the 8-byte fingerprint of the schema that wrote it,
so a reader always knows which event type and version it holds. Reading resolves older versions
into the newest one (Avro resolution, then upcasters).

The bodies are written and read by cavro, which compiles each schema into typed Cython readers and
writers once: 2.5x faster than fastavro's generic reader on the event mix, 1.8x on writing
(docs/performance.md, "The codec"). fastavro stays for what runs once or on a failure: parsing and
fingerprinting the schemas (`schemas.registry`) and explaining why a record could not be written.

A codec given the keystore (`keys`) seals every event's personal fields as it encodes them and
opens them as it decodes (`schemas.sealing`); an event whose key was destroyed decodes with them
blank (`Event.pii_withheld`). A codec without keys writes them in the clear, and refuses to read a
sealed event (`KeyUnavailable`) rather than pass it on blank.
"""

from __future__ import annotations

import secrets
from typing import Any

import cavro
from fastavro.validation import ValidationError, validate

from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import PAYLOAD_TYPES
from schemas.registry import SINGLE_OBJECT_MAGIC, SchemaRegistry, SchemaVersion, load_registry
from schemas.sealing import DataKeys, KeyUnavailable, PiiPlan, SealedBlobRejected, plan_for, restore, seal, unseal
from schemas.upcasters import upcast

HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8
CAVRO_OPTIONS = cavro.DEFAULT_OPTIONS.replace(
    record_decodes_to_dict=True,
    record_allow_extra_fields=False,  # a field the schema lacks is a bug to report, not data to drop
    logical_types=(),  # none of the schemas has one; a future one is read as its plain Avro type
)
_BODY_END = b"\x00" + bytes(byte or 1 for byte in secrets.token_bytes(15))
"""Put after each body read, and read back after it: what is read there instead is trailing bytes, and
a body that read into it was truncated. (cavro tells no reader's position; reading one byte too many,
to fail, cost 2 us an event in a raised EOFError.) A zero and then none: no end of it begins it, so
fewer than 16 trailing bytes always show; 16 or more pass only where they begin with these 15 bytes,
drawn afresh by each process."""
_BODY_END_READER = cavro.Schema({"type": "fixed", "name": "BodyEnd", "size": len(_BODY_END)}, options=CAVRO_OPTIONS)


class SchemaViolation(ValueError):
    """An event that does not match its schema; refused before it reaches the log."""

    def __init__(self, event_type: str, field: str, problem: str) -> None:
        super().__init__(f"{event_type}: field '{field}' {problem}")
        self.event_type = event_type
        self.field = field
        self.problem = problem


class UndecodableMessage(ValueError):
    """Bytes from the log that cannot be read as an event; the consumer dead-letters them."""


def _describe(schema: Any) -> str:
    if isinstance(schema, dict):
        if schema.get("type") == "enum":
            return "one of " + ", ".join(schema["symbols"])
        return str(schema.get("type"))
    return str(schema)


def _field_and_problem(error: ValidationError, record_name: str) -> tuple[str, str]:
    """fastavro lists one entry per rejected branch of the field's type; name the field once."""
    entries = [e for e in error.errors if hasattr(e, "field")]
    if not entries:
        return "?", str(error)
    first = entries[0]
    field = str(first.field)
    for prefix in (f"{record_name}.", "voxlog.events.", "voxlog."):
        field = field.removeprefix(prefix)
    expected = " or ".join(dict.fromkeys(_describe(e.schema) for e in entries if e.field == first.field))
    value = first.datum
    shown = repr(value) if not isinstance(value, bytes | bytearray) else f"{len(value)} bytes"
    return field, f"is {shown} ({type(value).__name__}), expected {expected}"


class EventCodec:
    def __init__(self, registry: SchemaRegistry | None = None, keys: DataKeys | None = None) -> None:
        self.registry = registry or load_registry()
        self.keys = keys
        self._latest = self.registry.latest
        self._by_fingerprint = self.registry.by_fingerprint
        self._plans: dict[str, PiiPlan | None] = {t: plan_for(t, sv.schema) for t, sv in self._latest.items()}
        self._writers: dict[str, Any] = {t: cavro.Schema(sv.schema, options=CAVRO_OPTIONS)
                                         for t, sv in self._latest.items()}
        self._readers: dict[bytes, Any] = {sv.fingerprint: self._writers[t] for t, sv in self._latest.items()}
        """The compiled reader of each writer schema seen (into the newest version): made on first use."""

    def encode(self, event: Event[EventPayload]) -> bytes:
        payload = event.payload
        event_type = payload.EVENT_TYPE
        sv = self._latest.get(event_type)
        if sv is None:
            raise SchemaViolation(event_type, "type", "is not a known event type")
        envelope = event.envelope
        if envelope.type != event_type or envelope.schema_version != sv.version:
            raise SchemaViolation(
                event_type,
                "envelope.type",
                f"says {envelope.type} v{envelope.schema_version}, payload is {event_type} v{sv.version}",
            )
        record = payload.to_avro()
        record["envelope"] = envelope.to_avro()
        plan = self._plans[event_type]
        if plan is not None and self.keys is not None and envelope.pii_sealed is None:
            self._seal(event, plan, record, self.keys)
        try:
            body: bytes = self._writers[event_type].binary_encode(record)
        except Exception as exc:  # cavro raises InvalidValue/KeyError/TypeError/OverflowError/...: explain
            raise self._violation(event_type, sv.parsed, record, exc) from exc
        return sv.header + body

    @staticmethod
    def _seal(event: Event[EventPayload], plan: PiiPlan, record: dict[str, Any], keys: DataKeys) -> None:
        values = plan.take(record)
        if not values:
            return
        key = keys.sealing_key(event, plan.kind)
        envelope = record["envelope"]
        envelope["pii_key_id"] = key.key_id
        # A destroyed key (the subject erased while the call went on): the fields stay blank and nothing
        # of them is kept; the empty blob marks the event as one whose personal data is withheld.
        envelope["pii_sealed"] = b"" if key.cipher is None else seal(key.cipher, values, envelope)

    def _open(self, record: dict[str, Any]) -> None:
        envelope = record["envelope"]
        key_id = envelope["pii_key_id"]
        if self.keys is None:
            raise KeyUnavailable(
                f"{envelope['type']} seq {envelope['seq']} of {envelope['call_id']} is sealed with key {key_id}, "
                "and this reader was given no keystore"
            )
        cipher = self.keys.opening_cipher(envelope["tenant_id"], key_id)
        if cipher is None or not envelope["pii_sealed"]:
            return  # erased: the payload keeps its blanks, the envelope says so
        try:
            restore(record, unseal(cipher, envelope["pii_sealed"], envelope))
        except (SealedBlobRejected, KeyError, IndexError, TypeError, ValueError) as exc:
            raise UndecodableMessage(str(exc)) from exc
        envelope["pii_sealed"] = None

    @staticmethod
    def _violation(event_type: str, schema: Any, record: dict[str, Any], exc: Exception) -> SchemaViolation:
        try:
            validate(record, schema, raise_errors=True, strict=True)
        except ValidationError as verr:
            field, problem = _field_and_problem(verr, schema["name"])
            return SchemaViolation(event_type, field, problem)
        return SchemaViolation(event_type, "?", f"could not be encoded: {exc!r}")

    def schema_of(self, data: bytes) -> tuple[str, int]:
        """Event type and writer version of a message, from its header alone."""
        sv = self._writer(data)
        return sv.event_type, sv.version

    def _writer(self, data: bytes) -> SchemaVersion:
        if len(data) < HEADER_LEN or data[:2] != SINGLE_OBJECT_MAGIC:
            raise UndecodableMessage("not an Avro single-object encoded message (bad marker)")
        sv = self._by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if sv is None:
            raise UndecodableMessage(
                f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}: "
                "written by a schema version this code does not have"
            )
        return sv

    def _reader(self, writer: SchemaVersion) -> Any:
        """The compiled reader of what `writer` wrote, into the newest version of its type."""
        reader = self._readers.get(writer.fingerprint)
        if reader is None:
            written_by = cavro.Schema(writer.schema, options=CAVRO_OPTIONS)
            reader = self._readers[writer.fingerprint] = self._writers[writer.event_type].reader_for_writer(written_by)
        return reader

    def decode(self, data: bytes) -> Event[EventPayload]:
        writer = self._writer(data)
        latest = self._latest[writer.event_type]
        body = cavro.MemoryReader(memoryview(data + _BODY_END)[HEADER_LEN:])
        try:
            record = self._reader(writer).binary_read(body)
            end = _BODY_END_READER.binary_read(body)
        except Exception as exc:  # truncated or corrupt bodies fail in many ways (EOF, UTF-8, unknown branch)
            raise UndecodableMessage(f"corrupt {writer.event_type} v{writer.version} body: {exc!r}") from exc
        if end != _BODY_END:
            raise UndecodableMessage(f"corrupt {writer.event_type} v{writer.version} body: trailing bytes")
        assert isinstance(record, dict)
        if record["envelope"]["pii_sealed"] is not None:
            self._open(record)
        if writer.version != latest.version:
            record = upcast(writer.event_type, writer.version, latest.version, record)
        try:
            envelope = Envelope.from_avro(record["envelope"])
            payload = PAYLOAD_TYPES[writer.event_type].from_avro(record)
        except (KeyError, TypeError) as exc:
            raise UndecodableMessage(f"{writer.event_type} v{writer.version}: {exc!r}") from exc
        if envelope.type != writer.event_type or envelope.schema_version != writer.version:
            raise UndecodableMessage(
                f"envelope says {envelope.type} v{envelope.schema_version} but the message was written "
                f"with {writer.event_type} v{writer.version}"
            )
        return Event(envelope, payload)
