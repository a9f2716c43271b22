"""A tenant's analysts query their own rows, in real ClickHouse (chDB), whatever SQL they send."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from projections.store import AnalyticsError, AnalyticsStore
from projections.tables import CALLS
from projections.tenant_sql import (
    ALLOWED_AGGREGATES,
    ALLOWED_FUNCTIONS,
    TENANT_SQL_LIMITS,
    ForbiddenQuery,
    TenantSql,
    describe_failure,
    parse_ast,
    tenant_access_statements,
    tenant_database,
    tenant_login,
)
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from tests.integration.test_outbound_calls import OTHER_KEY, agents_with_two_tenants, api
from tests.integration.test_projections import project, write_calls
from voxlog.settings import Settings
from voxlog.sim.stack import local_stack


def call_row(tenant: str) -> tuple[object, ...]:
    values: dict[str, object] = {c.name: "" for c in CALLS.columns}
    values.update(tenant_id=tenant, call_id=f"call-{uuid.uuid4()}", started_at=datetime.now(UTC), ended_at=None,
                  duration_ms=None, handoff=0, turns=1, tool_calls=0, barge_ins=0, errors=0, _version=1)
    return tuple(values[c.name] for c in CALLS.columns)


@pytest.fixture(params=["in-process", "hosted"])
def sql(request: pytest.FixtureRequest, store: AnalyticsStore) -> TenantSql:
    """Over the engine in this process, and through a store host as `voxlog serve`'s gateway reads it."""
    store.create(CALLS)
    store.insert(CALLS, [call_row("acme"), call_row("acme"), call_row("globex")])
    return TenantSql(store if request.param == "in-process" else request.getfixturevalue("hosted"))


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

        async with stack.gateway.backend.admin() as admin:
            audit = [EventCodec().decode(r.value).payload async for r in admin.read_key([AUDIT], b"-")]
        outcomes = [(a.actor, a.outcome) for a in audit if isinstance(a, AuditRecorded) and a.action == "sql.query"]
        assert outcomes == [("api-key:demo-key", "accepted"), ("api-key:other-key", "accepted"),
                            ("api-key:demo-key", "denied"), ("api-key:demo-key", "failed")]


def test_every_allowed_function_is_one_clickhouse_has(store: AnalyticsStore) -> None:
    rows = store.query("SELECT name, is_aggregate FROM system.functions").rows
    registered, aggregates = {str(n) for n, _ in rows}, {str(n) for n, a in rows if a}
    assert ALLOWED_FUNCTIONS - registered == {"lambda", "exists", "untuple"}, "made by the parser, not registered"
    assert aggregates >= ALLOWED_AGGREGATES
    assert ALLOWED_AGGREGATES <= ALLOWED_FUNCTIONS


def test_function_names_are_resolved_as_clickhouse_resolves_them(sql: TenantSql) -> None:
    names = sql._function_names()
    for allowed in ("count", "COUNT", "Sum", "countIf", "uniqExactIf", "sumArrayIf", "avgOrNull", "sumMap",
                    "countDistinct", "quantileIf", "if", "IF", "lower", "LOWER", "toStartOfDay", "JSONExtractString"):
        assert names.allowed(allowed), allowed
    for refused in ("version", "VERSION", "Version", "hostName", "hostname", "HOSTNAME", "FQDN", "currentDatabase",
                    "DATABASE", "database", "currentSchemas", "buildId", "timezone", "getSetting", "file", "url",
                    "dictGet", "dictGetString", "joinGet", "hasColumnInTable", "sleep", "sleepEachRow", "throwIf",
                    "arrayReduce", "versionIf", "fileIf", "sleepIf", "dictGetOrNull", "chdb", "getMacro"):
        assert not names.allowed(refused), refused
    # Every name ClickHouse registers is allowed only if it is on the list: no suffix or case folding
    # lets another one through.
    accepted = {n for n in names.registered if names.allowed(n)}
    assert accepted <= ALLOWED_FUNCTIONS


def test_a_name_that_prints_lines_of_its_own_into_the_dump_cannot_pass() -> None:
    honest = ["SelectWithUnionQuery (children 2)", " ExpressionList (children 1)", "  SelectQuery (children 1)",
              "   ExpressionList (children 1)", "    Identifier a", " Identifier TabSeparated"]
    assert parse_ast(honest).children[0].children[0].children[0].children[0].name == "a"
    smuggled = [*honest[:5], "    Function file", honest[5]]  # `a\n    Function file`: one node too many
    with pytest.raises(ForbiddenQuery, match="cannot be checked"):
        parse_ast(smuggled)
    with pytest.raises(ForbiddenQuery, match="cannot be checked"):
        parse_ast([*honest, "SelectQuery"])  # a second root
    with pytest.raises(ForbiddenQuery, match="cannot be checked"):
        parse_ast([*honest[:4], "      Identifier a", honest[5]])  # skips a level


def test_the_tenant_connection_is_read_only_and_bounded_whatever_runs_on_it(sql: TenantSql) -> None:
    connection = sql._tenant_store("acme")  # straight to ClickHouse: no check of ours in the way
    # ClickHouse takes the result limits off a query's context once it has applied them to its
    # result, so inside a query they read 0; test_a_settings_clause_cannot_lift_the_row_cap shows them.
    expected = {name: str(value) for name, value in TENANT_SQL_LIMITS.items()
                if name not in ("limit", "max_result_rows", "max_result_bytes")}
    names = ", ".join(f"'{name}'" for name in expected)
    have = dict(connection.query(f"SELECT name, value FROM system.settings WHERE name IN ({names})").rows)
    assert have == expected
    for statement in ("INSERT INTO calls (call_id) VALUES ('x')", "DROP TABLE calls", "SET readonly = 0",
                      f"CREATE TABLE {tenant_database('acme')}.t (a UInt8) ENGINE = Memory"):
        # (a hosted connection refuses any SET itself: its settings are those it opened with)
        with pytest.raises(AnalyticsError, match=r"(?i)readonly|fixed when it opens"):
            connection.command(statement)
    with pytest.raises(AnalyticsError, match="readonly"):
        connection.query("SELECT 1", settings={"max_execution_time": 1000})
    assert sql.query("acme", "SELECT count() FROM calls").rows == [(2,)], "still answers"


def test_a_settings_clause_cannot_lift_the_row_cap(sql: TenantSql) -> None:
    for query in ("SELECT count() FROM calls SETTINGS limit = 0", "SELECT 1 SETTINGS offset = 1",
                  "SELECT 1 SETTINGS limit = 5, offset = 2", "SELECT 1 SETTINGS max_threads = 8"):
        with pytest.raises(ForbiddenQuery, match="SETTINGS"):
            sql.query("acme", query)
    rows = sql.query("acme", "SELECT arrayJoin(range(20000)) AS n").rows
    assert len(rows) == TENANT_SQL_LIMITS["limit"], "more rows than the cap are cut, as a LIMIT would"


def test_on_a_clickhouse_server_each_tenant_is_a_user_with_a_row_policy(store: AnalyticsStore) -> None:
    digest = "ab" * 32
    statements = tenant_access_statements("acme-1", main_database="voxlog", password_sha256_hex=digest,
                                          tables=("calls", "turns"), limits={"readonly": 1, "max_threads": 2,
                                                                             "timeout_overflow_mode": "throw"},
                                          quota={"queries": 10, "execution_time": 60})
    assert statements == [
        "CREATE SETTINGS PROFILE OR REPLACE vx_tenant_acme_1 SETTINGS readonly = 1, max_threads = 2, "
        "timeout_overflow_mode = 'throw'",
        f"CREATE USER OR REPLACE vx_tenant_acme_1 IDENTIFIED WITH sha256_hash BY '{digest}' "
        "DEFAULT DATABASE vx_tenant_acme_1 SETTINGS PROFILE 'vx_tenant_acme_1'",
        "CREATE QUOTA OR REPLACE vx_tenant_acme_1 FOR INTERVAL 1 hour MAX queries = 10, execution_time = 60 "
        "TO vx_tenant_acme_1",
        "GRANT SELECT ON vx_tenant_acme_1.* TO vx_tenant_acme_1",
        "GRANT SELECT ON voxlog.calls TO vx_tenant_acme_1",
        "CREATE ROW POLICY OR REPLACE vx_tenant_acme_1 ON voxlog.calls USING tenant_id = 'acme-1' TO vx_tenant_acme_1",
        "GRANT SELECT ON voxlog.turns TO vx_tenant_acme_1",
        "CREATE ROW POLICY OR REPLACE vx_tenant_acme_1 ON voxlog.turns USING tenant_id = 'acme-1' TO vx_tenant_acme_1",
    ]
    for statement in tenant_access_statements("acme-1", main_database="voxlog", password_sha256_hex=digest):
        # ClickHouse's own parser takes each; chDB refuses to run them (its one user has no ACCESS
        # MANAGEMENT, and no tenant user exists to grant to), so docker-compose's server runs them.
        assert store.query("SELECT formatQuerySingleLine({s:String})", {"s": statement}).rows[0][0]
        with pytest.raises(AnalyticsError, match=r"ACCESS_DENIED|UNKNOWN_ROLE"):
            store.command(statement)
    with pytest.raises(ValueError, match="tenant id"):
        tenant_access_statements("acme'; DROP", main_database="voxlog", password_sha256_hex=digest)


def test_a_tenant_user_logs_in_with_a_password_derived_from_voxlogs_own() -> None:
    dsn, password = tenant_login("https://voxlog:s3cret@ch.example:8443/voxlog?secure=1", "acme")
    assert dsn == f"https://vx_tenant_acme:{password}@ch.example:8443/vx_tenant_acme?secure=1"
    assert re.fullmatch(r"[0-9a-f]{64}", password)
    assert tenant_login("https://voxlog:s3cret@other-host/voxlog", "acme")[1] == password, "every gateway agrees"
    assert tenant_login("https://voxlog:another@ch.example:8443/voxlog", "acme")[1] != password
    assert tenant_login("https://voxlog:s3cret@ch.example:8443/voxlog", "globex")[1] != password
    assert "s3cret" not in dsn


def test_errors_say_what_is_wrong_with_the_query_not_how_voxlog_is_built() -> None:
    internals = ("t_0123456789ab", "vx_tenant_", "_projection", "system", "default", "FORMAT ", "SETTINGS")

    def said(message: str, query: str = "SELECT nothing FROM calls") -> str:
        return str(describe_failure(AnalyticsError(message), query, limits=TENANT_SQL_LIMITS, internals=internals))

    assert said("Code: 47. DB::Exception: Unknown expression identifier `nothing` in scope SELECT nothing FROM "
                "calls. (UNKNOWN_IDENTIFIER)") == "unknown column or alias: nothing"
    unknown = said("Code: 60. DB::Exception: Unknown table expression identifier 'x' in scope SELECT * FROM "
                   "t_0123456789ab.calls FINAL WHERE tenant_id = 'a'. (UNKNOWN_TABLE)", "SELECT * FROM x")
    assert unknown.startswith("unknown table: x; the tables are calls, turns, ")
    assert said("Code: 62. DB::Exception: Syntax error: failed at position 8 (x): x y z. Expected one of: "
                "something (SYNTAX_ERROR)", "SELECT  x y z") == "syntax error at position 8, near 'x y z'"
    assert said("Code: 62. DB::Exception: Syntax error: failed at position 8: ...", "SELECT  system.one") \
        == "syntax error at position 8", "the query's own words, unless they name a database"
    assert said("Code: 159. DB::Exception: Timeout exceeded: elapsed 10.1 s, maximum: 10 s. (TIMEOUT_EXCEEDED)") \
        == "the query was stopped: it ran longer than 10 s"
    assert said("Code: 43. DB::Exception: Illegal types String and UInt8 of arguments of function plus: In scope "
                "SELECT 'a' + 1\n SETTINGS readonly = '1'\n FORMAT Native. (ILLEGAL_TYPE_OF_ARGUMENT)") \
        == "Illegal types String and UInt8 of arguments of function plus"
    assert said("Code: 43. DB::Exception: Illegal type of t_0123456789ab.calls. (ILLEGAL_TYPE_OF_ARGUMENT)") \
        == "the query could not run (ClickHouse error 43)"
    assert said("HTTPDriver for http://ch.internal:8123 received ClickHouse error code 999") \
        == "the query could not run (ClickHouse error 999)"
    assert isinstance(describe_failure(AnalyticsError("Code: 62. DB::Exception: Syntax error (Multi-statements are "
                                                      "not allowed): failed at position 9"), "SELECT 1; SELECT 2",
                                       limits=TENANT_SQL_LIMITS, internals=internals), ForbiddenQuery)
