"""The analysts' side, wired: the store the settings name, projections brought up to date, SQL with
limits, the audit trail checked and exported (`voxlog sql`, `voxlog projections`, `voxlog audit`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from projections.audit import AuditProblem, verify_chain
from projections.recording_store import recording_store
from projections.runner import Projection, ProjectionRunner, catch_up, default_projections
from projections.store import AnalyticsStore, QueryResult
from projections.tables import AUDIT_LOG, OFFSETS
from streams.agents import DEFAULT_AGENTS_DIR, AgentRouter, load_agents
from voxlog.backends import LogBackend, log_backend
from voxlog.settings import Settings

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

    async def rebuild(self, name: str) -> ProjectionRunner:
        (projection,) = self.projections([name])
        runner = ProjectionRunner(self.backend, self.store, projection)
        await runner.rebuild()
        return runner

    def sql(self, query: str) -> QueryResult:
        return self.store.query(query, settings=SQL_LIMITS)

    def lag(self) -> QueryResult:
        return self.store.query(f"SELECT projection_name, topic, log_partition, next_offset FROM {OFFSETS.name} FINAL "
                                "ORDER BY projection_name, topic, log_partition")

    def audit_rows(self, tenant: str) -> list[tuple[Any, ...]]:
        return self.store.query(
            f"SELECT {', '.join(AUDIT_LOG.column_names)} FROM {AUDIT_LOG.name} FINAL WHERE tenant_id = {{t:String}} "
            "ORDER BY source, chain_index", {"t": tenant}).rows

    def verify_audit(self, tenant: str) -> tuple[int, list[AuditProblem]]:
        rows = self.audit_rows(tenant)
        return len(rows), verify_chain(rows)

    def export_audit(self, call_id: str) -> QueryResult:
        return self.store.query(
            f"SELECT {', '.join(AUDIT_LOG.column_names)} FROM {AUDIT_LOG.name} FINAL WHERE call_id = {{c:String}} "
            "ORDER BY at, source, chain_index", {"c": call_id})
