"""The web voice widget: the page, its embeddable script, and its WebSocket (`/widget/ws`).

The protocol on the socket is `streams.channels.widget_protocol`; this is its socket side:
`iterate_page` reads the page's messages into its events, `WidgetTransport` is the session's
`MediaTransport` for a widget call (16 kHz PCM both ways, marks, clears, the live transcript).

A widget key is public (it is in the page of every site that embeds the widget), so anyone can open
calls with one: each client address may have `widget_calls_per_address` at once, lest one take all the
gateway's places from every tenant. The address is the one the tenant API's per-address limits count:
uvicorn's, from X-Forwarded-For where the peer is a proxy it trusts (FORWARDED_ALLOW_IPS).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse

from gateway.caller_recall import recall
from gateway.pages import CSS, JAVASCRIPT, PAGE_HEADERS, STATIC, page_file, text_file
from gateway.runtime import GatewayRuntime, new_call_id, while_running
from schemas.events import CallStarted
from streams.call.transport import Channel, InboundCall, MediaTransport, TransportClosed
from streams.channels.widget_protocol import (
    BadFrame,
    Hello,
    PageAudio,
    PageEvent,
    PageReader,
    busy_message,
    clear_message,
    end_message,
    error_message,
    mark_message,
    parse_hello,
    started_message,
    transcript_message,
)
from streams.config.agents import AgentSpec, RoutingError

WIDGET_KEY_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
"""The widget keys `GET /widget` puts in its page; anything else is refused (422) before it nears the HTML."""
POLICY_VIOLATION = 1008
"""The WebSocket close code of a call refused by a rule (RFC 6455, 7.4.1)."""


@dataclass
class CallsPerAddress:
    """The live widget calls of each client address, up to `limit` each. Only addresses with a live call are
    kept, so it holds no more entries than the gateway has calls."""

    limit: int
    _live: Counter[str] = field(default_factory=Counter)

    def take(self, address: str) -> bool:
        """Counts one more call from `address`, or says False when it has `limit` already."""
        if self._live[address] >= self.limit:
            return False
        self._live[address] += 1
        return True

    def give_back(self, address: str) -> None:
        self._live[address] -= 1
        if self._live[address] <= 0:
            del self._live[address]


async def iterate_page(websocket: WebSocket) -> AsyncIterator[PageEvent]:
    """Reads an accepted widget socket until it closes, yielding `PageReader`'s events; it never
    raises for the page's doing."""
    reader = PageReader()
    while True:
        try:
            message = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        if message["type"] == "websocket.disconnect":
            return
        if message["type"] != "websocket.receive":
            continue
        text = message.get("text")
        for event in reader.read(text if text is not None else message.get("bytes") or b""):
            yield event


class WidgetTransport(MediaTransport):
    channel: Channel = "widget"

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.closed = False

    async def _send(self, message: str | bytes) -> None:
        if self.closed:
            raise TransportClosed("the widget has disconnected")
        try:
            if isinstance(message, bytes):
                await self.websocket.send_bytes(message)
            else:
                await self.websocket.send_text(message)
        except (WebSocketDisconnect, RuntimeError) as exc:
            self.closed = True
            raise TransportClosed(str(exc)) from exc

    async def play(self, frame: bytes) -> None:
        await self._send(frame)

    async def clear(self) -> None:
        await self._send(clear_message())

    async def mark(self, name: str) -> None:
        await self._send(mark_message(name))

    async def transfer(self, target: str) -> tuple[str, str | None]:
        return "failed", "the web widget has no phone line to transfer"

    async def hangup(self) -> None:
        with contextlib.suppress(TransportClosed):
            await self._send(end_message("agent_hangup"))
        self.closed = True
        with contextlib.suppress(RuntimeError):
            await self.websocket.close()

    async def send_transcript(self, speaker: Literal["caller", "agent"], text: str, final: bool) -> None:
        await self._send(transcript_message(speaker, text, final))


async def refuse(websocket: WebSocket, message: str, *, reason: str = "") -> None:
    """Tells the page why it gets no call, and closes its socket (a page gone already is not told)."""
    with contextlib.suppress(Exception):
        await websocket.send_text(error_message(message))
        await websocket.close(code=POLICY_VIOLATION, reason=reason)


def widget_router(gateway: GatewayRuntime) -> APIRouter:
    router = APIRouter()
    callers = CallsPerAddress(gateway.widget_calls_per_address)

    @router.get("/widget", response_class=HTMLResponse)
    async def page(key: Annotated[str, Query(pattern=WIDGET_KEY_PATTERN, description="The widget key to call with.")]
                   = "demo-widget-key") -> HTMLResponse:
        """A page with the widget on it, served under the pages' Content-Security-Policy: no inline script,
        nothing from another origin, so no key can be made into markup or script."""
        text = (STATIC / "widget.html").read_text().replace("{{WIDGET_KEY}}", html.escape(key, quote=True))
        return HTMLResponse(text, headers=PAGE_HEADERS)

    @router.get("/widget/widget-page.js", response_class=FileResponse,
                responses={200: text_file(JAVASCRIPT, "The widget page's own script: mounts the widget.")})
    async def page_script() -> FileResponse:
        return page_file("widget-page.js", JAVASCRIPT)

    @router.get("/widget/widget.css", response_class=FileResponse,
                responses={200: text_file(CSS, "The widget page's style sheet.")})
    async def style() -> FileResponse:
        return page_file("widget.css", CSS)

    @router.get("/widget/voxlog-widget.js", response_class=FileResponse,
                responses={200: text_file(JAVASCRIPT, "The embeddable script: the page's microphone, speaker and "
                                                      "socket.")})
    async def script() -> FileResponse:
        return FileResponse(STATIC / "voxlog-widget.js", media_type=JAVASCRIPT)

    @router.get("/widget/capture-worklet.js", response_class=FileResponse,
                responses={200: text_file(JAVASCRIPT, "The AudioWorklet the script captures the microphone with.")})
    async def worklet() -> FileResponse:
        return FileResponse(STATIC / "capture-worklet.js", media_type=JAVASCRIPT)

    @router.websocket("/widget/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            hello = parse_hello(await asyncio.wait_for(websocket.receive_text(), 10))
            agent = gateway.router.by_widget_key(hello.key)
        except (TimeoutError, ValueError, RoutingError, WebSocketDisconnect, KeyError) as exc:
            await refuse(websocket, f"cannot start: {exc}")
            return
        address = websocket.client.host if websocket.client else "-"
        if not callers.take(address):
            refusal = f"this address has {callers.limit} widget calls already"
            await refuse(websocket, refusal, reason=refusal)
            return
        try:
            await converse(websocket, hello, agent)
        finally:
            callers.give_back(address)

    async def converse(websocket: WebSocket, hello: Hello, agent: AgentSpec) -> None:
        """One widget call, from its admission to its end."""
        call = InboundCall(call_id=new_call_id(), tenant_id=agent.tenant,
                           started=CallStarted(channel="widget", direction="inbound", agent_id=agent.id,
                                               agent_version=agent.version, routed_by="widget_key",
                                               parameters={"page": hello.page}))
        refusal = await gateway.admit(call)
        if refusal is not None:  # the page says so; 1013: try again later
            with contextlib.suppress(Exception):
                await websocket.send_text(busy_message(refusal.detail))
                await websocket.close(code=1013)
            return
        transport = WidgetTransport(websocket)
        session = gateway.open_session(call, agent, transport, memory=await recall(gateway.analytics, call))
        # A page gone already is not told: its reader says it is gone, and the session, run, ends at once.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.send_text(started_message(call.call_id))
        running = asyncio.create_task(gateway.run_session(session))
        events = iterate_page(websocket)
        try:
            async for event in while_running(running, lambda: anext(events, None)):
                if event is None:
                    session.closed("caller_hangup")
                    break
                if isinstance(event, PageAudio):
                    await session.hear(event.pcm, event.pcm, "pcm_s16le", 16_000)
                elif isinstance(event, BadFrame):
                    gateway.bad_input(session, "gateway.widget", event.reason)
        finally:
            # Whatever stopped the reading (a failure of ours included), nobody hears the call now: it ends at
            # once and gives its place back. No-op once it has ended.
            session.closed("shutdown" if gateway.draining else "socket_closed")
            transport.closed = transport.closed or running.done()
            report = await running
            with contextlib.suppress(Exception):
                await websocket.send_text(end_message(report.end_reason))
                await websocket.close()

    return router
