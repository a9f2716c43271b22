"""The audit projection: `audit_log`, chained by hash, and its verification against the log.

Audit records come from `audit.recorded` events (API keys refused, dial requests, rejected
webhooks, SQL access) and from the call events that are audit matters in themselves: consent
given or refused, a handoff and its outcome, a tool call with side effects. Each record is chained
to the previous one of its tenant and source partition: `hash = sha256(prev_hash + fields)`. The
order within a partition is the log's, so a rebuild gives the same chain.

The chain alone shows a record changed, or removed from the middle; not the newest records
removed, a chain removed whole, or records rewritten with their hashes recomputed (the hash is
unkeyed). So verification trusts the log, not the table: `compare_with_log` takes the tenant's
events from the log folded by the projection's own fold (`AuditFold` is pure) and compares the
table with them row by row, reporting a row missing, added or different with its chain and index.
That answers whoever can write to ClickHouse but not to the log.

Anchors answer whoever can also reach the log's copy. A verification that finds a trail intact
records each chain's head (index, offset, hash) in the log, as an `audit.recorded` of
`ANCHOR_ACTION`; every later one checks that each anchored record is still there with that hash:
in the log, or, once the log's retention has removed it, in the table (whose rows from before the
log's start are checked by their chain, and pinned by the anchors: a chain's head vouches for
every record before it). So a log cut short, or a table rewritten beyond the log's retention,
shows. Anchors rather than a keyed chain (HMAC with a secret): a shorter keyed chain is still a
valid one, so a key does not show truncation at all; every process that projects must hold it, so
it sits where ClickHouse's credentials do; and rotation and rebuilds come to depend on old keys.
An anchor needs only the log, which Kafka lets no client rewrite (one can only remove a
partition's oldest records, as retention does). What nothing inside voxlog can show: someone able
to rewrite the log itself (the embedded log's file) removing a chain's newest records together
with the anchors after them; keep the anchors (or the CLI's output) elsewhere too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from consumers.backends import LogBackend
from producers.log_producer import LogRecord
from projections.store import AnalyticsStore
from projections.tables import AUDIT_LOG, Row, Table, at
from schemas.base import Event, EventPayload
from schemas.events import (
    AuditRecorded,
    CallerErased,
    ConsentGiven,
    ConsentRefused,
    HandoffOutcome,
    HandoffRequested,
    ToolRequested,
)
from schemas.topics import AUDIT, CALLS, COMMANDS
from streams.redaction import Redactor, default_redactor

GENESIS = "0" * 64

ANCHOR_ACTION = "audit.verified"
"""The action of the audit record a verification writes when it finds a trail intact: its detail
names each chain's head (`anchor_detail`)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime (as ClickHouse may return one) is UTC."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def _canonical(value: Any) -> str:
    return str(epoch_us(value)) if isinstance(value, datetime) else str(value)


def record_hash(prev_hash: str, fields: Sequence[Any]) -> str:
    text = "\x1f".join(_canonical(v) for v in fields)
    return hashlib.sha256(f"{prev_hash}\x1e{text}".encode()).hexdigest()


def audit_source(topic: str, partition: int) -> str:
    """A chain's source, as `audit_log.source` names it: the log partition its records come from."""
    return f"{topic}/{partition}"


@dataclass(frozen=True)
class ChainHead:
    """A chain's newest record: its index, hash and log offset."""

    index: int
    hash: str
    offset: int


class AuditFold:
    tables = (AUDIT_LOG,)
    event_types = frozenset(t.EVENT_TYPE for t in (AuditRecorded, CallerErased, ConsentGiven, ConsentRefused,
                                                   HandoffRequested, HandoffOutcome, ToolRequested))

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.heads: dict[tuple[str, str], ChainHead] = {}

    def seed_head(self, tenant: str, source: str, index: int, hash_: str, offset: int) -> None:
        """The newest record of a chain already written (a restart continues the chain)."""
        self.heads[(tenant, source)] = ChainHead(index, hash_, offset)

    def apply(self, event: Event[EventPayload], source: str, offset: int) -> list[Row]:
        described = self._describe(event)
        if described is None:
            return []
        head = self.heads.get((event.tenant_id, source))
        if head is not None and offset <= head.offset:
            return []  # written before a restart
        actor, action, resource, outcome, detail, remote = described
        index, prev = (head.index + 1, head.hash) if head is not None else (0, GENESIS)
        fields = (event.tenant_id, source, index, offset, at(event.envelope.event_time_us), event.call_id, actor,
                  action, resource, outcome, self.redactor.redact(detail), remote, event.envelope.event_id)
        digest = record_hash(prev, fields)
        self.heads[(event.tenant_id, source)] = ChainHead(index, digest, offset)
        return [(AUDIT_LOG, (*fields, prev, digest, offset))]

    @staticmethod
    def _describe(event: Event[EventPayload]) -> tuple[str, str, str, str, str, str] | None:
        p = event.payload
        producer = event.envelope.producer
        match p:
            case AuditRecorded():
                return p.actor, p.action, p.resource, p.outcome, p.detail, p.remote_addr or ""
            case ConsentGiven() | ConsentRefused():
                given = isinstance(p, ConsentGiven)
                return ("caller", "consent.given" if given else "consent.refused", p.kind,
                        "given" if given else "refused", p.method, "")
            case HandoffRequested():
                return producer, "handoff.requested", p.handoff_id, "requested", p.reason, ""
            case HandoffOutcome():
                return "carrier", "handoff.outcome", p.handoff_id, p.outcome, p.provider_status, ""
            case ToolRequested():
                return producer, "tool.requested", p.tool_call_id, "requested", p.tool, ""
            case CallerErased():
                return p.requested_by, "caller.erased", p.caller_key, "erased", p.reason, ""
        return None


class AuditProjection:
    name = "audit"
    topics: tuple[str, ...] = (AUDIT, CALLS, COMMANDS)
    tables: tuple[Table, ...] = (AUDIT_LOG,)
    event_types: frozenset[str] | None = AuditFold.event_types

    def __init__(self) -> None:
        self.fold = AuditFold(default_redactor())

    def reset(self) -> None:
        self.fold = AuditFold(default_redactor())

    async def load(self, store: AnalyticsStore) -> None:
        result = await asyncio.to_thread(
            store.query, f"SELECT tenant_id, source, max(chain_index), argMax(hash, chain_index), max(log_offset) "
            f"FROM {AUDIT_LOG.name} FINAL GROUP BY tenant_id, source")
        for tenant, source, index, digest, offset in result.rows:
            self.fold.seed_head(tenant, source, int(index), digest, int(offset))

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> list[Row]:
        return self.fold.apply(event, f"{record.topic}/{record.partition}", record.offset)


ProblemKind = Literal["changed", "missing", "extra", "truncated"]
"""changed: a record differs from what the log gives (or from its chain, or its anchor); missing: a
record the log has, or an anchor names, is not in the table; extra: a row no event in the log
gives; truncated: an anchor names a record the log no longer holds (the log was cut short)."""


@dataclass(frozen=True)
class AuditProblem:
    tenant_id: str
    source: str
    chain_index: int
    kind: ProblemKind
    problem: str


def _named(values: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(AUDIT_LOG.column_names, values, strict=True))


def verify_chain(rows: Sequence[Sequence[Any]]) -> list[AuditProblem]:
    """Checks `audit_log` rows (all columns, ordered by tenant, source, chain_index) by their chain
    alone: each record's hash, each link, and that no index is missing. Returns the first problem of
    each broken chain."""
    names = AUDIT_LOG.column_names
    problems: list[AuditProblem] = []
    broken: set[tuple[str, str]] = set()
    expected: dict[tuple[str, str], tuple[int, str]] = {}
    for values in rows:
        row = _named(values)
        chain = (row["tenant_id"], row["source"])
        if chain in broken:
            continue
        index, prev = expected.get(chain, (0, GENESIS))
        fields = [row[n] for n in names[: names.index("prev_hash")]]
        found: tuple[ProblemKind, str] | None = None
        if row["chain_index"] != index:
            found = "missing", f"records {index}..{row['chain_index'] - 1} are missing (deleted)"
        elif row["prev_hash"] != prev:
            found = "changed", "its link to the previous record is broken (the previous one was changed or replaced)"
        elif record_hash(row["prev_hash"], fields) != row["hash"]:
            found = "changed", "its contents were altered after it was written"
        if found is not None:
            problems.append(AuditProblem(chain[0], chain[1], row["chain_index"], *found))
            broken.add(chain)
            continue
        expected[chain] = (index + 1, row["hash"])
    return problems


def anchor_detail(heads: Mapping[str, ChainHead]) -> str:
    """An anchor's detail: each chain's head by source, as JSON `{source: [index, offset, hash]}`."""
    return json.dumps({source: [h.index, h.offset, h.hash] for source, h in sorted(heads.items())},
                      separators=(",", ":"))


def read_anchor(detail: str) -> dict[str, ChainHead] | None:
    """The heads an anchor's detail names; None if it is not what `anchor_detail` writes."""
    try:
        named = json.loads(detail)
    except ValueError:
        return None
    if not isinstance(named, dict):
        return None
    heads: dict[str, ChainHead] = {}
    for source, head in named.items():
        match head:
            case [int() as index, int() as offset, str() as hash_]:
                heads[source] = ChainHead(index, hash_, offset)
            case _:
                return None
    return heads


@dataclass(frozen=True)
class Anchor:
    """Chain heads recorded in the log by a verification that found the trail intact."""

    source: str
    chain_index: int
    """Its own place in the trail: it is an audit record too."""
    actor: str
    heads: dict[str, ChainHead] | None
    """None: its detail is not one a verification writes."""

    def describe(self) -> str:
        return f"the anchor {self.source} record {self.chain_index} (by {self.actor})"


@dataclass
class LogTrail:
    """A tenant's audit trail as the log gives it: the rows the projection's fold makes of the log's
    events, the sources the log holds only part of, and the anchors found."""

    tenant_id: str
    rows: dict[tuple[str, int], tuple[Any, ...]] = field(default_factory=dict)
    """(source, chain_index) -> the row, all columns."""
    starts: dict[str, int] = field(default_factory=dict)
    """Sources whose beginning the log's retention removed: the first offset the log still holds."""
    anchors: list[Anchor] = field(default_factory=list)

    def start(self, source: str, offset: int, table_rows: Sequence[Sequence[Any]]) -> ChainHead | None:
        """The log holds `source` from `offset` on only: the table's rows from before it begin the
        chain, and the last of them (returned) is what the log's records continue."""
        self.starts[source] = offset
        before = [row for row in map(_named, table_rows) if row["source"] == source and row["log_offset"] < offset]
        if not before:
            return None
        last = max(before, key=lambda row: int(row["chain_index"]))
        return ChainHead(last["chain_index"], last["hash"], last["log_offset"])

    def add(self, values: tuple[Any, ...], payload: EventPayload) -> None:
        """A row the fold made of one of the tenant's events (`payload`)."""
        row = _named(values)
        self.rows[(row["source"], row["chain_index"])] = values
        if isinstance(payload, AuditRecorded) and payload.action == ANCHOR_ACTION:
            self.anchors.append(Anchor(row["source"], row["chain_index"], payload.actor, read_anchor(payload.detail)))


@dataclass(frozen=True)
class AuditReport:
    records: int
    """Rows of the table checked."""
    chains: int
    anchors: int
    """Anchors found in the log, each checked."""
    problems: list[AuditProblem]
    """The first problem of each chain that has one, by source."""
    heads: dict[str, ChainHead]
    """Each chain's newest record in the table: what an anchor records when there are no problems."""


def compare_with_log(table_rows: Sequence[Sequence[Any]], trail: LogTrail,
                     projected: Mapping[str, int]) -> AuditReport:
    """Checks a tenant's `audit_log` rows (all columns) against `trail`, the log's. `projected`: per
    source, the offset below which every record must be in the table (where the log ended before the
    projection caught up); later ones may not be projected yet, and are checked only if they are."""
    tenant = trail.tenant_id
    problems: list[AuditProblem] = []
    table: dict[tuple[str, int], dict[str, Any]] = {}
    unlogged: list[Sequence[Any]] = []  # rows from before the log's start: only their chain and anchors vouch
    for values in table_rows:
        row = _named(values)
        key = (row["source"], int(row["chain_index"]))
        table[key] = row
        logged = trail.rows.get(key)
        if row["log_offset"] < trail.starts.get(key[0], 0):
            unlogged.append(values)
        elif logged is None:
            problems.append(AuditProblem(tenant, *key, "extra", f"no event in the log gives it (offset "
                                         f"{row['log_offset']}): it was put into the table"))
        elif differing := _differing(row, _named(logged)):
            problems.append(AuditProblem(tenant, *key, "changed", f"it differs from what the log gives (offset "
                                         f"{row['log_offset']}) in {', '.join(differing)}: altered in the table"))
    for key, values in trail.rows.items():
        expected = _named(values)
        if key not in table and expected["log_offset"] < projected.get(key[0], 0):
            problems.append(AuditProblem(tenant, *key, "missing", f"the log has it (offset {expected['log_offset']}, "
                                         f"event {expected['event_id']}) and the table does not: deleted"))
    problems += verify_chain(unlogged)
    for anchor in trail.anchors:
        problems += _check_anchor(anchor, trail, table)
    first: dict[str, AuditProblem] = {}
    for problem in sorted(problems, key=lambda p: (p.source, p.chain_index)):  # stable: the log's word first
        first.setdefault(problem.source, problem)
    heads: dict[str, ChainHead] = {}
    for (source, index), row in table.items():
        if source not in heads or heads[source].index < index:
            heads[source] = ChainHead(index, row["hash"], row["log_offset"])
    chains = {source for source, _ in table} | {source for source, _ in trail.rows}
    return AuditReport(len(table_rows), len(chains), len(trail.anchors), list(first.values()), heads)


def _differing(row: Mapping[str, Any], logged: Mapping[str, Any]) -> list[str]:
    """The columns whose values differ, but the version (bookkeeping, not the record)."""
    return [name for name in AUDIT_LOG.column_names[:-1] if _canonical(row[name]) != _canonical(logged[name])]


def _check_anchor(anchor: Anchor, trail: LogTrail, table: Mapping[tuple[str, int], Mapping[str, Any]]
                  ) -> list[AuditProblem]:
    tenant = trail.tenant_id
    if anchor.heads is None:
        return [AuditProblem(tenant, anchor.source, anchor.chain_index, "changed",
                             "an anchor that names no chain heads: no verification wrote it")]
    found: list[AuditProblem] = []
    named = anchor.describe()
    for source, head in anchor.heads.items():
        logged = trail.rows.get((source, head.index))
        if head.offset < trail.starts.get(source, 0):  # the log's retention removed it: the table must keep it
            row = table.get((source, head.index))
            if row is None:
                found.append(AuditProblem(tenant, source, head.index, "missing",
                                          f"{named} names it, the table does not have it: deleted"))
            elif row["hash"] != head.hash:
                found.append(AuditProblem(tenant, source, head.index, "changed", f"its hash is not the one {named} "
                                          "recorded: it, or a record before it, was rewritten"))
        elif logged is None:
            found.append(AuditProblem(tenant, source, head.index, "truncated", f"{named} names it (offset "
                                      f"{head.offset}), the log no longer holds it: the log was cut short"))
        elif _named(logged)["hash"] != head.hash:
            found.append(AuditProblem(tenant, source, head.index, "changed", f"the log gives it a hash other than "
                                      f"the one {named} recorded: the log, or the table's rows from before the "
                                      "log's start, were rewritten"))
    return found
