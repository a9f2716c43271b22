"""What the ticket desks' local servers (fake_zendesk.py, fake_freshdesk.py) share: a real HTTP/1.1
server on 127.0.0.1 in a thread, the log of what reached it, and the faults the harness protocol
injects on the wire (tests/connectors/harness.py, `WireFaults`). Each vendor's server subclasses it
with its own routes, auth check and error bodies."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server read it."""

    method: str
    path: str
    """Percent-decoded, without the query."""
    query: Mapping[str, list[str]]
    """Decoded, as `parse_qs` reads it (`+` is a space, blank values kept)."""
    raw_query: str
    headers: Mapping[str, str]
    """Names lower-cased."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, status: int, value: Any, headers: Mapping[str, str] | None = None) -> Answer:
        return cls(status, json.dumps(value).encode(), {"content-type": "application/json; charset=utf-8",
                                                         **(headers or {})})


@dataclass
class _Fault:
    status: int | None = None
    body: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    stall_s: float = 0.0
    malformed: bool = False


class FakeDeskServer:
    """`with Server(...) as server:` serves on an ephemeral port until the block ends. Subclasses
    implement `authorised`, `route` and `error_body`."""

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self._faults: deque[_Fault] = deque()
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)

    # -- what a vendor's server says ---------------------------------------------------------------

    def authorised(self, request: SeenRequest) -> Answer | None:
        """None where the request's credentials are right, else the vendor's answer (a 401)."""
        raise NotImplementedError

    def route(self, request: SeenRequest) -> Answer:
        raise NotImplementedError

    def error_body(self, status: int) -> str:
        """The vendor's own error body for an injected failure."""
        raise NotImplementedError

    malformed_body = b'{"truncated": '
    """What a malformed 200 carries: the start of a JSON document, cut off."""

    # -- the harness's faults ----------------------------------------------------------------------

    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._faults.extend(_Fault(status=status, body=body, headers=dict(headers or {})) for _ in range(times))

    def stall_next(self, seconds: float) -> None:
        with self._lock:
            self._faults.append(_Fault(stall_s=seconds))

    def malformed_next(self) -> None:
        with self._lock:
            self._faults.append(_Fault(malformed=True))

    @property
    def requests_seen(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- serving -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closing.set()  # a stalled answer ends now rather than outliving the test
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def answer(self, request: SeenRequest) -> Answer:
        with self._lock:
            self.requests.append(request)
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.stall_s:
            self._closing.wait(fault.stall_s)
        elif fault is not None and fault.malformed:
            return Answer(200, self.malformed_body, {"content-type": "application/json; charset=utf-8"})
        elif fault is not None and fault.status is not None:
            body = fault.body if fault.body is not None else self.error_body(fault.status)
            return Answer(fault.status, body.encode(), {"content-type": "application/json; charset=utf-8",
                                                        **fault.headers})
        refused = self.authorised(request)
        if refused is not None:
            return refused
        with self._lock:  # the in-memory state changes one request at a time, as a database would order them
            return self.route(request)


def _handler_for(server: FakeDeskServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in two writes; no 40 ms wait on the second

        def _serve(self) -> None:
            target = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            request = SeenRequest(
                method=self.command,
                path=unquote(target.path),
                query=parse_qs(target.query, keep_blank_values=True),
                raw_query=target.query,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self.rfile.read(length) if length else b"",
            )
            answer = server.answer(request)
            try:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting, as one that times out does

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests read `server.requests` instead."""

    return Handler
