"""The web voice widget: the page, its embeddable script, and its WebSocket (`/widget/ws`).

The protocol on the socket is `streams.channels.widget_protocol`; this is its socket side:
`iterate_page` reads the page's messages into its events, `WidgetTransport` is the session's
`MediaTransport` for a widget call (16 kHz PCM both ways, marks, clears, the live transcript).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse

from gateway.caller_recall import recall
from gateway.runtime import GatewayRuntime, new_call_id, while_running
from schemas.events import CallStarted
from streams.call.transport import Channel, InboundCall, MediaTransport, TransportClosed
from streams.channels.widget_protocol import (
    BadFrame,
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
from streams.config.agents import RoutingError

STATIC = Path(__file__).parent / "static"
JAVASCRIPT = "text/javascript"
"""JavaScript's media type (RFC 9239; application/javascript is its obsolete alias)."""


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


def _javascript(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JAVASCRIPT: {"schema": {"type": "string"}}}}


def widget_router(gateway: GatewayRuntime) -> APIRouter:
    router = APIRouter()

    @router.get("/widget", response_class=HTMLResponse)
    async def page(key: str = "demo-widget-key") -> str:
        return (STATIC / "widget.html").read_text().replace("{{WIDGET_KEY}}", json.dumps(key)[1:-1])

    @router.get("/widget/voxlog-widget.js", response_class=FileResponse,
                responses={200: _javascript("The embeddable script: the page's microphone, speaker and socket.")})
    async def script() -> FileResponse:
        return FileResponse(STATIC / "voxlog-widget.js", media_type=JAVASCRIPT)

    @router.get("/widget/capture-worklet.js", response_class=FileResponse,
                responses={200: _javascript("The AudioWorklet the script captures the microphone with.")})
    async def worklet() -> FileResponse:
        return FileResponse(STATIC / "capture-worklet.js", media_type=JAVASCRIPT)

    @router.websocket("/widget/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            hello = parse_hello(await asyncio.wait_for(websocket.receive_text(), 10))
            agent = gateway.router.by_widget_key(hello.key)
        except (TimeoutError, ValueError, RoutingError, WebSocketDisconnect, KeyError) as exc:
            with contextlib.suppress(Exception):
                await websocket.send_text(error_message(f"cannot start: {exc}"))
                await websocket.close(code=1008)
            return
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
            transport.closed = transport.closed or running.done()
            report = await running
            with contextlib.suppress(Exception):
                await websocket.send_text(end_message(report.end_reason))
                await websocket.close()

    return router
