"""The tool worker: runs the side effects the core asks for, once each, and replies.

It consumes `tool.requested` commands from `voxlog.commands` in its consumer group and runs each as a
connector operation (streams/connectors/operations.py) in the tenant's own systems: its CRM, ticket
desk, calendar or webhooks. It replies on `voxlog.tool_results` with `tool.succeeded` (naming the
connector and the remote object) or `tool.failed`, and writes an audit record for every side effect.

Once each: a result is stored under the request's idempotency key, so a redelivered command replies
with the stored result; and the key reaches the remote system (streams/connectors/base.py), so a worker
killed between the vendor's answer and storing it makes nothing twice when the command comes again.

Retries only for what is safe to retry (429, 5xx, no answer), honouring Retry-After, with exponential
backoff and jitter; each connector is paced at its vendor's published rate. Nothing runs or is retried
past the command's deadline (when the call stops waiting): the call has told the caller it could not,
and offered another way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent, dead_letter_headers
from consumers.group_loop import run_in_group
from consumers.workers.state_file import open_state_db
from producers.event_writer import standalone_event
from producers.log_producer import LogProducer
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import AuditRecorded, ToolFailed, ToolRequested, ToolSucceeded
from schemas.topics import AUDIT, COMMANDS, DEADLETTER, TOOL_RESULTS
from schemas.version import __version__
from streams.config.agents import AgentRouter, ToolDefinition
from streams.connectors.base import ConnectorError, FailureKind
from streams.connectors.operations import (
    Connectors,
    OperationResult,
    ToolCall,
    connector_of,
    post_webhook,
    run_operation,
)
from streams.connectors.webhook_http import WebhookTarget
from streams.rate_limit import TokenBucket

log = logging.getLogger(__name__)

WORKER = "voxlog.tool_worker"
GROUP = "voxlog-tools"
READ_ONLY = frozenset({"crm.find_contact", "tickets.status", "calendar.free_slots"})
"""Operations that change nothing: no audit record of a side effect."""
REPLY_MARGIN_S = 0.3
"""Stop this long before the deadline, so the reply reaches the call before it gives up."""


class ToolError(Exception):
    """A tool call that cannot run at all (an unknown tool, arguments that are not JSON)."""


@dataclass(frozen=True)
class StoredResult:
    result_json: str
    connector: str
    remote_id: str


class ToolStore:
    """The worker's own state in one SQLite file: each idempotency key's result."""

    def __init__(self, path: Path) -> None:
        self.folder = path.parent
        self._db = open_state_db(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("""CREATE TABLE IF NOT EXISTS outcomes (
                idempotency_key TEXT PRIMARY KEY, result_json TEXT NOT NULL, connector TEXT NOT NULL,
                remote_id TEXT NOT NULL)""")

    def result(self, key: str) -> StoredResult | None:
        with self._lock:
            row = self._db.execute("SELECT result_json, connector, remote_id FROM outcomes WHERE idempotency_key = ?",
                                   (key,)).fetchone()
        return None if row is None else StoredResult(str(row[0]), str(row[1]), str(row[2]))

    def remember(self, key: str, outcome: StoredResult) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO outcomes VALUES (?, ?, ?, ?)",
                             (key, outcome.result_json, outcome.connector, outcome.remote_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _arguments(request: ToolRequested) -> dict[str, Any]:
    try:
        arguments = json.loads(request.arguments_json)
    except ValueError as exc:
        raise ToolError(f"arguments are not JSON: {exc}") from exc
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    return arguments


class ToolRunner:
    """Runs one tool call against the tenant's connectors. No log I/O."""

    def __init__(self, store: ToolStore, router: AgentRouter, connectors_for: Callable[[str], Connectors],
                 webhook_secret: SecretStr, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.router = router
        self.connectors_for = connectors_for
        self._webhook_secret = webhook_secret
        self._url_targets: dict[tuple[str, float], WebhookTarget] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.clock = clock

    def definition(self, tenant_id: str, name: str) -> ToolDefinition:
        for agent in self.router.agents.values():
            if agent.tenant == tenant_id and (tool := agent.tool(name)) is not None:
                return tool
        raise ToolError(f"tenant {tenant_id} has no tool {name!r}")

    def pacing(self, tenant_id: str, operation: str, tool: ToolDefinition) -> TokenBucket | None:
        """The token bucket of the connector the operation uses: its vendor's published rate."""
        connectors = self.connectors_for(tenant_id)
        connector: Any = connector_of(operation, connectors)
        if connector is None and operation == "webhook.post":
            connector = self._webhook(tool, connectors)
        if connector is None:
            return None
        key = (tenant_id, f"{connector.vendor}:{id(connector)}")
        bucket = self._buckets.get(key)
        if bucket is None:
            limit = connector.rate_limit
            bucket = self._buckets[key] = TokenBucket(limit.rate_per_s, max(1, min(limit.requests, 10)), self.clock())
        return bucket

    def _webhook(self, tool: ToolDefinition, connectors: Connectors) -> WebhookTarget:
        if tool.webhook is not None:
            target = connectors.webhooks.get(tool.webhook)
            problem = connectors.problems.get(f"webhook {tool.webhook}")
            if target is None and problem is not None:
                raise problem
            if target is None:
                raise ConnectorError(FailureKind.CONFIGURATION, f"tool {tool.name} names webhook {tool.webhook!r}, "
                                     "which the tenant's integrations do not declare")
            return target
        assert tool.webhook_url is not None
        key = (tool.webhook_url, tool.timeout_s)
        if key not in self._url_targets:
            self._url_targets[key] = WebhookTarget(tool.webhook_url, self._webhook_secret, timeout_s=tool.timeout_s)
        return self._url_targets[key]

    def retries(self, tool: ToolDefinition, tenant_id: str) -> int | None:
        """A webhook's own retry count; None: the worker's."""
        if tool.operation == "webhook.post" and tool.webhook is not None:
            hook = self.connectors_for(tenant_id).webhooks.get(tool.webhook)
            return None if hook is None else hook.retries
        return None

    def run(self, envelope: Envelope, request: ToolRequested, tool: ToolDefinition) -> OperationResult:
        """Blocking: the worker runs it in a thread."""
        call = ToolCall(tool=request.tool, operation=request.operation or tool.operation,
                        arguments=_arguments(request), idempotency_key=request.idempotency_key,
                        tenant_id=envelope.tenant_id, call_id=envelope.call_id, caller_number=request.caller_number,
                        now=datetime.fromtimestamp(self.clock(), UTC))
        connectors = self.connectors_for(envelope.tenant_id)
        if call.operation == "webhook.post":
            return post_webhook(call, self._webhook(tool, connectors))
        return run_operation(call, connectors)


class ToolWorker:
    """The consumer loop around `ToolRunner`: commands in, replies out, retries, audit, dead letters."""

    def __init__(
        self,
        backend: LogBackend,
        runner: ToolRunner,
        *,
        attempts: int = 3,
        backoff_s: float = 0.2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        concurrency: int = 32,
    ) -> None:
        self.backend = backend
        self.concurrency = concurrency
        """Tool calls run at once (a call's own in order): one slow vendor holds up no other call's tools."""
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

        await run_in_group(self.backend, [COMMANDS], GROUP, stop, handle, ready=self.ready, codec=self.codec,
                           concurrency=self.concurrency)

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

    async def _audit(self, producer: LogProducer, envelope: Envelope, request: ToolRequested, operation: str,
                     outcome: StoredResult) -> None:
        record = AuditRecorded(actor=WORKER, action=operation, resource=f"{outcome.connector}:{outcome.remote_id}",
                               outcome="succeeded", detail=f"tool {request.tool} ({request.tool_call_id})",
                               remote_addr=None)
        event = standalone_event(record, tenant_id=envelope.tenant_id, stream_id=envelope.call_id, producer=WORKER,
                                 producer_version=__version__)
        await producer.send(AUDIT, envelope.call_id.encode(), self.codec.encode(event))

    async def _handle(self, producer: LogProducer, envelope: Envelope, request: ToolRequested, record: Any) -> None:
        began = time.monotonic()
        outcome, failure = await self._attempts(producer, envelope, request)
        latency = int((time.monotonic() - began) * 1000)
        if outcome is not None:
            attempt = outcome[1]
            await self._reply(producer, envelope, ToolSucceeded(
                tool_call_id=request.tool_call_id, tool=request.tool, result_json=outcome[0].result_json,
                attempt=attempt, latency_ms=latency, connector=outcome[0].connector, remote_id=outcome[0].remote_id))
        else:
            assert failure is not None
            error, attempt, connector = failure
            await self._reply(producer, envelope, ToolFailed(
                tool_call_id=request.tool_call_id, tool=request.tool, error=str(error)[:1000],
                retryable=isinstance(error, ConnectorError) and error.retryable, attempt=attempt,
                dead_lettered=True, latency_ms=latency, connector=connector, failure=_failure_kind(error)))
            await producer.send(DEADLETTER, record.key or b"", record.value,
                                dead_letter_headers(record, f"tool failed: {error}", GROUP))
        self.handled += 1

    async def _attempts(self, producer: LogProducer, envelope: Envelope, request: ToolRequested
                        ) -> tuple[tuple[StoredResult, int] | None, tuple[Exception, int, str] | None]:
        """The request run until it succeeds, fails for good, or runs out of time: (result, attempt) or
        (error, attempt, connector)."""
        runner = self.runner
        done = await asyncio.to_thread(runner.store.result, request.idempotency_key)
        if done is not None:
            return (done, 0), None  # a redelivered command: the effect happened, reply the same
        try:
            tool = runner.definition(envelope.tenant_id, request.tool)
            operation = request.operation or tool.operation
            bucket = runner.pacing(envelope.tenant_id, operation, tool)
            attempts = self.attempts if (retries := runner.retries(tool, envelope.tenant_id)) is None else retries + 1
        except (ToolError, ConnectorError) as exc:
            return None, (exc, 1, "")
        deadline = request.deadline_us / 1e6 if request.deadline_us else None
        for attempt in range(1, attempts + 1):
            left = None if deadline is None else deadline - runner.clock() - REPLY_MARGIN_S
            if left is not None and left <= 0:
                return None, (ConnectorError(FailureKind.UNAVAILABLE, "the call stopped waiting (the tool's "
                                             "deadline passed) before it could run"), attempt, "")
            if bucket is not None and (wait := bucket.delay(runner.clock())) > 0:
                if left is not None and wait >= left:
                    return None, (ConnectorError(FailureKind.RATE_LIMITED, "the vendor's rate limit leaves no time "
                                                 "before the tool's deadline"), attempt, "")
                await self.sleep(wait)
            if bucket is not None:
                bucket.take(runner.clock())
            try:
                result = await asyncio.wait_for(asyncio.to_thread(self._run_and_keep, envelope, request, tool,
                                                                   operation), left)
            except TimeoutError:
                return None, (ConnectorError(FailureKind.UNAVAILABLE, "no answer before the tool's deadline"),
                              attempt, "")
            except ConnectorError as exc:
                retry_in = self._retry_in(exc, attempt)
                if not exc.retryable or attempt == attempts or (
                        left is not None and retry_in >= left - 0.05):
                    return None, (exc, attempt, self._vendor(operation, envelope))
                log.info("tool %s of call %s: attempt %d failed (%s); again in %.2fs", request.tool,
                         envelope.call_id, attempt, exc, retry_in)
                await self._reply(producer, envelope, ToolFailed(  # the call's log shows every attempt
                    tool_call_id=request.tool_call_id, tool=request.tool, error=str(exc)[:1000], retryable=True,
                    attempt=attempt, dead_lettered=False, latency_ms=0, connector=self._vendor(operation, envelope),
                    failure=exc.kind.value))
                await self.sleep(retry_in)
                continue
            except ToolError as exc:
                return None, (exc, attempt, "")
            if operation not in READ_ONLY:
                await self._audit(producer, envelope, request, operation, result)
            return (result, attempt), None
        raise AssertionError("unreachable: the last attempt returns")

    def _vendor(self, operation: str, envelope: Envelope) -> str:
        connector = connector_of(operation, self.runner.connectors_for(envelope.tenant_id))
        return "webhook" if operation == "webhook.post" else str(getattr(connector, "vendor", ""))

    def _retry_in(self, error: ConnectorError, attempt: int) -> float:
        backoff = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # jitter, not secrets
        return float(max(backoff, error.retry_after_s or 0.0))

    def _run_and_keep(self, envelope: Envelope, request: ToolRequested, tool: ToolDefinition,
                      operation: str) -> StoredResult:
        """In the worker's thread: the operation, and its result stored under the key as soon as it is known,
        even when the call stopped waiting meanwhile (a redelivery then replies it, and runs nothing)."""
        outcome = self.runner.run(envelope, request, tool)
        stored = StoredResult(json.dumps(outcome.result, sort_keys=True, default=str), outcome.connector,
                              outcome.remote_id)
        self.runner.store.remember(request.idempotency_key, stored)
        return stored


def _failure_kind(error: Exception) -> str:
    if isinstance(error, ConnectorError):
        return error.kind.value
    return "invalid" if isinstance(error, ToolError) else "error"
