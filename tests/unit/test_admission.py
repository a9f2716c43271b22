"""Admission control and the API's rate limits: pure logic with a hand-turned clock."""

from __future__ import annotations

from gateway.admission import Admission, RateLimits, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_gateway_takes_calls_up_to_its_capacity_and_a_place_frees_when_a_call_ends() -> None:
    admission = Admission(3, clock=Clock())
    assert [admission.admit(f"c{i}", "acme") for i in range(3)] == [None, None, None]
    refusal = admission.admit("c3", "acme")
    assert refusal is not None
    assert (refusal.reason, refusal.live_calls, refusal.limit) == ("gateway_at_capacity", 3, 3)
    assert admission.admit("c1", "acme") is None, "admitting an admitted call again changes nothing"
    admission.release("c1")
    assert admission.admit("c3", "acme") is None
    assert admission.live == 3


def test_one_tenant_cannot_take_the_gateway_from_the_others() -> None:
    admission = Admission(10, tenant_limit=lambda tenant: 2 if tenant == "acme" else None, clock=Clock())
    assert admission.admit("a1", "acme") is None
    assert admission.admit("a2", "acme") is None
    refusal = admission.admit("a3", "acme")
    assert refusal is not None
    assert refusal.reason == "tenant_at_capacity"
    assert refusal.limit == 2
    assert all(admission.admit(f"g{i}", "globex") is None for i in range(8))
    assert (admission.tenant_live("acme"), admission.tenant_live("globex"), admission.live) == (2, 8, 10)


def test_an_answered_call_whose_media_never_comes_gives_its_place_back() -> None:
    clock = Clock()
    admission = Admission(2, hold_s=30, clock=clock)
    assert admission.admit("never-connects", "acme") is None
    assert admission.admit("connects", "acme") is None
    assert admission.connected("connects")
    clock.now = 29.0
    assert admission.admit("third", "acme") is not None
    clock.now = 31.0
    assert admission.admit("third", "acme") is None, "the unconnected call's place came back"
    assert not admission.connected("never-connects"), "too late: it must be admitted again"
    assert admission.connected("third")
    clock.now = 1000.0
    assert admission.live == 2, "connected calls count until they end, however long"


def test_a_gateway_that_is_not_ready_admits_nothing() -> None:
    problem: list[str | None] = ["the log has not taken a write for 5 s"]
    admission = Admission(10, not_ready=lambda: problem[0], clock=Clock())
    refusal = admission.admit("c1", "acme")
    assert refusal is not None
    assert refusal.reason == "not_ready"
    assert "log" in refusal.detail
    problem[0] = None
    assert admission.admit("c1", "acme") is None


def test_api_keys_have_a_rate_and_a_burst() -> None:
    clock = Clock()
    limits = RateLimits(clock=clock)
    assert [limits.take("k", per_minute=60, burst=3) for _ in range(3)] == [None, None, None]
    wait = limits.take("k", per_minute=60, burst=3)
    assert wait is not None
    assert 0.9 < wait <= 1.0
    assert retry_after(wait) == "1"
    assert limits.take("other", per_minute=60, burst=3) is None, "each key has its own bucket"
    clock.now = 1.0
    assert limits.take("k", per_minute=60, burst=3) is None


def test_strangers_without_a_valid_key_are_slowed_down_and_forgotten_in_bounded_memory() -> None:
    clock = Clock()
    limits = RateLimits(clock=clock)
    assert all(limits.failed_auth("10.0.0.1") is None for _ in range(10))
    assert limits.failed_auth("10.0.0.1") is not None
    for i in range(20_000):
        limits.failed_auth(f"10.1.{i // 256}.{i % 256}")
    assert len(limits._sources) == 10_000
