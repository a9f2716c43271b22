"""Rate limits as token buckets: the dialer's per tenant, the providers' per API key."""

from __future__ import annotations


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
