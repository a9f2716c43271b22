"""A local WebSocket server that replays recorded exchanges of a provider's streaming API (Deepgram's
live transcription), so that the provider's real SDK can be tested against its own wire protocol with
no network: the WebSocket counterpart of tests/provider_server.py.

A test queues an exchange (`ProviderWsServer.expect`), points an SDK at `server.url`, and afterwards
reads what the SDK sent in `server.sockets`: the upgrade request's path, query and headers, the text
(control) messages, and how much audio. An exchange is loaded from a fixture file
(`tests/fixtures/providers/<provider>/<name>.json`) written from the provider's API reference:

    {
      "source": "the API reference the exchange follows",
      "request": {"path": "/v1/listen"},
      "handshake": {"status": 101}
          or {"status": 429, "headers": {"retry-after": "2", ...}, "json": {...}},
      "script": [
        {"after_audio_bytes": 16000, "send": {...}},  # once this much audio has come in
        {"on": "Finalize", "send": {...}},            # on the next Finalize the client sends
        {"on": "Finalize"},                           # ... or only wait for it, answering nothing
        {"send": {...}},                              # right after the step before
        {"text": "{\\"type\\":\\"Resu"},             # a text frame as it is: a malformed message
        {"on": "CloseStream", "close": {"code": 1000, "reason": ""}}
      ]
    }

Steps run in order, each once its trigger holds; `send` objects go out as compact JSON text frames.
Once the client has asked to close (a `CloseStream` message), steps still waiting for audio or for
another control message are skipped up to the next `on: CloseStream` one. When the script is done
the connection stays open until the client asks to close; it is then closed normally (1000).

Faults are the test's, not the recording's (`WsFault`), each after some messages: stall (send nothing
more, while still reading what the client sends), freeze (read nothing more either: not even a close
frame is answered, as with a hung server or a network that went dark), or drop the TCP connection with
no close frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

FIXTURES = Path(__file__).parent / "fixtures" / "providers"


@dataclass(frozen=True)
class Step:
    send: str | None = None  # a text frame
    close: tuple[int, str] | None = None  # a close frame: code, reason
    after_audio_bytes: int | None = None
    on: str | None = None  # the type of a control message from the client

    @classmethod
    def parse(cls, step: dict[str, Any]) -> Step:
        if "send" in step:
            text: str | None = json.dumps(step["send"], separators=(",", ":"))
        else:
            text = step.get("text")
        close = step.get("close")
        if text is not None and close is not None:
            raise ValueError(f"a step sends one text frame or one close frame, not both: {step}")
        return cls(
            send=text,
            close=None if close is None else (int(close["code"]), str(close.get("reason", ""))),
            after_audio_bytes=step.get("after_audio_bytes"),
            on=step.get("on"),
        )


@dataclass(frozen=True)
class WsExchange:
    status: int  # 101 accepts the upgrade; anything else refuses it with that HTTP status
    headers: tuple[tuple[str, str], ...]
    body: bytes
    steps: tuple[Step, ...]
    path: str | None = None  # the request path this exchange answers; None answers any

    @classmethod
    def load(cls, name: str, root: Path = FIXTURES) -> WsExchange:
        """The fixture `<root>/<name>.json`, e.g. `deepgram/utterance_interims_final`."""
        fixture = json.loads((root / f"{name}.json").read_text())
        handshake = fixture.get("handshake", {"status": 101})
        if "json" in handshake:
            body = json.dumps(handshake["json"], separators=(",", ":")).encode()
        else:
            body = handshake.get("text", "").encode()
        return cls(
            status=handshake["status"],
            headers=tuple((k, v) for k, v in handshake.get("headers", {}).items()),
            body=body,
            steps=tuple(Step.parse(step) for step in fixture.get("script", [])),
            path=fixture.get("request", {}).get("path"),
        )


@dataclass(frozen=True)
class WsFault:
    stall_after_messages: int | None = None  # send nothing after this many messages (keep reading)
    freeze_after_messages: int | None = None  # neither send nor read after this many messages
    drop_after_messages: int | None = None  # abort the TCP connection after this many messages


@dataclass
class RecordedSocket:
    """What one client sent on one connection (or tried to: a refused upgrade has only the request)."""

    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    controls: list[dict[str, Any]] = field(default_factory=list)  # text messages; one not JSON: {"text": ...}
    audio_bytes: int = 0
    audio_frames: int = 0
    sent: int = 0  # messages the server sent
    closed: bool = False  # the connection has ended

    def control_types(self) -> list[str]:
        return [str(control.get("type")) for control in self.controls]


@dataclass
class _Session:
    exchange: WsExchange
    fault: WsFault
    record: RecordedSocket
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    received: Counter[str] = field(default_factory=Counter)  # control messages by type
    consumed: Counter[str] = field(default_factory=Counter)  # ... of which steps have answered
    close_requested: bool = False

    def pending(self, kind: str) -> bool:
        return self.received[kind] > self.consumed[kind]

    async def until(self, ready: Callable[[], bool]) -> None:
        while not (ready() or self.record.closed):
            self.changed.clear()
            await self.changed.wait()


@dataclass
class ProviderWsServer:
    """`async with ProviderWsServer() as server:` on 127.0.0.1, a free port; exchanges are played in the
    order they were queued, each to one connection."""

    sockets: list[RecordedSocket] = field(default_factory=list)
    faulted_at: list[float] = field(default_factory=list)  # perf_counter() when each stall or drop began
    _queue: deque[tuple[WsExchange, WsFault]] = field(default_factory=deque)
    _sessions: dict[uuid.UUID, _Session] = field(default_factory=dict)
    _server: Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def expect(self, exchange: WsExchange | str, fault: WsFault | None = None) -> None:
        self._queue.append((WsExchange.load(exchange) if isinstance(exchange, str) else exchange, fault or WsFault()))

    @property
    def url(self) -> str:
        assert self._server is not None, "the server is not started"
        host, port = next(iter(self._server.sockets)).getsockname()[:2]
        return f"ws://{host}:{port}"

    async def __aenter__(self) -> ProviderWsServer:
        self._server = await serve(self._serve, "127.0.0.1", 0, process_request=self._upgrade, compression=None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        for task in list(self._handlers):  # a stalled exchange must not outlive the test
            task.cancel()
        for connection in self._server.connections:  # nor wait for a frozen one's closing handshake
            connection.transport.abort()
        self._server.close()
        await self._server.wait_closed()

    def _upgrade(self, connection: ServerConnection, request: Request) -> Response | None:
        """Records the upgrade request; refuses it where the exchange says so."""
        path, _, query = request.path.partition("?")
        headers = {name.lower(): value for name, value in request.headers.raw_items()}
        record = RecordedSocket(path, parse_qs(query, keep_blank_values=True), headers)
        self.sockets.append(record)
        if not self._queue:
            return _response(500, (("content-type", "application/json"),), b'{"error":"no exchange queued"}')
        exchange, fault = self._queue.popleft()
        if exchange.path is not None and exchange.path != path:
            body = json.dumps({"error": f"expected {exchange.path}, got {path}"}).encode()
            return _response(404, (("content-type", "application/json"),), body)
        if exchange.status != 101:
            record.closed = True
            return _response(exchange.status, exchange.headers, exchange.body)
        self._sessions[connection.id] = _Session(exchange, fault, record)
        return None

    async def _serve(self, connection: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        session = self._sessions.pop(connection.id)
        reader = asyncio.create_task(_read(connection, session))
        try:
            if await self._play(connection, session):
                await session.until(lambda: session.close_requested)
                with contextlib.suppress(ConnectionClosed):
                    await connection.close(1000)
            await session.until(lambda: False)  # until the connection ends, however it ends
        finally:
            self._handlers.discard(task)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _play(self, connection: ServerConnection, session: _Session) -> bool:
        """Runs the script; False where it closed, dropped or stalled the connection."""
        fault = session.fault
        for step in session.exchange.steps:
            if not await _triggered(session, step):
                continue
            if session.record.closed:
                return False
            if step.send is None and step.close is None:
                continue
            if step.close is not None:
                with contextlib.suppress(ConnectionClosed):
                    await connection.close(*step.close)
                return False
            if fault.drop_after_messages is not None and session.record.sent >= fault.drop_after_messages:
                self.faulted_at.append(time.perf_counter())
                connection.transport.abort()
                return False
            if fault.stall_after_messages is not None and session.record.sent >= fault.stall_after_messages:
                self.faulted_at.append(time.perf_counter())
                return False
            if fault.freeze_after_messages is not None and session.record.sent >= fault.freeze_after_messages:
                self.faulted_at.append(time.perf_counter())
                connection.transport.pause_reading()
                return False
            assert step.send is not None
            try:
                await connection.send(step.send)
            except ConnectionClosed:
                return False
            session.record.sent += 1
        return True


async def _triggered(session: _Session, step: Step) -> bool:
    """Waits for the step's trigger; False where the step is skipped because the client asked to close."""

    def ready() -> bool:
        if step.on is not None:
            return session.pending(step.on) or (session.close_requested and step.on != "CloseStream")
        if step.after_audio_bytes is not None:
            return session.record.audio_bytes >= step.after_audio_bytes or session.close_requested
        return True

    await session.until(ready)
    if step.on is not None:
        if not session.pending(step.on):
            return False
        session.consumed[step.on] += 1
        return True
    return step.after_audio_bytes is None or session.record.audio_bytes >= step.after_audio_bytes


async def _read(connection: ServerConnection, session: _Session) -> None:
    record = session.record
    try:
        async for message in connection:
            if isinstance(message, bytes):
                record.audio_bytes += len(message)
                record.audio_frames += 1
            else:
                try:
                    control = json.loads(message)
                except ValueError:
                    control = {"text": message}
                if not isinstance(control, dict):
                    control = {"text": message}
                record.controls.append(control)
                kind = str(control.get("type"))
                session.received[kind] += 1
                session.close_requested = session.close_requested or kind == "CloseStream"
            session.changed.set()
    except ConnectionClosed:
        pass  # a client that drops the connection ends the exchange as one that closes it
    finally:
        record.closed = True
        session.changed.set()


_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
}


def _response(status: int, headers: tuple[tuple[str, str], ...], body: bytes) -> Response:
    fields = Headers(headers)
    if "date" not in fields:
        fields["date"] = email.utils.formatdate(usegmt=True)
    fields["content-length"] = str(len(body))
    fields["connection"] = "close"
    return Response(status, _REASONS.get(status, "Status"), fields, body)
