"""A call as a vCon (the IETF's conversation container, draft-ietf-vcon-vcon-container), built,
validated and signed with the vcon-dev library (`vcon` on PyPI), and verified offline.

What a vCon of a call holds, from the call's events (the log) and its recording (the store), with
personal data as the analyst tables have it:

- `parties`: 0 the person (the caller inbound, the called person outbound): `tel` masked but for its
  last two digits, as `calls.from_number` is, and `meta.caller_key` (the tenant's key for them, a
  digest of the number, as in `caller_memory`); 1 the agent: `name` its id, `meta` its version.
- `dialog`: the stereo WAV the recordings projection wrote (caller left, agent right, 16 kHz), a
  `recording` dialog of `audio/x-wav` with its start, duration and both parties, embedded (base64url
  `body`) or linked (`url`, the tenant API's `GET /v1/calls/{id}/recording`), with the SHA-256 of the
  WAV's bytes either way (`alg` `sha256`, `signature` base64url, as the library names it; and the
  draft's `content_hash`, `sha512-` base64url). No recording (live, not assembled yet, consent
  refused, erased): no dialog, and the `voxlog.export` attachment says why.
- `analysis`: `transcript` (JSON: each utterance, caller's and agent's, PII redacted exactly as
  in `transcripts`: the calls projection's own fold makes it) and `summary` (the caller memory's
  summary of the call, redacted as in `caller_memory`), when there is one.
- `attachments`: `tags`; `voxlog.call` (the call's `calls` and `tool_calls` rows, as ClickHouse has
  them); `voxlog.events` (every event of the call but its audio chunks, decoded, each personal field
  redacted by the kind its schema marks, and the fields the tables redact besides); `voxlog.export`
  (what was left out and why: no recording, withheld personal data, events that could not be read).

Personal data erased (a destroyed data key: `Event.pii_withheld`) is blank in the events: the export
leaves it out, marks each such event `pii_withheld`, and counts them in `voxlog.export`.

**Signing.** The library signs with JWS RS256 (`Vcon.sign`: a compact JWS over the vCon's JSON, kept
as `payload` and `signatures` beside the vCon's own fields), so the key is RSA (3072 bits,
`VOXLOG_VCON_SIGNING_KEY`, made on first use like the audit signing key); `signatures[0].header.kid`
names it. The library's `Vcon.verify` checks the JWS alone, not that the vCon's fields are the
payload it signed, and through authlib, which refuses a JWS over 256,000 characters (any vCon with its
recording embedded): `verify_vcon` checks the RS256 signature itself (`cryptography`), that the fields
are the payload signed, the signature's form, and the library's validation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import uuid
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey, generate_private_key

from consumers.event_reader import CALL_LOOKBACK_MS, read_call
from consumers.log_consumer import LogAdmin
from projections.calls import CallsFold
from projections.recording_assembly import FORMAT
from projections.recording_store import RecordingFacts, RecordingStore
from projections.signing_keys import open_key_file, read_public_key
from projections.tables import CALLS, TOOL_CALLS, TRANSCRIPTS, Output
from schemas.base import Event, EventPayload
from schemas.events import CallStarted, CallSummarized, ErrorRaised, ProviderFallback, ToolFailed
from schemas.registry import load_registry
from schemas.sealing import EACH, Step, pii_leaves
from schemas.topics import CALLS as CALLS_TOPIC
from schemas.topics import COMMANDS
from schemas.version import __version__
from streams.memory import key_of_call, person_number
from streams.redaction import Redactor, default_redactor, names_in_json, redact_field

with warnings.catch_warnings(record=True) as _caught:
    # The library signs with authlib.jose, which warns on import that it is deprecated (for joserfc), and
    # sets its own warnings to "always" (no filter silences it): that one is dropped, any other warned again.
    warnings.simplefilter("always")
    from vcon import Vcon
    from vcon.dialog import Dialog
    from vcon.party import Party
for _warning in _caught:
    if "authlib.jose" not in str(_warning.message):
        warnings.warn_explicit(_warning.message, _warning.category, _warning.filename, _warning.lineno)

MEDIA_TYPE = "application/vcon+json"
"""The draft's media type for a vCon in JSON."""
SIGNING_ALGORITHM = "RS256"
"""What the library signs with (`Vcon.sign`), and all `verify_vcon` accepts."""
KEY_FILE = "vcon-signing-key.pem"
"""The signing key's file in VOXLOG_HOME when `VOXLOG_VCON_SIGNING_KEY` is not set (as `voxlog.settings` says)."""
RSA_BITS = 3072
VENDOR = "voxlog"
EVENTS_ATTACHMENT = "voxlog.events"
CALL_ATTACHMENT = "voxlog.call"
EXPORT_ATTACHMENT = "voxlog.export"
EXPORT_TOPICS = (CALLS_TOPIC, COMMANDS)
"""A call's events but its audio chunks: the recording is the audio."""
CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
"""What a call id may be to be exported (what can name a recording, and a message key)."""
RecordingMode = Literal["embed", "link"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SIGNED_FIELDS = ("payload", "signatures")
"""What signing adds to a vCon; the rest is what the payload holds."""
_SIGNATURE_FIELDS = frozenset({"protected", "signature", "header"})


class VconKeyError(Exception):
    """A key file that cannot be used: unreadable, not RSA, too short, or open to others."""


@dataclass(frozen=True)
class Recording:
    wav: bytes
    facts: RecordingFacts


@dataclass(frozen=True)
class CallMaterial:
    """What a call's vCon is made of: its events (seq order, one tenant's, no audio chunks), its
    recording if there is one yet, and its summary from the caller's memory."""

    tenant_id: str
    call_id: str
    events: Sequence[Event[EventPayload]]
    recording: Recording | None = None
    summary: Event[EventPayload] | None = None
    """The `call.summarized` of this call on the caller's memory stream."""
    undecodable: int = 0
    """Records of the call that could not be decoded (and so are not in the export)."""

    @property
    def started(self) -> Event[EventPayload]:
        return next(e for e in self.events if isinstance(e.payload, CallStarted))


def iso_time(us: int) -> str:
    """Epoch microseconds as ISO 8601, UTC, to the microsecond."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def vcon_uuid(tenant_id: str, call_id: str, started_us: int) -> str:
    """The call's vCon id: a UUID version 8 (as the draft recommends) of the call's start in epoch
    milliseconds and 74 bits of a SHA-256 of tenant and call, so every export of a call carries the same one."""
    digest = hashlib.sha256(f"voxlog.vcon\x1f{tenant_id}\x1f{call_id}".encode()).digest()
    raw = bytearray(((started_us // 1000) & (2**48 - 1)).to_bytes(6, "big") + digest[:10])
    raw[6] = 0x80 | (raw[6] & 0x0F)  # version 8
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(raw)))


# --- Events, redacted --------------------------------------------------------------------------------

_ALSO_REDACTED: dict[str, tuple[tuple[tuple[Step, ...], str], ...]] = {
    # Not marked personal in their schemas, yet free text or a caller's parameters: the tables redact
    # these too (errors.message, tool_calls.error), and a dial's parameters name the person.
    CallStarted.EVENT_TYPE: ((("parameters",), "json"),),
    ErrorRaised.EVENT_TYPE: ((("message",), "text"),),
    ToolFailed.EVENT_TYPE: ((("error",), "text"),),
    ProviderFallback.EVENT_TYPE: ((("reason",), "text"),),
}
_WORDS_TEXT = (("words", EACH, "word"),)
"""A transcript's words one by one, where no rule can see a number read out across them: their text
is not exported (the tables keep none either); their times and confidences are."""
_LEFT_OUT = frozenset({"voice", "words"})
"""Kinds of field blanked whole rather than redacted: audio, and the words above."""


@cache
def personal_fields(event_type: str) -> tuple[tuple[tuple[Step, ...], str], ...]:
    """Where an event type's newest schema (what events are read as) keeps personal data, and of which
    kind; with the fields the tables redact besides."""
    schema = load_registry().latest[event_type].schema
    return (*((leaf.steps, leaf.pii) for leaf in pii_leaves(schema)), *_ALSO_REDACTED.get(event_type, ()))


def _redact_value(kind: str, value: Any, redactor: Redactor, names: Collection[str]) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):  # a map of strings marked json (parameters, a carrier's raw fields)
        redacted = redact_field("json", json.dumps(value, sort_keys=True), redactor, names)
        return json.loads(redacted) if redacted else {}
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return redact_field(kind, str(value), redactor, names)


def _redact_at(node: Any, steps: tuple[Step, ...], kind: str, redactor: Redactor, names: Collection[str]) -> None:
    step, rest = steps[0], steps[1:]
    if step is EACH:
        items = enumerate(node) if isinstance(node, list) else node.items()
        for _, item in list(items):
            if item is not None:
                _redact_at(item, rest, kind, redactor, names)
        return
    if not isinstance(node, dict) or step not in node:
        return
    if rest:
        if node[step] is not None:
            _redact_at(node[step], rest, kind, redactor, names)
        return
    if kind in _LEFT_OUT:
        node[step] = None if node[step] is None else ""
        return
    node[step] = _redact_value(kind, node[step], redactor, names)


def _names_told(payload: EventPayload) -> list[str]:
    """People's names an event tells in fields meant for them (as `CallsFold` learns them)."""
    record = payload.to_avro()
    texts: list[str] = []
    if isinstance(payload, CallStarted):
        texts.append(json.dumps(payload.parameters))
    texts += [record[name] for name in ("arguments_json", "result_json") if isinstance(record.get(name), str)]
    texts += [call["arguments_json"] for call in record.get("tool_calls") or ()]
    return [name for text in texts for name in names_in_json(text)]


def redacted_payload(payload: EventPayload, redactor: Redactor, names: Collection[str] = ()) -> dict[str, Any]:
    """The payload as a JSON object, every personal field redacted by the kind its schema marks, and the
    people's names in `names` (else the ones it tells itself) wherever they are said."""
    record = payload.to_avro()
    known = names or _names_told(payload)
    for steps, kind in personal_fields(payload.EVENT_TYPE):
        _redact_at(record, steps, "words" if steps in _WORDS_TEXT else kind, redactor, known)
    return record


def redacted_events(events: Sequence[Event[EventPayload]], redactor: Redactor) -> list[dict[str, Any]]:
    """The events as JSON objects: envelope fields, the payload with every personal field redacted
    by its kind (`streams.redaction.redact_field`), people's names the call was told redacted wherever
    said after that; and whether the event's personal data was withheld (erased)."""
    names: set[str] = set()
    out: list[dict[str, Any]] = []
    for event in events:
        names.update(_names_told(event.payload))
        payload = redacted_payload(event.payload, redactor, names)
        envelope = event.envelope
        out.append({
            "seq": envelope.seq, "type": envelope.type, "schema_version": envelope.schema_version,
            "event_id": envelope.event_id, "at": iso_time(envelope.event_time_us),
            "event_time_us": envelope.event_time_us, "producer": envelope.producer,
            "producer_version": envelope.producer_version, "causation_id": envelope.causation_id,
            "correlation_id": envelope.correlation_id, "pii_withheld": event.pii_withheld, "payload": payload})
    return out


# --- The tables' rows, from the calls projection's own fold ----------------------------------------------


@dataclass
class _TableRows:
    call: dict[str, Any] = field(default_factory=dict)
    transcripts: dict[int, dict[str, Any]] = field(default_factory=dict)
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)


def _json_safe(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def table_rows(events: Sequence[Event[EventPayload]], redactor: Redactor) -> _TableRows:
    """What `calls`, `transcripts` and `tool_calls` hold of the call, as the calls projection writes it
    (the newest write of each row), without ClickHouse: the same fold, so the same redaction."""
    fold = CallsFold(redactor)
    kept = _TableRows()
    outputs: list[Output] = [row for event in events if event.type in CallsFold.event_types
                             for row in fold.apply(event)]
    for output in outputs:
        if not isinstance(output, tuple):
            continue
        table, values = output
        row = {name: _json_safe(value) for name, value in zip(table.column_names, values, strict=True)
               if name not in ("tenant_id", "call_id", "_version")}
        if table is CALLS:
            kept.call = row
        elif table is TRANSCRIPTS:
            kept.transcripts[row["seq"]] = row
        elif table is TOOL_CALLS:
            kept.tool_calls[row["tool_call_id"]] = row
    return kept


# --- Building -------------------------------------------------------------------------------------------


def _caller_party(started: Event[EventPayload], rows: _TableRows) -> Any:
    payload = started.payload
    assert isinstance(payload, CallStarted)
    masked = rows.call.get("to_number" if payload.direction == "outbound" else "from_number") or None
    meta: dict[str, Any] = {"direction": payload.direction, "channel": payload.channel}
    if rows.call.get("caller_key"):
        meta["caller_key"] = rows.call["caller_key"]
    if masked:
        meta["tel_redacted"] = "every digit but the last two masked, as calls.from_number has it"
    elif started.pii_withheld:
        meta["tel_withheld"] = "the caller's personal data was erased"
    elif person_number(payload) is None:
        meta["tel"] = f"none: a {payload.channel} call"
    return Party(tel=masked, role="customer", meta=meta)


def _agent_party(started: CallStarted, tenant_id: str) -> Any:
    return Party(name=started.agent_id, role="agent",
                 meta={"agent_id": started.agent_id, "agent_version": started.agent_version, "tenant_id": tenant_id,
                       "kind": "ai voice agent"})


def _recording_dialog(call: CallMaterial, recording: Recording, started: CallStarted, url: str | None) -> Any:
    wav, facts = recording.wav, recording.facts
    fields: dict[str, Any] = {
        "type": "recording", "start": iso_time(facts.started_us), "parties": [0, 1],
        "originator": 1 if started.direction == "outbound" else 0, "mimetype": "audio/x-wav",
        "filename": f"{call.call_id}.wav", "duration": facts.duration_ms / 1000,
        "alg": "sha256", "signature": _b64url(hashlib.sha256(wav).digest()),
        "content_hash": f"sha512-{_b64url(hashlib.sha512(wav).digest())}",
        "meta": {"format": FORMAT, "channels": {"left": 0, "right": 1}, "bytes": len(wav),
                 "caller_audio_ms": facts.caller_audio_ms, "agent_audio_ms": facts.agent_audio_ms}}
    if url is None:
        fields.update(body=_b64url(wav), encoding="base64url")
    else:
        fields["url"] = url
    return Dialog(**fields)


def _no_recording_reason(call: CallMaterial, rows: _TableRows) -> str:
    withheld = rows.call.get("recording_withheld")
    if withheld == "consent_refused":
        return "none: the caller refused consent to recording"
    if withheld == "consent_not_given":
        return "none: the call ran under opt_in and the caller never agreed to recording"
    if any(e.pii_withheld for e in call.events):
        return "none: the caller's personal data was erased, their recording with it"
    if rows.call.get("ended_at") is None:
        return "none yet: the call has not ended"
    return "none yet: the recordings projection has not stored it (or the call had no audio)"


def build_vcon(call: CallMaterial, *, created_at: datetime, recording: RecordingMode = "embed",
               recording_url: str | None = None, redactor: Redactor | None = None) -> Any:
    """The call as an unsigned `vcon.Vcon`. `recording`: the WAV embedded in the dialog, or linked to
    `recording_url` (required then)."""
    if recording == "link" and recording_url is None:
        raise ValueError("a linked recording needs its URL")
    redactor = redactor or default_redactor()
    started_event = call.started
    started = started_event.payload
    assert isinstance(started, CallStarted)
    rows = table_rows(call.events, redactor)
    withheld = [e.seq for e in call.events if e.pii_withheld]

    vcon = Vcon.build_new()
    vcon.vcon_dict.update(
        uuid=vcon_uuid(call.tenant_id, call.call_id, started_event.envelope.event_time_us),
        created_at=created_at.astimezone(UTC).isoformat(),
        subject=f"{started.direction} {started.channel} call {call.call_id} with agent {started.agent_id}")
    vcon.add_party(_caller_party(started_event, rows))
    vcon.add_party(_agent_party(started, call.tenant_id))

    dialogs: list[int] = []
    if call.recording is not None:
        vcon.add_dialog(_recording_dialog(call, call.recording, started, recording_url if recording == "link"
                                          else None))
        dialogs = [0]
        recording_note = (f"linked: {recording_url}" if recording == "link"
                          else "embedded in dialog 0 (base64url)")
    else:
        recording_note = _no_recording_reason(call, rows)

    withheld_seqs = set(withheld)
    transcript = [{"seq": row["seq"], "at": row["at"], "speaker": row["speaker"],
                   "party": 0 if row["speaker"] == "caller" else 1, "text": row["text"],
                   "start_ms": row["start_ms"], "end_ms": row["end_ms"], "confidence": row["confidence"],
                   **({"withheld": True} if row["seq"] in withheld_seqs else {})}
                  for _, row in sorted(rows.transcripts.items())]
    vcon.add_analysis(type="transcript", dialog=dialogs, vendor=VENDOR, body=json.dumps(transcript),
                      encoding="json", extra={"product": f"voxlog {__version__}", "schema": "voxlog.transcript/1",
                                              "redaction": "PII redacted as in the transcripts table"})
    summary_note = _add_summary(vcon, call, dialogs, redactor)

    for name, value in (("tenant", call.tenant_id), ("agent", started.agent_id), ("channel", started.channel),
                        ("direction", started.direction), ("outcome", rows.call.get("outcome") or "")):
        if value:
            vcon.add_tag(name, value)
    vcon.add_attachment(type=CALL_ATTACHMENT, encoding="none", body=json.dumps(
        {"call": rows.call, "tool_calls": list(rows.tool_calls.values())}))
    vcon.add_attachment(type=EVENTS_ATTACHMENT, encoding="none",
                        body=json.dumps(redacted_events(call.events, redactor)))
    vcon.add_attachment(type=EXPORT_ATTACHMENT, encoding="none", body=json.dumps({
        "exported_by": f"voxlog {__version__}", "tenant_id": call.tenant_id, "call_id": call.call_id,
        "recording": recording_note, "summary": summary_note,
        "redaction": ("personal data as the analyst tables have it (streams/redaction.py): numbers masked but "
                      "for their last two digits, text with typed placeholders (<PHONE>, <EMAIL>, <CARD>, "
                      "<PERSON>...), JSON fields redacted value by value, DTMF digits <DTMF>; the words of "
                      "transcripts one by one are left out; the raw data stays in the log"),
        "personal_data": (f"withheld: {len(withheld)} events' personal fields were erased (their key destroyed "
                          "by an erasure or retention) and are not in this export" if withheld else "as recorded"),
        "withheld_events": withheld,
        "audio_events": "not listed: the recording is the call's audio",
        "undecodable_events": call.undecodable}))
    return vcon


def _add_summary(vcon: Any, call: CallMaterial, dialogs: list[int], redactor: Redactor) -> str:
    event = call.summary
    if event is None:
        if key_of_call(call.tenant_id, _started_payload(call)) is None:
            return "none: a call without a number has no caller memory"
        return "none yet: the summariser has not summarised the call"
    summary = event.payload
    assert isinstance(summary, CallSummarized)
    if event.pii_withheld or not summary.summary:
        return "withheld: the caller's memory was erased"
    vcon.add_analysis(type="summary", dialog=dialogs, vendor=VENDOR, body=redactor.redact(summary.summary),
                      encoding="none", extra={"product": summary.source,
                                              "redaction": "PII redacted as in caller_memory"})
    return f"analysis, made by {summary.source}"


def _started_payload(call: CallMaterial) -> CallStarted:
    payload = call.started.payload
    assert isinstance(payload, CallStarted)
    return payload


# --- Reading a call -------------------------------------------------------------------------------------


def recording_started(store: RecordingStore, tenant_id: str, call_id: str) -> int | None:
    """When the call's finished recording starts (microseconds since the epoch); None while there is none.
    RecordingStoreError when the store cannot be reached."""
    facts = _finished(store, tenant_id, call_id)
    return None if facts is None else facts.started_us


def _finished(store: RecordingStore, tenant_id: str, call_id: str) -> RecordingFacts | None:
    try:
        return store.finished(tenant_id, call_id)
    except ValueError:  # an id that cannot name a recording
        return None


def _read_recording(store: RecordingStore, tenant_id: str, call_id: str) -> Recording | None:
    """The call's finished recording, whole; None while there is none. RecordingStoreError when the
    store cannot be reached. Blocking: run it in a thread."""
    facts = _finished(store, tenant_id, call_id)
    if facts is None:
        return None
    found = store.read(tenant_id, call_id)
    if found is None:  # erased between the two
        return None
    if isinstance(found, Path):
        try:
            return Recording(found.read_bytes(), facts)
        except FileNotFoundError:
            return None
    try:
        return Recording(b"".join(found.chunks), facts)
    finally:
        found.close()


async def read_call_material(admin: LogAdmin, store: RecordingStore, call_id: str, *,
                             tenant_id: str | None, started_us: int | None = None) -> CallMaterial | None:
    """A call as the log and the recording store have it; None for an unknown call, or one of another
    tenant than `tenant_id` (None: any tenant, as an operator reads). `started_us`, its start where the
    tables know it, bounds the log's scan (on Kafka, the call's partition from 0 else); so does its
    recording's. RecordingStoreError when the store cannot be reached."""
    if not CALL_ID.fullmatch(call_id):
        return None
    if started_us is None and tenant_id is not None:
        started_us = await asyncio.to_thread(recording_started, store, tenant_id, call_id)
    since_ms = None if started_us is None else started_us // 1000 - CALL_LOOKBACK_MS
    history = await read_call(admin, call_id, topics=EXPORT_TOPICS, since_ms=since_ms)
    started = next((e for e in history.events if isinstance(e.payload, CallStarted)
                    and (tenant_id is None or e.tenant_id == tenant_id)), None)
    if started is None:
        return None
    tenant = started.tenant_id
    events = [e for e in history.events if e.tenant_id == tenant]
    recording = await asyncio.to_thread(_read_recording, store, tenant, call_id)
    summary = None
    assert isinstance(started.payload, CallStarted)
    caller = key_of_call(tenant, started.payload)
    if caller is not None:
        memory = await read_call(admin, caller, topics=(CALLS_TOPIC,),
                                 since_ms=started.envelope.event_time_us // 1000)
        summary = next((e for e in memory.events if e.tenant_id == tenant and isinstance(e.payload, CallSummarized)
                        and e.payload.call_id == call_id), None)
    return CallMaterial(tenant, call_id, events, recording, summary, len(history.undecodable))


# --- Signing and verifying ------------------------------------------------------------------------------


def signing_key_id(public_key: RSAPublicKey) -> str:
    """The key's fingerprint: SHA-256 of its DER SubjectPublicKeyInfo, hex."""
    return hashlib.sha256(public_key.public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def sign_vcon(vcon: Any, key: RSAPrivateKey) -> bytes:
    """The vCon signed by the library (JWS RS256 over its JSON), the key's id in the signature's
    unprotected header; as the bytes of a file. Refuses (ValueError) a vCon the library finds invalid."""
    valid, errors = vcon.is_valid()
    if not valid:
        raise ValueError(f"not a valid vCon, so not signed: {'; '.join(errors)}")
    vcon.sign(key)
    vcon.vcon_dict["signatures"][0]["header"] = {"kid": signing_key_id(key.public_key())}
    return (json.dumps(vcon.vcon_dict, ensure_ascii=False) + "\n").encode()


@dataclass(frozen=True)
class VconVerdict:
    problems: list[str]
    document: dict[str, Any] | None
    """The vCon as read (None: not JSON)."""
    key_id: str | None
    """The key its signature names."""

    @property
    def intact(self) -> bool:
        return not self.problems


def _canonical_b64url(text: Any) -> bool:
    """Whether `text` is base64url as JWS writes it (unpadded, its spare bits zero): one spelling per value."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        return False
    try:
        return _b64url(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) == text
    except ValueError:
        return False


def _rs256_verifies(protected: str, payload: str, signature: str, key: RSAPublicKey) -> bool:
    """A compact JWS's RS256 signature (RFC 7518: RSASSA-PKCS1-v1_5, SHA-256) over `protected.payload`.

    Checked here rather than by the library's `Vcon.verify`: that is authlib's JWS, which refuses a
    serialization over 256,000 characters, and a vCon with its recording embedded is always longer.
    The unit tests have the library verify what this accepts, on vCons short enough for it."""
    try:
        key.verify(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
                   f"{protected}.{payload}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def _body_matches_hash(dialog: Any) -> bool:
    """An embedded body against its SHA-256 (`alg` sha256, `signature`, as `build_vcon` writes them); a dialog
    without either passes (the library's validation says what it lacks)."""
    if not isinstance(dialog, dict) or dialog.get("encoding") != "base64url" or dialog.get("alg") != "sha256":
        return True
    body, digest = dialog.get("body"), dialog.get("signature")
    if not isinstance(body, str) or not isinstance(digest, str):
        return True
    try:
        return _b64url(hashlib.sha256(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))).digest()) == digest
    except ValueError:
        return False


def _decoded_json(text: Any) -> Any:
    if not isinstance(text, str):
        raise ValueError("not text")
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def verify_vcon(data: bytes, public_key: RSAPublicKey) -> VconVerdict:
    """Whether a signed vCon is what the key's holder signed: its JWS (RS256 alone, in the one form
    `sign_vcon` writes) verifies with the key, the vCon's fields are the payload signed, value for value,
    an embedded recording is the one its hash names, and the library finds it valid."""
    try:
        document = json.loads(data)
    except ValueError:
        return VconVerdict(["not JSON: not a vCon `voxlog export vcon` writes"], None, None)
    if not isinstance(document, dict):
        return VconVerdict(["not a JSON object: not a vCon"], None, None)
    signatures = document.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1 or not isinstance(signatures[0], dict) \
            or "payload" not in document:
        return VconVerdict(["not signed: no `signatures` and `payload` (one signature) in it"], document, None)
    signature = signatures[0]
    header = signature.get("header")
    key_id = header.get("kid") if isinstance(header, dict) and isinstance(header.get("kid"), str) else None
    problems: list[str] = []
    given = signing_key_id(public_key)
    try:
        protected = _decoded_json(signature.get("protected"))
        algorithm = protected.get("alg") if isinstance(protected, dict) else None
    except ValueError:
        algorithm = None
    well_formed = set(signature) == _SIGNATURE_FIELDS and header == {"kid": key_id} and all(
        _canonical_b64url(value) for value in (signature["protected"], signature["signature"], document["payload"]))
    if not well_formed:
        # What the JWS does not cover (the unprotected header), and spellings of the same bytes, are held to
        # the one form `sign_vcon` writes: nothing in the file changes unnoticed.
        problems.append("its signature is not in the form voxlog writes (protected, signature, header.kid): altered")
    elif algorithm != SIGNING_ALGORITHM:
        problems.append(f"its signature's algorithm is {algorithm!r}, not {SIGNING_ALGORITHM}: not one voxlog made")
    elif key_id != given:
        problems.append(f"signed by key {key_id}, not by the public key given ({given})")
    elif not _rs256_verifies(signature["protected"], document["payload"], signature["signature"], public_key):
        problems.append("the signature does not verify with the key given: the signed payload or the "
                        "signature was altered, or another key signed it")
    try:
        signed = _decoded_json(document["payload"])
    except ValueError:
        signed = None
    content = {name: value for name, value in document.items() if name not in _SIGNED_FIELDS}
    if signed != content:
        changed = sorted(name for name in {*content, *(signed if isinstance(signed, dict) else {})}
                         if not isinstance(signed, dict) or signed.get(name) != content.get(name))
        problems.append(f"its fields are not the payload signed ({', '.join(changed) or 'the payload'} differ): "
                        "changed after signing")
    problems += [f"dialog {index}: its recording is not the one its hash names: changed"
                 for index, dialog in enumerate(content.get("dialog") or ()) if not _body_matches_hash(dialog)]
    try:
        valid, errors = Vcon(dict(content)).is_valid()
    except (ValueError, TypeError, OverflowError) as exc:  # the library parses created_at as it reads a vCon
        valid, errors = False, [str(exc)]
    if not valid:
        problems.append(f"not a valid vCon: {'; '.join(errors)}")
    return VconVerdict(problems, document, key_id)


def open_signing_key(path: Path) -> tuple[RSAPrivateKey, bool]:
    """The vCon signing key in `path` (PEM, PKCS#8, unencrypted, mode 0600), made there the first
    time (RSA, 3072 bits); and whether it was just made."""
    return open_key_file(path, lambda: generate_private_key(public_exponent=65537, key_size=RSA_BITS),
                         VconKeyError, what="vCon signing key", unusable=_not_for_rs256)


def _not_for_rs256(key: object) -> str | None:
    if not isinstance(key, RSAPrivateKey):
        return "is not an RSA key (the vcon library signs with RS256)"
    return f"has {key.key_size} bits: RS256 wants 2048 at least" if key.key_size < 2048 else None


def load_public_key(pem: bytes) -> RSAPublicKey:
    key = read_public_key(pem, VconKeyError, command="voxlog export public-key")
    if not isinstance(key, RSAPublicKey):
        raise VconKeyError("not an RSA public key")
    return key


def export_vcon(call: CallMaterial, key: RSAPrivateKey, *, created_at: datetime, recording: RecordingMode = "embed",
                recording_url: str | None = None) -> bytes:
    """The call's signed vCon, as a file's bytes."""
    return sign_vcon(build_vcon(call, created_at=created_at, recording=recording, recording_url=recording_url), key)

