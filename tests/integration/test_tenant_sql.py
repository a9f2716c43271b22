"""A tenant's analysts query their own rows, in real ClickHouse (chDB), whatever SQL they send."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from projections.store import AnalyticsError, AnalyticsStore
from projections.tables import CALLS
from projections.tenant_sql import ForbiddenQuery, TenantSql
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from tests.integration.test_outbound_calls import OTHER_KEY, agents_with_two_tenants, api
from tests.integration.test_projections import project, write_calls
from voxlog.settings import Settings
from voxlog.sim.stack import local_stack


def call_row(tenant: str) -> tuple[object, ...]:
    values = {c.name: "" for c in CALLS.columns}
    values.update(tenant_id=tenant, call_id=f"call-{uuid.uuid4()}", started_at=datetime.now(UTC), ended_at=None,
                  duration_ms=None, handoff=0, turns=1, tool_calls=0, barge_ins=0, errors=0, _version=1)
    return tuple(values[c.name] for c in CALLS.columns)


@pytest.fixture
def sql(store: AnalyticsStore) -> TenantSql:
    store.create(CALLS)
    store.insert(CALLS, [call_row("acme"), call_row("acme"), call_row("globex")])
    return TenantSql(store)


def test_a_tenant_sees_only_its_own_rows(sql: TenantSql) -> None:
    assert sql.query("acme", "SELECT DISTINCT tenant_id FROM calls").rows == [("acme",)]
    assert sql.query("acme", "SELECT count() FROM calls").rows == [(2,)]
    assert sql.query("globex", "SELECT count() FROM calls WHERE tenant_id = 'acme'").rows == [(0,)]
    sneaky = "SELECT count() FROM calls WHERE 1 OR tenant_id != 'acme'"
    assert sql.query("globex", sneaky).rows == [(1,)]
    joined = "SELECT count() FROM calls AS a, (SELECT * FROM calls) AS b"
    assert sql.query("acme", joined).rows == [(4,)]


@pytest.mark.parametrize("query", [
    "SELECT * FROM {db}.calls",
    "SELECT * FROM system.tables",
    "SELECT count() FROM calls WHERE call_id IN (SELECT call_id FROM {db}.calls)",
    "WITH (SELECT count() FROM {db}.calls) AS n SELECT n",
    "SELECT * FROM merge('{db}', '.*')",
    "SELECT * FROM remote('127.0.0.1', {db}.calls)",
    "SELECT file('/etc/passwd')",
    "SELECT * FROM url('http://127.0.0.1/', 'CSV', 'a String')",
    "SELECT dictGet('d', 'a', 1)",
    "INSERT INTO calls (call_id) VALUES ('x')",
    "DROP TABLE calls",
    "SELECT 1; DROP TABLE calls",
    "SELECT count() FROM calls; SELECT * FROM {db}.calls",
    "SELECT ';' AS a; SELECT * FROM {db}.calls -- ;",
    "SELECT * FROM numbers(10)",
])
def test_queries_that_reach_outside_the_tenant_are_refused(sql: TenantSql, store: AnalyticsStore, query: str) -> None:
    main = str(store.query("SELECT currentDatabase()").rows[0][0])
    with pytest.raises(ForbiddenQuery):
        sql.query("acme", query.format(db=main))


def test_one_statement_with_semicolons_in_strings_and_a_trailing_one_is_fine(sql: TenantSql) -> None:
    assert sql.query("acme", "SELECT ';' AS a, count() FROM calls /* ; */ -- trailing;\n;").rows == [(";", 2)]


def test_limits_cannot_be_lifted_from_inside_the_query(sql: TenantSql) -> None:
    with pytest.raises(AnalyticsError, match=r"(?i)readonly|setting"):
        sql.query("acme", "SELECT count() FROM calls SETTINGS max_result_rows = 0")


async def test_the_sql_api_answers_each_tenant_with_its_own_rows_and_audits_it(
    store: AnalyticsStore, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as stack:
        stack.gateway.analytics = store  # the test's own database in this process's ClickHouse
        await write_calls(stack.gateway.backend, "demo", 3)
        await write_calls(stack.gateway.backend, "other", 2, first=3)
        await project(stack.gateway.backend, store)

        asked = await api(stack, "POST", "/v1/sql", json={"query": "SELECT tenant_id, count() FROM calls GROUP BY 1"})
        assert asked.status_code == 200, asked.text
        assert asked.json()["rows"] == [["demo", 3]]
        other = await api(stack, "POST", "/v1/sql", key=OTHER_KEY, json={"query": "SELECT count() FROM turns"})
        assert other.json()["rows"] == [[4]]
        forbidden = await api(stack, "POST", "/v1/sql", json={"query": "SELECT * FROM system.tables"})
        assert forbidden.status_code == 403
        broken = await api(stack, "POST", "/v1/sql", json={"query": "SELECT nothing FROM calls"})
        assert broken.status_code == 400
        assert (await api(stack, "POST", "/v1/sql", key=None, json={"query": "SELECT 1"})).status_code == 401

        admin = stack.gateway.backend.admin()
        try:
            audit = [EventCodec().decode(r.value).payload async for r in admin.read_key([AUDIT], b"-")]
        finally:
            await admin.close()
        outcomes = [(a.actor, a.outcome) for a in audit if isinstance(a, AuditRecorded) and a.action == "sql.query"]
        assert outcomes == [("api-key:demo-key", "accepted"), ("api-key:other-key", "accepted"),
                            ("api-key:demo-key", "denied"), ("api-key:demo-key", "failed")]
