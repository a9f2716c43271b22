"""What every vendor's local server in tests/connectors shares (fake_zendesk.py, fake_freshdesk.py,
fake_hubspot.py, fake_salesforce.py, fake_calcom.py, fake_google_calendar.py, and fault_proxy.py in
front of Radicale): a real HTTP/1.1 server on 127.0.0.1 in a thread (HTTPS where it is given a TLS
context), the log of the requests that reached it, and the faults the harness protocol injects on the
wire (tests/connectors/harness.py, `WireFaults`). Each vendor's server subclasses `VendorServer` with its
own routes, auth check, error bodies and malformed answer."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

JSON = "application/json; charset=utf-8"
POLL_INTERVAL_S = 0.02
"""How often the serving thread looks for a shutdown: closing waits for it, once per test."""


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server read it."""

    method: str
    path: str
    """Percent-decoded, without the query (`FaultProxy`'s: the request-target as sent, query included)."""
    query: Mapping[str, list[str]]
    """Decoded, as `parse_qs` reads it (`+` is a space)."""
    headers: Mapping[str, str]
    """Names lower-cased."""
    body: bytes
    raw_query: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Answer:
    status: int
    body: bytes | str = b""
    """Text is sent UTF-8 encoded."""
    headers: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    """The status line's phrase where it is not the standard one (a proxied answer's)."""

    @classmethod
    def of_json(cls, status: int, value: Any, headers: Mapping[str, str] | None = None) -> Answer:
        return cls(status, json.dumps(value).encode(), {"content-type": JSON, **(headers or {})})

    @property
    def payload(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


@dataclass(frozen=True)
class Fault:
    """What one request gets instead of the vendor's answer; all unset: the vendor's answer."""

    status: int | None = None
    body: str | None = None
    """The failure's body (else the vendor's own error body), or the malformed answer's."""
    headers: Mapping[str, str] = field(default_factory=dict)
    stall_s: float = 0.0
    malformed: bool = False


class VendorServer:
    """`with Server(...) as server:` serves on an ephemeral port of 127.0.0.1 until the block ends.
    Subclasses implement `authorised`, `route` and `error_body`, or `respond` where they route otherwise."""

    methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE")
    keep_blank_query_values = True
    """Whether `?name=` is read as `{"name": [""]}` (True) or left out."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[SeenRequest] = []
        """The requests faults apply to, in order (a token endpoint's are not among them)."""
        self._faults: deque[Fault] = deque()
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._tls = tls
        self._connections: set[socket.socket] = set()
        self._http = (ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self)) if tls is None
                      else _TlsServer(self, tls))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S},
                                        name=type(self).__name__, daemon=True)

    # -- what a vendor's server says ---------------------------------------------------------------

    def authorised(self, request: SeenRequest) -> Answer | None:
        """None where the request's credentials are right, else the vendor's answer (a 401)."""
        raise NotImplementedError

    def route(self, request: SeenRequest) -> Answer:
        raise NotImplementedError

    def respond(self, request: SeenRequest) -> Answer:
        """The vendor's answer to a request no fault took: `authorised`, then `route` (one at a time, as a
        database would order them)."""
        refused = self.authorised(request)
        if refused is not None:
            return refused
        with self._lock:
            return self.route(request)

    def unfaulted(self, request: SeenRequest) -> Answer | None:
        """The answer to a request that faults never touch and `requests` does not log (a token
        endpoint's), else None."""
        return None

    def error_body(self, status: int) -> str:
        """The vendor's own error body for an injected failure."""
        raise NotImplementedError

    def failure_answer(self, fault: Fault, request: SeenRequest) -> Answer:
        """What an injected failure (`fault.status`) answers."""
        assert fault.status is not None
        body = fault.body if fault.body is not None else self.error_body(fault.status)
        return Answer(fault.status, body.encode(), {"content-type": JSON, **fault.headers})

    malformed_body = b'{"truncated": '
    """What a malformed 200 carries: the start of a JSON document, cut off."""

    def malformed_answer(self, fault: Fault) -> Answer:
        return Answer(200, self.malformed_body, {"content-type": JSON})

    # -- the harness's faults ----------------------------------------------------------------------

    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None, after: int = 0) -> None:
        """The harness protocol's, plus `after`: that many requests are answered as usual first."""
        failure = Fault(status=status, body=body, headers=dict(headers or {}))
        with self._lock:
            self._faults.extend([Fault()] * after + [failure] * times)

    def stall_next(self, seconds: float) -> None:
        with self._lock:
            self._faults.append(Fault(stall_s=seconds))

    def malformed_next(self) -> None:
        with self._lock:
            self._faults.append(Fault(malformed=True))

    @property
    def requests_seen(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- serving -----------------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        """`http://127.0.0.1:<port>` (`https://` where it serves TLS)."""
        host, port = self._http.server_address[:2]
        return f"{'http' if self._tls is None else 'https'}://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        return self.origin

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closing.set()  # a stalled answer ends now rather than outliving the test
        self._http.shutdown()
        self._http.server_close()
        with self._lock:
            for connection in list(self._connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def read_request(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> SeenRequest:
        """The request as `requests` logs it."""
        parts = urlsplit(target)
        return SeenRequest(method=method, path=unquote(parts.path),
                           query=parse_qs(parts.query, keep_blank_values=self.keep_blank_query_values),
                           headers=headers, body=body, raw_query=parts.query)

    def answer(self, request: SeenRequest) -> Answer | None:
        """The answer to one request, faults first as they happen on the wire; None: the server is
        closing during a stall (the connection is dropped)."""
        exempt = self.unfaulted(request)
        if exempt is not None:
            return exempt
        with self._lock:
            self.requests.append(request)
            fault = self._faults.popleft() if self._faults else Fault()
        if fault.stall_s:
            if self._closing.wait(fault.stall_s):
                return None
        elif fault.malformed:
            return self.malformed_answer(fault)
        elif fault.status is not None:
            return self.failure_answer(fault, request)
        return self.respond(request)


class _TlsServer(ThreadingHTTPServer):
    """HTTPS: the TLS handshake runs in the connection's own thread, so a slow client holds up no other."""

    def __init__(self, vendor: VendorServer, tls: ssl.SSLContext) -> None:
        self.vendor = vendor
        self.tls = tls
        super().__init__(("127.0.0.1", 0), _handler_for(vendor, timeout=30))

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)
        try:
            connection = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.vendor._lock:
            self.vendor._connections.add(connection)
        try:
            super().finish_request(connection, client_address)
        except (ssl.SSLError, OSError):
            pass  # the client hung up (as one that times out does)
        finally:
            with self.vendor._lock:
                self.vendor._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up mid-answer is expected here


def _handler_for(server: VendorServer, *, timeout: float | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the vendors' edges and the clients' pools use it
        disable_nagle_algorithm = True  # headers and body go in two writes; no 40 ms wait on the second

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = server.read_request(self.command, self.path,
                                          {name.lower(): value for name, value in self.headers.items()},
                                          self.rfile.read(length) if length else b"")
            answer = server.answer(request)
            if answer is None:
                self.close_connection = True
                return
            payload = answer.payload
            try:
                self.send_response(answer.status, answer.reason)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.status != 204:
                    self.send_header("content-length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD" and answer.status != 204:
                    self.wfile.write(payload)
            except (OSError, ssl.SSLError):
                self.close_connection = True  # the client gave up waiting, as one that times out does

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests read `server.requests` instead."""

    Handler.timeout = timeout
    for method in server.methods:
        setattr(Handler, f"do_{method}", Handler._serve)
    return Handler
