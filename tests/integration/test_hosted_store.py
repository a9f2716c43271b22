"""The embedded ClickHouse read through a store host (`projections.hosted_store`), as `voxlog serve`'s
gateway reads the engine its background process holds: what it returns, what it refuses, and what
a host that restarts, hangs or is reached without the key does to it. (The tenant SQL suites run
over a hosted connection too: tests/integration/test_tenant_sql*.py.)"""

from __future__ import annotations

import asyncio
import pickle
import secrets
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import pytest

from projections.hosted_store import HostedStore, StoreHost
from projections.store import AnalyticsError, AnalyticsStore, AnalyticsUnavailable
from projections.tables import CALLS
from projections.tenant_sql import TENANT_SQL_LIMITS, TenantSql


@pytest.fixture
def host_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # A Unix socket's path must be short: not under pytest's long tmp_path.
    folder = Path(f"/tmp/vx-{uuid.uuid4().hex[:8]}")
    folder.mkdir(mode=0o700)
    yield folder
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()


def own_host(store: AnalyticsStore, folder: Path) -> tuple[StoreHost, str]:
    """A host of its own for this process's engine (one the test may close), and `store`'s database."""
    database = str(store.query("SELECT currentDatabase()").rows[0][0])
    return StoreHost(store.dsn, folder / "s", secrets.token_bytes(32)), database


def test_results_keep_clickhouse_types_and_parameters_are_bound(hosted: HostedStore) -> None:
    result = hosted.query("SELECT {n:UInt32} AS n, {s:String} AS s, toDateTime('2026-12-06 10:00:00', 'UTC') AS at, "
                          "toDecimal64(1.25, 2) AS d, [1, 2] AS a, NULL AS nothing, "
                          "toUUID('00000000-0000-0000-0000-000000000001') AS u",
                          {"n": 7, "s": "it's; DROP TABLE calls"})
    assert result.columns == ("n", "s", "at", "d", "a", "nothing", "u")
    ((n, s, at, d, a, nothing, u),) = result.rows
    assert (n, s, d, a, nothing) == (7, "it's; DROP TABLE calls", Decimal("1.25"), [1, 2], None)
    assert isinstance(at, datetime)
    assert str(u) == "00000000-0000-0000-0000-000000000001"


def test_tables_are_made_and_read_in_the_connections_database(hosted: HostedStore, store: AnalyticsStore) -> None:
    hosted.create(CALLS)
    store.command(f"INSERT INTO {CALLS.name} (tenant_id, call_id) VALUES ('acme', 'c1')")
    assert hosted.query(f"SELECT tenant_id, call_id FROM {CALLS.name} FINAL").rows == [("acme", "c1")]
    hosted.command(f"INSERT INTO {CALLS.name} (tenant_id, call_id) VALUES ({{t:String}}, 'c2')", {"t": "globex"})
    assert store.query(f"SELECT count() FROM {CALLS.name}").rows == [(2,)]


def test_clickhouse_refusals_arrive_as_analytics_errors_with_their_code(hosted: HostedStore) -> None:
    with pytest.raises(AnalyticsError, match=r"Code: 47\b"):
        hosted.query("SELECT nothing")
    assert hosted.query("SELECT 1").rows == [(1,)], "the connection outlives a refused statement"


def test_a_connection_keeps_the_settings_it_opened_with(hosted: HostedStore) -> None:
    limited = hosted.connect(database=hosted.database or "default", settings=TENANT_SQL_LIMITS)
    assert limited.query("SELECT getSetting('readonly'), getSetting('max_threads')").rows == [(1, 2)]
    with pytest.raises(AnalyticsError, match="readonly"):
        limited.command("CREATE TABLE t (a UInt8) ENGINE = Memory")
    with pytest.raises(AnalyticsError, match="readonly"):
        limited.query("SELECT 1 SETTINGS readonly = 0")
    for statement in ("SET readonly = 0", "set max_threads = 64", "  USE system"):
        with pytest.raises(AnalyticsError, match="fixed when it opens"):
            limited.command(statement)
    assert hosted.query("SELECT getSetting('readonly')").rows == [(0,)], "another connection keeps its own"


def test_a_restarted_host_gives_a_connection_its_database_and_limits_again(
    store: AnalyticsStore, host_folder: Path
) -> None:
    host, database = own_host(store, host_folder)
    address, key = host.address, host.authkey
    limited = HostedStore(address, key, store.dsn, database=database, settings={"readonly": 1, "max_threads": 1})
    assert limited.query("SELECT currentDatabase(), getSetting('readonly')").rows == [(database, 1)]
    host.close()
    with pytest.raises(AnalyticsError, match="analytics unavailable"):
        limited.query("SELECT 1")
    host = StoreHost(store.dsn, address, key)
    try:
        # The first request after the restart opens a new connection, defined as the old one was.
        assert limited.query("SELECT currentDatabase(), getSetting('readonly'), getSetting('max_threads')"
                             ).rows == [(database, 1, 1)]
        with pytest.raises(AnalyticsError, match="readonly"):
            limited.command("CREATE TABLE t (a UInt8) ENGINE = Memory")
    finally:
        host.close()


def test_a_peer_without_the_key_gets_nothing_and_sends_nothing_that_is_run(
    store: AnalyticsStore, host_folder: Path
) -> None:
    address, key = host_folder / "s", secrets.token_bytes(32)
    host = StoreHost(store.dsn, address, key)
    try:
        with pytest.raises(AnalyticsError, match="analytics unavailable"):
            HostedStore(address, secrets.token_bytes(32), store.dsn).query("SELECT 1")
        # A pickle that would make a file if it were loaded, sent as a first message without the handshake.
        marker = host_folder / "pwned"
        payload = pickle.dumps(_MakesAFile(str(marker)))
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(address))
            raw.sendall(struct.pack("!i", len(payload)) + payload)
            raw.settimeout(30)
            try:
                while raw.recv(4096):  # the host's challenge, its refusal, then its end
                    raw.sendall(struct.pack("!i", len(payload)) + payload)
            except TimeoutError:
                pytest.fail("the host kept a peer without the key waiting")
            except OSError:
                pass  # reset: hung up
        assert not marker.exists()
        assert HostedStore(address, key, store.dsn).query("SELECT 1").rows == [(1,)], "the host still serves"
    finally:
        host.close()


class _MakesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_host_that_never_answers_fails_the_request_and_its_connection_is_not_reused(host_folder: Path) -> None:
    address, key = host_folder / "s", secrets.token_bytes(32)
    listener = Listener(str(address), family="AF_UNIX", authkey=key)
    opened: list[Connection] = []

    def silent_host() -> None:  # answers each connection's open, then nothing
        while True:
            try:
                connection = listener.accept()
            except OSError:
                return
            connection.recv()
            opened.append(connection)  # before its answer: counted by the time the client has it
            connection.send(("ok", None))

    threading.Thread(target=silent_host, daemon=True).start()
    try:
        hung = HostedStore(address, key, "chdb:///nowhere", timeout_s=2)
        with pytest.raises(AnalyticsError, match="no answer within"):
            hung.query("SELECT 1")
        with pytest.raises(AnalyticsError, match="no answer within"):
            hung.query("SELECT 2")
        assert len(opened) == 2, "a connection with an answer still due is dropped, never asked again"
    finally:
        listener.close()
        for connection in opened:
            connection.close()


def test_no_host_is_reported_as_analytics_unavailable(host_folder: Path) -> None:
    with pytest.raises(AnalyticsError, match=r"analytics unavailable: .*background process"):
        HostedStore(host_folder / "absent", secrets.token_bytes(32), "chdb:///x").query("SELECT 1")


def test_a_tenant_query_while_the_host_is_away_is_unavailable_not_a_bad_query(
    store: AnalyticsStore, host_folder: Path
) -> None:
    host, database = own_host(store, host_folder)
    address, key = host.address, host.authkey
    sql = TenantSql(HostedStore(address, key, store.dsn, database=database))
    assert sql.query("acme", "SELECT count() FROM calls").rows == [(0,)]
    host.close()
    # The API answers 503 (try again) for this, where a query's own fault is a 400 or 403.
    with pytest.raises(AnalyticsUnavailable):
        sql.query("acme", "SELECT count() FROM calls")
    with pytest.raises(AnalyticsUnavailable):
        TenantSql(HostedStore(address, key, store.dsn, database=database)).query("globex", "SELECT 1")


async def test_tenants_beyond_the_open_connections_are_let_go_and_come_back_with_their_limits(
    store: AnalyticsStore, host_folder: Path
) -> None:
    host, database = own_host(store, host_folder)
    try:
        sql = TenantSql(HostedStore(host.address, host.authkey, store.dsn, database=database), connections=2)
        for tenant in ("acme", "globex", "initech"):
            assert sql.query(tenant, "SELECT count() FROM calls").rows == [(0,)]
        assert list(sql._views) == ["globex", "initech"]
        for _ in range(200):  # the host's thread for acme's connection ends when it is let go
            if len(host._connections) == 3:  # the main connection and two tenants'
                break
            await asyncio.sleep(0.05)
        assert len(host._connections) == 3
        assert sql.query("acme", "SELECT count() FROM calls").rows == [(0,)]
        assert list(sql._views) == ["initech", "acme"]
        with pytest.raises(AnalyticsError, match="readonly"):
            sql._tenant_store("acme").command("CREATE TABLE t (a UInt8) ENGINE = Memory")
    finally:
        host.close()
