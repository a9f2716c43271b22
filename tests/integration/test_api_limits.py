"""What one client of the HTTP API can cost the others: request bodies are bounded before they are read
(so before their API key is looked at), a refused body is not echoed back, and a tenant's SQL queries run
one at a time on threads of their own, never on those the calls' path needs."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from starlette.types import Message

from gateway.app import REQUEST_BODY_MAX_BYTES, VALIDATION_TEXT_MAX, create_app
from gateway.console import AGENT_FILE_MAX
from projections.store import QueryResult
from projections.tenant_sql import TENANT_SQL_LIMITS
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from streams.channels.twilio_webhook_protocol import FORM_CONTENT_TYPE, MAX_WEBHOOK_BYTES, VOICE_PATH
from tests.integration.test_call_e2e import AGENT_NUMBER, agent_done_speaking
from tests.integration.test_gateway_hardship import eventually
from tests.integration.test_outbound_calls import DEMO_KEY, OTHER_KEY, agents_with_two_tenants, api
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.widget_page import WidgetPage

CHUNK = b"a" * 65_536


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as running:
        yield running


async def audit_records(stack: LocalStack) -> list[AuditRecorded]:
    """The audit trail of what no call did (API requests)."""
    async with stack.gateway.backend.admin() as admin:
        payloads = [EventCodec().decode(r.value).payload async for r in admin.read_key([AUDIT], b"-")]
    return [p for p in payloads if isinstance(p, AuditRecorded)]


async def post_to_app(stack: LocalStack, path: str, body: Iterator[bytes],
                      content_length: int | None) -> tuple[int, int]:
    """POSTs `body` without an API key to a gateway app as uvicorn hands a request over, a chunk at each
    `receive()`; the status answered and the bytes the app took."""
    app = create_app(stack.gateway)
    taken = 0

    async def receive() -> Message:
        nonlocal taken
        chunk = next(body, None)
        taken += len(chunk or b"")
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    answered: list[Message] = []

    async def send(message: Message) -> None:
        answered.append(message)

    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
               "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
               "headers": headers, "client": ("192.0.2.7", 40000), "server": ("127.0.0.1", 80), "state": {}},
              receive, send)
    return int(answered[0]["status"]), taken


async def test_a_body_over_the_limit_is_refused_before_it_is_read_or_its_key_looked_at(stack: LocalStack) -> None:
    # Declared: refused without a byte read. Streamed without end: refused once past the limit, the rest unread.
    declared = await post_to_app(stack, "/v1/sql", iter([CHUNK] * 10_000), content_length=500_000_000)
    assert declared == (413, 0)
    for path in ("/v1/sql", "/v1/erasures", "/v1/calls", "/v1/calls/call-x/whatif"):
        status, taken = await post_to_app(stack, path, itertools.repeat(CHUNK), content_length=None)
        assert status == 413, path
        assert taken <= REQUEST_BODY_MAX_BYTES + len(CHUNK), path

    # Over a socket too; and no request above reached the API key's check, which audits a stranger's.
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        refused = await client.post("/v1/sql", content=b"a" * (REQUEST_BODY_MAX_BYTES + 1),
                                    headers={"content-type": "application/json"})
    assert refused.status_code == 413
    assert not [a for a in await audit_records(stack) if a.action == "api.unauthorized"]


async def test_the_largest_agent_file_a_whatif_takes_fits_in_the_body_limit(stack: LocalStack) -> None:
    # Each character as long as JSON can make it: an astral one escaped as a surrogate pair.
    body = json.dumps({"agent": "\U0001f600" * AGENT_FILE_MAX})
    assert len(body) > 12 * AGENT_FILE_MAX
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        answer = await client.post("/v1/calls/call-unknown/whatif", content=body,
                                   headers={"Authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"})
    assert answer.status_code == 404, answer.text  # read and understood: there is no such call


@pytest.mark.slow
async def test_twilios_webhooks_keep_their_own_limit_and_calls_still_talk_over_websockets(stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        over = await client.post(VOICE_PATH, content=b"a=" + b"b" * MAX_WEBHOOK_BYTES,
                                 headers={"content-type": FORM_CONTENT_TYPE})
    assert (over.status_code, over.text) == (413, "webhook body too large")

    caller = stack.caller(to=AGENT_NUMBER)
    instructions = await caller.dial()
    async with caller:
        await caller.connect(instructions)
        await agent_done_speaking(caller)
    async with WidgetPage(stack.base_url.replace("http://", "ws://") + "/widget/ws") as page:
        await page.connect()
        assert await page.agent_quiet(), "the agent never spoke"


async def test_a_refused_body_is_not_echoed_back(stack: LocalStack) -> None:
    long_query = await api(stack, "POST", "/v1/sql", json={"query": "a" * 30_000})
    assert long_query.status_code == 422
    assert long_query.json() == {"detail": [{"type": "string_too_long", "loc": ["body", "query"],
                                             "msg": "String should have at most 20000 characters"}]}

    unknown_key = await api(stack, "POST", "/v1/sql", json={"q" * 100_000: 1, "query": "SELECT 1"})
    assert unknown_key.status_code == 422
    [error] = unknown_key.json()["detail"]
    assert error == {"type": "extra_forbidden", "loc": ["body", "q" * VALIDATION_TEXT_MAX],
                     "msg": "Extra inputs are not permitted"}


class HeldSql:
    """Tenant SQL whose queries run until the test lets them end, as one at its time limit runs."""

    def __init__(self) -> None:
        self.limits = TENANT_SQL_LIMITS
        self.running: list[str] = []
        self.end = threading.Event()

    def query(self, tenant_id: str, sql: str) -> QueryResult:
        self.running.append(tenant_id)
        self.end.wait(60)
        return QueryResult(columns=("1",), rows=[(1,)])


async def test_a_tenants_queries_run_one_at_a_time_and_never_on_the_threads_calls_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As few default threads as a small machine has to spare: the calls' path (keys, recordings) runs there.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as stack:
        held = HeldSql()
        monkeypatch.setattr(stack.gateway, "tenant_sql", lambda: held)

        def running(*tenants: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return held.running == list(tenants)
            return check

        try:
            first = asyncio.create_task(api(stack, "POST", "/v1/sql", json={"query": "SELECT 1"}))
            await eventually(running("demo"), 5, "demo's query running")
            second = await api(stack, "POST", "/v1/sql", json={"query": "SELECT 2"})
            assert second.status_code == 429
            assert second.headers["Retry-After"] == "1"
            assert "one at a time" in second.json()["detail"]
            other = asyncio.create_task(api(stack, "POST", "/v1/sql", key=OTHER_KEY, json={"query": "SELECT 1"}))
            await eventually(running("demo", "other"), 5, "other's query running beside demo's")
            # Both held to their limit, the default executor still answers (at once; were the queries on it, it
            # would not answer until they end, which only this test's `finally` brings: the deadline is for that).
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 30)
        finally:
            held.end.set()
        assert (await first).status_code == 200
        assert (await other).status_code == 200
        again = await api(stack, "POST", "/v1/sql", json={"query": "SELECT 3"})
        assert again.status_code == 200, again.text
        audit = await audit_records(stack)
    assert sorted((a.actor, a.outcome, a.detail) for a in audit if a.action == "sql.query") == [
        ("api-key:demo-key", "accepted", "1 rows: SELECT 1"), ("api-key:demo-key", "accepted", "1 rows: SELECT 3"),
        ("api-key:demo-key", "denied", "another of the tenant's queries is running: SELECT 2"),
        ("api-key:other-key", "accepted", "1 rows: SELECT 1")]
