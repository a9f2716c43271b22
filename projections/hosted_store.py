"""The embedded ClickHouse held by one process and read by another.

chDB opens its data folder in one process only. `voxlog serve` gives that process, its background
process, the projections (which write), and the gateway reads through it: `StoreHost` serves
connections to the engine on a Unix socket, and a `HostedStore` is one such connection, as an
`Analytics` (`projections.store`).

- A connection is defined when it opens, for its life: its current database and its settings
  (the tenant SQL API's `readonly` and limits). A `HostedStore` whose socket broke opens a new
  connection with the same definition on its next request, so a host that restarted can never
  hand it a connection without its limits; statements that would change a connection's state
  (`SET`, `USE`) are refused, since a reconnection would not repeat them.
- Only the gateway's own process may connect: the socket is in a folder only its user can open,
  and both ends prove they hold the key the gateway made (`multiprocessing.connection`'s HMAC
  challenge) before anything else is read.
- A request that gets no answer within `timeout_s` fails (the connection is dropped, never reused
  with an answer still due) and is not retried: a statement is run once or reported failed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from projections.store import AnalyticsError, AnalyticsStore, AnalyticsUnavailable, QueryResult
from projections.tables import Table

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 60.0
"""Longer than any query may run (the tenant SQL API stops its own at 10 s), with room to queue
behind others: the engine takes one statement at a time."""

_OPERATIONS = frozenset({"command", "create", "query"})
_SESSION_STATEMENTS = ("SET", "USE")


class HostedStore:
    """One connection to the engine a `StoreHost` serves at `address`. Safe to share between threads:
    requests take turns."""

    def __init__(self, address: Path, authkey: bytes, dsn: str, *, database: str | None = None,
                 settings: Mapping[str, int | str] | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.address = address
        self._authkey = authkey
        self._dsn = dsn
        self.database = database
        self.settings = dict(settings or {})
        self.timeout_s = timeout_s
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    @property
    def dsn(self) -> str:
        """The engine's, in the host."""
        return self._dsn

    @property
    def embedded(self) -> bool:
        return True

    def describe(self) -> str:
        return f"embedded ClickHouse (chDB) {self._dsn.removeprefix('chdb://')}, held by voxlog's background process"

    def connect(self, *, database: str, settings: Mapping[str, int | str] | None = None) -> HostedStore:
        return HostedStore(self.address, self._authkey, self._dsn, database=database, settings=settings,
                           timeout_s=self.timeout_s)

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        words = sql.split(None, 1)
        if words and words[0].upper() in _SESSION_STATEMENTS:
            raise AnalyticsError(f"{words[0].upper()} is refused on a hosted connection: its database and settings "
                                 "are fixed when it opens (HostedStore.connect)")
        self._request("command", sql, dict(parameters or {}))

    def create(self, table: Table) -> None:
        self._request("create", table)

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None,
              settings: Mapping[str, Any] | None = None) -> QueryResult:
        result = self._request("query", sql, dict(parameters or {}), dict(settings or {}))
        assert isinstance(result, QueryResult)
        return result

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _request(self, operation: str, *arguments: Any) -> Any:
        with self._lock:
            if self._connection is not None and self._connection.poll(0):
                self._drop()  # readable while nothing is asked: the host closed it (it restarted); never sent to
            try:
                connection = self._connection or self._open()
                connection.send((operation, arguments))
                if not connection.poll(self.timeout_s):
                    raise TimeoutError(f"no answer within {self.timeout_s:.0f} s")
                status, value = connection.recv()
            except (OSError, EOFError, TimeoutError, AuthenticationError) as exc:
                self._drop()
                why = str(exc) or type(exc).__name__
                raise AnalyticsUnavailable(f"analytics unavailable: voxlog's background process, which holds "
                                     f"{self._dsn.removeprefix('chdb://')}, did not answer ({why})") from exc
        if status == "error":
            raise AnalyticsError(value)
        return value

    def _open(self) -> Connection:
        connection = Client(str(self.address), family="AF_UNIX", authkey=self._authkey)
        try:
            connection.send(("open", (self.database, self.settings)))
            if not connection.poll(self.timeout_s):
                raise TimeoutError(f"no answer within {self.timeout_s:.0f} s")
            status, value = connection.recv()
        except BaseException:
            connection.close()
            raise
        if status == "error":
            connection.close()
            raise AnalyticsError(value)
        self._connection = connection
        return connection

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class StoreHost:
    """Serves connections to the engine at `dsn` on the Unix socket `address` (made here; its folder
    must be one only this user can open), each in a thread of its own, until `close`."""

    def __init__(self, dsn: str, address: Path, authkey: bytes) -> None:
        self.dsn = dsn
        self.address = address
        self.authkey = authkey
        address.unlink(missing_ok=True)  # a socket left by a host that died
        # The key is checked in each connection's thread (not by accept, which would leave a peer that
        # failed it waiting on an open socket): nothing a peer sends is read as a request before.
        self._listener = Listener(str(address), family="AF_UNIX", backlog=64)
        self._closed = threading.Event()
        self._connections: set[Connection] = set()
        self._accepting = threading.Thread(target=self._accept, name="store-host", daemon=True)
        self._accepting.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as waking:
            waking.connect(str(self.address))  # accept returns, and finds the host closed
        self._accepting.join(5)
        self._listener.close()
        for connection in list(self._connections):
            # Shut down, not closed: its thread, waiting in recv, then sees the end and closes it.
            with socket.socket(fileno=connection.fileno()) as sock:
                sock.shutdown(socket.SHUT_RDWR)
                sock.detach()
        self.address.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                log.exception("the store host could not accept a connection")
                continue
            if self._closed.is_set():
                connection.close()
                return
            self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,), name="store-host-connection", daemon=True).start()

    def _serve(self, connection: Connection) -> None:
        store: AnalyticsStore | None = None
        try:
            try:
                deliver_challenge(connection, self.authkey)
                answer_challenge(connection, self.authkey)
            except AuthenticationError as exc:
                log.warning("the store host refused a connection: %s", exc)
                return
            operation, (database, settings) = connection.recv()
            if operation != "open":
                connection.send(("error", f"a connection opens first, not {operation!r}"))
                return
            try:
                store = AnalyticsStore(self.dsn, database=database, settings=settings)
            except AnalyticsError as exc:
                connection.send(("error", str(exc)))
                return
            connection.send(("ok", None))
            while True:
                operation, arguments = connection.recv()
                if operation not in _OPERATIONS:
                    connection.send(("error", f"no operation {operation!r}"))
                    continue
                try:
                    connection.send(("ok", getattr(store, operation)(*arguments)))
                except AnalyticsError as exc:
                    connection.send(("error", str(exc)))
                except Exception as exc:  # a request the store could not take: reported, the connection kept
                    log.exception("the store host failed a %s", operation)
                    connection.send(("error", f"the analytics store failed: {type(exc).__name__}"))
        except (EOFError, OSError):
            pass  # the client went away (or the host is closing)
        except (ValueError, TypeError) as exc:  # not a request of ours: the connection is closed
            log.warning("the store host closed a connection that sent %s", exc)
        finally:
            if store is not None:
                store.close()
            self._connections.discard(connection)
            connection.close()
