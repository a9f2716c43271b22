"""What an HTTP answer from a vendor means for the operation: the one mapping every connector uses,
whichever SDK raised it (the SDKs wrap the same status codes in their own exceptions)."""

from __future__ import annotations

from streams.connectors.base import ConnectorError, FailureKind
from streams.rate_limit import retry_after_wait

MAX_RETRY_AFTER_S = 3600.0
"""A Retry-After beyond this is read as this: a vendor's typo must not park a worker for days."""


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds, at most `MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    wait = retry_after_wait(value, now)
    return None if wait is None else min(wait, MAX_RETRY_AFTER_S)


def failure_for_status(status: int, detail: str, *, vendor: str, retry_after: str | None = None) -> ConnectorError:
    """The error for a non-2xx answer. `detail` is the vendor's own error text (never headers)."""
    text = f"{vendor}: {detail.strip()[:300]}" if detail.strip() else f"{vendor} answered HTTP {status}"
    if status == 401:
        return ConnectorError(FailureKind.AUTH, text, status=status)
    if status == 403:
        return ConnectorError(FailureKind.SCOPE, text, status=status)
    if status == 404:
        return ConnectorError(FailureKind.NOT_FOUND, text, status=status)
    if status in (409, 412):
        return ConnectorError(FailureKind.CONFLICT, text, status=status)
    if status == 429:
        return ConnectorError(FailureKind.RATE_LIMITED, text, status=status, retry_after_s=retry_after_s(retry_after))
    if status >= 500 or status == 408:
        return ConnectorError(FailureKind.UNAVAILABLE, text, status=status, retry_after_s=retry_after_s(retry_after))
    return ConnectorError(FailureKind.INVALID, text, status=status)
