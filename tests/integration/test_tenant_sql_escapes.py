"""Hostile tenants against `POST /v1/sql`, through the real gateway on both log backends, and once
more straight against TenantSql: every way out we know of. Each attempt must be refused (403), fail
cleanly (400), or, for a heavy query, stop at ClickHouse's limits. No answer may carry another
tenant's rows, a database's name, or how voxlog is built (internal tables, the settings and format
the client appends, ClickHouse's own error text), and no file may be written."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from projections.store import Analytics, AnalyticsStore
from projections.tables import CALLS, TRANSCRIPTS, Table
from projections.tenant_sql import TENANT_SQL_LIMITS, ForbiddenQuery, QueryFailed, TenantSql
from streams.config.tenants import Limits, Tenants
from tests.integration.test_outbound_calls import agents_with_two_tenants, api
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

DOCS = Path(__file__).parents[2] / "docs" / "analytics.md"
SECRET = f"secret{uuid.uuid4().hex[:12]}"
"""In every row of the other tenant's: no answer to the demo tenant may hold it."""
LIMITS = {**TENANT_SQL_LIMITS, "max_execution_time": 2}
"""Production limits but the time: the same ClickHouse limit stops a CPU-bound query at 2 s as at
10, and the suite stays quick."""

REFUSED, ERROR, BOUNDED, ANSWERED = "refused", "error", "bounded", "answered"
"""403; 400; a heavy query stopped by ClickHouse (a 400 naming the limit, or the bound a function
has) or answered within the limits; 200 with the tenant's own rows."""


@dataclass(frozen=True)
class Attempt:
    family: str
    query: str
    outcome: frozenset[str]

    def __str__(self) -> str:
        return f"{self.family}: {self.query[:90]!r}"


def attempts(family: str, outcome: str | set[str], *queries: str) -> list[Attempt]:
    outcomes = frozenset({outcome} if isinstance(outcome, str) else outcome)
    return [Attempt(family, q, outcomes) for q in queries]


# {main}: the analyst tables' database; {other}: the other tenant's database of views; {outfile}: a
# file that must not appear; {existing}: a file whose content must not change.
ATTEMPTS = [
    *attempts("multiple statements", {REFUSED, ERROR},
              "SELECT $$ ' $$ ; SELECT name FROM system.databases -- '",
              "SELECT $$ ' $$ ; SELECT * FROM {main}.transcripts -- '",
              "SELECT $$ ' $$ ; SELECT query FROM system.processes -- '",
              "SELECT $$ ; $$ AS a; SELECT * FROM {main}.calls",
              "SELECT $tag$ ' ; $tag$; SELECT * FROM {main}.calls -- '",
              "SELECT $a$ $$ ; $a$ ; SELECT name FROM system.databases",
              "SELECT ';' ; SELECT * FROM {main}.calls",
              'SELECT ";" FROM calls; SELECT * FROM {main}.calls',
              "SELECT `;` FROM calls; SELECT * FROM {main}.calls",
              "SELECT 'a\\';' ; SELECT * FROM {main}.calls -- '",
              "SELECT 'a'';' ; SELECT * FROM {main}.calls",
              "SELECT 1 -- ;\n; SELECT * FROM {main}.calls",
              "SELECT 1 -- '\n; SELECT name FROM system.databases -- '",
              "SELECT 1 # ' \n ; SELECT name FROM system.databases -- '",
              "SELECT 1 # mismatched ' \" ` $$ \n; SELECT name FROM system.databases",
              "SELECT 1 #! ;\n; SELECT * FROM {main}.calls",
              "SELECT 1 /* ; */ ; SELECT * FROM {main}.calls",
              "SELECT 1 /* /* */ ; SELECT * FROM {main}.calls */ ; SELECT name FROM system.databases",
              "SELECT 1 /* /* */ */ ; SELECT name FROM system.databases",
              "SELECT 1; SELECT name FROM system.databases",
              "SELECT 1;SELECT 2",
              "SELECT 1 ;; SELECT 2",
              "SELECT 1; -- \n SELECT name FROM system.databases",
              "SELECT 1\n;\nINSERT INTO calls (call_id) VALUES ('x')",
              "SELECT 1; DROP TABLE calls",
              "SELECT $$ $$; SELECT * FROM {other}.calls",
              "SELECT count() FROM transcripts WHERE text = $$'$$; SELECT text FROM {main}.transcripts",
              "SELECT 1 /* unterminated ; SELECT name FROM system.databases",
              "SELECT 'unterminated ; SELECT name FROM system.databases",
              "SELECT $$unterminated ; SELECT 1",
              "SELECT `unterminated ; SELECT 1",
              "SELECT 1 /* /* nested, unterminated */ ; SELECT name FROM system.databases"),
    *attempts("other databases", {REFUSED, ERROR},
              "SELECT * FROM {main}.calls",
              "SELECT * FROM `{main}`.`transcripts`",
              'SELECT * FROM "{main}"."transcripts"',
              "SELECT * FROM default.calls",
              "SELECT * FROM INFORMATION_SCHEMA.TABLES",
              "SELECT * FROM information_schema.tables",
              "SELECT * FROM {other}.calls",
              "SELECT * FROM vx_tenant_demo.calls",
              "SELECT * FROM calls AS c JOIN {other}.calls AS o USING (call_id)",
              "SELECT count() FROM calls WHERE call_id IN (SELECT call_id FROM {main}.calls)",
              "SELECT count() FROM calls WHERE (tenant_id, call_id) IN {main}.calls",
              "SELECT {main}.calls.call_id FROM calls",
              "SELECT * FROM `system.one`",
              "SELECT system.one.dummy FROM calls",
              "SELECT * FROM {main}._projection_offsets",
              "SELECT * FROM _projection_offsets",
              "SELECT * FROM ѕystem.tables",
              "SELECT * FROM sys\u200btem.tables"),
    *attempts("system tables", {REFUSED, ERROR},
              "SELECT * FROM system.tables", "SELECT * FROM system.processes", "SELECT * FROM system.query_log",
              "SELECT * FROM system.settings", "SELECT * FROM system.users", "SELECT * FROM system.parts",
              "SELECT * FROM system.columns", "SELECT * FROM system.functions", "SELECT * FROM system.one",
              "SELECT * FROM system.numbers LIMIT 1",
              "SELECT count() FROM calls WHERE call_id IN (SELECT query FROM system.processes)"),
    *attempts("table functions", {REFUSED, ERROR},
              "SELECT * FROM numbers(10)", "SELECT * FROM numbers_mt(10)", "SELECT * FROM zeros(1)",
              "SELECT * FROM merge('{main}', '.*')", "SELECT * FROM merge(REGEXP('.*'), '.*')",
              "SELECT * FROM remote('127.0.0.1', {main}.calls)", "SELECT * FROM remoteSecure('127.0.0.1', system.one)",
              "SELECT * FROM cluster('default', system.one)",
              "SELECT * FROM file('/etc/passwd', 'LineAsString')",
              "SELECT * FROM url('http://127.0.0.1:9/', 'CSV', 'a String')",
              "SELECT * FROM s3('http://127.0.0.1:9/b/k.csv', 'CSV', 'a String')",
              "SELECT * FROM input('a String')", "SELECT * FROM generateRandom('a String') LIMIT 1",
              "SELECT * FROM view(SELECT * FROM {main}.calls)", "SELECT * FROM loop(calls) LIMIT 1",
              "SELECT * FROM values('a String', 'x')", "SELECT * FROM format(CSV, 'a\\n')",
              "SELECT * FROM executable('ls', 'CSV', 'a String')",
              "SELECT * FROM mysql('127.0.0.1:9', 'd', 't', 'u', 'p')",
              "SELECT * FROM postgresql('127.0.0.1:9', 'd', 't', 'u', 'p')",
              "SELECT * FROM sqlite('/tmp/x.db', 't')", "SELECT * FROM generate_series(1, 10)",
              "SELECT * FROM viewIfPermitted(SELECT * FROM {main}.calls ELSE null('a String'))",
              "SELECT * FROM calls, numbers(5)",
              "SELECT count() FROM calls WHERE call_id IN (SELECT toString(number) FROM numbers(3))",
              "SELECT * FROM python('x')", "SELECT * FROM fuzzJSON('{{\"a\": 1}}') LIMIT 1"),
    *attempts("dictionaries and joins", {REFUSED, ERROR},
              "SELECT dictGet('d', 'a', 1)", "SELECT dictGetString('d', 'a', toUInt64(1))",
              "SELECT dictHas('d', 1)", "SELECT dictGetOrDefault('d', 'a', 1, 'x')",
              "SELECT * FROM dictionary('d')", "SELECT joinGet('{main}.j', 'a', 1)",
              "SELECT joinGetOrNull('j', 'a', 1)"),
    *attempts("settings", {REFUSED, ERROR},
              "SELECT 1 SETTINGS max_execution_time = 1000",
              "SELECT count() FROM calls SETTINGS readonly = 0, allow_ddl = 1",
              "SELECT * FROM (SELECT 1 SETTINGS readonly = 0)",
              "SELECT 1 SETTINGS limit = 0",
              "WITH 1 AS x SELECT x SETTINGS max_result_rows = 0",
              "SELECT * FROM calls UNION ALL SELECT * FROM calls SETTINGS max_memory_usage = 0",
              "SET readonly = 0", "SET max_execution_time = 0",
              "SELECT getSetting('max_memory_usage')", "SELECT getSettingOrDefault('readonly', 1)",
              "SELECT getServerSetting('path')"),
    *attempts("output clauses", {REFUSED, ERROR},
              "SELECT 'x' INTO OUTFILE '{outfile}' TRUNCATE",
              "SELECT 'x' INTO OUTFILE '{outfile}'",
              "SELECT 'x' INTO OUTFILE '{outfile}' APPEND",
              "SELECT 'x' INTO OUTFILE '{existing}' TRUNCATE",
              "SELECT 'x' INTO OUTFILE '{existing}' APPEND",
              "SELECT 'x' INTO OUTFILE '{outfile}' AND STDOUT",
              "SELECT 'x' INTO OUTFILE '{outfile}' COMPRESSION 'gzip'",
              "SELECT 'x' INTO OUTFILE '{outfile}' FORMAT CSV",
              "SELECT 1 INTO OUTFILE '{outfile}' ; SELECT 2",
              "SELECT * FROM (SELECT 1 INTO OUTFILE '{outfile}')",
              "SELECT 'x' FORMAT JSON", "SELECT 'x' FORMAT Native", "SELECT 'x' FORMAT TabSeparated",
              "SELECT 'x' FORMAT TabSeparated SETTINGS max_threads = 1",
              "INSERT INTO FUNCTION file('{outfile}', 'CSV', 'a String') VALUES ('x')"),
    *attempts("output clauses", ANSWERED, "SELECT count() FROM calls GROUP BY tenant_id WITH TOTALS"),
    *attempts("introspection", {REFUSED, ERROR},
              "SELECT version()", "SELECT buildId()", "SELECT currentSchemas(true)", "SELECT hostName()",
              "SELECT hostname()", "SELECT FQDN()", "SELECT currentDatabase()", "SELECT DATABASE()",
              "SELECT SCHEMA()", "SELECT currentUser()", "SELECT user()", "SELECT timezone()",
              "SELECT serverTimezone()", "SELECT uptime()",
              "SELECT hasColumnInTable('{main}', 'calls', 'call_id')",
              "SELECT hasColumnInTable('{other}', 'calls', 'call_id')", "SELECT getMacro('x')", "SELECT tcpPort()",
              "SELECT filesystemCapacity()", "SELECT revision()", "SELECT serverUUID()", "SELECT query_id()",
              "SELECT currentProfiles()", "SELECT chdb()", "SELECT displayName()", "SELECT VERSION()",
              "SELECT Version()", "SELECT `version`()", "SELECT versionIf(1)", "SELECT arrayReduce('max', [1])",
              "SELECT arrayMap(x -> version(), [1])", "SELECT count() FROM calls WHERE hostName() != ''",
              "SELECT maxIf(version(), 1)", "SELECT * APPLY(version) FROM calls", "SELECT throwIf(1)",
              "SELECT count() FROM calls SAMPLE 0.5"),
    *attempts("heavy", BOUNDED,
              "SELECT count() FROM (SELECT arrayJoin(range(1000000000)))",
              "SELECT length(repeat('x', 2000000000))",
              "SELECT sum(cityHash64(a, b)) FROM (SELECT arrayJoin(range(100000)) AS a) AS x, "
              "(SELECT arrayJoin(range(100000)) AS b) AS y",
              "SELECT count() FROM calls AS a, calls AS b, calls AS c, calls AS d, calls AS e",
              "SELECT groupArray(repeat('x', 1000)) FROM (SELECT arrayJoin(range(2000000)))",
              "SELECT arrayJoin(range(100000)) AS a",
              "SELECT repeat('x', 100000) FROM (SELECT arrayJoin(range(10000)))",
              "SELECT arrayMap(x -> arrayMap(y -> x * y, range(100000)), range(100000))",
              "SELECT uniqExact(x) FROM (SELECT arrayJoin(range(300000000)) AS x)",
              "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r) SELECT count() FROM r",
              "SELECT " + "(" * 3000 + "1" + ")" * 3000,
              "SELECT " + "1 + " * 4000 + "1",
              "SELECT " + ", ".join(["1"] * 6000)),
    *attempts("heavy", {REFUSED, ERROR}, "SELECT sleep(3)", "SELECT sleepEachRow(1) FROM calls"),
    *attempts("not a SELECT", {REFUSED, ERROR},
              "INSERT INTO calls (call_id) VALUES ('x')", "INSERT INTO calls SELECT * FROM calls",
              "ALTER TABLE calls DELETE WHERE 1", "ALTER TABLE calls UPDATE turns = 0 WHERE 1",
              "DELETE FROM calls WHERE 1", "DROP TABLE calls", "DROP DATABASE vx_tenant_demo",
              "TRUNCATE TABLE calls", "CREATE TABLE t (a Int8) ENGINE = Memory",
              "CREATE VIEW v AS SELECT * FROM {main}.calls", "CREATE FUNCTION f AS x -> x",
              "CREATE USER u", "GRANT ALL ON *.* TO default", "SYSTEM FLUSH LOGS", "SYSTEM SHUTDOWN",
              "KILL QUERY WHERE 1", "OPTIMIZE TABLE calls FINAL", "EXPLAIN SELECT 1",
              "EXPLAIN QUERY TREE SELECT * FROM {main}.calls", "SHOW TABLES", "SHOW DATABASES",
              "SHOW CREATE TABLE calls", "DESCRIBE TABLE calls", "DESC calls", "USE system", "EXISTS TABLE calls",
              "WATCH calls", "DETACH TABLE calls", "RENAME TABLE calls TO x", "CHECK TABLE calls",
              "BACKUP TABLE calls TO File('x')", "UNDROP TABLE calls", "BEGIN TRANSACTION"),
    *attempts("unicode and NUL", {REFUSED, ERROR},
              "SELECT 1\x00; SELECT name FROM system.databases",
              "SELECT '\x00' FROM calls",
              "SELECT 1\uff1b SELECT name FROM system.databases",
              "SELECT 1 \u037e SELECT name FROM system.databases",
              "SELECT 1 /* \u2028 */ ; SELECT name FROM system.databases",
              "SELECT `a\\n    Function file` FROM calls",
              "SELECT `a\n Function version` FROM calls",
              "SELECT `system.one`.dummy FROM calls",
              "SELECT * FROM calls AS `x (alias y` WHERE `x (alias y`.call_id IN system.one"),
    *attempts("unicode and NUL", ANSWERED, "SELECT 1 AS `x (children 3)`", "SELECT char(59) AS semicolon"),
    *attempts("CTEs that reach out", {REFUSED, ERROR},
              "WITH x AS (SELECT * FROM {main}.calls) SELECT * FROM x",
              "WITH x AS (SELECT * FROM system.tables) SELECT * FROM x",
              "WITH x AS (SELECT * FROM numbers(10)) SELECT * FROM x",
              "WITH x AS (SELECT version() AS v) SELECT v FROM x",
              "WITH calls AS (SELECT * FROM {other}.calls) SELECT * FROM calls",
              "WITH (SELECT hostName()) AS h SELECT h",
              "WITH file('/etc/passwd') AS f SELECT f",
              "SELECT * FROM (WITH y AS (SELECT * FROM system.one) SELECT * FROM y)",
              "WITH (SELECT groupArray(text) FROM {main}.transcripts) AS x SELECT x"),
    *attempts("own rows only", ANSWERED,
              "SELECT * FROM calls WHERE tenant_id = 'other'",
              "SELECT count() FROM transcripts WHERE 1 OR tenant_id != 'demo'",
              "SELECT * FROM transcripts AS a, transcripts AS b WHERE a.tenant_id != b.tenant_id"),
]

LEGITIMATE = [
    "SELECT count(DISTINCT call_id), countIf(turns > 0), COUNT(*), Sum(turns), avgOrNull(turns) FROM calls",
    "WITH q AS (SELECT call_id AS x FROM calls) SELECT q.x FROM q ORDER BY q.x",
    "SELECT call_id, row_number() OVER (PARTITION BY agent_id ORDER BY started_at) AS n FROM calls",
    "SELECT toStartOfDay(started_at) AS day, quantile(0.9)(duration_ms) FROM calls GROUP BY day ORDER BY day",
    "SELECT JSONExtractString(arguments, 'date') AS date, count() FROM tool_calls GROUP BY date",
    "SELECT speaker, text FROM transcripts FINAL ORDER BY call_id, seq LIMIT 50",
    "SELECT call_id FROM calls UNION ALL SELECT call_id FROM transcripts",
    "SELECT c.call_id, count() FROM calls AS c JOIN transcripts AS t ON t.call_id = c.call_id GROUP BY c.call_id",
    "SELECT multiIf(turns > 3, 'long', turns > 0, 'short', 'none') AS kind, count() FROM calls GROUP BY kind",
    "SELECT dateDiff('second', started_at, now()) AS age_s, formatDateTime(started_at, '%F') FROM calls",
    "SELECT arrayStringConcat(groupArray(text), ' ') FROM transcripts GROUP BY call_id",
    "SELECT 'semi;colon' AS a, $$dollar ; quoted$$ AS b -- a comment; with a semicolon\n;",
    "SELECT count() AS \"Total calls\" FROM calls",
]


def doc_queries() -> list[str]:
    """The queries docs/analytics.md shows analysts: its ```sql blocks and its `voxlog sql` lines."""
    text = DOCS.read_text()
    blocks = [q.strip() for q in re.findall(r"```sql\n(.*?)```", text, re.DOTALL)]
    commands = [m.replace('\\"', '"') for m in re.findall(r'^voxlog sql (?:--\S+ \S+ )?"(.*)"$', text, re.MULTILINE)]
    return blocks + commands


def seed(store: AnalyticsStore) -> None:
    """Two tenants' rows, the other's all marked with SECRET."""
    for table in (CALLS, TRANSCRIPTS):
        store.create(table)
    store.insert(CALLS, [call_row("demo", f"call-demo-{i}") for i in range(3)]
                 + [call_row("other", f"call-{SECRET}-{i}") for i in range(2)])
    store.insert(TRANSCRIPTS, [transcript_row("demo", "call-demo-0", "hello from demo"),
                               transcript_row("other", f"call-{SECRET}-0", f"{SECRET} the other tenant's words")])


def row(table: Table, **values: Any) -> tuple[Any, ...]:
    defaults = {c.name: 0 if c.type.startswith(("UInt", "Float")) else "" for c in table.columns}
    defaults.update(values)
    return tuple(defaults[c.name] for c in table.columns)


def call_row(tenant: str, call_id: str) -> tuple[Any, ...]:
    return row(CALLS, tenant_id=tenant, call_id=call_id, agent_id="front-desk", started_at=datetime.now(UTC),
               ended_at=None, duration_ms=None, turns=2, _version=1)


def transcript_row(tenant: str, call_id: str, text: str) -> tuple[Any, ...]:
    return row(TRANSCRIPTS, tenant_id=tenant, call_id=call_id, seq=1, at=datetime.now(UTC), speaker="caller",
               text=text, start_ms=None, end_ms=None, confidence=None, _version=1)


@dataclass
class Scene:
    """Where an attempt runs: names to put in its text, and what must stay as it was."""

    main: str
    folder: Path

    @property
    def outfile(self) -> Path:
        return self.folder / "v.txt"

    @property
    def existing(self) -> Path:
        return self.folder / "existing.txt"

    def text(self, attempt: Attempt) -> str:
        return attempt.query.format(main=self.main, other="vx_tenant_other", outfile=self.outfile,
                                    existing=self.existing)


LEAKS = re.compile(r"(?i)\bsystem\b|\bdefault\b|information_schema|vx_tenant_|_projection|FORMAT Native|"
                   r"SETTINGS \w+ =|DB::Exception|Code: \d|Traceback|26\.\d+\.\d|chdb://|clickhouse_connect")


def escapes(attempt: Attempt, scene: Scene, status: int, body: str) -> list[str]:
    """What is wrong with the answer to `attempt`: none for a clean refusal or a bounded answer."""
    found = []
    outcome = {403: REFUSED, 400: ERROR, 200: ANSWERED}.get(status, f"HTTP {status}")
    if outcome not in attempt.outcome and not (BOUNDED in attempt.outcome and outcome in (ERROR, ANSWERED)):
        found.append(f"{outcome} ({body[:200]})")
    if SECRET in body or scene.main in body:
        found.append(f"another tenant's rows or an internal name: {body[:300]}")
    if leak := LEAKS.search(body):
        found.append(f"{leak.group(0)!r} in {body[:300]}")
    if outcome == ANSWERED:
        answer = json.loads(body)
        if answer["row_count"] > LIMITS["max_result_rows"]:
            found.append(f"{answer['row_count']} rows")
        if "tenant_id" in answer["columns"]:
            at = answer["columns"].index("tenant_id")
            found.extend(f"tenant {r[at]}'s row" for r in answer["rows"] if r[at] != "demo")
    if scene.outfile.exists():
        found.append(f"{scene.outfile} was written")
    if scene.existing.read_text() != "untouched\n":
        found.append(f"{scene.existing} was changed")
    return found


@pytest.fixture(params=["in-process", "hosted"])
async def gateway(request: pytest.FixtureRequest, log_bootstrap: str | None, store: AnalyticsStore,
                  tmp_path: Path) -> AsyncIterator[LocalStack]:
    """A gateway reading the test's own database in this process's ClickHouse, there or (as `voxlog
    serve`'s does) through a store host."""
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=log_bootstrap,
                        agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    seed(store)
    analytics: Analytics = store if request.param == "in-process" else request.getfixturevalue("hosted")
    async with local_stack(settings) as stack:
        stack.gateway.analytics = analytics
        stack.gateway._tenant_sql = TenantSql(analytics, limits=LIMITS)
        # Hundreds of attempts in seconds from one key: the key's rate limit would answer 429 before the
        # SQL checks were reached (the limit has tests of its own).
        stack.gateway.tenants = Tenants({t.id: t.model_copy(update={"limits": Limits(api_burst=1_000_000)})
                                         for t in stack.gateway.tenants.tenants.values()})
        yield stack


@pytest.fixture(scope="module")
def seeded(chdb_engine: AnalyticsStore) -> TenantSql:
    """One database for every direct attempt: what one of them did, the next would see."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    chdb_engine.command(f"CREATE DATABASE {database}")
    store = AnalyticsStore(chdb_engine.dsn, database=database)
    seed(store)
    return TenantSql(store, limits=LIMITS)


def new_scene(store: Analytics, folder: Path) -> Scene:
    found = Scene(str(store.query("SELECT currentDatabase()").rows[0][0]), folder)
    found.folder.mkdir()
    found.existing.write_text("untouched\n")
    return found


def test_the_suite_covers_every_family() -> None:
    assert len({a.query for a in ATTEMPTS}) == len(ATTEMPTS) >= 80
    assert {a.family for a in ATTEMPTS} == {
        "multiple statements", "other databases", "system tables", "table functions", "dictionaries and joins",
        "settings", "output clauses", "introspection", "heavy", "not a SELECT", "unicode and NUL",
        "CTEs that reach out", "own rows only"}


@pytest.mark.slow
async def test_no_attempt_escapes_through_the_api(gateway: LocalStack, store: AnalyticsStore, tmp_path: Path) -> None:
    scene = new_scene(store, tmp_path / "files")
    problems: list[str] = []
    for attempt in ATTEMPTS:
        answer = await api(gateway, "POST", "/v1/sql", json={"query": scene.text(attempt)})
        problems.extend(f"{attempt} -> {p}" for p in escapes(attempt, scene, answer.status_code, answer.text))
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
async def test_what_analysts_write_still_works_through_the_api(gateway: LocalStack) -> None:
    queries = doc_queries()
    assert len(queries) >= 12, "the docs' examples were found"
    for query in queries + LEGITIMATE:
        answer = await api(gateway, "POST", "/v1/sql", json={"query": query})
        assert answer.status_code == 200, f"{query}: {answer.text}"
        assert SECRET not in answer.text


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[f"{a.family}-{i}" for i, a in enumerate(ATTEMPTS)])
def test_no_attempt_escapes_tenant_sql(attempt: Attempt, seeded: TenantSql, tmp_path: Path) -> None:
    scene = new_scene(seeded.store, tmp_path / "files")
    try:
        result = seeded.query("demo", scene.text(attempt))
    except ForbiddenQuery as exc:
        status, body = 403, str(exc)
    except QueryFailed as exc:
        status, body = 400, str(exc)
    else:
        status = 200
        body = json.dumps({"columns": list(result.columns), "rows": result.rows, "row_count": len(result.rows)},
                          default=str)
    assert escapes(attempt, scene, status, body) == []
