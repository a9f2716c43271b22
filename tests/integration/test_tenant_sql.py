"""A tenant's analysts query their own rows, in real ClickHouse (chDB), whatever SQL they send."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from projections.store import AnalyticsError, AnalyticsStore
from projections.tables import CALLS
from projections.tenant_sql import ForbiddenQuery, TenantSql
from tests.integration.test_projections import store  # noqa: F401  (the fixture)


def call_row(tenant: str) -> tuple[object, ...]:
    values = {c.name: "" for c in CALLS.columns}
    values.update(tenant_id=tenant, call_id=f"call-{uuid.uuid4()}", started_at=datetime.now(UTC), ended_at=None,
                  duration_ms=None, handoff=0, turns=1, tool_calls=0, barge_ins=0, errors=0, _version=1)
    return tuple(values[c.name] for c in CALLS.columns)


@pytest.fixture
def sql(store: AnalyticsStore) -> TenantSql:  # noqa: F811
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
def test_queries_that_reach_outside_the_tenant_are_refused(sql: TenantSql, store: AnalyticsStore, query: str) -> None:  # noqa: F811
    main = str(store.query("SELECT currentDatabase()").rows[0][0])
    with pytest.raises(ForbiddenQuery):
        sql.query("acme", query.format(db=main))


def test_one_statement_with_semicolons_in_strings_and_a_trailing_one_is_fine(sql: TenantSql) -> None:
    assert sql.query("acme", "SELECT ';' AS a, count() FROM calls /* ; */ -- trailing;\n;").rows == [(";", 2)]


def test_limits_cannot_be_lifted_from_inside_the_query(sql: TenantSql) -> None:
    with pytest.raises(AnalyticsError, match=r"(?i)readonly|setting"):
        sql.query("acme", "SELECT count() FROM calls SETTINGS max_result_rows = 0")
