"""`voxlog audit verify` against every way of tampering with `audit_log`, on both log backends:
real audit events in the log, projected by the real runner into chDB, tampered with by SQL, then
checked against the log. The chain alone (`verify_chain`, all the check was before it compared the
table with the log) misses three of the five; the anchors a verification records show the log
itself cut short, and a table rewritten beyond the log's retention."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumers.backends import EmbeddedBackend, LogBackend, ensure_topics
from producers.embedded_log_file import OFFSET_BITS
from producers.event_writer import CallRecorder, EventWriter, standalone_event
from producers.partitioning import partition_for
from projections.audit import (
    AuditFold,
    AuditProjection,
    AuditReport,
    LogTrail,
    audit_source,
    compare_with_log,
    record_hash,
    verify_chain,
)
from projections.projection_runner import ProjectionRunner
from projections.store import AnalyticsStore
from projections.tables import AUDIT_LOG
from schemas.base import EventPayload
from schemas.events import AuditRecorded, ConsentGiven, HandoffOutcome, HandoffRequested, ToolRequested
from schemas.topics import AUDIT, CALLS, COMMANDS
from streams.redaction import default_redactor
from voxlog.analytics import record_audit_anchor, verify_audit_trail

pytestmark = pytest.mark.slow

COLUMNS = AUDIT_LOG.column_names
NO_CALL = "-"
RECORDS = 11
"""In the trail `write_trail` writes: 6 + 3 + 1 + 1, in four chains."""


def _call_ids(partitions: int) -> tuple[str, str]:
    """Two calls on different partitions of voxlog.calls."""
    first = f"call-{uuid.uuid4()}"
    while True:
        second = f"call-{uuid.uuid4()}"
        if partition_for(second.encode(), partitions) != partition_for(first.encode(), partitions):
            return first, second


async def write_trail(backend: LogBackend, tenant: str) -> dict[str, str]:
    """A tenant's trail in four chains: six audit records (the audit topic); a call's consent,
    handoff and its outcome (voxlog.calls); its tool call (voxlog.commands); another call's consent,
    alone on its partition (a one-record chain). Returns each chain's source by name."""
    async with backend.admin() as admin:
        await ensure_topics(admin)  # before the first write, which would have Kafka make them its own way
        partitions = {topic.name: topic.partitions for topic in await admin.topics()}
    call, lone = _call_ids(partitions[CALLS])
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        for i in range(6):
            audit = CallRecorder(writer, tenant_id=tenant, call_id=NO_CALL, producer="test", producer_version="0")
            await audit.record(AuditRecorded(actor=f"api-key:k{i}", action="sql.query", resource="calls",
                                             outcome="accepted", detail=f"query {i}", remote_addr="10.0.0.1"))
        recorder = CallRecorder(writer, tenant_id=tenant, call_id=call, producer="test", producer_version="0")
        payloads: list[EventPayload] = [
            ConsentGiven(kind="recording", method="dtmf", prompt_text="Press 1 to agree to recording."),
            HandoffRequested(handoff_id="h1", reason="asked for a person", target="front-desk", summary="a person"),
            HandoffOutcome(handoff_id="h1", outcome="answered", provider_status="completed"),
            ToolRequested(tool_call_id="tc1", tool="book_appointment", arguments_json="{}", idempotency_key="k1"),
        ]
        for payload in payloads:
            await recorder.record(payload)
        alone = CallRecorder(writer, tenant_id=tenant, call_id=lone, producer="test", producer_version="0")
        await alone.record(ConsentGiven(kind="recording", method="speech", prompt_text="Is recording all right?"))
        await producer.flush()

    def source(topic: str, key: str) -> str:
        return audit_source(topic, partition_for(key.encode(), partitions[topic]))

    return {"audit": source(AUDIT, NO_CALL), "call": source(CALLS, call), "tool": source(COMMANDS, call),
            "lone": source(CALLS, lone)}


async def projected_trail(backend: LogBackend, store: AnalyticsStore) -> tuple[str, dict[str, str]]:
    """A new tenant's trail (`write_trail`) in the log and projected into `audit_log` by the runner."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    sources = await write_trail(backend, tenant)
    await ProjectionRunner(backend, store, AuditProjection()).run(asyncio.Event(), until_caught_up=True)
    return tenant, sources


def chain(store: AnalyticsStore, tenant: str, source: str) -> list[dict[str, Any]]:
    """A chain's rows as the table has them, all columns."""
    return [dict(zip(COLUMNS, row, strict=True)) for row in store.query(
        f"SELECT {', '.join(COLUMNS)} FROM {AUDIT_LOG.name} FINAL WHERE tenant_id = {{t:String}} "
        "AND source = {s:String} ORDER BY chain_index", {"t": tenant, "s": source}).rows]


def table_rows(store: AnalyticsStore, tenant: str) -> list[tuple[Any, ...]]:
    return store.query(f"SELECT {', '.join(COLUMNS)} FROM {AUDIT_LOG.name} FINAL WHERE tenant_id = {{t:String}} "
                       "ORDER BY source, chain_index", {"t": tenant}).rows


def change_record(store: AnalyticsStore, tenant: str, source: str, index: int) -> None:
    store.command(f"ALTER TABLE {AUDIT_LOG.name} UPDATE detail = 'nothing to see' WHERE tenant_id = {{t:String}} "
                  "AND source = {s:String} AND chain_index = {i:UInt64} SETTINGS mutations_sync = 1",
                  {"t": tenant, "s": source, "i": index})


def delete_record(store: AnalyticsStore, tenant: str, source: str, index: int) -> None:
    store.command(f"ALTER TABLE {AUDIT_LOG.name} DELETE WHERE tenant_id = {{t:String}} AND source = {{s:String}} "
                  "AND chain_index = {i:UInt64} SETTINGS mutations_sync = 1", {"t": tenant, "s": source, "i": index})


def rewrite_from(store: AnalyticsStore, tenant: str, source: str, index: int) -> None:
    """Changes record `index` and recomputes every hash after it, to the chain's end: rows inserted
    with a higher version, which is what FINAL then reads."""
    rows = chain(store, tenant, source)
    prev = rows[index - 1]["hash"]
    rewritten = []
    for row in rows[index:]:
        if row["chain_index"] == index:
            row["detail"] = "nothing to see"
        row["prev_hash"] = prev
        row["hash"] = prev = record_hash(prev, [row[name] for name in COLUMNS[:COLUMNS.index("prev_hash")]])
        row["_version"] += 1_000_000
        rewritten.append(tuple(row[name] for name in COLUMNS))
    store.insert(AUDIT_LOG, rewritten)


@dataclass(frozen=True)
class Tampering:
    name: str
    tamper: Callable[[AnalyticsStore, str, dict[str, str]], None]
    chain: str
    index: int
    kind: str
    chain_alone_sees: bool
    """Whether the chain's own hashes show it (all the check did before it compared with the log)."""
    deleted: int = 0


TAMPERINGS = [
    Tampering("changed record", lambda store, tenant, sources: change_record(store, tenant, sources["audit"], 1),
              "audit", 1, "changed", chain_alone_sees=True),
    Tampering("deleted middle record",
              lambda store, tenant, sources: delete_record(store, tenant, sources["audit"], 2),
              "audit", 2, "missing", chain_alone_sees=True, deleted=1),
    Tampering("deleted newest record",
              lambda store, tenant, sources: delete_record(store, tenant, sources["audit"], 5),
              "audit", 5, "missing", chain_alone_sees=False, deleted=1),
    Tampering("deleted one-record chain",
              lambda store, tenant, sources: delete_record(store, tenant, sources["lone"], 0),
              "lone", 0, "missing", chain_alone_sees=False, deleted=1),
    Tampering("rewritten with hashes recomputed",
              lambda store, tenant, sources: rewrite_from(store, tenant, sources["audit"], 2),
              "audit", 2, "changed", chain_alone_sees=False),
]


def found(report: AuditReport) -> list[tuple[str, int, str]]:
    return [(problem.source, problem.chain_index, problem.kind) for problem in report.problems]


@pytest.mark.parametrize("tampering", TAMPERINGS, ids=[t.name for t in TAMPERINGS])
async def test_each_tampering_is_found_against_the_log(backend: LogBackend, store: AnalyticsStore,
                                                       tampering: Tampering) -> None:
    tenant, sources = await projected_trail(backend, store)
    tampering.tamper(store, tenant, sources)
    assert bool(verify_chain(table_rows(store, tenant))) is tampering.chain_alone_sees

    report = await verify_audit_trail(backend, store, tenant)
    assert found(report) == [(sources[tampering.chain], tampering.index, tampering.kind)], report.problems
    assert (report.records, report.chains) == (RECORDS - tampering.deleted, 4)


async def test_an_untouched_trail_verifies_clean(backend: LogBackend, store: AnalyticsStore) -> None:
    tenant, sources = await projected_trail(backend, store)
    report = await verify_audit_trail(backend, store, tenant)
    assert report.problems == []
    assert (report.records, report.chains, report.anchors) == (RECORDS, 4, 0)
    assert {source: head.index for source, head in report.heads.items()} == {
        sources["audit"]: 5, sources["call"]: 2, sources["tool"]: 0, sources["lone"]: 0}


async def test_a_rebuild_from_offset_zero_still_verifies(backend: LogBackend, store: AnalyticsStore) -> None:
    tenant, _ = await projected_trail(backend, store)
    report = await verify_audit_trail(backend, store, tenant)
    await record_audit_anchor(backend, tenant, report.heads, actor="test")
    before = table_rows(store, tenant)

    await ProjectionRunner(backend, store, AuditProjection()).rebuild()
    rebuilt = await verify_audit_trail(backend, store, tenant)
    assert rebuilt.problems == []
    assert (rebuilt.records, rebuilt.chains, rebuilt.anchors) == (RECORDS + 1, 4, 1)  # the anchor is a record too
    assert set(before) < set(table_rows(store, tenant)), "the same rows, and the anchor's"


def remove_from_log(path: Path, source: str, offsets: Iterable[int]) -> None:
    """Deletes records from the embedded log's file, as whoever holds the file can."""
    topic, partition = source.rsplit("/", 1)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        (tp,) = db.execute("SELECT tp FROM topic_partitions WHERE topic = ? AND partition = ?",
                           (topic, int(partition))).fetchone()
        db.executemany("DELETE FROM records WHERE id = ?", [((tp << OFFSET_BITS) | offset,) for offset in offsets])


async def test_an_anchor_shows_the_log_itself_cut_short(embedded_backend: EmbeddedBackend, tmp_path: Path,
                                                        store: AnalyticsStore) -> None:
    backend = embedded_backend
    tenant, sources = await projected_trail(backend, store)
    report = await verify_audit_trail(backend, store, tenant)
    await record_audit_anchor(backend, tenant, report.heads, actor="test")

    # The one-record chain removed from the log's file and from the table: the two copies agree.
    (lone,) = chain(store, tenant, sources["lone"])
    remove_from_log(tmp_path / "log.db", sources["lone"], [lone["log_offset"]])
    delete_record(store, tenant, sources["lone"], 0)
    report = await verify_audit_trail(backend, store, tenant)
    assert found(report) == [(sources["lone"], 0, "truncated")], report.problems


async def test_anchors_pin_what_the_logs_retention_removed(embedded_backend: EmbeddedBackend, tmp_path: Path,
                                                           store: AnalyticsStore) -> None:
    backend = embedded_backend
    tenant, sources = await projected_trail(backend, store)
    report = await verify_audit_trail(backend, store, tenant)
    await record_audit_anchor(backend, tenant, report.heads, actor="test")

    # Retention removes the audit partition's first six records (this test's log has no others); the anchor stays.
    remove_from_log(tmp_path / "log.db", sources["audit"], range(6))
    kept = await verify_audit_trail(backend, store, tenant)
    assert kept.problems == [], "rows from before the log's start are vouched for by their chain and the anchor"
    assert (kept.records, kept.anchors) == (RECORDS + 1, 1)

    rewrite_from(store, tenant, sources["audit"], 2)
    assert verify_chain(table_rows(store, tenant)) == []
    report = await verify_audit_trail(backend, store, tenant)
    assert found(report) == [(sources["audit"], 5, "changed")], report.problems  # the anchored head


def test_what_the_projection_may_not_have_reached_is_not_missing_and_a_forged_row_is_extra() -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    fold = AuditFold(default_redactor())
    source = audit_source(AUDIT, 0)
    rows = [values for offset in range(3) for _, values in fold.apply(standalone_event(
        AuditRecorded(actor="api-key:k", action="sql.query", resource="calls", outcome="accepted", detail="q"),
        tenant_id=tenant, stream_id=NO_CALL, producer="test", producer_version="0"), source, offset)]
    trail = LogTrail(tenant, rows={(source, index): values for index, values in enumerate(rows)})

    assert compare_with_log(rows[:2], trail, {source: 2}).problems == [], "offset 2 came after the catch-up"
    assert found(compare_with_log(rows[:2], trail, {source: 3})) == [(source, 2, "missing")]
    forged = (*rows[2][:COLUMNS.index("log_offset")], 10**9, *rows[2][COLUMNS.index("log_offset") + 1:])
    assert found(compare_with_log([*rows[:2], forged], trail, {source: 2})) == [(source, 2, "changed")]
    assert found(compare_with_log([*rows, (*rows[2][:2], 3, *rows[2][3:])], trail, {source: 3})) == [
        (source, 3, "extra")]
