"""A local HTTP/1.1 server that replays recorded provider exchanges, so that the providers' real SDKs
can be tested against their own wire protocols with no network.

A test queues replies (`ProviderServer.reply`), points an SDK at `server.base_url`, and afterwards
reads what the SDK sent in `server.requests`. A reply is loaded from a fixture file
(`tests/fixtures/providers/<provider>/<name>.json`) written from the provider's API reference:

    {
      "source": "the API reference the exchange follows",
      "request": {"method": "POST", "path": "/v1/chat/completions"},
      "response": {
        "status": 200,
        "headers": {"content-type": "text/event-stream; charset=utf-8", "x-request-id": "req_..."},
        one body of:
        "sse": [{"event": "message_start", "data": {...}}, {"data": "[DONE]"}, ...],
        "json": {...},
        "text": "...",
        "binary": {"file": "speech.pcm", "chunk_bytes": 3200}
      }
    }

`sse` data that is an object is written as compact JSON, a string as it is (so a fixture can hold a
malformed line); each event goes out as its own HTTP chunk, as the providers send them. `binary`
streams a file beside the fixture in chunks (audio, for text-to-speech providers). Bodies are sent
with `Transfer-Encoding: chunked`, so a client can tell a complete body from a broken one.

Faults are the test's, not the recording's (`Fault`): wait before the response, stall before a given
chunk, or close the connection after some chunks without ending the body. While a fault holds a reply
back the server watches the connection: a client that gives up and closes it (as a client that times
out should) is seen at once and recorded in `hangups`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "providers"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...]
    method: str = "POST"
    path: str | None = None  # the request path this reply answers; None answers any

    @classmethod
    def load(cls, name: str, root: Path = FIXTURES) -> Reply:
        """The fixture `<root>/<name>.json`, e.g. `openai/chat_text_stream` under
        tests/fixtures/providers."""
        path = root / f"{name}.json"
        fixture = json.loads(path.read_text())
        request, response = fixture.get("request", {}), fixture["response"]
        return cls(
            status=response["status"],
            headers=tuple((k, v) for k, v in response.get("headers", {}).items()),
            chunks=_body_chunks(response, path.parent),
            method=request.get("method", "POST"),
            path=request.get("path"),
        )


def _body_chunks(response: dict[str, Any], folder: Path) -> tuple[bytes, ...]:
    if "sse" in response:
        return tuple(_sse_event(event) for event in response["sse"])
    if "json" in response:
        return (json.dumps(response["json"], separators=(",", ":")).encode(),)
    if "text" in response:
        return (response["text"].encode(),)
    if "binary" in response:
        data = (folder / response["binary"]["file"]).read_bytes()
        size = response["binary"]["chunk_bytes"]
        return tuple(data[i : i + size] for i in range(0, len(data), size))
    return ()


def _sse_event(event: dict[str, Any]) -> bytes:
    lines = []
    if "event" in event:
        lines.append(f"event: {event['event']}")
    data = event.get("data", "")
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


@dataclass(frozen=True)
class Fault:
    headers_delay_s: float = 0.0  # before the status line
    stall_before_chunk: int | None = None  # index of the chunk to hold back ...
    stall_s: float = 0.0  # ... for this long
    close_after_chunks: int | None = None  # drop the connection after this many chunks, body unfinished


@dataclass
class _Queued:
    reply: Reply
    fault: Fault


@dataclass
class ProviderServer:
    """`async with ProviderServer() as server:` on 127.0.0.1, a free port; replies are served in the
    order they were queued, each to one request."""

    requests: list[RecordedRequest] = field(default_factory=list)
    faulted_at: list[float] = field(default_factory=list)  # perf_counter() when each delay or stall began
    hangups: list[float] = field(default_factory=list)  # perf_counter() when a client closed during one
    _hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    _queue: deque[_Queued] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def reply(self, reply: Reply | str, fault: Fault | None = None) -> None:
        self._queue.append(_Queued(Reply.load(reply) if isinstance(reply, str) else reply, fault or Fault()))

    async def first_hangup(self, within_s: float) -> float | None:
        """`hangups[0]`, waiting up to `within_s` for it; None where no client hung up in that time."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._hung_up.wait()
        return self.hangups[0] if self.hangups else None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the server is not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> ProviderServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):  # a stalled reply must not outlive the test
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                if not await self._answer(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, as clients that time out do
        except asyncio.CancelledError:
            # The server is closing (`__aexit__`). Ending quietly, as Python 3.11's asyncio logs a
            # connection handler that ends cancelled as an unhandled exception.
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(
        self, request: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Writes the next queued reply; False where the connection is to be dropped."""
        if not self._queue:
            await _write_whole(writer, 500, {"error": f"no reply queued for {request.method} {request.path}"})
            return True
        queued = self._queue.popleft()
        reply, fault = queued.reply, queued.fault
        if reply.path is not None and (reply.method, reply.path) != (request.method, request.path):
            await _write_whole(
                writer, 404, {"error": f"expected {reply.method} {reply.path}, got {request.method} {request.path}"}
            )
            return True
        if fault.headers_delay_s and not await self._hold(reader, fault.headers_delay_s):
            return False
        head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
        head += [f"{name}: {value}" for name, value in reply.headers if name.lower() != "transfer-encoding"]
        head += ["transfer-encoding: chunked", "", ""]
        writer.write("\r\n".join(head).encode())
        await writer.drain()
        for index, chunk in enumerate(reply.chunks):
            if fault.close_after_chunks is not None and index >= fault.close_after_chunks:
                return False
            if fault.stall_before_chunk == index and not await self._hold(reader, fault.stall_s):
                return False
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        if fault.close_after_chunks is not None and fault.close_after_chunks >= len(reply.chunks):
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _hold(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Holds the reply back for `seconds`; False where the client closed the connection meanwhile.
        A client sends nothing while its response is under way (no pipelining), so the only thing the
        connection can bring is its end."""
        self.faulted_at.append(time.perf_counter())
        try:
            async with asyncio.timeout(seconds):
                data = await reader.read(1)
        except TimeoutError:
            return True
        except ConnectionError:
            data = b""
        if data:
            raise RuntimeError("the client sent data while its response was under way (pipelining is not supported)")
        self.hangups.append(time.perf_counter())
        self._hung_up.set()
        return False


_REASONS = {
    200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
    529: "Site Overloaded",
}


async def _write_whole(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\ncontent-type: application/json\r\n"
    writer.write(head.encode() + f"content-length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed a kept-alive connection
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    path, _, query = target.partition("?")
    return RecordedRequest(method, path, query, headers, body)
