"""Admission control: a gateway takes on only the calls it can serve well, and says busy to the rest.

A voice gateway that takes every call degrades every call: past what its CPU can carry, audio
arrives in bursts, turns slow down for everybody and webhooks time out (measured at 300 callers on
2 cores: webhook p99 35.6 s, 10 calls of 300 completed). So each call is admitted or refused when
it arrives, in microseconds, before anything is spent on it:

- **capacity**: the calls one gateway serves at once (`VOXLOG_MAX_CALLS`; the default is measured,
  see docs/performance.md), counted from the voice webhook (or the widget's socket) to the end of the
  session; a call answered but whose media never connects stops counting after `hold_s`;
- **per tenant**: `limits.max_concurrent_calls` in the tenant's file, so one tenant's burst cannot take
  the gateway from the others (per gateway: with N gateways a tenant may have N times as many);
- **readiness**: a gateway that cannot write its log, or is draining for shutdown, admits nothing.

A refused phone call gets `<Reject reason="busy"/>` (the caller hears busy, the call is not billed)
and is recorded as `call.refused`; the widget gets a WebSocket close with the reason.

API keys have a rate limit too (`limits.api_requests_per_minute` and `api_burst`): a request over it
is answered 429 with Retry-After before it costs anything, and so is a source address that keeps
presenting keys that are not valid.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from streams.rate_limit import TokenBucket

RefusalReason = Literal["gateway_at_capacity", "tenant_at_capacity", "not_ready"]

HOLD_S = 30.0
"""How long an answered call may take to connect its media before its place is given back
(Twilio connects within a second or two)."""
MAX_SOURCES = 10_000
"""Source addresses whose failed authentications are counted (the oldest are forgotten)."""


@dataclass(frozen=True)
class Refusal:
    reason: RefusalReason
    detail: str
    live_calls: int
    limit: int


@dataclass
class Admission:
    capacity: int
    tenant_limit: Callable[[str], int | None] = lambda _tenant: None
    hold_s: float = HOLD_S
    clock: Callable[[], float] = time.monotonic
    not_ready: Callable[[], str | None] = lambda: None
    """Why the gateway cannot take calls now (its log cannot be written, it is draining), or None."""
    _calls: dict[str, str] = field(default_factory=dict)
    """Admitted calls and their tenants."""
    _waiting: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Admitted calls whose media has not connected yet, oldest first, with when they were admitted."""
    _per_tenant: dict[str, int] = field(default_factory=dict)

    @property
    def live(self) -> int:
        self._expire()
        return len(self._calls)

    def tenant_live(self, tenant_id: str) -> int:
        self._expire()
        return self._per_tenant.get(tenant_id, 0)

    def admit(self, call_id: str, tenant_id: str) -> Refusal | None:
        """Takes the call on (None) or says why not; admitting a call already admitted changes nothing."""
        self._expire()
        if call_id in self._calls:
            return None
        problem = self.not_ready()
        if problem is not None:
            return Refusal("not_ready", problem, len(self._calls), self.capacity)
        if len(self._calls) >= self.capacity:
            return Refusal("gateway_at_capacity", f"this gateway serves {self.capacity} calls at once",
                           len(self._calls), self.capacity)
        limit = self.tenant_limit(tenant_id)
        tenant_live = self._per_tenant.get(tenant_id, 0)
        if limit is not None and tenant_live >= limit:
            return Refusal("tenant_at_capacity", f"tenant {tenant_id} may have {limit} calls at once",
                           tenant_live, limit)
        self._calls[call_id] = tenant_id
        self._waiting[call_id] = self.clock()
        self._per_tenant[tenant_id] = tenant_live + 1
        return None

    def connected(self, call_id: str) -> bool:
        """The admitted call's media arrived: it counts until `release`. False if it was never
        admitted or its place was given back meanwhile."""
        self._expire()
        self._waiting.pop(call_id, None)
        return call_id in self._calls

    def release(self, call_id: str) -> None:
        self._waiting.pop(call_id, None)
        tenant_id = self._calls.pop(call_id, None)
        if tenant_id is not None:
            self._per_tenant[tenant_id] -= 1
            if not self._per_tenant[tenant_id]:
                del self._per_tenant[tenant_id]

    def _expire(self) -> None:
        now = self.clock()
        while self._waiting:
            call_id, admitted_at = next(iter(self._waiting.items()))
            if now - admitted_at < self.hold_s:
                return
            self.release(call_id)


@dataclass
class RateLimits:
    """Token buckets per API key and per source address of failed authentications."""

    clock: Callable[[], float] = time.monotonic
    stranger_per_minute: float = 30
    stranger_burst: int = 10
    """Requests without a valid key one source address may make (each is audited) before 429s."""
    _keys: dict[str, TokenBucket] = field(default_factory=dict)
    _sources: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)

    def take(self, key: str, per_minute: float, burst: int) -> float | None:
        """Spends one of `key`'s tokens (None), or says in how many seconds one will be there."""
        now = self.clock()
        bucket = self._keys.get(key)
        if bucket is None or bucket.rate_per_s != per_minute / 60 or bucket.burst != burst:
            bucket = self._keys[key] = TokenBucket(per_minute / 60, burst, now)
        return _spend(bucket, now)

    def failed_auth(self, source: str) -> float | None:
        """Counts a request without a valid key from `source`: None while it is within the allowance,
        else when to come back. Bounds the audit records a stranger can make us write."""
        now = self.clock()
        bucket = self._sources.pop(source, None) or TokenBucket(self.stranger_per_minute / 60, self.stranger_burst,
                                                                 now)
        self._sources[source] = bucket
        while len(self._sources) > MAX_SOURCES:
            self._sources.popitem(last=False)
        return _spend(bucket, now)


def _spend(bucket: TokenBucket, now: float) -> float | None:
    wait = bucket.delay(now)
    if wait > 0:
        return wait
    bucket.take(now)
    return None


def retry_after(wait_s: float) -> str:
    """A Retry-After header's value: whole seconds, at least one."""
    return str(max(1, math.ceil(wait_s)))
