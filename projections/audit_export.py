"""Signed audit exports: a tenant's audit trail as JSON lines, a detached Ed25519 signature over
what the file holds, and their verification offline, with the public key alone.

An export holds every column of `audit_log` but the bookkeeping version, one record a line, each
chain's records in order; so whoever holds the file can recompute each record's hash from its
fields and each link to the record before it (`projections.audit.record_hash`, the projection's
own), and an edited, inserted, dropped or reordered record is named by its line. A time range
takes, of each chain, the records from its first in the range to its last, and those between
whatever their time: a chain is in the log's order, not in time order, and a gap would leave the
rest unverifiable.

The chain alone does not show an export cut short, nor records rewritten with their hashes
recomputed (the hash is unkeyed). The signature does: it is over a statement that binds the file's
SHA-256, its number of records and each chain's span (first record and the hash it links to, last
record and its hash), the tenant, the time range, the key and when it was signed. The statement is
the signature file itself, less the signature, as canonical JSON (sorted keys, no spaces), so every
field a reader sees in it is signed.

What verification cannot show: that the export holds every record of the range (it is what the
table gave after the CLI checked the trail against the log), nor who held the private key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from projections.audit import epoch_us, record_hash
from projections.signing_keys import open_key_file, read_public_key
from projections.tables import AUDIT_LOG

SIGNATURE_FORMAT = "voxlog.audit-export-signature/1"
ALGORITHM = "Ed25519"

_COLUMNS = AUDIT_LOG.column_names
EXPORTED_FIELDS = tuple(_COLUMNS[: _COLUMNS.index("_version")])
"""What a line holds: every column of `audit_log` but `_version` (which write won in ClickHouse,
not part of the record)."""
_HASHED_FIELDS = EXPORTED_FIELDS[: EXPORTED_FIELDS.index("prev_hash")]
_NUMBER_FIELDS = frozenset({"chain_index", "log_offset"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AuditKeyError(Exception):
    """A key file that cannot be used: missing, unreadable, not Ed25519, or open to others."""


def parse_time_bound(text: str) -> datetime:
    """`--since`/`--until`: a date (midnight UTC) or an ISO 8601 time (UTC unless it names a zone)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (2025-01-31) or an ISO 8601 time (2025-01-31T12:00:00Z)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """A time as exports and signature files write it: UTC to the microsecond, as `audit_log` keeps it."""
    return (_EPOCH + timedelta(microseconds=epoch_us(value))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def records_in_range(rows: Sequence[Sequence[Any]], since: datetime | None,
                     until: datetime | None) -> list[Sequence[Any]]:
    """Of `audit_log` rows (all columns, ordered by source and chain_index), per chain the records
    from the first at or after `since` to the last before `until`, and every record between them."""
    source_at, index_at, time_at = _COLUMNS.index("source"), _COLUMNS.index("chain_index"), _COLUMNS.index("at")
    low = epoch_us(since) if since is not None else None
    high = epoch_us(until) if until is not None else None
    spans: dict[str, tuple[int, int]] = {}
    for row in rows:
        us = epoch_us(row[time_at])
        if (low is None or us >= low) and (high is None or us < high):
            first, last = spans.get(row[source_at], (row[index_at], row[index_at]))
            spans[row[source_at]] = (min(first, row[index_at]), max(last, row[index_at]))
    return [row for row in rows if row[source_at] in spans
            and spans[row[source_at]][0] <= row[index_at] <= spans[row[source_at]][1]]


def export_line(row: Sequence[Any]) -> str:
    """An `audit_log` row (all columns) as an export's line, without its newline."""
    named = dict(zip(_COLUMNS, row, strict=True))
    record = {name: named[name] for name in EXPORTED_FIELDS}
    record["at"] = format_time(named["at"])
    return json.dumps(record, separators=(",", ":"))


def export_bytes(rows: Sequence[Sequence[Any]]) -> bytes:
    """An export's contents: one line per row, in the order given."""
    return "".join(f"{export_line(row)}\n" for row in rows).encode()


@dataclass(frozen=True)
class ChainSpan:
    """The records of one chain an export holds: `first_index`, which links to the record whose hash
    is `prev_hash` (64 zeros when it is the chain's first), to `last_index`, whose hash is `hash`."""

    source: str
    first_index: int
    prev_hash: str
    last_index: int
    hash: str

    def describe(self) -> str:
        return f"{self.source} records {self.first_index}..{self.last_index}"


@dataclass(frozen=True)
class ExportProblem:
    line: int | None
    """From 1; None: the file, or its signature, as a whole."""
    problem: str

    def describe(self) -> str:
        return self.problem if self.line is None else f"line {self.line}: {self.problem}"


@dataclass(frozen=True)
class ExportContents:
    """What an export's lines give, recomputed from them alone."""

    records: int
    """Lines that are well-formed records."""
    chains: dict[str, ChainSpan]
    """By source, as the lines run: each chain's first record and the last that continues it."""
    problems: list[ExportProblem]


def read_export(data: bytes, tenant: str | None) -> ExportContents:
    """Recomputes each record's hash and each link from an export's lines. `tenant`: the one every
    record must be of (None: not checked)."""
    if not data:
        return ExportContents(0, {}, [ExportProblem(None, "the export is empty: it holds no records")])
    problems: list[ExportProblem] = []
    lines = data.split(b"\n")
    if lines[-1]:
        problems.append(ExportProblem(len(lines), "the file does not end with a newline: it was cut short"))
    else:
        lines.pop()
    records = 0
    chains: dict[str, ChainSpan] = {}
    line_of: dict[tuple[str, int], int] = {}
    for number, raw in enumerate(lines, 1):
        record = _line_record(raw)
        if isinstance(record, str):
            problems.append(ExportProblem(number, record))
            continue
        records += 1
        source, index, prev, digest = record["source"], record["chain_index"], record["prev_hash"], record["hash"]
        if tenant is not None and record["tenant_id"] != tenant:
            problems.append(ExportProblem(number, f"a record of tenant {record['tenant_id']!r} in an export of "
                                                  f"{tenant!r}: added"))
        if record_hash(prev, [record[name] for name in _HASHED_FIELDS]) != digest:
            problems.append(ExportProblem(number, f"{source} record {index} was edited: its fields do not give "
                                                  "its hash"))
        span = chains.get(source)
        if span is None:
            chains[source] = ChainSpan(source, index, prev, index, digest)
        elif index <= span.last_index:
            # Not taken as the chain's new end: the records after it still continue the real one.
            earlier = line_of.get((source, index))
            where = f" (line {earlier})" if earlier is not None else ""
            problems.append(ExportProblem(number, f"{source} record {index} comes after record {span.last_index}"
                                                  f"{where}: records reordered or repeated"))
        else:
            if index > span.last_index + 1:
                problems.append(ExportProblem(number, f"{source} records {span.last_index + 1}..{index - 1} are "
                                                      "missing before it: dropped"))
            elif prev != span.hash:
                problems.append(ExportProblem(number, f"its link to {source} record {span.last_index} (line "
                                                      f"{line_of[(source, span.last_index)]}) is broken: a record "
                                                      "was replaced or inserted"))
            chains[source] = replace(span, last_index=index, hash=digest)
        line_of.setdefault((source, index), number)
    return ExportContents(records, chains, problems)


def _line_record(raw: bytes) -> dict[str, Any] | str:
    """A line's record, its time as a datetime; or what is wrong with it."""
    try:
        value = json.loads(raw)
    except ValueError:  # not UTF-8 either
        return "not a JSON object: the line was cut short or edited"
    if not isinstance(value, dict):
        return "not a JSON object: the line was edited"
    if missing := [name for name in EXPORTED_FIELDS if name not in value]:
        return f"no {', '.join(missing)}: not a record of an audit export"
    if unknown := sorted(set(value) - set(EXPORTED_FIELDS)):
        return f"fields no audit export writes ({', '.join(unknown)}): the line was edited"
    for name in EXPORTED_FIELDS:
        if name in _NUMBER_FIELDS:
            if type(value[name]) is not int or value[name] < 0:  # bool is an int to Python, never an index to us
                return f"its {name} is not a number: the line was edited"
        elif not isinstance(value[name], str):
            return f"its {name} is not text: the line was edited"
    try:
        at = datetime.fromisoformat(value["at"])
    except ValueError:
        return f"its time {value['at']!r} is not an ISO 8601 time: the line was edited"
    if at.tzinfo is None:
        return f"its time {value['at']!r} names no zone: the line was edited"
    return {**value, "at": at}


@dataclass(frozen=True)
class ExportStatement:
    """What a signature vouches for; the signature file holds it, and the signature over it."""

    key_id: str
    tenant_id: str
    since: datetime | None
    until: datetime | None
    signed_at: datetime
    file_sha256: str
    records: int
    chains: tuple[ChainSpan, ...]

    def fields(self) -> dict[str, Any]:
        """The signature file's fields but the signature: what is signed, as canonical JSON."""
        return {
            "format": SIGNATURE_FORMAT,
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "tenant_id": self.tenant_id,
            "since": None if self.since is None else format_time(self.since),
            "until": None if self.until is None else format_time(self.until),
            "signed_at": format_time(self.signed_at),
            "file_sha256": self.file_sha256,
            "records": self.records,
            "chains": [{"source": c.source, "first_index": c.first_index, "prev_hash": c.prev_hash,
                        "last_index": c.last_index, "hash": c.hash} for c in self.chains],
        }


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signing_key_id(public_key: Ed25519PublicKey) -> str:
    """The key's fingerprint: SHA-256 of its 32 raw bytes, in hex."""
    return hashlib.sha256(public_key.public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)).hexdigest()


def sign_export(data: bytes, *, tenant: str, since: datetime | None, until: datetime | None,
                key: Ed25519PrivateKey, signed_at: datetime) -> bytes:
    """The signature file for an export's contents. Refuses (ValueError) contents that do not
    verify by their own chains: a signature must never vouch for a broken trail."""
    contents = read_export(data, tenant)
    if contents.problems:
        raise ValueError(f"the export does not verify, so it is not signed: "
                         f"{'; '.join(p.describe() for p in contents.problems)}")
    statement = ExportStatement(signing_key_id(key.public_key()), tenant, since, until, signed_at,
                                hashlib.sha256(data).hexdigest(), contents.records, tuple(contents.chains.values()))
    fields = statement.fields()
    signature = base64.b64encode(key.sign(_canonical(fields))).decode()
    return (json.dumps({**fields, "signature": signature}, indent=2) + "\n").encode()


@dataclass(frozen=True)
class ExportVerdict:
    statement: ExportStatement | None
    """None: the signature file could not be read."""
    contents: ExportContents
    problems: list[ExportProblem]
    """The signature's first, then the lines', then where the file differs from the statement."""

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_export(data: bytes, signature_file: bytes, public_key: Ed25519PublicKey) -> ExportVerdict:
    """Checks an export against its signature file with the signer's public key, offline."""
    signed = _read_signature_file(signature_file)
    if isinstance(signed, str):
        contents = read_export(data, None)
        return ExportVerdict(None, contents, [ExportProblem(None, signed), *contents.problems])
    statement = signed.statement
    problems: list[ExportProblem] = []
    given = signing_key_id(public_key)
    if statement.key_id != given:
        problems.append(ExportProblem(None, f"signed by key {statement.key_id}, not by the public key given "
                                            f"({given})"))
    else:
        try:
            public_key.verify(signed.signature, signed.message)
        except InvalidSignature:
            problems.append(ExportProblem(None, "the signature does not match the signature file's statement: the "
                                                "signature file was altered"))
    contents = read_export(data, statement.tenant_id)
    problems += contents.problems
    if data:  # an empty file is said to be so, not every signed chain missing from it
        problems += _against_statement(contents, statement)
    if hashlib.sha256(data).hexdigest() != statement.file_sha256:
        problems.append(ExportProblem(None, "the file's SHA-256 is not the one signed: it was changed after signing"))
    return ExportVerdict(statement, contents, problems)


@dataclass(frozen=True)
class _SignatureFile:
    statement: ExportStatement
    signature: bytes
    message: bytes
    """What was signed: the file's own fields less the signature, as canonical JSON (not the statement
    written again, so that nothing in the file goes unchecked)."""


_SIGNATURE_FIELDS = frozenset({"format", "algorithm", "key_id", "tenant_id", "since", "until", "signed_at",
                               "file_sha256", "records", "chains", "signature"})
_SPAN_FIELDS = frozenset({"source", "first_index", "prev_hash", "last_index", "hash"})


def _read_signature_file(raw: bytes) -> _SignatureFile | str:
    """The signature file read; or what is wrong with it."""
    try:
        fields = json.loads(raw)
    except ValueError:
        return "the signature file is not JSON: not one `voxlog audit export --signed` writes"
    if not isinstance(fields, dict) or set(fields) != _SIGNATURE_FIELDS:
        return "the signature file is malformed: not the fields `voxlog audit export --signed` writes"
    if fields["format"] != SIGNATURE_FORMAT or fields["algorithm"] != ALGORITHM:
        return (f"the signature file is of format {fields['format']!r}, algorithm {fields['algorithm']!r}: this "
                f"voxlog reads {SIGNATURE_FORMAT!r}, {ALGORITHM}")
    try:
        statement = ExportStatement(
            key_id=_field_text(fields, "key_id"), tenant_id=_field_text(fields, "tenant_id"),
            since=_field_time_or_none(fields, "since"), until=_field_time_or_none(fields, "until"),
            signed_at=_field_time(fields, "signed_at"), file_sha256=_field_text(fields, "file_sha256"),
            records=_field_number(fields, "records"),
            chains=tuple(_chain_span(chain) for chain in _field_list(fields, "chains")))
        signature = base64.b64decode(_field_text(fields, "signature"), validate=True)
    except (TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        return f"the signature file is malformed: {exc}"
    del fields["signature"]
    return _SignatureFile(statement, signature, _canonical(fields))


def _field_text(fields: dict[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise TypeError(f"its {name} is not text")
    return value


def _field_number(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if type(value) is not int or value < 0:  # bool is an int to Python, never a count to us
        raise TypeError(f"its {name} is not a number")
    return value


def _field_list(fields: dict[str, Any], name: str) -> list[Any]:
    value = fields[name]
    if not isinstance(value, list):
        raise TypeError(f"its {name} is not a list")
    return value


def _field_time(fields: dict[str, Any], name: str) -> datetime:
    at = datetime.fromisoformat(_field_text(fields, name))
    if at.tzinfo is None:
        raise ValueError(f"its {name} names no zone")
    return at


def _field_time_or_none(fields: dict[str, Any], name: str) -> datetime | None:
    return None if fields[name] is None else _field_time(fields, name)


def _chain_span(value: object) -> ChainSpan:
    if not isinstance(value, dict) or set(value) != _SPAN_FIELDS:
        raise TypeError("a chain is not source, first_index, prev_hash, last_index, hash")
    return ChainSpan(_field_text(value, "source"), _field_number(value, "first_index"),
                     _field_text(value, "prev_hash"), _field_number(value, "last_index"), _field_text(value, "hash"))


def _against_statement(contents: ExportContents, statement: ExportStatement) -> list[ExportProblem]:
    """Where the chains the lines give differ from the signed ones: a file cut short, added to, or
    rewritten with its hashes recomputed."""
    problems: list[str] = []
    for signed in statement.chains:
        found = contents.chains.get(signed.source)
        if found is None:
            problems.append(f"{signed.describe()} were signed and are not in the file: truncated or removed")
            continue
        if found.first_index > signed.first_index:
            problems.append(f"{signed.source} begins at record {found.first_index}, the signed export at "
                            f"{signed.first_index}: records removed from its beginning")
        elif found.first_index < signed.first_index:
            problems.append(f"{signed.source} begins at record {found.first_index}, before the signed export's "
                            f"{signed.first_index}: records added")
        elif found.prev_hash != signed.prev_hash:
            problems.append(f"{signed.source} record {found.first_index} links to another record than the signed "
                            "one: rewritten")
        if found.last_index < signed.last_index:
            problems.append(f"{signed.source} ends at record {found.last_index}, the signed export at "
                            f"{signed.last_index}: truncated ({signed.last_index - found.last_index} records "
                            "removed from its end)")
        elif found.last_index > signed.last_index:
            problems.append(f"{signed.source} goes on past its signed end (record {signed.last_index}) to "
                            f"{found.last_index}: records appended")
        elif found.hash != signed.hash:
            problems.append(f"{signed.source} record {found.last_index} is not the signed one (another hash): the "
                            "chain was rewritten with its hashes recomputed")
    signed_sources = {c.source for c in statement.chains}
    problems += [f"{c.describe()} are not in the signed export: added"
                 for source, c in contents.chains.items() if source not in signed_sources]
    if contents.records != statement.records:
        problems.append(f"the file holds {contents.records} records, the signed export {statement.records}")
    return [ExportProblem(None, problem) for problem in problems]


def open_signing_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The audit signing key in `path` (PEM, PKCS#8, unencrypted, mode 0600), made there the first
    time; and whether it was just made."""
    return open_key_file(path, Ed25519PrivateKey.generate, AuditKeyError, what="audit signing key",
                         unusable=lambda key: None if isinstance(key, Ed25519PrivateKey) else "is not an Ed25519 key")


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = read_public_key(pem, AuditKeyError, command="voxlog audit public-key")
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError("not an Ed25519 public key")
    return key
