"""voxlog's own ticket desk, for a tenant without one of its own (`tickets: {kind: voxlog}`): tickets
and their comments in a SQLite file of the tool worker's. Idempotent by key like every desk: the key is
the row's unique column, so a repeat answers the ticket it made."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from streams.connectors.base import CheckResult, ConnectorError, FailureKind, RateLimit, Ticket, TicketRequest


class BuiltinDesk:
    vendor = "voxlog"
    rate_limit = RateLimit(1000, 1.0, "a local SQLite file: no vendor limit")

    def __init__(self, path: Path, tenant_id: str) -> None:
        self._tenant = tenant_id
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS desk_tickets (
                id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, idempotency_key TEXT NOT NULL UNIQUE,
                subject TEXT NOT NULL, description TEXT NOT NULL, requester_phone TEXT NOT NULL,
                requester_name TEXT NOT NULL, priority TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'new');
            CREATE TABLE IF NOT EXISTS desk_comments (
                id INTEGER PRIMARY KEY, ticket_id INTEGER NOT NULL, idempotency_key TEXT NOT NULL UNIQUE,
                body TEXT NOT NULL);
        """)

    @staticmethod
    def ticket_id(row_id: int) -> str:
        return f"T{1000 + row_id}"

    def _row(self, ticket_id: str) -> tuple[int, str, str]:
        number = int(ticket_id[1:]) - 1000 if ticket_id[:1] == "T" and ticket_id[1:].isdigit() else -1
        row = self._db.execute("SELECT id, subject, status FROM desk_tickets WHERE id = ? AND tenant_id = ?",
                               (number, self._tenant)).fetchone()
        if row is None:
            raise ConnectorError(FailureKind.NOT_FOUND, f"no ticket {ticket_id[:40]!r}")
        return int(row[0]), str(row[1]), str(row[2])

    def create(self, request: TicketRequest, idempotency_key: str) -> Ticket:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO desk_tickets (tenant_id, idempotency_key, subject, description, requester_phone,"
                " requester_name, priority) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self._tenant, idempotency_key, request.subject, request.description, request.requester_phone,
                 request.requester_name, request.priority))
            row = self._db.execute("SELECT id, subject, status FROM desk_tickets WHERE idempotency_key = ?",
                                   (idempotency_key,)).fetchone()
        return Ticket(self.ticket_id(int(row[0])), str(row[2]), str(row[1]))

    def comment(self, ticket_id: str, body: str, idempotency_key: str) -> str:
        with self._lock:
            number, _, _ = self._row(ticket_id)
            self._db.execute("INSERT OR IGNORE INTO desk_comments (ticket_id, idempotency_key, body) VALUES (?, ?, ?)",
                             (number, idempotency_key, body))
            row = self._db.execute("SELECT id FROM desk_comments WHERE idempotency_key = ?",
                                   (idempotency_key,)).fetchone()
        return str(row[0])

    def status(self, ticket_id: str) -> Ticket:
        with self._lock:
            number, subject, status = self._row(ticket_id)
        return Ticket(self.ticket_id(number), status, subject)

    def tickets(self) -> list[dict[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT id, subject, description, status FROM desk_tickets WHERE tenant_id = ? "
                                    "ORDER BY id", (self._tenant,)).fetchall()
        return [{"id": self.ticket_id(r[0]), "subject": r[1], "description": r[2], "status": r[3]} for r in rows]

    def comments(self, ticket_id: str) -> list[str]:
        with self._lock:
            number, _, _ = self._row(ticket_id)
            rows = self._db.execute("SELECT body FROM desk_comments WHERE ticket_id = ? ORDER BY id",
                                    (number,)).fetchall()
        return [str(r[0]) for r in rows]

    def check(self) -> list[CheckResult]:
        with self._lock:
            self._db.execute("SELECT 1 FROM desk_tickets LIMIT 1").fetchall()
        return [CheckResult("voxlog's own desk", True, "tickets are kept by the tool worker")]

    def close(self) -> None:
        with self._lock:
            self._db.close()
