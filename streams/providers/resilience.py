"""Providers fail; a call must not. A capability (the LLM; ASR and TTS: asr_chain.py, tts_chain.py) is served
by a chain of providers, the agent's choice first and its fallbacks after, each guarded by:

- a **circuit breaker** of its own (per provider and model, shared by every call in the process):
  after `failure_threshold` failures in a row it is skipped for `reset_after_s`, then one request
  probes it, so a dead provider costs calls nothing while it is down;
- a **rate limit** per API key (a token bucket shared by everything that uses that key): a request
  that would have to wait longer than `max_wait_s` for a token goes to the next provider instead;
- a **deadline** per attempt (`attempt_timeout_s`, on top of the adapter's own connect, first-byte
  and stall timeouts), and one for the whole chain;
- **retries** of the same provider only where they are cheap and safe: an error the provider marks
  retryable but not a timeout or a rate limit (those would cost the caller a full timeout or the
  provider's Retry-After again), after a jittered backoff of at most `max_pause_s`. The last
  provider of a chain, having nobody to hand over to, retries timeouts and rate limits too, within
  the chain's deadline.

What happened on the way is returned with the answer (`ChainReport`), or with `ChainExhausted` when
nobody answered, and recorded by the session as events: an `error.raised` per failure, a
`provider.fallback` per switch. So a failed primary costs the turn its attempt timeout plus the
switch, and the log says why.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

from streams.providers.base import (
    ChainReport,
    ErrorKind,
    LlmProvider,
    LlmRequest,
    LlmResult,
    ProviderError,
    ProviderFailure,
    ProviderSwitch,
)
from streams.rate_limit import TokenBucket

P = TypeVar("P")
T = TypeVar("T")

NOT_RETRIED_BEFORE_FALLBACK = frozenset({ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED, ErrorKind.AUTH,
                                         ErrorKind.BAD_REQUEST})

Handover = tuple[str, ErrorKind]
"""Who failed, and why the next member takes over (`ErrorKind.switch_reason`)."""


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    reset_after_s: float = 30.0
    counts_timeouts: bool = True
    """False for a provider on this machine's own CPU: a timeout there means the machine is busy (a
    burst of calls), not that the provider is gone, and opening the circuit would fail every call
    that comes after the burst too. Admission control, not the breaker, answers local overload."""
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    def state(self, now: float) -> Literal["closed", "open", "half_open"]:
        if self.opened_at is None:
            return "closed"
        return "half_open" if now - self.opened_at >= self.reset_after_s else "open"

    def allow(self, now: float) -> bool:
        """Whether a request may go to the provider now (in half-open state: one probe at a time)."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "open" or self.probing:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failed(self, now: float, kind: ErrorKind = ErrorKind.ERROR) -> None:
        if kind == ErrorKind.TIMEOUT and not self.counts_timeouts:
            self.probing = False
            return
        self.failures += 1
        if self.probing or self.failures >= self.failure_threshold:
            self.opened_at, self.probing = now, False


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2
    """Tries of one provider within one request."""
    base_s: float = 0.05
    max_pause_s: float = 0.25
    """The longest pause before retrying the same provider; a longer one (a Retry-After, say) means
    the next provider is tried instead."""
    max_wait_s: float = 0.2
    """The longest wait for a rate-limit token before the next provider is tried instead."""

    def pause_s(self, attempt: int, error: ProviderError, rng: random.Random) -> float:
        if error.retry_after_s is not None:
            return error.retry_after_s
        return float(min(self.max_pause_s, self.base_s * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0))


@dataclass
class Guarded(Generic[P]):
    """One provider of a chain with its guards."""

    provider: P
    name: str
    model: str
    breaker: CircuitBreaker
    attempt_timeout_s: float
    bucket: TokenBucket | None = None
    """The rate limit of the provider's API key (shared by every user of that key), if it has one."""


class ChainExhausted(ProviderError):
    """Every provider of the chain failed or was skipped; `report` says what each did."""

    def __init__(self, capability: str, report: ChainReport) -> None:
        kind = report.failures[-1].kind if report.failures else ErrorKind.CIRCUIT_OPEN
        tried = ", ".join(f"{f.provider} ({f.kind})" for f in report.failures) or "none could be tried"
        super().__init__(capability, kind, f"every provider failed: {tried}", retryable=True, report=report)


@dataclass
class ProviderChain(Generic[P]):
    capability: str
    members: Sequence[Guarded[P]]
    retry: RetryPolicy = RetryPolicy()
    deadline_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)

    @property
    def primary(self) -> Guarded[P]:
        return self.members[0]

    def index(self, member: Guarded[P]) -> int:
        return next(i for i, m in enumerate(self.members) if m is member)

    def failed(self, member: Guarded[P], error: ProviderError, report: ChainReport) -> Handover:
        """A member that had answered failed later (a stream, midway): its breaker and the report are
        told; returns what `run(failed=...)` needs to hand over to the next member."""
        member.breaker.failed(self.clock(), error.kind)
        report.failures.append(ProviderFailure.of(error, member.name))
        return member.name, error.kind.switch_reason()

    async def run(self, call: Callable[[Guarded[P]], Awaitable[T]], *, start: int = 0,
                  failed: Handover | None = None,
                  report: ChainReport | None = None) -> tuple[T, Guarded[P], ChainReport]:
        """`call(member)` with the chain's guards: the first answer, who gave it and what failed before;
        ChainExhausted (with the report) when nobody answered. A stream that loses its provider midway
        goes on with the members after it (`start`), saying which one failed and why (`failed`), and
        adds to the report it already has."""
        report = report if report is not None else ChainReport()
        deadline = self.clock() + self.deadline_s
        for index in range(start, len(self.members)):
            member = self.members[index]
            if failed is not None:
                report.fallbacks.append(ProviderSwitch(failed[0], member.name, failed[1]))
                failed = None
            last = index == len(self.members) - 1
            if not member.breaker.allow(self.clock()):
                failed = (member.name, ErrorKind.CIRCUIT_OPEN)
                continue
            if not await self._take_token(member, deadline, last):
                spent = ProviderFailure(member.name, ErrorKind.RATE_LIMITED, "the API key's rate limit is spent", True)
                report.failures.append(spent)
                failed = (member.name, ErrorKind.RATE_LIMITED)
                continue
            outcome = await self._attempts(member, call, deadline, last, report)
            if not isinstance(outcome, _Failed):
                return outcome, member, report
            failed = (member.name, outcome.error.kind.switch_reason())
        raise ChainExhausted(self.capability, report)

    async def _take_token(self, member: Guarded[P], deadline: float, last: bool) -> bool:
        if member.bucket is None:
            return True
        wait = member.bucket.delay(self.clock())
        if wait > 0:
            limit = deadline - self.clock() if last else min(self.retry.max_wait_s, deadline - self.clock())
            if wait > limit:
                return False
            await self.sleep(wait)
        member.bucket.take(self.clock())
        return True

    async def _attempts(self, member: Guarded[P], call: Callable[[Guarded[P]], Awaitable[T]], deadline: float,
                        last: bool, report: ChainReport) -> T | _Failed:
        error = ProviderError(member.name, ErrorKind.TIMEOUT, "no time left in the chain's deadline", retryable=True)
        for attempt in range(1, self.retry.attempts + 1):
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            timeout = min(member.attempt_timeout_s, remaining)
            try:
                result = await asyncio.wait_for(call(member), timeout)
            except TimeoutError:
                error = ProviderError(member.name, ErrorKind.TIMEOUT, f"no answer within {timeout:.2f} s",
                                      retryable=True)
            except ProviderError as exc:
                error = exc
            else:
                member.breaker.succeeded()
                return result
            self.failed(member, error, report)
            if not error.retryable or attempt == self.retry.attempts:
                break
            if not last and error.kind in NOT_RETRIED_BEFORE_FALLBACK:
                break
            pause = self.retry.pause_s(attempt, error, self.rng)
            if (pause > self.retry.max_pause_s and not last) or self.clock() + pause >= deadline:
                break
            await self.sleep(pause)
        return _Failed(error)


@dataclass(frozen=True)
class _Failed:
    error: ProviderError


class ChainLlm(LlmProvider):
    """An LLM served by a chain: each request goes through `chain.run` with the member's own model
    (none: the provider's default, never another provider's model name), and its result says who
    answered and what failed before."""

    def __init__(self, chain: ProviderChain[LlmProvider]) -> None:
        self.chain = chain
        self.name = chain.primary.name
        self.capabilities = chain.primary.provider.capabilities

    async def _complete(self, request: LlmRequest) -> LlmResult:
        async def ask(member: Guarded[LlmProvider]) -> LlmResult:
            return await member.provider.complete(replace(request, model=member.model))

        result, member, report = await self.chain.run(ask)
        return replace(result, provider=member.name, report=report)
