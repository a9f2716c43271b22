"""Provider chains: breakers, retries, rate limits and fallbacks decide who answers, and say why."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from streams.providers.base import ErrorKind, LlmProvider, LlmRequest, LlmResult, ProviderError, ProviderSwitch
from streams.providers.resilience import (
    ChainExhausted,
    ChainLlm,
    CircuitBreaker,
    Guarded,
    ProviderChain,
    RetryPolicy,
)
from streams.rate_limit import TokenBucket


@dataclass
class Clock:
    now: float = 0.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds




class FakeLlm(LlmProvider):
    """A provider that behaves as told, request by request (a cloud provider's failure modes, in process)."""

    def __init__(self, name: str, *behaviours: str) -> None:
        self.name = name
        self.behaviours = list(behaviours)
        self.requests: list[LlmRequest] = []

    async def _complete(self, request: LlmRequest) -> LlmResult:
        self.requests.append(request)
        behaviour = self.behaviours.pop(0) if self.behaviours else "ok"
        match behaviour:
            case "ok":
                return LlmResult(f"hello from {self.name}", (), "stop", 10, 3, 40, 60, request.model)
            case "stall":
                await asyncio.sleep(3600)
            case "429":
                raise ProviderError(self.name, ErrorKind.RATE_LIMITED, "429 Too Many Requests", retryable=True,
                                    retry_after_s=20.0)
            case "500":
                raise ProviderError(self.name, ErrorKind.SERVER, "500 Internal Server Error", retryable=True)
            case "401":
                raise ProviderError(self.name, ErrorKind.AUTH, "401 Unauthorized", retryable=False)
        raise AssertionError(behaviour)


def chain(*providers: FakeLlm, clock: Clock | None = None, timeout_s: float = 0.05,
          breakers: dict[str, CircuitBreaker] | None = None, buckets: dict[str, TokenBucket] | None = None,
          deadline_s: float = 5.0) -> ChainLlm:
    clock = clock or Clock()
    breakers = breakers if breakers is not None else {}
    members = [Guarded[LlmProvider](p, p.name, f"{p.name}-model", breakers.setdefault(p.name, CircuitBreaker()),
                                    timeout_s, (buckets or {}).get(p.name)) for p in providers]
    return ChainLlm(ProviderChain("llm", members, RetryPolicy(), deadline_s, clock, clock.sleep, random.Random(7)))


REQUEST = LlmRequest("req-1", "agent-model", ())


async def test_the_primary_answers_when_it_can() -> None:
    primary, backup = FakeLlm("openai"), FakeLlm("anthropic")
    result = await chain(primary, backup).complete(REQUEST)
    assert (result.provider, result.text, result.model) == ("openai", "hello from openai", "openai-model")
    assert (result.report.failures, result.report.fallbacks) == ([], [])
    assert backup.requests == []


async def test_a_server_error_is_retried_once_then_the_next_provider_answers() -> None:
    primary, backup = FakeLlm("openai", "500", "500"), FakeLlm("anthropic")
    clock = Clock()
    result = await chain(primary, backup, clock=clock).complete(REQUEST)
    assert result.provider == "anthropic"
    assert backup.requests[0].model == "anthropic-model", "each provider is asked for its own model"
    assert [f.kind for f in result.report.failures] == ["server", "server"]
    assert result.report.fallbacks == [ProviderSwitch("openai", "anthropic", "error")]
    assert len(clock.slept) == 1
    assert 0.025 <= clock.slept[0] <= 0.05, "a jittered backoff, no longer than max_pause_s"


async def test_a_stalled_primary_costs_one_attempt_timeout_then_falls_back() -> None:
    primary, backup = FakeLlm("openai", "stall"), FakeLlm("anthropic")
    result = await chain(primary, backup, timeout_s=0.05).complete(REQUEST)
    assert result.provider == "anthropic"
    assert len(primary.requests) == 1, "a timeout is not retried while a fallback can answer"
    assert [f.kind for f in result.report.failures] == ["timeout"]
    assert result.report.fallbacks == [ProviderSwitch("openai", "anthropic", "timeout")]


async def test_a_rate_limited_primary_hands_over_at_once_rather_than_wait_its_retry_after() -> None:
    primary, backup = FakeLlm("openai", "429"), FakeLlm("anthropic")
    clock = Clock()
    result = await chain(primary, backup, clock=clock).complete(REQUEST)
    assert result.report.fallbacks == [ProviderSwitch("openai", "anthropic", "rate_limited")]
    assert clock.slept == []


async def test_the_last_provider_waits_out_a_short_retry_after_within_the_deadline() -> None:
    only = FakeLlm("openai", "429")
    only.behaviours = ["429", "ok"]
    clock = Clock()
    with pytest.raises(ChainExhausted) as refused:
        await chain(only, clock=clock, deadline_s=5.0).complete(REQUEST)
    assert clock.slept == [], "a 20 s Retry-After does not fit a 5 s deadline"
    assert [f.kind for f in refused.value.report.failures] == ["rate_limited"]

    short = FakeLlm("openai")
    short.behaviours = ["500", "ok"]
    result = await chain(short, clock=Clock()).complete(REQUEST)
    assert (result.provider, [f.kind for f in result.report.failures]) == ("openai", ["server"])


async def test_auth_errors_are_not_retried() -> None:
    primary, backup = FakeLlm("openai", "401"), FakeLlm("anthropic")
    result = await chain(primary, backup).complete(REQUEST)
    assert len(primary.requests) == 1
    assert [(f.kind, f.retryable) for f in result.report.failures] == [("auth", False)]


async def test_an_open_circuit_skips_the_provider_until_a_probe_succeeds() -> None:
    clock, breakers = Clock(), {"openai": CircuitBreaker(failure_threshold=3, reset_after_s=30)}
    primary, backup = FakeLlm("openai", *["stall"] * 3), FakeLlm("anthropic")
    for _ in range(3):
        await chain(primary, backup, clock=clock, breakers=breakers).complete(REQUEST)
    assert breakers["openai"].state(clock.now) == "open"
    result = await chain(primary, backup, clock=clock, breakers=breakers).complete(REQUEST)
    assert len(primary.requests) == 3, "an open circuit costs the call nothing"
    assert result.report.fallbacks == [ProviderSwitch("openai", "anthropic", "circuit_open")]
    assert result.report.failures == []

    clock.now += 30
    assert breakers["openai"].state(clock.now) == "half_open"
    result = await chain(primary, backup, clock=clock, breakers=breakers).complete(REQUEST)
    assert result.provider == "openai", "one probe goes through, and closes the circuit"
    assert breakers["openai"].state(clock.now) == "closed"


def test_a_failed_probe_opens_the_circuit_again() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=10)
    breaker.failed(0.0)
    assert breaker.allow(0.0)
    breaker.failed(1.0)
    assert not breaker.allow(5.0)
    assert breaker.allow(11.0), "the probe"
    assert not breaker.allow(11.0), "one probe at a time"
    breaker.failed(11.5)
    assert breaker.state(12.0) == "open"
    assert not breaker.allow(20.0)
    assert breaker.allow(21.5)


async def test_a_spent_rate_limit_sends_the_request_to_the_next_provider() -> None:
    clock = Clock()
    buckets = {"openai": TokenBucket(rate_per_s=1.0, burst=1, now=0.0)}
    primary, backup = FakeLlm("openai"), FakeLlm("anthropic")
    first = await chain(primary, backup, clock=clock, buckets=buckets).complete(REQUEST)
    second = await chain(primary, backup, clock=clock, buckets=buckets).complete(REQUEST)
    assert (first.provider, second.provider) == ("openai", "anthropic")
    assert second.report.fallbacks == [ProviderSwitch("openai", "anthropic", "rate_limited")]
    clock.now += 1.0
    assert (await chain(primary, backup, clock=clock, buckets=buckets).complete(REQUEST)).provider == "openai"


async def test_when_every_provider_fails_the_report_says_what_each_did() -> None:
    with pytest.raises(ChainExhausted) as failed:
        await chain(FakeLlm("openai", "stall"), FakeLlm("anthropic", "401")).complete(REQUEST)
    report = failed.value.report
    assert [(f.provider, f.kind) for f in report.failures] == [("openai", "timeout"), ("anthropic", "auth")]
    assert report.fallbacks == [ProviderSwitch("openai", "anthropic", "timeout")]
    assert "openai (timeout), anthropic (auth)" in str(failed.value)


def test_a_provider_on_this_machine_is_not_cut_off_for_being_slow() -> None:
    """A burst of calls slows the local recogniser down; its circuit must not open for it (every call
    after the burst would fail), while errors still open it."""
    local = CircuitBreaker(failure_threshold=2, reset_after_s=10, counts_timeouts=False)
    for at in range(10):
        local.failed(float(at), "timeout")
    assert local.state(10.0) == "closed"
    local.failed(11.0, "worker_exited")
    local.failed(12.0, "worker_exited")
    assert local.state(12.0) == "open"
    remote = CircuitBreaker(failure_threshold=2, reset_after_s=10)
    remote.failed(0.0, "timeout")
    remote.failed(1.0, "timeout")
    assert remote.state(1.0) == "open"
