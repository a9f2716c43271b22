"""Where projections write and analysts read: ClickHouse, through clickhouse-connect.

Embedded by default: chDB, the ClickHouse engine in-process, under `VOXLOG_HOME/clickhouse`
(`chdb://` DSN); a ClickHouse server when `VOXLOG_CLICKHOUSE_DSN=http://user:pass@host:8123/db`.
Same client API, same SQL. The client is synchronous; callers on the event loop go through
`asyncio.to_thread`, and one lock serialises use of a client (chDB's session is one per process).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from projections.tables import Statement, Table


class AnalyticsError(Exception):
    """ClickHouse refused a statement: bad SQL, a limit reached, a read-only violation."""


class AnalyticsUnavailable(AnalyticsError):
    """ClickHouse could not be reached: the statement was not judged (try again later), whatever it was."""


@dataclass(frozen=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def _lock_for(dsn: str) -> threading.Lock:
    # chDB runs one engine per process (one data path): its clients take turns.
    with _locks_lock:
        return _locks.setdefault(dsn, threading.Lock())


def setting_value(value: int | str) -> str:
    """A setting's value as SQL: ours, constant (no quote to escape)."""
    return str(value) if isinstance(value, int) else f"'{value}'"


def embedded_dsn(home: Path) -> str:
    path = (home / "clickhouse").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"chdb://{path}"


class Analytics(Protocol):
    """What reads the analyst tables (the tenant SQL API, the console's call views, caller memory)
    needs of a connection: an `AnalyticsStore` in this process, or a `HostedStore` of the engine
    another process holds (`projections.hosted_store`)."""

    @property
    def dsn(self) -> str: ...

    @property
    def embedded(self) -> bool:
        """chDB, whose connections carry their own settings, rather than a server with users."""
        ...

    def describe(self) -> str: ...

    def connect(self, *, database: str, settings: Mapping[str, int | str] | None = None) -> Analytics:
        """Another connection to the same engine, whose current database is `database` and whose
        `settings` hold for its life (`readonly` set last, after which none can change)."""
        ...

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None: ...

    def create(self, table: Table) -> None: ...

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None,
              settings: Mapping[str, Any] | None = None) -> QueryResult: ...


class AnalyticsStore:
    """`database`: where the tables are (default: the DSN's own); tests give each a database of its own.
    `settings`: the connection's own, for its life (chDB only: a server's users have settings profiles)."""

    def __init__(self, dsn: str, *, database: str | None = None,
                 settings: Mapping[str, int | str] | None = None) -> None:
        self.dsn = dsn
        if settings and not self.embedded:
            raise ValueError("a connection's own settings are for the embedded engine; a server's come from "
                             "its user's settings profile")
        self._lock = _lock_for(dsn)
        with self._lock:
            try:
                self._client = clickhouse_connect.get_client(dsn=dsn)
            except ClickHouseError as exc:
                if "lock" in str(exc).lower() or "already" in str(exc).lower():
                    raise AnalyticsError(
                        f"the embedded ClickHouse at {dsn[len('chdb://'):]} is open in another voxlog process "
                        "(only one may open it): query through that one (`POST /v1/sql`), or stop it") from exc
                raise AnalyticsError(f"cannot open {self.describe()}: {_first_line(exc)}") from exc
            if database is not None:
                self._client.command(f"USE {database}")
            # `readonly` last: from it on, no setting of this connection changes.
            for name, value in sorted((settings or {}).items(), key=lambda item: item[0] == "readonly"):
                self._client.command(f"SET {name} = {setting_value(value)}")

    @classmethod
    def open(cls, dsn: str | None, home: Path) -> AnalyticsStore:
        return cls(dsn or embedded_dsn(home))

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb://")

    def describe(self) -> str:
        if self.embedded:
            return f"embedded ClickHouse (chDB) {self.dsn[len('chdb://'):]}"
        return f"ClickHouse {self.dsn.split('@')[-1]}"  # never the password

    def connect(self, *, database: str, settings: Mapping[str, int | str] | None = None) -> AnalyticsStore:
        return AnalyticsStore(self.dsn, database=database, settings=settings)

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            try:
                self._client.command(sql, parameters=dict(parameters or {}))
            except ClickHouseError as exc:
                raise AnalyticsError(_first_line(exc)) from exc

    def create(self, table: Table, *, new: bool = False) -> None:
        """Creates the table, or adds the columns a newer voxlog defines to one an older made (rows
        written before get the column's default until a rebuild). `new`: it was just dropped, so its
        CREATE makes it whole and its columns are not looked up."""
        self.command(table.ddl())
        if new:
            return
        have = {name for (name,) in self.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
            {"t": table.name}).rows}
        previous = None
        for column in table.columns:
            if column.name not in have:
                after = f" AFTER `{previous}`" if previous else " FIRST"
                self.command(f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS `{column.name}` {column.type}{after}")
            previous = column.name

    def run(self, statement: Statement) -> None:
        self.command(statement.sql, dict(statement.parameters))

    def drop(self, table: Table) -> None:
        self.command(f"DROP TABLE IF EXISTS {table.name}")

    def insert(self, table: Table, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._lock:
            try:
                self._client.insert(table.name, rows, column_names=table.column_names)
            except ClickHouseError as exc:
                raise AnalyticsError(_first_line(exc)) from exc

    def query(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> QueryResult:
        with self._lock:
            try:
                result = self._client.query(sql, parameters=dict(parameters or {}), settings=dict(settings or {}))
            except ClickHouseError as exc:
                raise AnalyticsError(_first_line(exc)) from exc
        return QueryResult(tuple(result.column_names), [tuple(row) for row in result.result_rows])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
