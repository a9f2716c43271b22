"""A fault-injecting HTTP reverse proxy, for vendors whose test server is a real one that cannot fail on
demand (Radicale): it forwards every request to an upstream URL and answers the next ones with an
error status, a stall or a malformed body when a test asks (the `WireFaults` of tests/connectors/harness.py).

`with FaultProxy("http://127.0.0.1:5232") as proxy:` listens on 127.0.0.1, a free port; point the client
at `proxy.url_for(upstream_url)`. Every request is recorded (`requests`, names lower-cased), faulted or not.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
UPSTREAM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    """With the query string."""
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class _Failure:
    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass
class FaultProxy:
    upstream: str
    """The upstream server's root, `http://127.0.0.1:5232`; paths are forwarded as they come."""
    error_body: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    """The upstream's own error body for a status, as (content type, text); else the status phrase."""
    error_headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    """Headers the upstream sends with a status (e.g. WWW-Authenticate with 401)."""
    malformed: tuple[str, bytes] = ("text/xml; charset=utf-8", b"<?xml version='1.0'?><multistatus><response>")
    """What `malformed_next` answers with status 200, as (content type, body)."""
    before_forward: Callable[[ProxiedRequest], None] | None = None
    """Called in the request's own thread before it is forwarded: a test's way to put another client's
    requests between a client's check and its write (without faults, every request is forwarded)."""
    requests: list[ProxiedRequest] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _stalls: list[float] = field(default_factory=list)
    _malformed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    # -- WireFaults -----------------------------------------------------------------------------------

    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        content_type, text = self.error_body.get(status, ("text/plain; charset=utf-8", HTTPStatus(status).phrase))
        sent_headers = {"Content-Type": content_type, **self.error_headers.get(status, {}), **(headers or {})}
        failure = _Failure(status, (text if body is None else body).encode(), sent_headers)
        with self._lock:
            self._failures.extend([failure] * times)

    def stall_next(self, seconds: float) -> None:
        with self._lock:
            self._stalls.append(seconds)

    def malformed_next(self) -> None:
        with self._lock:
            self._malformed += 1

    @property
    def requests_seen(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- running --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The proxy's root, `http://127.0.0.1:<port>/`."""
        assert self._server is not None, "the proxy is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def url_for(self, upstream_url: str) -> str:
        """`upstream_url` (a URL on the upstream server) as reached through the proxy."""
        parts = urlsplit(upstream_url)
        return self.url.rstrip("/") + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def start(self) -> None:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy",
                         daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()  # ends any stall at once
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _take_fault(self, request: ProxiedRequest) -> tuple[_Failure | None, float, bool]:
        """Records the request and takes the fault it is to get: (failure, stall seconds, malformed)."""
        with self._lock:
            self.requests.append(request)
            failure = self._failures.pop(0) if self._failures else None
            stall = self._stalls.pop(0) if self._stalls and failure is None else 0.0
            malformed = failure is None and not stall and self._malformed > 0
            if malformed:
                self._malformed -= 1
            return failure, stall, malformed


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keeps the client's connection open between requests, as servers do

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = ProxiedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        failure, stall, malformed = self.owner._take_fault(request)
        if failure is not None:
            self._answer(failure.status, failure.headers, failure.body)
            return
        if stall and self.owner._stopping.wait(stall):
            self.close_connection = True
            return
        if malformed:
            content_type, text = self.owner.malformed
            self._answer(200, {"Content-Type": content_type}, text)
            return
        self._forward(request)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_any
    do_PROPFIND = do_PROPPATCH = do_REPORT = do_MKCALENDAR = do_MKCOL = do_MOVE = do_COPY = do_any

    def _forward(self, request: ProxiedRequest) -> None:
        if self.owner.before_forward is not None:
            self.owner.before_forward(request)
        upstream = urlsplit(self.owner.upstream)
        connection = http.client.HTTPConnection(upstream.hostname or "127.0.0.1", upstream.port,
                                                timeout=UPSTREAM_TIMEOUT_S)
        try:
            headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
            connection.request(request.method, request.path, body=request.body or None, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            sent = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            self._answer(response.status, sent, answer, reason=response.reason)
        except OSError as exc:
            self._answer(502, {"Content-Type": "text/plain"}, f"upstream unreachable: {exc}".encode())
        finally:
            connection.close()

    def _answer(self, status: int, headers: Mapping[str, str], body: bytes, reason: str | None = None) -> None:
        try:
            self.send_response(status, reason)
            for name, value in headers.items():
                if name.lower() not in ("date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client gave up (a timeout) and closed the connection
            self.close_connection = True
