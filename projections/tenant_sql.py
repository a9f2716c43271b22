"""SQL for a tenant's analysts (`POST /v1/sql`): their rows only, whatever the query says.

Each tenant has a database of views, `vx_tenant_<id>`, one per analyst table, each `SELECT * ...
FINAL WHERE tenant_id = '<id>'`. A query runs with that database as its current one, read-only,
bounded in time and rows, after ClickHouse's own parser has shown (`EXPLAIN AST`) that it is one
SELECT that names no database, no table function and no function that reaches outside the tables
(files, URLs, other servers, dictionaries). So every table it can name is one of the tenant's
views.
"""

from __future__ import annotations

import re
from typing import Any

from projections.store import AnalyticsError, AnalyticsStore, QueryResult
from projections.tables import ANALYST_TABLES

TENANT_SQL_LIMITS: dict[str, Any] = {
    "readonly": 1,
    "max_execution_time": 10,
    "max_result_rows": 10_000,
    "result_overflow_mode": "break",
    "max_rows_to_read": 50_000_000,
}
_OUTSIDE = frozenset({
    "file", "url", "urlcluster", "s3", "s3cluster", "gcs", "azureblobstorage", "hdfs", "remote", "remotesecure",
    "cluster", "clusterallreplicas", "input", "executable", "mysql", "postgresql", "jdbc", "odbc", "mongodb",
    "redis", "sqlite", "dictionary", "joinget", "joingetornull", "getserversetting", "filesystemavailable",
    "filesystemcapacity", "filesystemunreserved", "currentdatabase", "hostname", "fqdn",
})
_AST_LINE = re.compile(r"^(?P<indent> *)(?P<node>\w+)(?: (?P<name>[^ ]+))?")


class ForbiddenQuery(ValueError):
    """A query a tenant may not run; the message says why."""


def tenant_database(tenant_id: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", tenant_id):
        raise ValueError(f"not a tenant id: {tenant_id!r}")
    return "vx_tenant_" + tenant_id.replace("-", "_")  # tenant ids have no '_', so this is one-to-one


_LEXEME = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`|--[^\n]*|/\*.*?\*/|;|[^'"`;/-]+|.""",
                     re.DOTALL)


def single_statement(sql: str) -> str:
    """The query without a trailing ';'; ForbiddenQuery if it holds more than one statement
    (embedded ClickHouse runs every statement of a multi-statement query)."""
    lexemes = _LEXEME.findall(sql)
    while lexemes and (not lexemes[-1].strip() or lexemes[-1] == ";" or lexemes[-1].startswith(("--", "/*"))):
        lexemes.pop()
    if ";" in lexemes:
        raise ForbiddenQuery("one statement at a time")
    return "".join(lexemes)


def check_query(store: AnalyticsStore, sql: str, databases: set[str]) -> str:
    """The query to run, if `sql` is one SELECT within the current database's tables; else ForbiddenQuery."""
    if "\x00" in sql:
        raise ForbiddenQuery("the query contains a NUL byte")
    sql = single_statement(sql)
    try:
        ast = [str(row[0]) for row in store.query(f"EXPLAIN AST {sql}", settings={"readonly": 1}).rows]
    except AnalyticsError as exc:
        raise ForbiddenQuery(f"not a single valid SELECT: {exc}") from exc
    if not ast or not ast[0].startswith(("SelectWithUnionQuery", "SelectIntersectExceptQuery")):
        raise ForbiddenQuery("only SELECT queries")
    parents: list[str] = []
    for line in ast:
        match = _AST_LINE.match(line)
        if match is None:
            continue
        depth, node, name = len(match["indent"]), match["node"], match["name"] or ""
        del parents[depth:]
        parent = parents[-1] if parents else ""
        parents.append(node)
        if node == "Function" and parent == "TableExpression":
            raise ForbiddenQuery(f"table function {name}() is not allowed")
        if node == "Function" and (name.lower() in _OUTSIDE or name.lower().startswith("dictget")):
            raise ForbiddenQuery(f"function {name}() is not allowed")
        if node in ("TableIdentifier", "Identifier") and "." in name:
            qualifier = name.split(".", 1)[0].strip("`\"")
            if node == "TableIdentifier" or qualifier in databases:
                raise ForbiddenQuery(f"{name}: name tables without a database")
    return sql


class TenantSql:
    """Runs tenants' queries against `store` (whose current database holds the analyst tables)."""

    def __init__(self, store: AnalyticsStore) -> None:
        self.store = store
        self._views: dict[str, AnalyticsStore] = {}

    def _tenant_store(self, tenant_id: str) -> AnalyticsStore:
        found = self._views.get(tenant_id)
        if found is not None:
            return found
        database = tenant_database(tenant_id)
        main = str(self.store.query("SELECT currentDatabase()").rows[0][0])
        self.store.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        for table in ANALYST_TABLES:
            self.store.create(table)
            # tenant_database() has checked the id: [a-z0-9-] only, safe between quotes.
            self.store.command(
                f"CREATE OR REPLACE VIEW {database}.{table.name} AS SELECT * FROM {main}.{table.name} FINAL "
                f"WHERE tenant_id = '{tenant_id}'")
        found = self._views[tenant_id] = AnalyticsStore(self.store.dsn, database=database)
        return found

    def query(self, tenant_id: str, sql: str) -> QueryResult:
        tenant_store = self._tenant_store(tenant_id)
        databases = {str(row[0]) for row in self.store.query("SELECT name FROM system.databases").rows}
        return tenant_store.query(check_query(tenant_store, sql, databases), settings=TENANT_SQL_LIMITS)
