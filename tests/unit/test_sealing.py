"""Personal data sealed in events (crypto-shredding): round trips of every event type, erasure,
tampering, a lost keystore, key rotation. What the first envelope wrote still reads:
tests/unit/test_schema_evolution.py."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings

from schemas.base import Event, EventPayload
from schemas.codec import EventCodec, UndecodableMessage
from schemas.envelope import Envelope
from schemas.events import CallStarted, TranscriptFinal
from schemas.registry import load_registry
from schemas.sealing import KeyUnavailable, plan_for
from streams.keystore.data_keys import CACHE_TTL_S, DataKeyStore
from streams.keystore.local_key_encryption import LocalKeyEncryptionKeys
from streams.memory import caller_key
from tests.strategies import any_event

REGISTRY = load_registry()
NUMBER = "+14155550132"


def keystore(folder: Path) -> DataKeyStore:
    return DataKeyStore(folder / "keys.db", LocalKeyEncryptionKeys(folder / "kek.db"))


@pytest.fixture
def keys(tmp_path: Path) -> DataKeyStore:
    return keystore(tmp_path)


def envelope(event_type: str, seq: int, call_id: str = "call-1", tenant: str = "acme") -> Envelope:
    return Envelope(event_id=f"e-{call_id}-{seq}", tenant_id=tenant, call_id=call_id, seq=seq, type=event_type,
                    schema_version=REGISTRY.latest[event_type].version, event_time_us=1_700_000_000_000_000 + seq,
                    producer="test", producer_version="0")


def started(call_id: str = "call-1", number: str = NUMBER) -> Event[EventPayload]:
    payload = CallStarted(channel="phone", direction="inbound", from_number=number, to_number="+15550100",
                          agent_id="a", agent_version="1", routed_by="number", provider_call_id="CA1")
    return Event(envelope("call.started", 0, call_id), payload)


def heard(text: str, call_id: str = "call-1", seq: int = 1) -> Event[EventPayload]:
    payload = TranscriptFinal(utterance_id="u1", text=text, confidence=0.9, words=(), provider="p", model="m",
                              language=None, start_ms=0, end_ms=10, latency_ms=5)
    return Event(envelope("transcript.final", seq, call_id), payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=any_event)
def test_every_event_type_round_trips_sealed(tmp_path_factory: pytest.TempPathFactory, event: Event[Any]) -> None:
    codec = EventCodec(keys=keystore(tmp_path_factory.mktemp("keys")))
    data = codec.encode(event)
    back = codec.decode(data)
    plan = plan_for(event.type, REGISTRY.latest[event.type].schema)
    assert back.payload == event.payload
    assert not back.pii_withheld
    assert back.envelope == dataclasses.replace(event.envelope, pii_key_id=back.envelope.pii_key_id)
    assert codec.encode(event) == data, "sealing is deterministic: the same event encodes to the same bytes"
    if plan is None:
        assert back.envelope.pii_key_id is None


def test_personal_fields_are_not_in_the_bytes(keys: DataKeyStore) -> None:
    codec = EventCodec(keys=keys)
    data = codec.encode(started()) + codec.encode(heard("my card is 4111 1111 1111 1111 thanks"))
    assert NUMBER.encode() not in data
    assert b"4111" not in data
    clear = EventCodec().encode(started())
    assert NUMBER.encode() in clear  # a codec without a keystore writes in the clear, as before


def test_an_erased_subject_reads_as_withheld_and_the_rest_stays(keys: DataKeyStore) -> None:
    codec = EventCodec(keys=keys)
    first, said = codec.encode(started()), codec.encode(heard("call me at 415 555 0132"))
    other = codec.encode(started("call-2", "+14155550199"))
    destroyed = keys.destroy_subject("acme", caller_key("acme", NUMBER) or "", created_before_ms=2**62, by="erasure-1")
    assert destroyed == 2  # the call's keys: its personal data's and its audio's, made when it started
    call_started = codec.decode(first)
    assert call_started.pii_withheld
    assert isinstance(call_started.payload, CallStarted)
    assert call_started.payload.from_number is None
    assert call_started.payload.agent_id == "a"
    transcript = codec.decode(said)
    assert transcript.pii_withheld
    assert isinstance(transcript.payload, TranscriptFinal)
    assert transcript.payload.text == ""
    assert transcript.payload.confidence == 0.9
    assert not codec.decode(other).pii_withheld
    # Personal data the call writes after its subject was erased is not kept either.
    later = codec.decode(codec.encode(heard("still talking", seq=2)))
    assert later.pii_withheld
    assert isinstance(later.payload, TranscriptFinal)
    assert later.payload.text == ""


def test_a_lost_keystore_is_a_clear_error_never_a_silent_blank(tmp_path: Path) -> None:
    data = EventCodec(keys=keystore(tmp_path / "a")).encode(started())
    with pytest.raises(KeyUnavailable, match="lost or replaced"):
        EventCodec(keys=keystore(tmp_path / "b")).decode(data)
    with pytest.raises(KeyUnavailable, match="no keystore"):
        EventCodec().decode(data)
    (tmp_path / "a" / "kek.db").unlink()
    with pytest.raises(KeyUnavailable, match="key-encryption key"):
        EventCodec(keys=keystore(tmp_path / "a")).decode(data)


def test_an_altered_or_moved_sealed_blob_is_undecodable(keys: DataKeyStore) -> None:
    codec = EventCodec(keys=keys)
    data = bytearray(codec.encode(heard("hello there")))
    data[-40] ^= 1  # inside the sealed blob
    with pytest.raises(UndecodableMessage):
        codec.decode(bytes(data))
    a, b = codec.decode(codec.encode(heard("one"))), heard("two", seq=2)
    raw = codec.encode(b)
    sv = REGISTRY.latest["transcript.final"]
    record = fastavro.schemaless_reader(io.BytesIO(raw[10:]), sv.parsed, None)
    assert isinstance(record, dict)
    sealed_one = EventCodec(keys=keys)
    original = sealed_one.encode(a)
    moved = fastavro.schemaless_reader(io.BytesIO(original[10:]), sv.parsed, None)
    assert isinstance(moved, dict)
    record["envelope"]["pii_sealed"] = moved["envelope"]["pii_sealed"]
    out = io.BytesIO()
    fastavro.schemaless_writer(out, sv.parsed, record)
    with pytest.raises(UndecodableMessage, match="does not authenticate"):
        codec.decode(sv.header + out.getvalue())


def test_rotation_rewraps_keys_without_touching_the_log(tmp_path: Path) -> None:
    keys = keystore(tmp_path)
    codec = EventCodec(keys=keys)
    log = [codec.encode(started(f"call-{i}", f"+1415555{i:04d}")) for i in range(5)]
    kek, rewrapped = keys.rotate("acme")
    assert rewrapped == 10
    fresh = EventCodec(keys=keystore(tmp_path))  # another process, nothing cached
    assert [fresh.decode(d).payload for d in log] == [codec.decode(d).payload for d in log]
    assert keys.keks.current("acme") == kek
    assert len(keys.keks._db.execute("SELECT * FROM keks").fetchall()) == 1  # the old KEK retired


def test_a_subjects_memory_gets_a_new_key_after_erasure(keys: DataKeyStore) -> None:
    codec = EventCodec(keys=keys)
    subject = caller_key("acme", NUMBER) or ""
    before = codec.encode(heard("remember me", call_id=subject))
    keys.destroy_subject("acme", subject, created_before_ms=2**62, by="erasure-1")
    after = codec.encode(heard("a later call", call_id=subject, seq=2))
    assert codec.decode(before).pii_withheld
    assert codec.decode(after).payload == heard("a later call", call_id=subject, seq=2).payload


def test_two_processes_share_one_key_per_call(tmp_path: Path) -> None:
    """Two gateways, workers or projectors with the same keystore agree on a call's key, whoever is first."""
    one, two = keystore(tmp_path), keystore(tmp_path)
    first = EventCodec(keys=one).encode(started())
    second = EventCodec(keys=two).encode(heard("hello"))
    assert EventCodec(keys=two).decode(first).payload == started().payload
    assert EventCodec(keys=one).decode(second).payload == heard("hello").payload
    assert sorted(k.kind for k in one.keys("acme")) == ["audio", "personal"]


def test_keys_made_by_a_process_whose_keystore_another_process_opened_and_closed_are_kept(tmp_path: Path) -> None:
    """SQLite's locks are POSIX locks: a process that opens and closes a file descriptor of its own on the
    keystore's file after opening it drops them all, and another process closing last then deletes the WAL
    under it; the keys it makes after that reach no other process, and what it sealed is lost."""
    keys = keystore(tmp_path)
    codec = EventCodec(keys=keys)
    opens = ("import sys; from pathlib import Path; from streams.keystore.data_keys import DataKeyStore; "
             "from streams.keystore.local_key_encryption import LocalKeyEncryptionKeys; folder = Path(sys.argv[1]); "
             "keys = DataKeyStore(folder / 'keys.db', LocalKeyEncryptionKeys(folder / 'kek.db')); ")
    subprocess.run([sys.executable, "-c", opens + "keys.prepare_call('acme', 'call-elsewhere', None); keys.close()",
                    str(tmp_path)], check=True, timeout=120)  # another process, in and out
    sealed = codec.decode(codec.encode(started("call-here"))).envelope.pii_key_id
    read = subprocess.run([sys.executable, "-c", opens + "print(keys.opening_cipher('acme', sys.argv[2]) is not None)",
                           str(tmp_path), sealed or ""], capture_output=True, text=True, timeout=120)
    assert read.stdout.strip() == "True", read.stderr[-2000:]


def test_a_key_destroyed_elsewhere_stops_opening_once_the_cache_expires(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    reader, eraser = keystore(tmp_path), keystore(tmp_path)
    codec = EventCodec(keys=reader)
    data = codec.encode(started())
    assert not codec.decode(data).pii_withheld
    eraser.destroy_subject("acme", caller_key("acme", NUMBER) or "", created_before_ms=2**62, by="erasure-1")
    assert not codec.decode(data).pii_withheld, "cached in this process for CACHE_TTL_S"
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + CACHE_TTL_S + 1)
    assert codec.decode(data).pii_withheld


def test_a_live_calls_key_whose_time_is_up_is_checked_not_unwrapped_again(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    keys = keystore(tmp_path)
    codec = EventCodec(keys=keys)
    first = codec.decode(codec.encode(started())).envelope.pii_key_id
    unwrapping, sealed = keys.keks.unwrap, []

    def unwrap(*args: object) -> bytes:
        raise AssertionError("a key still the call's is not unwrapped again to seal with it")

    monkeypatch.setattr(keys.keks, "unwrap", unwrap)
    now = time.monotonic()
    for ttls in (1, 2, 3):  # each time the cache's time is up, the call goes on with the same key
        monkeypatch.setattr(time, "monotonic", lambda ttls=ttls: now + ttls * (CACHE_TTL_S + 1))
        sealed.append(codec.encode(heard(f"still here {ttls}", seq=ttls)))
    monkeypatch.setattr(keys.keks, "unwrap", unwrapping)  # opening them is another matter
    assert [codec.decode(data).envelope.pii_key_id for data in sealed] == [first] * 3
    assert [getattr(codec.decode(data).payload, "text", None) for data in sealed] == [
        "still here 1", "still here 2", "still here 3"]


def _done_while_another_thread_writes(keys: DataKeyStore, lookup: Callable[[], object]) -> bool:
    """Whether `lookup` ends while another thread holds the keystore as `prepare_call` does through its
    durable commit (a call's keys made in a thread beside the event loop)."""
    writing, written = threading.Event(), threading.Event()

    def commit() -> None:
        with keys._lock:
            writing.set()
            written.wait(30)

    writer = threading.Thread(target=commit)
    writer.start()
    writing.wait(30)
    looking = threading.Thread(target=lookup)
    looking.start()
    looking.join(10)
    ended = not looking.is_alive()
    written.set()
    writer.join(30)
    looking.join(30)
    return ended


def test_a_live_calls_key_is_looked_up_beside_a_thread_writing_to_the_keystore(keys: DataKeyStore) -> None:
    codec = EventCodec(keys=keys)
    data = codec.encode(started())
    keys._opening.clear()
    assert _done_while_another_thread_writes(keys, lambda: codec.decode(data)), "opening waited for the writer"
    entry = keys._sealing._entries[("acme", "call-1", "personal")]
    keys._sealing._entries[("acme", "call-1", "personal")] = (time.monotonic() - 1, entry[1])  # its time up
    assert _done_while_another_thread_writes(keys, lambda: codec.encode(heard("still here"))), \
        "refreshing a live call's sealing key waited for the writer"


def test_a_live_calls_key_destroyed_elsewhere_seals_nothing_once_its_time_is_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sealer, eraser = keystore(tmp_path), keystore(tmp_path)
    codec = EventCodec(keys=sealer)
    codec.encode(started())
    eraser.destroy_subject("acme", caller_key("acme", NUMBER) or "", created_before_ms=2**62, by="erasure-1")
    # Cached for CACHE_TTL_S: sealed still, under the key now destroyed (so unreadable all the same).
    assert codec.decode(codec.encode(heard("said before it was known"))).envelope.pii_sealed
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + CACHE_TTL_S + 1)
    after = codec.decode(codec.encode(heard("my card is 4111 1111 1111 1111", seq=2)))
    assert after.pii_withheld
    assert after.envelope.pii_sealed == b""  # nothing of it kept, under any key


def test_a_call_prepared_ahead_writes_nothing_to_the_keystore_when_it_starts(keys: DataKeyStore) -> None:
    keys.prepare_call("acme", "call-1", caller_key("acme", NUMBER))
    before = [(k.key_id, k.kind, k.subject) for k in keys.keys("acme")]
    assert sorted(kind for _, kind, _ in before) == ["audio", "personal"]
    assert {subject for _, _, subject in before} == {caller_key("acme", NUMBER)}
    codec = EventCodec(keys=keys)
    data = [codec.encode(started()), codec.encode(heard("hi"))]
    assert [(k.key_id, k.kind, k.subject) for k in keys.keys("acme")] == before
    personal = next(key_id for key_id, kind, _ in before if kind == "personal")
    assert [codec.decode(d).envelope.pii_key_id for d in data] == [personal, personal]
