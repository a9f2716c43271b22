"""The widget against what a stranger sends it, through the real gateway: a key that is markup on
`GET /widget`, JSON nested past the parser's stack on `WS /widget/ws` (before and during a call), a socket
reader that fails, and one address opening call after call with a tenant's public widget key. Each was
reproduced against a running gateway before its fix; the page's policy is checked in Chromium too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import websockets
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection

from consumers.event_reader import read_call
from gateway.app import create_app
from gateway.pages import CONTENT_SECURITY_POLICY
from schemas.base import Event, EventPayload
from schemas.events import CallEnded, ErrorRaised
from streams.channels.widget_protocol import MAX_CONTROL_CHARS, PageEvent
from tests.chromium import STARTUP_TIMEOUT_S, Browser, devtools, only_loopback, open_page, start_chromium
from voxlog.serving import build_gateway
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow

WIDGET_KEY = "demo-widget-key"  # voxlog/agents/demo/front-desk.yaml, as its phone number
AGENT_NUMBER = "+15550100"
MARKUP_KEY = '"><script>alert(document.domain)</script>'
TOO_DEEP = "[" * 200_000
"""The audit's message: past the size bound."""
TOO_DEEP_WITHIN_BOUND = "[" * MAX_CONTROL_CHARS
"""Within the size bound, still past the JSON parser's stack."""
CALL_END_S = 10
"""Well under the demo agent's silence hang-up (20 s): a call that ends within it ended because it was told."""


class PageParts(HTMLParser):
    """A page's scripts (their src, or their text when inline), style sheets and inline style."""

    def __init__(self) -> None:
        super().__init__()
        self.script_sources: list[str | None] = []
        self.stylesheets: list[str] = []
        self.inline_styles = 0
        self.keys: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.script_sources.append(named.get("src"))
        elif tag == "link" and named.get("rel") == "stylesheet" and named.get("href"):
            self.stylesheets.append(str(named["href"]))
        elif tag == "style" or "style" in named:
            self.inline_styles += 1
        if "data-key" in named:
            self.keys.append(named["data-key"])


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(_env_file=None, home=tmp_path, run_workers=False, run_projections=False)
    app = create_app(build_gateway(settings))  # the page needs no runtime: its lifespan is not started
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.internal") as http:
        yield http


async def call_events(stack: LocalStack, call_id: str) -> list[Event[EventPayload]]:
    async with stack.gateway.backend.admin() as admin:
        return (await read_call(admin, call_id)).events


def ended(events: list[Event[EventPayload]]) -> CallEnded:
    (end,) = [e.payload for e in events if isinstance(e.payload, CallEnded)]
    return end


def widget_url(stack: LocalStack) -> str:
    return stack.base_url.replace("http", "ws") + "/widget/ws"


async def start_call(stack: LocalStack, *, forwarded_for: str | None = None) -> tuple[ClientConnection, dict[str, str]]:
    """A widget socket that has sent its opening message, and the gateway's first answer."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    socket = await websockets.connect(widget_url(stack), additional_headers=headers)
    await socket.send(json.dumps({"type": "start", "key": WIDGET_KEY, "page": "http://127.0.0.1/hardening"}))
    return socket, json.loads(await socket.recv())


async def close_frame(socket: ClientConnection) -> tuple[int, str]:
    """The close frame the gateway sent: code and reason."""
    await asyncio.wait_for(socket.wait_closed(), CALL_END_S)
    received = socket.protocol.close_rcvd
    assert received is not None, "the gateway dropped the connection without a close frame"
    return received.code, received.reason


async def until_call_ends(socket: ClientConnection) -> str:
    """The reason in the gateway's `end` message."""
    while True:
        message = await socket.recv()
        if isinstance(message, str) and json.loads(message)["type"] == "end":
            return str(json.loads(message)["reason"])


# --------------------------------------------------------------------------- GET /widget


async def test_a_key_that_is_markup_is_refused_and_never_reaches_the_page(client: httpx.AsyncClient) -> None:
    refused = await client.get("/widget", params={"key": MARKUP_KEY})
    assert refused.status_code == 422
    assert "<script>" not in refused.text
    assert not refused.headers["content-type"].startswith("text/html")
    for key in ("", "a" * 129, "key with spaces", "key\n", "clé"):
        assert (await client.get("/widget", params={"key": key})).status_code == 422, key


@pytest.mark.parametrize("key", [WIDGET_KEY, "globex-widget", "A.b_c-9", "k" * 128])
async def test_the_widget_page_carries_a_widget_key_under_the_consoles_policy(client: httpx.AsyncClient,
                                                                              key: str) -> None:
    page = await client.get("/widget", params={"key": key})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    parts = PageParts()
    parts.feed(page.text)
    assert parts.keys == [key]
    assert None not in parts.script_sources, "no inline script: the policy would refuse it"
    assert parts.inline_styles == 0, "no inline style: the policy would refuse it"
    for url, kind in [*((src, "text/javascript") for src in parts.script_sources),
                      *((href, "text/css") for href in parts.stylesheets)]:
        asset = await client.get(str(url))
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(kind), url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    fake_microphone = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--mute-audio"]
    with start_chromium(tmp_path, [only_loopback(), *fake_microphone]) as running:
        yield running


@pytest.mark.browser
async def test_the_widget_page_works_in_chromium_under_its_policy(tmp_path: Path, browser: Browser) -> None:
    async with local_stack(Settings(home=tmp_path / "home")) as stack, devtools(browser.devtools_url) as cdp:
        page = await open_page(cdp)
        await page.navigate(f"{stack.base_url}/widget?key={WIDGET_KEY}")
        # Both scripts ran (the widget's and the page's, which mounts it) and the style sheet applies.
        await page.wait_for("!!document.querySelector('#voxlog-widget .vx-start')", timeout_s=STARTUP_TIMEOUT_S,
                            what="the widget mounted")
        assert await page.evaluate("getComputedStyle(document.getElementById('voxlog-widget')).borderTopLeftRadius"
                                   ) == "12px"
        # Its worklet loads and its socket opens to this gateway, which the policy allows.
        await page.click("#voxlog-widget .vx-start")
        call_id = await page.wait_for("document.getElementById('voxlog-widget').dataset.callId",
                                      timeout_s=STARTUP_TIMEOUT_S, what="the call started")
        assert await page.evaluate("document.querySelector('#voxlog-widget .vx-status').textContent") == "connected"
        assert not cdp.log_entries, cdp.diagnostics()  # a Content-Security-Policy refusal is logged here
        await page.close()
        await stack.gateway.wait_idle(CALL_END_S)
        assert ended(await call_events(stack, call_id)).reason in ("caller_hangup", "socket_closed")


# --------------------------------------------------------------------------- nested JSON on WS /widget/ws


# Named: the messages themselves as test ids would make PYTEST_CURRENT_TEST too long for the stack's subprocesses.
@pytest.mark.parametrize("opening", [TOO_DEEP, TOO_DEEP_WITHIN_BOUND], ids=["past-the-bound", "within-the-bound"])
async def test_an_opening_message_nested_past_the_parser_is_refused_with_a_close_frame(tmp_path: Path,
                                                                                      opening: str) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        async with websockets.connect(widget_url(stack)) as socket:
            await socket.send(opening)
            answer = json.loads(await socket.recv())
            assert answer["type"] == "error"
            assert answer["message"].startswith("cannot start: control message")
            assert (await close_frame(socket))[0] == 1008
        assert not stack.gateway.sessions


async def test_nested_json_mid_call_is_a_bad_frame_and_the_call_hears_its_caller_leave(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        socket, started = await start_call(stack)
        call_id = started["call_id"]
        async with socket:
            await socket.send(TOO_DEEP)
            await socket.send(TOO_DEEP_WITHIN_BOUND)
            await socket.send(json.dumps({"type": "mark", "name": "still-reading"}))
            await socket.send(b"\x00" * 640)  # the reader still reads: the session still hears
            assert call_id in stack.gateway.sessions
        started_at = time.monotonic()
        await stack.gateway.wait_idle(CALL_END_S)
        assert time.monotonic() - started_at < CALL_END_S
        assert stack.gateway.admission.live == 0, "its place is given back"
        events = await call_events(stack, call_id)
        assert ended(events).reason == "caller_hangup"
        bad = [e.payload for e in events if isinstance(e.payload, ErrorRaised) and e.payload.kind == "bad_input"]
        assert [(error.component, error.message.split(":")[0]) for error in bad] == [
            ("gateway.widget", f"control message of {len(TOO_DEEP)} characters, more than {MAX_CONTROL_CHARS}"),
            ("gateway.widget", "control message nested too deeply")]


async def test_a_socket_reader_that_fails_ends_the_call_at_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class FailingReader:
        """Fails on the page's first text message, as a bug of ours in reading it would."""

        def read(self, message: str | bytes) -> list[PageEvent]:
            if isinstance(message, str):
                raise RuntimeError("a reader that fails")
            return []

    monkeypatch.setattr("gateway.widget.PageReader", FailingReader)
    async with local_stack(Settings(home=tmp_path)) as stack:
        socket, started = await start_call(stack)
        async with socket:
            await socket.send(json.dumps({"type": "mark", "name": "m1"}))
            assert await until_call_ends(socket) == "socket_closed"
        await stack.gateway.wait_idle(CALL_END_S)
        assert stack.gateway.admission.live == 0, "its place is given back"
        assert ended(await call_events(stack, started["call_id"])).reason == "socket_closed"


async def test_a_page_gone_before_it_is_told_the_call_started_leaves_no_call_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def page_gone(call_id: str) -> str:
        raise WebSocketDisconnect(1006)  # what sending to a page whose connection dropped raises

    monkeypatch.setattr("gateway.widget.started_message", page_gone)
    async with local_stack(Settings(home=tmp_path)) as stack:
        socket = await websockets.connect(widget_url(stack))
        await socket.send(json.dumps({"type": "start", "key": WIDGET_KEY}))
        await socket.close()
        await stack.gateway.wait_idle(CALL_END_S)
        assert stack.gateway.admission.live == 0, "its place is given back"
        (report,) = stack.gateway.reports
        assert report.end_reason in ("caller_hangup", "socket_closed")


# --------------------------------------------------------------------------- calls per address


async def test_one_address_cannot_fill_the_gateway_with_a_public_widget_key(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)  # uvicorn's default: the proxy on this host is trusted
    per_address = 2  # VOXLOG_WIDGET_CALLS_PER_ADDRESS, 3 unless set
    async with local_stack(Settings(home=tmp_path, max_calls=per_address + 2,
                                    widget_calls_per_address=per_address)) as stack:
        # Behind the proxy, the address is the one it forwards, as the tenant API's limits count it.
        first = [await start_call(stack, forwarded_for="203.0.113.7") for _ in range(per_address)]
        assert [answer["type"] for _, answer in first] == ["started"] * per_address
        extra, answer = await start_call(stack, forwarded_for="203.0.113.7")
        assert answer == {"type": "error",
                          "message": f"this address has {per_address} widget calls already"}
        assert await close_frame(extra) == (1008, answer["message"])
        assert stack.gateway.admission.live == per_address, "the refused socket took no place"

        neighbour, answer = await start_call(stack, forwarded_for="203.0.113.8")
        assert answer["type"] == "started"
        phone = await stack.caller(from_="+15557770042", to=AGENT_NUMBER).ring()
        assert "<Stream" in phone.text, f"a phone call was refused: {phone.text}"

        # A call of the first address ends: once its place is given back, it may open another.
        hung_up, _ = first.pop()
        await hung_up.close()
        deadline = time.monotonic() + CALL_END_S
        while True:
            again, answer = await start_call(stack, forwarded_for="203.0.113.7")
            if answer["type"] == "started":
                break
            await again.close()
            assert time.monotonic() < deadline, f"the address never got its place back: {answer}"
            await asyncio.sleep(0.1)
        for socket in [again, neighbour, *(s for s, _ in first)]:
            await socket.close()
        await stack.gateway.wait_idle(CALL_END_S)
