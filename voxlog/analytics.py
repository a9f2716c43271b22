"""The analysts' side, wired: the store the settings name, projections brought up to date, SQL with
limits, the audit trail checked and exported (`voxlog sql`, `voxlog projections`, `voxlog audit`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from consumers.backends import LogBackend, ensure_topics
from consumers.log_consumer import LogAdmin
from gateway.config_audit import NO_CALL
from producers.event_writer import EventWriter, standalone_event
from producers.log_producer import LogRecord
from projections.audit import (
    ANCHOR_ACTION,
    AuditProjection,
    AuditReport,
    ChainHead,
    LogTrail,
    anchor_detail,
    audit_source,
    compare_with_log,
)
from projections.default_projections import default_projections
from projections.projection import Projection
from projections.projection_runner import ProjectionRunner, ReadProgress, catch_up
from projections.store import AnalyticsStore, QueryResult
from projections.tables import AUDIT_LOG, OFFSETS
from schemas.base import Event, EventPayload
from schemas.codec import EventCodec, UndecodableMessage
from schemas.events import AuditRecorded
from schemas.version import __version__
from streams.config.agents import AgentRouter, load_agents
from voxlog.backends import log_backend, recording_store
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings

SQL_LIMITS: dict[str, Any] = {
    "readonly": 2,  # no writes; settings in the query may still be read
    "max_execution_time": 30,
    "max_result_rows": 10_000,
    "result_overflow_mode": "break",
    "final": 1,  # every table read as FINAL: each row once, whatever merges have happened
}
"""Limits every analyst query runs under."""


class Analytics:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: LogBackend = log_backend(settings)
        self.store = AnalyticsStore.open(settings.clickhouse_dsn, settings.home)
        self.router = AgentRouter(load_agents(settings.agents_dir or DEFAULT_AGENTS_DIR))

    def projections(self, names: Sequence[str] | None = None) -> list[Projection]:
        found = default_projections(self.router, recordings=self.settings.recordings_path,
                                    recording_store=recording_store(self.settings))
        if names is None:
            return found
        unknown = set(names) - {p.name for p in found}
        if unknown:
            known = ", ".join(p.name for p in found)
            raise ValueError(f"no projection {', '.join(sorted(unknown))}; there are {known}")
        return [p for p in found if p.name in names]

    async def catch_up(self) -> None:
        await catch_up(self.backend, self.store, self.projections())

    async def rebuild(self, name: str, on_progress: ReadProgress | None = None) -> ProjectionRunner:
        (projection,) = self.projections([name])
        runner = ProjectionRunner(self.backend, self.store, projection, on_progress=on_progress)
        await runner.rebuild()
        return runner

    def sql(self, query: str) -> QueryResult:
        return self.store.query(query, settings=SQL_LIMITS)

    def lag(self) -> QueryResult:
        """Each projection's next offset per partition; none where no projection has run yet."""
        self.store.create(OFFSETS)  # a fresh home has no tables yet: that is "nothing read", not an error
        return self.store.query(f"SELECT projection_name, topic, log_partition, next_offset FROM {OFFSETS.name} FINAL "
                                "ORDER BY projection_name, topic, log_partition")

    async def verify_audit(self, tenant: str) -> AuditReport:
        return await verify_audit_trail(self.backend, self.store, tenant)

    async def checked_audit_rows(self, tenant: str) -> tuple[AuditReport, list[tuple[Any, ...]]]:
        return await verified_audit_rows(self.backend, self.store, tenant)

    async def anchor_audit(self, tenant: str, heads: Mapping[str, ChainHead], *, actor: str) -> None:
        await record_audit_anchor(self.backend, tenant, heads, actor=actor)

    def export_audit(self, call_id: str) -> QueryResult:
        return self.store.query(
            f"SELECT {', '.join(AUDIT_LOG.column_names)} FROM {AUDIT_LOG.name} FINAL WHERE call_id = {{c:String}} "
            "ORDER BY at, source, chain_index", {"c": call_id})


async def verify_audit_trail(backend: LogBackend, store: AnalyticsStore, tenant: str) -> AuditReport:
    """Brings `audit_log` up to the log, then checks the tenant's rows against the log's events and
    the anchors among them (`projections.audit.compare_with_log`)."""
    report, _ = await verified_audit_rows(backend, store, tenant)
    return report


async def verified_audit_rows(backend: LogBackend, store: AnalyticsStore,
                              tenant: str) -> tuple[AuditReport, list[tuple[Any, ...]]]:
    """`verify_audit_trail`'s report, and the rows it checked (all columns, by source and chain_index):
    what an export may vouch for, not rows read again after the check."""
    async with backend.admin() as admin:
        await ensure_topics(admin)
        projected = await _end_offsets(admin, AuditProjection.topics)
    await ProjectionRunner(backend, store, AuditProjection()).run(asyncio.Event(), until_caught_up=True)
    rows = await asyncio.to_thread(_audit_rows, store, tenant)
    trail = await _log_trail(backend, tenant, rows)  # read after the rows: every row's event is in it
    return compare_with_log(rows, trail, {audit_source(*tp): end for tp, end in projected.items()}), rows


async def record_audit_anchor(backend: LogBackend, tenant: str, heads: Mapping[str, ChainHead], *,
                              actor: str) -> None:
    """Records chain heads a verification found intact in the log: an anchor later ones check."""
    payload = AuditRecorded(actor=actor, action=ANCHOR_ACTION, resource=AUDIT_LOG.name, outcome="intact",
                            detail=anchor_detail(heads), remote_addr=None)
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        await writer.append(standalone_event(payload, tenant_id=tenant, stream_id=NO_CALL, producer="voxlog.analytics",
                                             producer_version=__version__))
        await writer.flush()


def _audit_rows(store: AnalyticsStore, tenant: str) -> list[tuple[Any, ...]]:
    return store.query(
        f"SELECT {', '.join(AUDIT_LOG.column_names)} FROM {AUDIT_LOG.name} FINAL WHERE tenant_id = {{t:String}} "
        "ORDER BY source, chain_index", {"t": tenant}).rows


async def _end_offsets(admin: LogAdmin, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    return {(topic, partition): end for topic in topics for partition, end in (await admin.end_offsets(topic)).items()}


async def _log_trail(backend: LogBackend, tenant: str, table_rows: Sequence[Sequence[Any]]) -> LogTrail:
    """The tenant's trail as the log gives it, up to where the log ends now: every record of the
    audit projection's topics read, the events of the types it folds (and only those) decoded, and
    the tenant's folded by the projection itself, as it folded them into the table."""
    projection = AuditProjection()
    codec = backend.codec
    trail = LogTrail(tenant)
    async with backend.admin() as admin:
        ends = await _end_offsets(admin, projection.topics)
    remaining = {tp for tp, end in ends.items() if end > 0}
    started: set[tuple[str, int]] = set()
    async with backend.consumer(list(projection.topics)) as consumer:
        while remaining:
            records = await consumer.poll(timeout_s=5.0, max_records=5000)
            if not records:
                raise TimeoutError(f"reading the audit trail: the log stopped short of {sorted(remaining)}")
            for record in records:
                tp = (record.topic, record.partition)
                end = ends.get(tp, 0)
                if record.offset >= end:
                    continue  # appended after the rows were read
                if record.offset + 1 == end:
                    remaining.discard(tp)
                if tp not in started:
                    started.add(tp)
                    if record.offset > 0:  # retention removed the partition's beginning
                        source = audit_source(*tp)
                        head = trail.start(source, record.offset, table_rows)
                        if head is not None:
                            projection.fold.seed_head(tenant, source, head.index, head.hash, head.offset)
                event = _decoded(codec, record, projection.event_types)
                if event is None or event.tenant_id != tenant:
                    continue
                try:
                    rows = await projection.rows(record, event, backend)
                except Exception:  # the projection dead-letters what it cannot fold: no row
                    continue
                for _, values in rows:
                    trail.add(values, event.payload)
    return trail


def _decoded(codec: EventCodec, record: LogRecord, types: frozenset[str] | None) -> Event[EventPayload] | None:
    """The record's event if it is of one of `types` (told by its header alone), else None; None too
    for what cannot be decoded (the projection dead-letters it: it has no row)."""
    try:
        if types is not None and codec.schema_of(record.value)[0] not in types:
            return None
        return codec.decode(record.value)
    except UndecodableMessage:
        return None
