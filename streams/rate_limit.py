"""Rate limits as token buckets: the dialer's per tenant, the providers' per API key; and what a server's
Retry-After asks for."""

from __future__ import annotations

import email.utils
import time


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up. `delay()` says how long until the
    next token; `take()` spends one."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = max(self.updated, now)

    def delay(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate_per_s

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


def retry_after_wait(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds (delta-seconds or an HTTP-date, RFC 9110 10.2.3), never
    negative; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return None if seconds != seconds else max(0.0, seconds)  # NaN: unreadable
