"""The tool worker on both log backends: commands in, replies out, once per idempotency key,
retries with a dead letter at the end, and webhooks signed for their receiver."""

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

import httpx
import pytest

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import DLQ_REASON, EventConsumer
from consumers.workers.tools import ToolRunner, ToolStore, ToolWorker, WebhookSigner
from producers.event_writer import CallRecorder, EventWriter
from schemas.base import Event, EventPayload
from schemas.events import ToolFailed, ToolRequested, ToolSucceeded
from schemas.topics import DEADLETTER, TOOL_RESULTS
from streams.config.agents import AgentRouter, ToolDefinition, load_agents
from voxlog.settings import DEFAULT_AGENTS_DIR

SECRET = b"webhook-secret"


class Receiver(BaseHTTPRequestHandler):
    """A webhook endpoint: answers by script, records what arrived and whether the signature held."""

    script: ClassVar[list[int]] = []
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
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
    Receiver.script, Receiver.received = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture
async def worker(backend: LogBackend, tmp_path: Path, receiver: str) -> AsyncIterator[tuple[ToolWorker, ToolStore]]:
    agents = load_agents(DEFAULT_AGENTS_DIR)
    front = agents[0]
    crm = ToolDefinition(name="update_crm", description="CRM", kind="webhook", webhook_url=receiver)
    agents[0] = front.model_copy(update={"tools": (*front.tools, crm)})
    async with backend.admin() as admin:
        await ensure_topics(admin)
    store = ToolStore(tmp_path / "tools.db")
    async with httpx.AsyncClient(timeout=5) as http:
        tool_worker = ToolWorker(backend, ToolRunner(store, AgentRouter(agents), WebhookSigner(SECRET), http),
                                 backoff_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(tool_worker.run(stop))
        await asyncio.wait_for(tool_worker.ready.wait(), 30)
        yield tool_worker, store
        stop.set()
        await task
    store.close()


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


def booking(call_id: str, n: int = 0) -> ToolRequested:
    return ToolRequested(tool_call_id=f"tc{n}", tool="book_appointment", arguments_json='{"day": "tomorrow", '
                         '"time": "ten"}', idempotency_key=f"{call_id}/tc{n}")


async def test_a_booking_happens_once_however_often_it_is_requested(
        backend: LogBackend, worker: tuple[ToolWorker, ToolStore]) -> None:
    _, store = worker
    call_id = f"call-{time.time_ns()}"
    # The same command twice (a redelivery), then a ticket.
    await request_tools(backend, call_id, [booking(call_id), booking(call_id), ToolRequested(
        tool_call_id="tc9", tool="create_ticket", arguments_json='{"summary": "internet down"}',
        idempotency_key=f"{call_id}/tc9")])
    got = await replies(backend, call_id, 3)
    assert all(isinstance(r.payload, ToolSucceeded) for r in got)
    first, second, ticket = (r.payload for r in got)
    assert isinstance(first, ToolSucceeded)
    assert isinstance(second, ToolSucceeded)
    assert first.result_json == second.result_json
    assert json.loads(first.result_json)["when"] == "tomorrow at ten"
    assert [b["call_id"] for b in store.bookings("demo")].count(call_id) == 1
    assert isinstance(ticket, ToolSucceeded)
    assert json.loads(ticket.result_json)["ticket_id"].startswith("T")
    assert all(r.envelope.producer == "voxlog.tool_worker" and r.envelope.causation_id for r in got)


async def test_a_webhook_is_signed_retried_and_answered(
        backend: LogBackend, worker: tuple[ToolWorker, ToolStore], receiver: str) -> None:
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
        backend: LogBackend, worker: tuple[ToolWorker, ToolStore], receiver: str) -> None:
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
