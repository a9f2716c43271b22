"""The tool worker on both log backends: commands in, replies out, once per idempotency key,
retries with a dead letter at the end, nothing past a call's deadline, an audit record per side effect,
and webhooks signed for their receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import DLQ_REASON, EventConsumer
from consumers.workers.tools import ToolRunner, ToolStore, ToolWorker
from producers.event_writer import CallRecorder, EventWriter
from schemas.base import Event, EventPayload
from schemas.events import AuditRecorded, ToolFailed, ToolRequested, ToolSucceeded
from schemas.topics import AUDIT, DEADLETTER, TOOL_RESULTS
from streams.config.agents import AgentRouter, ToolDefinition, load_agents
from streams.connectors.operations import Connectors
from streams.connectors.tickets_builtin import BuiltinDesk
from voxlog.settings import DEFAULT_AGENTS_DIR

SECRET = b"webhook-secret"


class Receiver(BaseHTTPRequestHandler):
    """A webhook endpoint: answers by script, records what arrived and whether the signature held; a
    request with `hold` in its body waits until the test lets it go (a slow vendor)."""

    script: ClassVar[list[int]] = []
    received: ClassVar[list[dict[str, Any]]] = []
    held: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b'"hold"' in body:
            self.held.wait(60)
        stamp = self.headers["X-Voxlog-Timestamp"]
        expected = "v1=" + hmac.new(SECRET, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        self.received.append({"body": json.loads(body), "signed": hmac.compare_digest(
            expected, self.headers["X-Voxlog-Signature"]), "key": self.headers["Idempotency-Key"]})
        status = self.script.pop(0) if self.script else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"ok": status == 200, "crm_id": "C-77"}).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.script, Receiver.received, Receiver.held = [], [], threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture
async def worker(backend: LogBackend, tmp_path: Path, receiver: str) -> AsyncIterator[tuple[ToolWorker, BuiltinDesk]]:
    agents = load_agents(DEFAULT_AGENTS_DIR)
    front = agents[0]
    crm = ToolDefinition(name="update_crm", description="CRM", operation="webhook.post", webhook_url=receiver)
    agents[0] = front.model_copy(update={"tools": (*front.tools, crm)})
    async with backend.admin() as admin:
        await ensure_topics(admin)
    store = ToolStore(tmp_path / "tools.db")
    desk = BuiltinDesk(tmp_path / "desk.db", "demo")
    connectors = Connectors(tickets=desk)  # voxlog's own desk; no calendar: a booking finds none configured
    tool_worker = ToolWorker(backend, ToolRunner(store, AgentRouter(agents), lambda tenant: connectors,
                                                 SecretStr(SECRET.decode())), backoff_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(tool_worker.run(stop))
    await asyncio.wait_for(tool_worker.ready.wait(), 30)
    yield tool_worker, desk
    stop.set()
    await task
    store.close()
    desk.close()


async def request_tools(backend: LogBackend, call_id: str, requests: list[ToolRequested]) -> None:
    async with backend.producer() as producer:
        recorder = CallRecorder(EventWriter(producer), tenant_id="demo", call_id=call_id, producer="test",
                                producer_version="0")
        for request in requests:
            await recorder.record(request)


async def replies(backend: LogBackend, call_id: str, count: int, timeout_s: float = 30) -> list[Event[EventPayload]]:
    out: list[Event[EventPayload]] = []
    deadline = time.monotonic() + timeout_s
    async with backend.producer() as dl, backend.consumer([TOOL_RESULTS]) as consumer:
        events = EventConsumer(consumer, dl, name="test")
        while len(out) < count:
            assert time.monotonic() < deadline, f"only {len(out)} replies: {out}"
            out += [i.event for i in await events.poll(timeout_s=0.5) if i.event.call_id == call_id]
    return out


def ticket(call_id: str, n: int = 0, *, deadline_us: int = 0) -> ToolRequested:
    return ToolRequested(tool_call_id=f"tc{n}", tool="create_ticket", arguments_json='{"summary": "internet down"}',
                         idempotency_key=f"{call_id}/tc{n}", operation="tickets.create",
                         caller_number="+15550001111", deadline_us=deadline_us)


async def audit_records(backend: LogBackend, call_id: str) -> list[AuditRecorded]:
    async with backend.admin() as admin:
        records = [r async for r in admin.read_key([AUDIT], call_id.encode())]
    events = [backend.codec.decode(r.value) for r in records]
    return [e.payload for e in events if isinstance(e.payload, AuditRecorded)]


async def test_a_ticket_is_opened_once_however_often_it_is_requested(
        backend: LogBackend, worker: tuple[ToolWorker, BuiltinDesk]) -> None:
    _, desk = worker
    call_id = f"call-{time.time_ns()}"
    await request_tools(backend, call_id, [ticket(call_id), ticket(call_id)])  # the same command twice: a redelivery
    got = await replies(backend, call_id, 2)
    first, second = (r.payload for r in got)
    assert isinstance(first, ToolSucceeded)
    assert isinstance(second, ToolSucceeded)
    assert first.result_json == second.result_json
    assert (first.connector, first.remote_id) == ("voxlog", json.loads(first.result_json)["ticket_id"])
    assert [t["subject"] for t in desk.tickets()] == ["internet down"]
    assert all(r.envelope.producer == "voxlog.tool_worker" and r.envelope.causation_id for r in got)
    audits = await audit_records(backend, call_id)
    assert [(a.action, a.resource) for a in audits] == [("tickets.create", f"voxlog:{first.remote_id}")]


async def test_nothing_runs_after_the_call_stopped_waiting(
        backend: LogBackend, worker: tuple[ToolWorker, BuiltinDesk]) -> None:
    _, desk = worker
    call_id = f"call-{time.time_ns()}"
    await request_tools(backend, call_id, [ticket(call_id, deadline_us=time.time_ns() // 1000 - 1_000_000)])
    (failed,) = (r.payload for r in await replies(backend, call_id, 1))
    assert isinstance(failed, ToolFailed)
    assert (failed.failure, failed.dead_lettered) == ("unavailable", True)
    assert "deadline" in failed.error
    assert desk.tickets() == []


async def test_an_operation_without_its_connector_says_so(
        backend: LogBackend, worker: tuple[ToolWorker, BuiltinDesk]) -> None:
    call_id = f"call-{time.time_ns()}"
    await request_tools(backend, call_id, [ToolRequested(
        tool_call_id="b1", tool="book_appointment", arguments_json='{"day": "tomorrow", "time": "10 am"}',
        idempotency_key=f"{call_id}/b1", operation="calendar.book")])
    (failed,) = (r.payload for r in await replies(backend, call_id, 1))
    assert isinstance(failed, ToolFailed)
    assert (failed.failure, failed.retryable, failed.attempt) == ("configuration", False, 1)
    assert "no calendar configured" in failed.error


async def test_a_webhook_is_signed_retried_and_answered(
        backend: LogBackend, worker: tuple[ToolWorker, BuiltinDesk], receiver: str) -> None:
    call_id = f"call-{time.time_ns()}"
    Receiver.script = [503]  # first attempt fails, the retry succeeds
    await request_tools(backend, call_id, [ToolRequested(
        tool_call_id="w1", tool="update_crm", arguments_json='{"note": "x"}', idempotency_key=f"{call_id}/w1")])
    failed, succeeded = (r.payload for r in await replies(backend, call_id, 2))
    assert isinstance(failed, ToolFailed)
    assert (failed.retryable, failed.dead_lettered, failed.attempt) == (True, False, 1)
    assert isinstance(succeeded, ToolSucceeded)
    assert succeeded.attempt == 2
    assert json.loads(succeeded.result_json)["crm_id"] == "C-77"
    assert len(Receiver.received) == 2
    assert all(r["signed"] and r["key"] == f"{call_id}/w1" for r in Receiver.received)


async def test_a_tool_that_keeps_failing_is_dead_lettered_and_the_call_told(
        backend: LogBackend, worker: tuple[ToolWorker, BuiltinDesk], receiver: str) -> None:
    call_id = f"call-{time.time_ns()}"
    Receiver.script = [500, 500, 500]
    await request_tools(backend, call_id, [ToolRequested(
        tool_call_id="w2", tool="update_crm", arguments_json="{}", idempotency_key=f"{call_id}/w2"),
        ToolRequested(tool_call_id="w3", tool="no_such_tool", arguments_json="{}", idempotency_key=f"{call_id}/w3")])
    got = [r.payload for r in await replies(backend, call_id, 4)]
    attempts = [p for p in got if isinstance(p, ToolFailed) and p.tool == "update_crm"]
    assert [(p.attempt, p.dead_lettered) for p in attempts] == [(1, False), (2, False), (3, True)]
    unknown = next(p for p in got if isinstance(p, ToolFailed) and p.tool == "no_such_tool")
    assert (unknown.retryable, unknown.dead_lettered, unknown.attempt) == (False, True, 1)
    async with backend.admin() as admin:
        letters = [r async for r in admin.read_key([DEADLETTER], call_id.encode())]
    reasons = [dict(r.headers)[DLQ_REASON].decode() for r in letters]
    assert len(reasons) == 2
    assert any("no_such_tool" in r for r in reasons)


async def test_a_slow_vendor_holds_up_no_other_calls_tools(
        backend: LogBackend, worker: tuple[ToolWorker, BuiltinDesk], receiver: str) -> None:
    slow_call, quick_call = f"call-{time.time_ns()}-slow", f"call-{time.time_ns()}-quick"
    await request_tools(backend, slow_call, [ToolRequested(
        tool_call_id="w9", tool="update_crm", arguments_json='{"hold": true}', idempotency_key=f"{slow_call}/w9")])
    await request_tools(backend, quick_call, [ticket(quick_call)])
    # The ticket is answered while the webhook asked first is still waiting for its vendor.
    (opened,) = (r.payload for r in await replies(backend, quick_call, 1))
    assert isinstance(opened, ToolSucceeded)
    assert not Receiver.held.is_set()
    Receiver.held.set()
    (posted,) = (r.payload for r in await replies(backend, slow_call, 1))
    assert isinstance(posted, ToolSucceeded)
