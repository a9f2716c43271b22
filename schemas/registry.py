"""The schema catalogue: every event type and every version of it kept in `schemas/avsc`.

Each event type lives in `avsc/<type>/v<N>.avsc`; the highest N is what this code writes, and every
older version stays in the repository so that data it wrote can still be read (Avro schema
resolution into the newest version, then the upcasters in `schemas.upcasters`). The envelope is
defined once, in `avsc/envelope/v<N>.avsc`, and referenced by name from every event schema; it evolves
on its own: every event version is written with the newest envelope, and its forms with the older
envelopes are kept (`legacy`) so that what they wrote is still read.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).parent / "avsc"
ENVELOPE_NAME = "voxlog.Envelope"
# Avro single-object encoding: two marker bytes, then the writer schema's CRC-64-AVRO fingerprint.
SINGLE_OBJECT_MAGIC = b"\xc3\x01"


def _crc64_avro_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_AVRO_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


CRC64_AVRO_EMPTY = 0xC15D213AA4D7A795
_CRC64_TABLE = _crc64_avro_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint the Avro specification names CRC-64-AVRO."""
    fp = CRC64_AVRO_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one event type's schema, resolved and ready for fastavro."""

    event_type: str
    version: int
    envelope_version: int
    path: Path
    schema: dict[str, Any]  # the full schema, envelope inlined
    parsed: Any  # fastavro's parsed form of `schema`
    fingerprint: bytes  # CRC-64-AVRO of the canonical form, little-endian, as single-object encoding has it

    @property
    def header(self) -> bytes:
        return SINGLE_OBJECT_MAGIC + self.fingerprint


@dataclass(frozen=True)
class SchemaRegistry:
    envelope: dict[str, Any]  # the newest, which every version in `versions` inlines
    versions: dict[str, tuple[SchemaVersion, ...]]  # oldest first
    legacy: tuple[SchemaVersion, ...]  # every event version with each older envelope: read, never written

    @cached_property
    def latest(self) -> dict[str, SchemaVersion]:
        return {event_type: vs[-1] for event_type, vs in self.versions.items()}

    @cached_property
    def by_fingerprint(self) -> dict[bytes, SchemaVersion]:
        return {sv.fingerprint: sv for sv in (*self.legacy, *(sv for vs in self.versions.values() for sv in vs))}


def _inline_envelope(schema: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    full = copy.deepcopy(schema)
    for field in full["fields"]:
        if field["type"] == ENVELOPE_NAME:
            field["type"] = copy.deepcopy(envelope)
    return full


def load_schema_version(path: Path, envelope: dict[str, Any], envelope_version: int) -> SchemaVersion:
    raw = json.loads(path.read_text())
    event_type = raw.get("event_type")
    version = raw.get("event_version")
    if not isinstance(event_type, str) or not isinstance(version, int):
        raise ValueError(f"{path}: a schema needs string 'event_type' and int 'event_version' attributes")
    if path.stem != f"v{version}":
        raise ValueError(f"{path}: file name says {path.stem} but event_version is {version}")
    full = _inline_envelope(raw, envelope)
    # A fresh name table per schema: the same enum names recur in unrelated event types.
    parsed = fastavro.parse_schema(full, named_schemas={})
    fingerprint = crc64_avro(to_parsing_canonical_form(parsed).encode()).to_bytes(8, "little")
    return SchemaVersion(event_type, version, envelope_version, path, full, parsed, fingerprint)


@cache
def load_registry(directory: Path = SCHEMA_DIR) -> SchemaRegistry:
    envelopes = [json.loads((directory / "envelope" / f"v{n}.avsc").read_text())
                 for n in range(1, len(list((directory / "envelope").glob("v*.avsc"))) + 1)]
    versions: dict[str, list[SchemaVersion]] = {}
    legacy: list[SchemaVersion] = []
    for path in sorted(directory.glob("*/v*.avsc")):
        if path.parent.name == "envelope":
            continue
        for number, envelope in enumerate(envelopes[:-1], start=1):
            legacy.append(load_schema_version(path, envelope, number))
        sv = load_schema_version(path, envelopes[-1], len(envelopes))
        versions.setdefault(sv.event_type, []).append(sv)
    ordered: dict[str, tuple[SchemaVersion, ...]] = {}
    for event_type, vs in sorted(versions.items()):
        vs.sort(key=lambda sv: sv.version)
        numbers = [sv.version for sv in vs]
        if numbers != list(range(1, len(vs) + 1)):
            raise ValueError(f"{event_type}: versions must run 1..N without gaps, found {numbers}")
        ordered[event_type] = tuple(vs)
    fingerprints = [sv.fingerprint for vs in ordered.values() for sv in vs] + [sv.fingerprint for sv in legacy]
    if len(set(fingerprints)) != len(fingerprints):
        raise ValueError("two schema versions share a fingerprint: they are identical")
    return SchemaRegistry(envelope=envelopes[-1], versions=ordered, legacy=tuple(legacy))
