"""A fault-injecting HTTP reverse proxy, for vendors whose test server is a real one that cannot fail on
demand (Radicale): it forwards every request to an upstream URL and answers the next ones with an
error status, a stall or a malformed body when a test asks (the `WireFaults` of tests/connectors/harness.py).

`with FaultProxy("http://127.0.0.1:5232") as proxy:` listens on 127.0.0.1, a free port; point the client
at `proxy.url_for(upstream_url)`. Every request is recorded (`requests`, names lower-cased), faulted or not.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Mapping
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from tests.connectors.vendor_server import Answer, Fault, SeenRequest, VendorServer

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
UPSTREAM_TIMEOUT_S = 30.0

ProxiedRequest = SeenRequest
"""A request as the proxy read it; its `path` is the request-target as sent (query included)."""


class FaultProxy(VendorServer):
    methods = ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH",
               "PROPFIND", "PROPPATCH", "REPORT", "MKCALENDAR", "MKCOL", "MOVE", "COPY")

    def __init__(self, upstream: str, *, error_bodies: Mapping[int, tuple[str, str]] | None = None,
                 error_headers: Mapping[int, Mapping[str, str]] | None = None,
                 malformed: tuple[str, bytes] = ("text/xml; charset=utf-8",
                                                 b"<?xml version='1.0'?><multistatus><response>"),
                 before_forward: Callable[[ProxiedRequest], None] | None = None) -> None:
        super().__init__()
        self.upstream = upstream
        """The upstream server's root, `http://127.0.0.1:5232`; paths are forwarded as they come."""
        self.error_bodies: Mapping[int, tuple[str, str]] = error_bodies or {}
        """The upstream's own error body for a status, as (content type, text); else the status phrase."""
        self.error_headers: Mapping[int, Mapping[str, str]] = error_headers or {}
        """Headers the upstream sends with a status (e.g. WWW-Authenticate with 401)."""
        self.malformed = malformed
        """What `malformed_next` answers with status 200, as (content type, body)."""
        self.before_forward = before_forward
        """Called in the request's own thread before it is forwarded: a test's way to put another client's
        requests between a client's check and its write (without faults, every request is forwarded)."""

    @property
    def url(self) -> str:
        """The proxy's root, `http://127.0.0.1:<port>/`."""
        return f"{self.origin}/"

    def url_for(self, upstream_url: str) -> str:
        """`upstream_url` (a URL on the upstream server) as reached through the proxy."""
        parts = urlsplit(upstream_url)
        return self.url.rstrip("/") + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    # -- what the upstream would say ------------------------------------------------------------------

    def read_request(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> SeenRequest:
        """The request-target is kept as sent: it is forwarded as it came."""
        query = urlsplit(target).query
        return SeenRequest(method=method, path=target, query=parse_qs(query), headers=headers, body=body,
                           raw_query=query)

    def failure_answer(self, fault: Fault, request: SeenRequest) -> Answer:
        assert fault.status is not None
        content_type, text = self.error_bodies.get(fault.status,
                                                   ("text/plain; charset=utf-8", HTTPStatus(fault.status).phrase))
        return Answer(fault.status, text if fault.body is None else fault.body,
                      {"Content-Type": content_type, **self.error_headers.get(fault.status, {}), **fault.headers})

    def malformed_answer(self, fault: Fault) -> Answer:
        content_type, body = self.malformed
        return Answer(200, body, {"Content-Type": content_type})

    def respond(self, request: SeenRequest) -> Answer:
        if self.before_forward is not None:
            self.before_forward(request)
        upstream = urlsplit(self.upstream)
        connection = http.client.HTTPConnection(upstream.hostname or "127.0.0.1", upstream.port,
                                                timeout=UPSTREAM_TIMEOUT_S)
        try:
            headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
            connection.request(request.method, request.path, body=request.body or None, headers=headers)
            response = connection.getresponse()
            body = response.read()
            sent = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"date", "server"}}
            return Answer(response.status, body, sent, reason=response.reason)
        except OSError as exc:
            return Answer(502, f"upstream unreachable: {exc}".encode(), {"Content-Type": "text/plain"})
        finally:
            connection.close()
