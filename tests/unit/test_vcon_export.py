"""A call as a vCon: valid by the vcon library's own validation, its personal data as the analyst tables
have it, signed so that any change to the file is found, and a call whose caller was erased exported
without what was erased."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import wave
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.calls import CallsFold
from projections.recording_store import RecordingFacts
from projections.signing_keys import public_key_pem
from projections.tables import TRANSCRIPTS
from projections.vcon_export import (
    CALL_ATTACHMENT,
    EVENTS_ATTACHMENT,
    EXPORT_ATTACHMENT,
    CallMaterial,
    Recording,
    VconKeyError,
    build_vcon,
    export_vcon,
    load_public_key,
    open_signing_key,
    sign_vcon,
    signing_key_id,
    verify_vcon,
)
from schemas.base import Event, EventPayload
from schemas.codec import EventCodec
from schemas.envelope import Envelope
from schemas.events import (
    CallEnded,
    CallStarted,
    CallSummarized,
    ConsentGiven,
    DtmfReceived,
    LlmDecided,
    ToolCallSpec,
    ToolRequested,
    ToolSucceeded,
    TranscriptFinal,
    TtsRequested,
    TurnTaken,
    Word,
)
from streams.keystore.data_keys import DataKeyStore
from streams.keystore.local_key_encryption import LocalKeyEncryptionKeys
from streams.memory import caller_key
from streams.redaction import default_redactor

NUMBER = "+14155550132"
SAID = "hi this is Priya, call me back at 415 555 0199 about order 88231"
STARTED_US = 1_760_000_000_000_000
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

pytestmark = pytest.mark.filterwarnings("error")  # the library's import warning is dropped, nothing else is


def envelope(payload: EventPayload, seq: int, call_id: str = "call-7", tenant: str = "acme") -> Envelope:
    return Envelope(event_id=f"e-{call_id}-{seq}", tenant_id=tenant, call_id=call_id, seq=seq,
                    type=payload.EVENT_TYPE, schema_version=payload.EVENT_VERSION,
                    event_time_us=STARTED_US + seq * 250_000, producer="test", producer_version="0")


def payloads(number: str | None = NUMBER, channel: str = "phone") -> list[EventPayload]:
    asked = ToolCallSpec(id="tc1", name="create_ticket",
                         arguments_json=json.dumps({"customer_name": "Ada Lovelace", "phone": "415 555 0199"}))
    return [
        CallStarted(channel=channel, direction="inbound", agent_id="front-desk", agent_version="sha256:v1",
                    from_number=number, to_number="+15550100" if number else None, provider_call_id="CA1",
                    routed_by="number"),
        ConsentGiven(kind="recording", method="implied_by_continuing", prompt_text="This call is recorded."),
        TranscriptFinal(utterance_id="u1", text=SAID, confidence=0.91,
                        words=tuple(Word(word=w, start_ms=i * 100, end_ms=i * 100 + 90, confidence=0.9)
                                    for i, w in enumerate(SAID.split())),
                        provider="whisper", model="tiny.en", start_ms=0, end_ms=3_000, latency_ms=120),
        TurnTaken(turn_index=0, caller_text=SAID, utterance_ids=("u1",), end_of_turn_ms=3_000),
        DtmfReceived(digit="7", offset_ms=3_100),
        LlmDecided(request_id="r1", provider="offline-scripted", model="scripted", text="I'll open a ticket, Ada.",
                   tool_calls=(asked,), finish_reason="tool_calls", input_tokens=10, output_tokens=5,
                   time_to_first_token_ms=100, total_ms=200),
        ToolRequested(tool_call_id="tc1", tool="create_ticket", arguments_json=asked.arguments_json,
                      idempotency_key="call-7/tc1"),
        ToolSucceeded(tool_call_id="tc1", tool="create_ticket", result_json='{"ticket_id": "T-1"}', attempt=1,
                      latency_ms=12),
        TtsRequested(request_id="t1", text="Ticket T-1 is open, Ada. We'll call 415 555 0199.", provider="flite",
                     voice="slt", codec="mulaw", sample_rate=8000),
        CallEnded(reason="caller_hangup", duration_ms=9_000, outcome="ticket_created"),
    ]


def events_of(items: list[EventPayload], call_id: str = "call-7", tenant: str = "acme") -> list[Event[EventPayload]]:
    return [Event(envelope(p, seq, call_id, tenant), p) for seq, p in enumerate(items)]


def stereo_wav(seconds: float = 1.0) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(bytes(range(256)) * int(seconds * 16_000 * 4 / 256))
    return out.getvalue()


WAV = stereo_wav()
FACTS = RecordingFacts(started_us=STARTED_US, duration_ms=9_000, bytes=len(WAV), caller_audio_ms=3_000,
                       agent_audio_ms=4_000)


def summary_of(text: str, call_id: str = "call-7") -> Event[EventPayload]:
    payload = CallSummarized(call_id=call_id, agent_id="front-desk", summary=text, outcome="ticket_created",
                             source="offline-extractive")
    key = caller_key("acme", NUMBER) or ""
    return Event(Envelope(event_id="s-1", tenant_id="acme", call_id=key, seq=0, type=payload.EVENT_TYPE,
                          schema_version=payload.EVENT_VERSION, event_time_us=STARTED_US + 60_000_000,
                          producer="test", producer_version="0"), payload)


def a_call(**changes: Any) -> CallMaterial:
    fields: dict[str, Any] = {"tenant_id": "acme", "call_id": "call-7", "events": events_of(payloads()),
                              "recording": Recording(WAV, FACTS),
                              "summary": summary_of("we opened ticket T-1 for you; call 415 555 0199")}
    return CallMaterial(**{**fields, **changes})


@pytest.fixture(scope="module")
def key() -> RSAPrivateKey:
    return generate_private_key(public_exponent=65537, key_size=2048)


def attachment(document: dict[str, Any], kind: str) -> Any:
    (found,) = [a for a in document["attachments"] if a["type"] == kind]
    return json.loads(found["body"])


def analysis(document: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((a for a in document["analysis"] if a["type"] == kind), None)


def test_a_recorded_call_is_a_vcon_the_library_finds_valid(key: RSAPrivateKey) -> None:
    from vcon import Vcon

    data = export_vcon(a_call(), key, created_at=NOW)
    assert Vcon.validate_json(data.decode()) == (True, [])
    document = json.loads(data)
    customer, agent = document["parties"]
    assert customer["tel"] == "+*********32"  # as calls.from_number has it
    assert customer["meta"]["caller_key"] == caller_key("acme", NUMBER)
    assert (agent["name"], agent["role"], agent["meta"]["agent_version"]) == ("front-desk", "agent", "sha256:v1")
    (dialog,) = document["dialog"]
    assert (dialog["type"], dialog["mimetype"], dialog["parties"], dialog["duration"]) == (
        "recording", "audio/x-wav", [0, 1], 9.0)
    assert dialog["start"] == "2025-10-09T08:53:20+00:00"
    embedded = base64.urlsafe_b64decode(dialog["body"] + "=" * (-len(dialog["body"]) % 4))
    assert embedded == WAV
    assert dialog["signature"] == base64.urlsafe_b64encode(hashlib.sha256(WAV).digest()).decode().rstrip("=")
    transcript = json.loads(analysis(document, "transcript")["body"])
    assert [(line["speaker"], line["party"]) for line in transcript] == [("caller", 0), ("agent", 1)]
    summary = analysis(document, "summary")
    assert summary is not None
    assert summary["body"] == "we opened ticket T-1 for you; call <PHONE>"
    assert attachment(document, CALL_ATTACHMENT)["call"]["outcome"] == "ticket_created"
    assert [e["type"] for e in attachment(document, EVENTS_ATTACHMENT)] == [p.EVENT_TYPE for p in payloads()]
    assert attachment(document, EXPORT_ATTACHMENT)["recording"] == "embedded in dialog 0 (base64url)"
    assert document["uuid"] == json.loads(export_vcon(a_call(), key, created_at=NOW))["uuid"], "one id per call"


def test_personal_data_is_redacted_as_in_clickhouse_and_nowhere_raw(key: RSAPrivateKey) -> None:
    call = a_call()
    data = export_vcon(call, key, created_at=NOW)
    document = json.loads(data)
    signed = base64.urlsafe_b64decode(document["payload"] + "=" * (-len(document["payload"]) % 4))
    for raw in (NUMBER, "415 555 0199", "4155550199", "Priya", "Ada Lovelace"):
        assert raw.encode() not in data, raw
        assert raw.encode() not in signed, raw
    # The transcript is the transcripts table's, redacted by the calls projection's own fold.
    fold = CallsFold(default_redactor())
    table = [dict(zip(TRANSCRIPTS.column_names, values, strict=True))
             for event in call.events for table, values in fold.apply(event) if table is TRANSCRIPTS]
    transcript = json.loads(analysis(document, "transcript")["body"])
    assert [line["text"] for line in transcript] == [row["text"] for row in table]
    assert transcript[0]["text"] == "hi this is <PERSON>, call me back at <PHONE> about order 88231"
    events = {e["type"]: e for e in attachment(document, EVENTS_ATTACHMENT)}
    assert events["call.started"]["payload"]["from_number"] == "+*********32"
    assert events["dtmf.received"]["payload"]["digit"] == "<DTMF>"
    assert {w["word"] for w in events["transcript.final"]["payload"]["words"]} == {""}, "words alone: left out"
    assert events["transcript.final"]["payload"]["words"][0]["end_ms"] == 90
    assert json.loads(events["tool.requested"]["payload"]["arguments_json"]) == {
        "customer_name": "<PERSON>", "phone": "<PHONE>"}
    assert events["tts.requested"]["payload"]["text"] == "Ticket T-1 is open, <PERSON>. We'll call <PHONE>."


def test_the_signature_verifies_and_a_changed_vcon_does_not(key: RSAPrivateKey) -> None:
    from vcon import Vcon

    data = export_vcon(a_call(), key, created_at=NOW)
    verdict = verify_vcon(data, key.public_key())
    assert verdict.intact, verdict.problems
    assert verdict.key_id == signing_key_id(key.public_key())
    assert Vcon.build_from_json(data.decode()).verify(key.public_key()), "the library's own verification agrees"

    def changed(edit: Any) -> bytes:
        document = json.loads(data)
        edit(document)
        return json.dumps(document).encode()

    said = changed(lambda d: d["analysis"][0].update(body=d["analysis"][0]["body"].replace("caller", "agent", 1)))
    assert verify_vcon(said, key.public_key()).problems == [
        "its fields are not the payload signed (analysis differ): changed after signing"]
    payload = changed(lambda d: d.update(payload=d["payload"][:40] + ("A" if d["payload"][40] != "A" else "B")
                                         + d["payload"][41:]))
    assert any("does not verify" in p for p in verify_vcon(payload, key.public_key()).problems)
    assert not Vcon.build_from_json(payload.decode()).verify(key.public_key())
    other = generate_private_key(public_exponent=65537, key_size=2048)
    assert "not by the public key given" in verify_vcon(data, other.public_key()).problems[0]
    wrong_hash = build_vcon(a_call(), created_at=NOW)
    wrong_hash.vcon_dict["dialog"][0]["signature"] = "A" * 43  # signed as made: a hash that does not fit its body
    assert verify_vcon(sign_vcon(wrong_hash, key), key.public_key()).problems == [
        "dialog 0: its recording is not the one its hash names: changed"]
    resigned = export_vcon(a_call(), other, created_at=NOW)  # another key, its own kid
    assert not verify_vcon(resigned, key.public_key()).intact
    unsigned = changed(lambda d: [d.pop("signatures"), d.pop("payload")])
    assert verify_vcon(unsigned, key.public_key()).problems == [
        "not signed: no `signatures` and `payload` (one signature) in it"]
    # What the JWS does not cover is held to the one form voxlog writes: the key's id, the header, the
    # signature's fields, and the one spelling of the signature (its last base64url character carries 4
    # spare bits: another value of them is the same signature to a JWS library).
    def respelled(document: dict[str, Any]) -> None:
        signature = document["signatures"][0]["signature"]
        assert len(signature) == 342  # 256 bytes
        document["signatures"][0]["signature"] = signature[:-1] + B64URL[B64URL.index(signature[-1]) ^ 1]

    for edit in (lambda d: d["signatures"][0].update(header={"kid": "0" * 64}),
                 lambda d: d["signatures"][0].update(heades=d["signatures"][0].pop("header")),
                 lambda d: d["signatures"][0].update(note="added"), respelled):
        assert not verify_vcon(changed(edit), key.public_key()).intact
    none_alg = base64.urlsafe_b64encode(b'{"alg":"none"}').decode().rstrip("=")
    forged = changed(lambda d: d["signatures"][0].update(protected=none_alg, signature=""))
    assert not verify_vcon(forged, key.public_key()).intact


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255))
def test_a_changed_byte_is_found_or_changes_nothing(key: RSAPrivateKey, position: float, byte: int) -> None:
    data = _signed_once(key)
    index = int(position * len(data))
    if data[index] == byte:
        return
    tampered = data[:index] + bytes([byte]) + data[index + 1:]
    verdict = verify_vcon(tampered, key.public_key())
    if verdict.intact:  # whitespace between JSON tokens: the same vCon
        assert json.loads(tampered) == json.loads(data)


_SIGNED: dict[str, bytes] = {}


def _signed_once(key: RSAPrivateKey) -> bytes:
    small = a_call(events=events_of(payloads())[:4], summary=None, recording=Recording(WAV[:64], FACTS))
    return _SIGNED.setdefault(signing_key_id(key.public_key()), export_vcon(small, key, created_at=NOW))


def test_a_vcon_with_a_long_recording_embedded_verifies(key: RSAPrivateKey) -> None:
    """Past what authlib (the library's JWS) reads: 256,000 characters."""
    long = stereo_wav(seconds=3)
    data = export_vcon(a_call(recording=Recording(long, FACTS)), key, created_at=NOW)
    assert len(data) > 500_000
    assert verify_vcon(data, key.public_key()).intact
    tampered = data.replace(b'"role": "agent"', b'"role": "human"', 1)
    assert not verify_vcon(tampered, key.public_key()).intact


def test_a_linked_recording_names_its_url_and_hash(key: RSAPrivateKey) -> None:
    url = "https://voxlog.example/v1/calls/call-7/recording"
    document = json.loads(export_vcon(a_call(), key, created_at=NOW, recording="link", recording_url=url))
    (dialog,) = document["dialog"]
    assert dialog["url"] == url
    assert "body" not in dialog
    assert dialog["content_hash"] == "sha512-" + base64.urlsafe_b64encode(
        hashlib.sha512(WAV).digest()).decode().rstrip("=")
    assert verify_vcon(json.dumps(document).encode(), key.public_key()).intact
    with pytest.raises(ValueError, match="needs its URL"):
        build_vcon(a_call(), created_at=NOW, recording="link")


def test_a_call_without_a_recording_yet_says_so_and_is_valid(key: RSAPrivateKey) -> None:
    from vcon import Vcon

    live = a_call(events=events_of(payloads()[:-1]), recording=None, summary=None)
    data = export_vcon(live, key, created_at=NOW)
    assert Vcon.validate_json(data.decode()) == (True, [])
    document = json.loads(data)
    assert document["dialog"] == []
    assert analysis(document, "transcript")["dialog"] == []
    notes = attachment(document, EXPORT_ATTACHMENT)
    assert notes["recording"] == "none yet: the call has not ended"
    assert notes["summary"] == "none yet: the summariser has not summarised the call"
    ended = attachment(json.loads(export_vcon(a_call(recording=None), key, created_at=NOW)), EXPORT_ATTACHMENT)
    assert ended["recording"].startswith("none yet: the recordings projection has not stored it")


def test_a_widget_call_has_no_number_and_no_memory(key: RSAPrivateKey) -> None:
    call = a_call(events=events_of(payloads(number=None, channel="widget")), summary=None)
    document = json.loads(export_vcon(call, key, created_at=NOW))
    assert "tel" not in document["parties"][0]
    assert document["parties"][0]["meta"]["tel"] == "none: a widget call"
    assert attachment(document, EXPORT_ATTACHMENT)["summary"] == "none: a call without a number has no caller memory"
    assert verify_vcon(json.dumps(document).encode(), key.public_key()).intact


def test_an_erased_call_exports_without_what_was_erased(tmp_path: Path, key: RSAPrivateKey) -> None:
    keys = DataKeyStore(tmp_path / "keys.db", LocalKeyEncryptionKeys(tmp_path / "kek.db"))
    codec = EventCodec(keys=keys)
    sealed = [codec.encode(event) for event in events_of(payloads())]
    assert keys.destroy_subject("acme", caller_key("acme", NUMBER) or "", created_before_ms=2**62, by="erasure-1")
    read = [codec.decode(data) for data in sealed]
    assert read[0].pii_withheld
    call = a_call(events=read, recording=None, summary=None)
    data = export_vcon(call, key, created_at=NOW)
    assert verify_vcon(data, key.public_key()).intact
    document = json.loads(data)
    # What a reader sees: the fields, not the JWS's base64 copy of them (the payload) or its signature,
    # where any three characters turn up by chance; and the personal data itself, not any "415" (a
    # digit run the vCon's uuid, made from the call's start, can hold).
    readable = json.dumps({k: v for k, v in document.items() if k not in ("payload", "signatures")})
    for raw in (NUMBER, "415 555", "4155550", "Priya", "Ada"):
        assert raw not in readable, raw
    assert "tel" not in document["parties"][0]
    assert document["parties"][0]["meta"]["tel_withheld"] == "the caller's personal data was erased"
    notes = attachment(document, EXPORT_ATTACHMENT)
    withheld = [e.seq for e in read if e.pii_withheld]
    assert notes["withheld_events"] == withheld
    assert withheld
    assert notes["personal_data"].startswith(f"withheld: {len(withheld)} events' personal fields were erased")
    assert notes["recording"] == "none: the caller's personal data was erased, their recording with it"
    transcript = json.loads(analysis(document, "transcript")["body"])
    assert transcript
    assert all(line["withheld"] and line["text"] == "" for line in transcript)
    assert all(e["pii_withheld"] for e in attachment(document, EVENTS_ATTACHMENT) if e["seq"] in withheld)
    erased_summary = summary_of("")
    noted = attachment(json.loads(export_vcon(a_call(events=read, summary=erased_summary), key, created_at=NOW)),
                       EXPORT_ATTACHMENT)
    assert noted["summary"] == "withheld: the caller's memory was erased"


def test_an_invalid_vcon_is_not_signed(key: RSAPrivateKey) -> None:
    vcon = build_vcon(a_call(), created_at=NOW)
    vcon.vcon_dict["dialog"][0]["mimetype"] = "audio/x-unknown"
    with pytest.raises(ValueError, match="not a valid vCon"):
        sign_vcon(vcon, key)


def test_the_signing_key_is_made_once_private_and_its_public_half_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "vcon.pem"
    made, first = open_signing_key(path)
    again, second = open_signing_key(path)
    assert (first, second) == (True, False)
    assert signing_key_id(made.public_key()) == signing_key_id(again.public_key())
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing_key_id(load_public_key(public_key_pem(made).encode())) == signing_key_id(made.public_key())
    with pytest.raises(VconKeyError, match="private key"):
        load_public_key(path.read_bytes())
    path.chmod(0o644)
    with pytest.raises(VconKeyError, match="open to others"):
        open_signing_key(path)
