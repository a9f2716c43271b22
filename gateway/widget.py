"""The web voice widget: the page, its embeddable script, and its WebSocket (`/widget/ws`).

Protocol on the socket: the browser opens with a JSON `{"type": "start", "key": WIDGET_KEY}`, then
sends binary frames of 16 kHz 16-bit little-endian mono PCM (20 ms, 640 bytes, is what the script
sends). The server answers `{"type": "started", "call_id"}`, then binary frames of agent audio (same
format), `{"type": "transcript", "speaker", "text", "final"}`, `{"type": "clear"}` on barge-in, and
`{"type": "end", "reason"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse

from gateway.calls import Gateway, new_call_id
from streams.call.session import FRAME_BYTES
from streams.call.transport import InboundCall, MediaTransport, TransportClosed
from streams.config.agents import RoutingError

STATIC = Path(__file__).parent / "static"
JAVASCRIPT = "text/javascript"
"""JavaScript's media type (RFC 9239; application/javascript is its obsolete alias)."""
MAX_FRAME_BYTES = FRAME_BYTES * 10  # 200 ms: more in one message is not a live microphone


class WidgetTransport(MediaTransport):
    channel: Literal["phone", "sip", "widget"] = "widget"

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.closed = False

    async def _send(self, message: dict[str, object] | bytes) -> None:
        if self.closed:
            raise TransportClosed("the widget has disconnected")
        try:
            if isinstance(message, bytes):
                await self.websocket.send_bytes(message)
            else:
                await self.websocket.send_text(json.dumps(message))
        except (WebSocketDisconnect, RuntimeError) as exc:
            self.closed = True
            raise TransportClosed(str(exc)) from exc

    async def play(self, frame: bytes) -> None:
        await self._send(frame)

    async def clear(self) -> None:
        await self._send({"type": "clear"})

    async def mark(self, name: str) -> None:
        await self._send({"type": "mark", "name": name})

    async def transfer(self, target: str) -> tuple[str, str | None]:
        return "failed", "the web widget has no phone line to transfer"

    async def hangup(self) -> None:
        with contextlib.suppress(TransportClosed):
            await self._send({"type": "end", "reason": "agent_hangup"})
        self.closed = True
        with contextlib.suppress(RuntimeError):
            await self.websocket.close()

    async def send_transcript(self, speaker: Literal["caller", "agent"], text: str, final: bool) -> None:
        await self._send({"type": "transcript", "speaker": speaker, "text": text, "final": final})


def _javascript(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JAVASCRIPT: {"schema": {"type": "string"}}}}


def widget_router(gateway: Gateway) -> APIRouter:
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
            hello = json.loads(await asyncio.wait_for(websocket.receive_text(), 10))
            agent = gateway.router.by_widget_key(str(hello.get("key", "")))
        except (TimeoutError, ValueError, AttributeError, RoutingError, WebSocketDisconnect, KeyError) as exc:
            with contextlib.suppress(Exception):
                await websocket.send_text(json.dumps({"type": "error", "message": f"cannot start: {exc}"}))
                await websocket.close(code=1008)
            return
        call = InboundCall(call_id=new_call_id(), channel="widget", direction="inbound", tenant_id=agent.tenant,
                           agent_id=agent.id, routed_by="widget_key",
                           parameters={"page": str(hello.get("page", ""))[:500]})
        refusal = await gateway.admit(call)
        if refusal is not None:  # the page says so; 1013: try again later
            with contextlib.suppress(Exception):
                await websocket.send_text(json.dumps({"type": "busy", "message": refusal.detail}))
                await websocket.close(code=1013)
            return
        transport = WidgetTransport(websocket)
        session = gateway.open_session(call, agent, transport, memory=await gateway.recall(call))
        await websocket.send_text(json.dumps({"type": "started", "call_id": call.call_id}))
        running = asyncio.create_task(gateway.run_session(session))
        pending = b""
        try:
            while not running.done():
                receive = asyncio.create_task(websocket.receive())
                done, _ = await asyncio.wait({receive, running}, return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    session.closed("caller_hangup")
                    break
                data = message.get("bytes")
                if data is None:
                    continue  # text control messages from the page are not needed mid-call
                if len(data) % 2 or len(data) > MAX_FRAME_BYTES:
                    gateway.bad_input(session, "gateway.widget", f"audio frame of {len(data)} bytes")
                    continue
                pending += data
                while len(pending) >= FRAME_BYTES:
                    frame, pending = pending[:FRAME_BYTES], pending[FRAME_BYTES:]
                    await session.hear(frame, frame, "pcm_s16le", 16_000)
        except WebSocketDisconnect:
            session.closed("socket_closed")
        finally:
            transport.closed = transport.closed or running.done()
            report = await running
            with contextlib.suppress(Exception):
                await websocket.send_text(json.dumps({"type": "end", "reason": report.end_reason}))
                await websocket.close()

    return router
