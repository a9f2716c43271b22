"""The tool worker: runs the side effects the core asks for, once each, and replies.

It consumes `tool.requested` commands from `voxlog.commands` in its consumer group, runs the tool
(built in: a calendar, a ticket desk, a webhook), and replies on `voxlog.tool_results` with
`tool.succeeded` or `tool.failed`. Each request carries an idempotency key; the result of a key is
stored with the side effect in one transaction, so a redelivered command (at-least-once) replies
with the stored result instead of booking twice. Retryable failures are tried again with backoff;
the last failure is dead-lettered and replied as such, so the call moves on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent, dead_letter_headers
from consumers.group_loop import run_in_group
from consumers.workers.state_file import open_state_db
from producers.log_producer import LogProducer
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import ToolFailed, ToolRequested, ToolSucceeded
from schemas.topics import COMMANDS, DEADLETTER, TOOL_RESULTS
from schemas.version import __version__
from streams.config.agents import AgentRouter, ToolDefinition

log = logging.getLogger(__name__)

WORKER = "voxlog.tool_worker"
GROUP = "voxlog-tools"


class ToolError(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ToolStore:
    """The worker's own state in one SQLite file: results by idempotency key, bookings, tickets."""

    def __init__(self, path: Path) -> None:
        self._db = open_state_db(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.executescript("""
                CREATE TABLE IF NOT EXISTS results (idempotency_key TEXT PRIMARY KEY, result_json TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS bookings (
                    id INTEGER PRIMARY KEY, tenant_id TEXT, call_id TEXT, day TEXT, time TEXT, note TEXT,
                    confirmation TEXT UNIQUE);
                CREATE TABLE IF NOT EXISTS tickets (
                    id INTEGER PRIMARY KEY, tenant_id TEXT, call_id TEXT, summary TEXT, ticket_id TEXT UNIQUE);
            """)

    def result(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT result_json FROM results WHERE idempotency_key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _effect(self, key: str, effect: Callable[[], str]) -> str:
        """Runs a side effect and stores its result under the idempotency key, in one transaction:
        either both happened or neither did."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = effect()
                self._db.execute("INSERT INTO results VALUES (?, ?)", (key, result))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return result

    def book(self, key: str, tenant_id: str, call_id: str, day: str, at: str, note: str) -> str:
        def effect() -> str:
            cursor = self._db.execute(
                "INSERT INTO bookings (tenant_id, call_id, day, time, note) VALUES (?, ?, ?, ?, ?)",
                (tenant_id, call_id, day, at, note),
            )
            confirmation = f"A{1000 + int(cursor.lastrowid or 0)}"
            self._db.execute("UPDATE bookings SET confirmation = ? WHERE id = ?", (confirmation, cursor.lastrowid))
            return json.dumps({"confirmation": confirmation, "when": f"{day} at {at}".strip()})

        return self._effect(key, effect)

    def open_ticket(self, key: str, tenant_id: str, call_id: str, summary: str) -> str:
        def effect() -> str:
            cursor = self._db.execute(
                "INSERT INTO tickets (tenant_id, call_id, summary) VALUES (?, ?, ?)", (tenant_id, call_id, summary)
            )
            ticket_id = f"T{1000 + int(cursor.lastrowid or 0)}"
            self._db.execute("UPDATE tickets SET ticket_id = ? WHERE id = ?", (ticket_id, cursor.lastrowid))
            return json.dumps({"ticket_id": ticket_id})

        return self._effect(key, effect)

    def remember(self, key: str, result: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO results VALUES (?, ?)", (key, result))

    def bookings(self, tenant_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT call_id, day, time, note, confirmation FROM bookings WHERE tenant_id = ? ORDER BY id",
                (tenant_id,),
            ).fetchall()
        return [dict(zip(("call_id", "day", "time", "note", "confirmation"), r, strict=True)) for r in rows]

    def tickets(self, tenant_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT call_id, summary, ticket_id FROM tickets WHERE tenant_id = ? ORDER BY id", (tenant_id,)
            ).fetchall()
        return [dict(zip(("call_id", "summary", "ticket_id"), r, strict=True)) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _arguments(request: ToolRequested) -> dict[str, Any]:
    try:
        arguments = json.loads(request.arguments_json)
    except ValueError as exc:
        raise ToolError(f"arguments are not JSON: {exc}", retryable=False) from exc
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object", retryable=False)
    return arguments


@dataclass(frozen=True)
class WebhookSigner:
    """Signs webhook bodies so the receiver can check they came from voxlog (HMAC-SHA256)."""

    secret: bytes

    def headers(self, body: bytes, timestamp: int) -> dict[str, str]:
        digest = hmac.new(self.secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        return {
            "X-Voxlog-Timestamp": str(timestamp),
            "X-Voxlog-Signature": f"v1={digest}",
            "Content-Type": "application/json",
        }


class ToolRunner:
    """Runs one tool call. Pure dispatch over the store and HTTP; no log I/O."""

    def __init__(self, store: ToolStore, router: AgentRouter, signer: WebhookSigner, http: httpx.AsyncClient) -> None:
        self.store = store
        self.router = router
        self.signer = signer
        self.http = http

    def definition(self, tenant_id: str, name: str) -> ToolDefinition:
        for agent in self.router.agents.values():
            if agent.tenant == tenant_id and (tool := agent.tool(name)) is not None:
                return tool
        raise ToolError(f"tenant {tenant_id} has no tool {name!r}", retryable=False)

    async def run(self, envelope: Envelope, request: ToolRequested) -> str:
        done = await asyncio.to_thread(self.store.result, request.idempotency_key)
        if done is not None:
            return done  # a redelivered command: the effect happened, reply the same
        tool = self.definition(envelope.tenant_id, request.tool)
        arguments = _arguments(request)
        if tool.kind == "calendar":
            return await asyncio.to_thread(
                self.store.book,
                request.idempotency_key,
                envelope.tenant_id,
                envelope.call_id,
                str(arguments.get("day", "")),
                str(arguments.get("time", "")),
                str(arguments.get("note", "")),
            )
        if tool.kind == "ticket":
            return await asyncio.to_thread(
                self.store.open_ticket,
                request.idempotency_key,
                envelope.tenant_id,
                envelope.call_id,
                str(arguments.get("summary", "")),
            )
        return await self._webhook(tool, envelope, request, arguments)

    async def _webhook(
        self, tool: ToolDefinition, envelope: Envelope, request: ToolRequested, arguments: Mapping[str, Any]
    ) -> str:
        if not tool.webhook_url:
            raise ToolError(f"tool {tool.name} has no webhook_url", retryable=False)
        body = json.dumps(
            {
                "tool": tool.name,
                "arguments": arguments,
                "call_id": envelope.call_id,
                "tenant_id": envelope.tenant_id,
                "idempotency_key": request.idempotency_key,
            },
            sort_keys=True,
        ).encode()
        headers = self.signer.headers(body, int(time.time()))
        headers["Idempotency-Key"] = request.idempotency_key
        try:
            response = await self.http.post(tool.webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ToolError(f"webhook {tool.webhook_url}: {exc!r}", retryable=True) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise ToolError(f"webhook answered {response.status_code}", retryable=True)
        if response.status_code >= 400:
            raise ToolError(f"webhook refused: {response.status_code} {response.text[:200]}", retryable=False)
        try:
            result = response.json() if response.content else {}
        except ValueError:
            result = {"body": response.text[:1000]}
        text = json.dumps(result, sort_keys=True)
        await asyncio.to_thread(self.store.remember, request.idempotency_key, text)
        return text


class ToolWorker:
    """The consumer loop around `ToolRunner`: commands in, replies out, retries, dead letters."""

    def __init__(
        self,
        backend: LogBackend,
        runner: ToolRunner,
        *,
        attempts: int = 3,
        backoff_s: float = 0.2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.runner = runner
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.codec = backend.codec
        self.ready = asyncio.Event()
        self.handled = 0

    async def run(self, stop: asyncio.Event) -> None:
        async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
            if isinstance(item.event.payload, ToolRequested):
                await self._handle(producer, item.event.envelope, item.event.payload, item.record)

        await run_in_group(self.backend, [COMMANDS], GROUP, stop, handle, ready=self.ready, codec=self.codec)

    async def _reply(self, producer: LogProducer, request_envelope: Envelope, payload: EventPayload) -> None:
        envelope = Envelope(
            event_id=f"{request_envelope.event_id}/{payload.EVENT_TYPE}/{getattr(payload, 'attempt', 0)}",
            tenant_id=request_envelope.tenant_id,
            call_id=request_envelope.call_id,
            seq=request_envelope.seq,
            type=payload.EVENT_TYPE,
            schema_version=payload.EVENT_VERSION,
            event_time_us=time.time_ns() // 1000,
            causation_id=request_envelope.event_id,
            correlation_id=request_envelope.correlation_id,
            producer=WORKER,
            producer_version=__version__,
        )
        data = self.codec.encode(Event(envelope, payload))
        await producer.send(TOOL_RESULTS, request_envelope.call_id.encode(), data)

    async def _handle(self, producer: LogProducer, envelope: Envelope, request: ToolRequested, record: Any) -> None:
        for attempt in range(1, self.attempts + 1):
            started = time.perf_counter()
            try:
                result = await self.runner.run(envelope, request)
            except Exception as exc:  # any failure becomes a reply: the call must not wait forever
                latency = int((time.perf_counter() - started) * 1000)
                retryable = exc.retryable if isinstance(exc, ToolError) else True
                last = not retryable or attempt == self.attempts
                await self._reply(
                    producer,
                    envelope,
                    ToolFailed(
                        tool_call_id=request.tool_call_id,
                        tool=request.tool,
                        error=str(exc) or repr(exc),
                        retryable=retryable,
                        attempt=attempt,
                        dead_lettered=last,
                        latency_ms=latency,
                    ),
                )
                if last:
                    await producer.send(
                        DEADLETTER,
                        record.key or b"",
                        record.value,
                        dead_letter_headers(record, f"tool failed: {exc}", GROUP),
                    )
                    break
                await self.sleep(self.backoff_s * 2 ** (attempt - 1))
                continue
            latency = int((time.perf_counter() - started) * 1000)
            await self._reply(
                producer,
                envelope,
                ToolSucceeded(
                    tool_call_id=request.tool_call_id,
                    tool=request.tool,
                    result_json=result,
                    attempt=attempt,
                    latency_ms=latency,
                ),
            )
            break
        self.handled += 1
