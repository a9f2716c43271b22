"""Custom webhooks: a tool call POSTed as JSON to the tenant's own endpoint, signed so the receiver can
tell it came from voxlog and is not a replay.

The request (the payload is documented in docs/integrations.md):

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <the tool call's idempotency key>
    X-Voxlog-Timestamp: <unix seconds>
    X-Voxlog-Signature: v1=<hex HMAC-SHA256 of "<timestamp>." + body, keyed with the webhook's secret>

    {"tool": ..., "arguments": {...}, "call_id": ..., "tenant_id": ..., "idempotency_key": ..., "sent_at": ...}

A receiver checks the signature with `verify_signature` (or its own few lines), refuses a timestamp
older than five minutes (a captured request replayed later), and keeps the idempotency keys it has
acted on: a command redelivered to the worker posts again with the same key, and the receiver answers
what it answered before. 2xx with a JSON body is the tool's result; anything else is a failure
classified like any vendor's (429 and 5xx retried, 4xx not).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from streams.connectors.base import CheckResult, ConnectorError, FailureKind, RateLimit
from streams.connectors.http_status import failure_for_status
from streams.connectors.secrets import Secrets
from streams.connectors.vendor_settings import WebhookSettings as WebhookSettings

SIGNATURE_HEADER = "X-Voxlog-Signature"
TIMESTAMP_HEADER = "X-Voxlog-Timestamp"
SIGNATURE_TOLERANCE_S = 300
MAX_RESULT_BYTES = 64 * 1024
"""A result bigger than this is refused: it would be recorded in the call's log and read to the LLM."""


@dataclass(frozen=True)
class WebhookSigner:
    """Signs webhook bodies (HMAC-SHA256 over the timestamp and the body)."""

    secret: bytes

    def headers(self, body: bytes, timestamp: int) -> dict[str, str]:
        return {
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: f"v1={self.digest(body, timestamp)}",
            "Content-Type": "application/json",
        }

    def digest(self, body: bytes, timestamp: int) -> str:
        return hmac.new(self.secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


class SignatureInvalid(ValueError):
    pass


def verify_signature(secret: bytes, body: bytes, headers: Mapping[str, str], *, now: float | None = None,
                     tolerance_s: int = SIGNATURE_TOLERANCE_S) -> None:
    """What a receiver runs on each request: raises `SignatureInvalid` unless the signature holds for this
    body and the timestamp is recent (within `tolerance_s` either way)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    stamp, signature = lowered.get(TIMESTAMP_HEADER.lower()), lowered.get(SIGNATURE_HEADER.lower())
    if not stamp or not signature:
        raise SignatureInvalid("the request is not signed")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise SignatureInvalid("the timestamp is not a number") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise SignatureInvalid("the timestamp is too old or in the future: a replay?")
    expected = f"v1={WebhookSigner(secret).digest(body, timestamp)}"
    if not any(hmac.compare_digest(expected, part.strip()) for part in signature.split(",")):
        raise SignatureInvalid("the signature does not match the body")


class WebhookTarget:
    """Posts tool calls to one URL, signed. Blocking, like every connector (the worker runs it in a thread)."""

    vendor = "webhook"

    def __init__(self, url: str, secret: SecretStr, *, timeout_s: float, requests_per_s: float = 10.0,
                 retries: int | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self.retries = retries
        """How often a safe failure is tried again; None: as often as the worker tries any tool."""
        self._signer = WebhookSigner(secret.get_secret_value().encode())
        self._client = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)
        self.rate_limit = RateLimit(max(1, round(requests_per_s)), 1.0, "the webhook's settings (requests_per_s)")

    def post(self, payload: Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        body = json.dumps({**payload, "idempotency_key": idempotency_key, "sent_at": int(time.time())},
                          sort_keys=True, separators=(",", ":")).encode()
        headers = {**self._signer.headers(body, int(time.time())), "Idempotency-Key": idempotency_key}
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"webhook {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"webhook {self.url}: {type(exc).__name__}") from None
        if not response.is_success:
            raise failure_for_status(response.status_code, response.text[:300], vendor=f"webhook {self.url}",
                                     retry_after=response.headers.get("Retry-After"))
        if len(response.content) > MAX_RESULT_BYTES:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"webhook {self.url} answered {len(response.content)} "
                                 f"bytes; at most {MAX_RESULT_BYTES} are taken")
        if not response.content:
            return {}
        try:
            result = response.json()
        except ValueError:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"webhook {self.url} answered something that is not "
                                 "JSON") from None
        return result if isinstance(result, dict) else {"result": result}

    def check(self) -> list[CheckResult]:
        """Whether the endpoint answers at all (a HEAD: any HTTP status means it is reachable; nothing is
        posted, so the receiver acts on nothing)."""
        try:
            response = self._client.head(self.url)
        except httpx.HTTPError as exc:
            return [CheckResult(f"reach {self.url}", False, f"no answer: {type(exc).__name__}")]
        return [CheckResult(f"reach {self.url}", True, f"answers (HTTP {response.status_code} to HEAD)")]

    def close(self) -> None:
        self._client.close()


def connect(settings: WebhookSettings, secrets: Secrets, name: str) -> WebhookTarget:
    return WebhookTarget(settings.url, secrets.resolve(settings.secret, f"webhook {name}"),
                         timeout_s=settings.timeout_s, requests_per_s=settings.requests_per_s,
                         retries=settings.retries)
