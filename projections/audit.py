"""The audit trail: `audit_log`, chained by hash, and its verification.

Audit records come from `audit.recorded` events (API keys refused, dial requests, rejected
webhooks, SQL access) and from the call events that are audit matters in themselves: consent
given or refused, a handoff and its outcome, a tool call with side effects. Each record is chained
to the previous one of its tenant and source partition: `hash = sha256(prev_hash + fields)`. The
order within a partition is the log's, so a rebuild gives the same chain, and changing or removing
any record but a chain's newest breaks it where it happened.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from projections.tables import AUDIT_LOG, Row, at
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
from streams.redaction import Redactor

GENESIS = "0" * 64


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


@dataclass
class _Head:
    index: int
    hash: str
    offset: int


class AuditFold:
    tables = (AUDIT_LOG,)
    event_types = frozenset(t.EVENT_TYPE for t in (AuditRecorded, CallerErased, ConsentGiven, ConsentRefused,
                                                   HandoffRequested, HandoffOutcome, ToolRequested))

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.heads: dict[tuple[str, str], _Head] = {}

    def seed_head(self, tenant: str, source: str, index: int, hash_: str, offset: int) -> None:
        """The newest record of a chain already written (a restart continues the chain)."""
        self.heads[(tenant, source)] = _Head(index, hash_, offset)

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
        self.heads[(event.tenant_id, source)] = _Head(index, digest, offset)
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


@dataclass(frozen=True)
class AuditProblem:
    tenant_id: str
    source: str
    chain_index: int
    problem: str


def verify_chain(rows: Sequence[Sequence[Any]]) -> list[AuditProblem]:
    """Checks `audit_log` rows (all columns, ordered by tenant, source, chain_index): each record's
    hash, each link, and that no index is missing. Returns the first problem of each broken chain."""
    names = AUDIT_LOG.column_names
    problems: list[AuditProblem] = []
    broken: set[tuple[str, str]] = set()
    expected: dict[tuple[str, str], tuple[int, str]] = {}
    for values in rows:
        row = dict(zip(names, values, strict=True))
        chain = (row["tenant_id"], row["source"])
        if chain in broken:
            continue
        index, prev = expected.get(chain, (0, GENESIS))
        fields = [row[n] for n in names[: names.index("prev_hash")]]
        problem = None
        if row["chain_index"] != index:
            problem = f"records {index}..{row['chain_index'] - 1} are missing (deleted)"
        elif row["prev_hash"] != prev:
            problem = "its link to the previous record is broken (the previous one was changed or replaced)"
        elif record_hash(row["prev_hash"], fields) != row["hash"]:
            problem = "its contents were altered after it was written"
        if problem is not None:
            problems.append(AuditProblem(chain[0], chain[1], row["chain_index"], problem))
            broken.add(chain)
            continue
        expected[chain] = (index + 1, row["hash"])
    return problems
