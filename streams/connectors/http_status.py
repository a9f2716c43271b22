"""What an HTTP answer from a vendor means for the operation: the one mapping every connector uses,
whichever SDK raised it (the SDKs wrap the same status codes in their own exceptions)."""

from __future__ import annotations

import email.utils
import time

from streams.connectors.base import ConnectorError, FailureKind

MAX_RETRY_AFTER_S = 3600.0
"""A Retry-After beyond this is read as this: a vendor's typo must not park a worker for days."""


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP-date, RFC 9110 10.2.3) in seconds, or None when
    absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


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
