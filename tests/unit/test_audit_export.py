"""Signed audit exports, their pure part (`projections/audit_export.py`): a trail folded by the audit
projection's own fold, exported, signed and verified offline; every way of changing the file or its
signature file fails, and bad input of any kind is a problem reported, never an exception."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from producers.event_writer import standalone_event
from projections.audit import AuditFold, record_hash
from projections.audit_export import (
    EXPORTED_FIELDS,
    AuditKeyError,
    ExportVerdict,
    export_bytes,
    load_public_key,
    open_signing_key,
    parse_time_bound,
    read_export,
    records_in_range,
    sign_export,
    signing_key_id,
    verify_export,
)
from projections.signing_keys import public_key_pem
from projections.tables import AUDIT_LOG
from schemas.base import Event
from schemas.events import AuditRecorded
from streams.redaction import default_redactor

TENANT = "acme"
AUDIT, CALLS = "voxlog.audit/0", "voxlog.calls/3"
START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
REDACTOR = default_redactor()
SOURCE, INDEX, AT = (AUDIT_LOG.column_names.index(name) for name in ("source", "chain_index", "at"))


def trail(lengths: dict[str, int], times: dict[str, list[datetime]] | None = None) -> list[tuple[Any, ...]]:
    """`audit_log` rows, as the audit projection folds them: `lengths[source]` records in each chain,
    a minute apart from START unless `times` says when; ordered by source and chain_index."""
    fold = AuditFold(REDACTOR)
    rows = []
    for source, count in lengths.items():
        for offset in range(count):
            at = (times or {}).get(source, [START + timedelta(minutes=i) for i in range(count)])[offset]
            payload = AuditRecorded(actor=f"api-key:k{offset}", action="sql.query", resource="calls",
                                    outcome="accepted", detail=f"query {offset}", remote_addr="10.0.0.1")
            event = standalone_event(payload, tenant_id=TENANT, stream_id="-", producer="test", producer_version="0")
            timed = Event(replace(event.envelope, event_time_us=int(at.timestamp() * 1_000_000)), event.payload)
            rows += [values for _, values in fold.apply(timed, source, offset)]
    return sorted(rows, key=lambda row: (row[SOURCE], row[INDEX]))


EXPORT = export_bytes(trail({AUDIT: 6, CALLS: 3}))
SIGNATURE = sign_export(EXPORT, tenant=TENANT, since=None, until=None, key=KEY, signed_at=START + timedelta(days=1))


def verdict(export: bytes = EXPORT, signature: bytes = SIGNATURE, key: Ed25519PrivateKey = KEY) -> ExportVerdict:
    return verify_export(export, signature, key.public_key())


def problems(found: ExportVerdict) -> list[str]:
    return [problem.describe() for problem in found.problems]


def lines() -> list[bytes]:
    return EXPORT.splitlines(keepends=True)


def record(line: bytes) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(line)
    return loaded


def line_of(values: dict[str, Any]) -> bytes:
    return json.dumps(values, separators=(",", ":")).encode() + b"\n"


def rehashed(values: dict[str, Any], prev: str) -> dict[str, Any]:
    """The record linked to `prev` with its hash recomputed: what a forger who knows the chain does."""
    fields = [datetime.fromisoformat(values[n]) if n == "at" else values[n] for n in EXPORTED_FIELDS[:-2]]
    return {**values, "prev_hash": prev, "hash": record_hash(prev, fields)}


def test_an_intact_signed_export_verifies_and_says_what_it_covers() -> None:
    found = verdict()
    assert found.intact, problems(found)
    statement = found.statement
    assert statement is not None
    assert (statement.tenant_id, statement.records, statement.key_id) == (TENANT, 9, signing_key_id(KEY.public_key()))
    assert [(c.source, c.first_index, c.last_index) for c in statement.chains] == [(AUDIT, 0, 5), (CALLS, 0, 2)]
    assert statement.chains[0].prev_hash == "0" * 64
    assert statement.chains[0].hash == record(lines()[5])["hash"], "the head is the chain's last record"
    assert statement.signed_at == START + timedelta(days=1)
    assert sorted(json.loads(SIGNATURE)) == sorted(["format", "algorithm", "key_id", "tenant_id", "since", "until",
                                                    "signed_at", "file_sha256", "records", "chains", "signature"])


def test_each_line_is_a_record_with_its_chain_fields() -> None:
    first = record(lines()[0])
    assert list(first) == list(EXPORTED_FIELDS)
    assert (first["source"], first["chain_index"], first["at"]) == (AUDIT, 0, "2025-03-01T09:00:00.000000Z")
    assert "_version" not in first


@settings(max_examples=300)
@given(st.data())
def test_any_single_byte_changed_in_a_signed_export_fails(data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(EXPORT) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != EXPORT[at]))
    changed = EXPORT[:at] + bytes([byte]) + EXPORT[at + 1:]
    found = verdict(changed)
    assert not found.intact
    assert "the file's SHA-256 is not the one signed: it was changed after signing" in problems(found)


@settings(max_examples=300)
@given(st.data())
def test_any_truncation_of_a_signed_export_fails(data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(EXPORT) - 1))
    assert not verdict(EXPORT[:cut]).intact


def test_dropping_the_newest_records_is_truncation() -> None:
    found = verdict(b"".join(lines()[:-2]))
    assert problems(found) == [
        f"{CALLS} ends at record 0, the signed export at 2: truncated (2 records removed from its end)",
        "the file holds 7 records, the signed export 9",
        "the file's SHA-256 is not the one signed: it was changed after signing",
    ]


def test_dropping_a_whole_chain_is_truncation() -> None:
    assert f"{CALLS} records 0..2 were signed and are not in the file: truncated or removed" in problems(
        verdict(b"".join(lines()[:6])))


def test_an_edited_record_is_named_by_its_line() -> None:
    edited = lines()
    edited[2] = edited[2].replace(b'"query 2"', b'"nothing to see"')
    assert problems(verdict(b"".join(edited)))[0] == (
        f"line 3: {AUDIT} record 2 was edited: its fields do not give its hash")


def test_a_record_rewritten_with_its_hash_recomputed_breaks_the_link_after_it() -> None:
    rewritten = lines()
    values = record(rewritten[2])
    rewritten[2] = line_of(rehashed({**values, "detail": "nothing to see"}, values["prev_hash"]))
    assert problems(verdict(b"".join(rewritten)))[0] == (
        f"line 4: its link to {AUDIT} record 2 (line 3) is broken: a record was replaced or inserted")


def test_a_chain_rewritten_to_its_end_with_hashes_recomputed_is_not_the_signed_one() -> None:
    rewritten = lines()
    prev = record(rewritten[3])["prev_hash"]
    for i in range(3, 6):
        values = rehashed({**record(rewritten[i]), "detail": "nothing to see"} if i == 3 else record(rewritten[i]),
                          prev)
        rewritten[i], prev = line_of(values), values["hash"]
    found = problems(verdict(b"".join(rewritten)))
    assert found[0] == (f"{AUDIT} record 5 is not the signed one (another hash): the chain was rewritten with its "
                        "hashes recomputed")


def test_a_dropped_record_is_named_by_the_line_after_the_gap() -> None:
    dropped = lines()
    del dropped[2]
    assert problems(verdict(b"".join(dropped)))[0] == f"line 3: {AUDIT} records 2..2 are missing before it: dropped"


def test_reordered_records_are_named_by_line() -> None:
    swapped = lines()
    swapped[2], swapped[3] = swapped[3], swapped[2]
    assert problems(verdict(b"".join(swapped)))[:2] == [
        f"line 3: {AUDIT} records 2..2 are missing before it: dropped",
        f"line 4: {AUDIT} record 2 comes after record 3: records reordered or repeated",
    ]


def test_a_repeated_record_is_named_with_the_line_it_repeats() -> None:
    repeated = lines()
    repeated.insert(3, repeated[1])
    assert problems(verdict(b"".join(repeated)))[0] == (
        f"line 4: {AUDIT} record 1 comes after record 2 (line 2): records reordered or repeated")


def test_a_record_of_another_tenant_is_named() -> None:
    other = lines()
    other[1] = line_of({**record(other[1]), "tenant_id": "someone-else"})
    assert problems(verdict(b"".join(other)))[0] == (
        "line 2: a record of tenant 'someone-else' in an export of 'acme': added")


def test_another_key_is_refused_by_its_id() -> None:
    assert problems(verdict(key=OTHER_KEY)) == [
        f"signed by key {signing_key_id(KEY.public_key())}, not by the public key given "
        f"({signing_key_id(OTHER_KEY.public_key())})"]


def test_a_truncated_export_with_its_statement_altered_to_match_fails_the_signature() -> None:
    """A forger without the key cuts the file and rewrites the signature file's numbers to match."""
    cut = b"".join(lines()[:-1])
    forged = json.loads(SIGNATURE)
    contents = read_export(cut, TENANT)
    forged.update(records=contents.records, file_sha256=hashlib.sha256(cut).hexdigest())
    forged["chains"][1].update(last_index=1, hash=contents.chains[CALLS].hash)
    assert problems(verdict(cut, json.dumps(forged).encode())) == [
        "the signature does not match the signature file's statement: the signature file was altered"]


@pytest.mark.parametrize(("field", "value"), [
    ("tenant_id", "someone-else"), ("since", "2025-01-01T00:00:00.000000Z"), ("signed_at", "2030-01-01T00:00:00Z"),
    ("records", 8)])
def test_any_field_of_the_signature_file_altered_fails_the_signature(field: str, value: object) -> None:
    altered = {**json.loads(SIGNATURE), field: value}
    assert ("the signature does not match the signature file's statement: the signature file was altered"
            in problems(verdict(signature=json.dumps(altered).encode())))


def test_a_key_id_changed_to_the_verifiers_does_not_pass() -> None:
    forged = {**json.loads(SIGNATURE), "key_id": signing_key_id(OTHER_KEY.public_key())}
    assert problems(verdict(signature=json.dumps(forged).encode(), key=OTHER_KEY)) == [
        "the signature does not match the signature file's statement: the signature file was altered"]


def test_the_signature_file_may_be_reformatted_without_changing_what_it_says() -> None:
    assert verdict(signature=json.dumps(json.loads(SIGNATURE), separators=(",", ":")).encode()).intact


@pytest.mark.parametrize(("signature", "said"), [
    (b"", "the signature file is not JSON"),
    (b"not json {", "the signature file is not JSON"),
    (b"[1, 2]", "the signature file is malformed: not the fields"),
    (json.dumps({k: v for k, v in json.loads(SIGNATURE).items() if k != "chains"}).encode(),
     "the signature file is malformed: not the fields"),
    (json.dumps({**json.loads(SIGNATURE), "records": "9"}).encode(), "malformed: its records is not a number"),
    (json.dumps({**json.loads(SIGNATURE), "records": True}).encode(), "malformed: its records is not a number"),
    (json.dumps({**json.loads(SIGNATURE), "signature": "not base64!"}).encode(), "the signature file is malformed"),
    (json.dumps({**json.loads(SIGNATURE), "signed_at": "yesterday"}).encode(), "the signature file is malformed"),
    (json.dumps({**json.loads(SIGNATURE), "chains": [{"source": AUDIT}]}).encode(),
     "the signature file is malformed: a chain is not"),
    (json.dumps({**json.loads(SIGNATURE), "algorithm": "RSA"}).encode(), "algorithm 'RSA': this voxlog reads"),
])
def test_a_malformed_signature_file_is_said_to_be(signature: bytes, said: str) -> None:
    found = verdict(signature=signature)
    assert found.statement is None
    assert said in problems(found)[0], problems(found)


@pytest.mark.parametrize(("line", "said"), [
    (b"garbage {\n", "line 2: not a JSON object: the line was cut short or edited"),
    (b"\xff\xfe\n", "line 2: not a JSON object: the line was cut short or edited"),
    (b"\n", "line 2: not a JSON object: the line was cut short or edited"),
    (b"[1, 2]\n", "line 2: not a JSON object: the line was edited"),
    (b'{"source": "x"}\n', "line 2: no tenant_id, chain_index"),
])
def test_a_malformed_line_is_named(line: bytes, said: str) -> None:
    mangled = lines()
    mangled.insert(1, line)
    assert problems(verdict(b"".join(mangled)))[0].startswith(said)


@pytest.mark.parametrize(("change", "said"), [
    ({"chain_index": "1"}, "its chain_index is not a number"),
    ({"chain_index": True}, "its chain_index is not a number"),
    ({"log_offset": -1}, "its log_offset is not a number"),
    ({"detail": None}, "its detail is not text"),
    ({"at": "yesterday"}, "its time 'yesterday' is not an ISO 8601 time"),
    ({"at": "2025-03-01T09:01:00"}, "its time '2025-03-01T09:01:00' names no zone"),
    ({"extra": 1}, "fields no audit export writes (extra)"),
])
def test_a_record_with_a_field_of_the_wrong_kind_is_named(change: dict[str, Any], said: str) -> None:
    mangled = lines()
    mangled[1] = line_of({**record(mangled[1]), **change})
    assert problems(verdict(b"".join(mangled)))[0] == f"line 2: {said}: the line was edited"


def test_an_empty_export_is_said_to_be_empty() -> None:
    assert problems(verdict(b"")) == ["the export is empty: it holds no records",
                                      "the file's SHA-256 is not the one signed: it was changed after signing"]


def test_an_export_cut_at_a_line_end_is_cut_short() -> None:
    assert "line 9: the file does not end with a newline: it was cut short" in problems(verdict(EXPORT[:-1]))


@settings(max_examples=200)
@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_any_bytes_are_problems_never_an_exception(export: bytes, signature: bytes) -> None:
    assert not verdict(export, signature).intact


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4), max_leaves=12)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(sorted(json.loads(SIGNATURE))), JSON))
def test_any_signature_file_fields_are_problems_never_an_exception(changed: dict[str, Any]) -> None:
    found = verdict(signature=json.dumps({**json.loads(SIGNATURE), **changed}).encode())
    assert found.intact is (changed == {k: json.loads(SIGNATURE)[k] for k in changed})


def test_an_export_that_does_not_chain_is_not_signed() -> None:
    broken = lines()
    del broken[2]
    with pytest.raises(ValueError, match="does not verify, so it is not signed"):
        sign_export(b"".join(broken), tenant=TENANT, since=None, until=None, key=KEY, signed_at=START)


def test_a_period_keeps_each_chain_whole_between_its_first_and_last_record_in_it() -> None:
    hour = [START + timedelta(hours=h) for h in (0, 1, 5, 2, 9)]  # a chain is in log order, not time order
    rows = trail({AUDIT: 5, CALLS: 2}, {AUDIT: hour, CALLS: [START, START + timedelta(hours=9)]})
    since, until = START + timedelta(minutes=30), START + timedelta(hours=3)
    picked = records_in_range(rows, since, until)
    assert [(row[SOURCE], row[INDEX]) for row in picked] == [(AUDIT, 1), (AUDIT, 2), (AUDIT, 3)], \
        "record 2 (at 5 h) is between records 1 and 3 in the chain: kept, or the export would not verify"
    signed = sign_export(export_bytes(picked), tenant=TENANT, since=since, until=until, key=KEY, signed_at=START)
    found = verdict(export_bytes(picked), signed)
    assert found.intact, problems(found)
    assert found.statement is not None
    assert (found.statement.since, found.statement.until) == (since, until)
    assert found.statement.chains[0].prev_hash == rows[0][AUDIT_LOG.column_names.index("hash")]


@settings(max_examples=200)
@given(st.lists(st.integers(0, 10), min_size=1, max_size=8), st.integers(0, 11), st.integers(0, 11))
def test_any_period_gives_whole_chain_spans_that_verify(hours: list[int], low: int, high: int) -> None:
    rows = trail({AUDIT: len(hours)}, {AUDIT: [START + timedelta(hours=h) for h in hours]})
    since, until = START + timedelta(hours=low), START + timedelta(hours=high)
    picked = records_in_range(rows, since, until)
    inside = [i for i, h in enumerate(hours) if low <= h < high]
    assert [row[INDEX] for row in picked] == (list(range(min(inside), max(inside) + 1)) if inside else [])
    if picked:
        data = export_bytes(picked)
        assert verdict(data, sign_export(data, tenant=TENANT, since=since, until=until, key=KEY,
                                         signed_at=START)).intact


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-03-01", datetime(2025, 3, 1, tzinfo=UTC)),
    ("2025-03-01T09:30", datetime(2025, 3, 1, 9, 30, tzinfo=UTC)),
    ("2025-03-01T09:30:00Z", datetime(2025, 3, 1, 9, 30, tzinfo=UTC)),
    ("2025-03-01T11:30:00+02:00", datetime(2025, 3, 1, 9, 30, tzinfo=UTC)),
])
def test_a_period_bound_is_a_date_or_a_time_utc_unless_zoned(text: str, expected: datetime) -> None:
    assert parse_time_bound(text) == expected


def test_a_period_bound_that_is_no_time_is_refused() -> None:
    with pytest.raises(ValueError, match="'last week' is not a date"):
        parse_time_bound("last week")


def test_the_signing_key_is_made_once_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "home" / "audit-signing-key.pem"
    key, made = open_signing_key(path)
    assert made
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, made_again = open_signing_key(path)
    assert not made_again
    assert signing_key_id(again.public_key()) == signing_key_id(key.public_key())
    assert os.listdir(path.parent) == [path.name], "no temporary file left beside it"
    assert load_public_key(public_key_pem(key).encode()).public_bytes_raw() == key.public_key().public_bytes_raw()


def test_a_signing_key_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    open_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(AuditKeyError, match=r"open to others \(mode 0644\): chmod 600 it"):
        open_signing_key(path)


@pytest.mark.parametrize(("content", "said"), [
    (b"", "not an unencrypted PEM private key"),
    (ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), "not an Ed25519 key"),
    (KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                       serialization.BestAvailableEncryption(b"secret")), "not an unencrypted PEM private key"),
])
def test_a_signing_key_file_that_is_not_one_is_refused(tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(AuditKeyError, match=said):
        open_signing_key(path)


@pytest.mark.parametrize(("content", "said"), [
    (KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                       serialization.NoEncryption()), "that is a private key"),
    (b"hello", "not a PEM public key"),
    (ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), "not an Ed25519 public key"),
])
def test_a_public_key_that_is_not_one_is_refused(content: bytes, said: str) -> None:
    with pytest.raises(AuditKeyError, match=said):
        load_public_key(content)
