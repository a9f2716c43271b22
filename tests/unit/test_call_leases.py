"""Which gateways' calls the reaper ends, and when: the lease watch, with a hand-turned clock."""

from __future__ import annotations

from consumers.workers.call_leases import Lease, LeasedCall, LeaseWatch

CALL = LeasedCall("call-1", "acme", 1_000)


def lease(instance: str, state: str = "serving", calls: tuple[LeasedCall, ...] = (CALL,)) -> Lease:
    return Lease(instance, state, calls, renewed_ms=0)  # type: ignore[arg-type]


def test_a_lease_that_is_not_renewed_is_lost_after_lease_s() -> None:
    watch = LeaseWatch("me", lease_s=20)
    watch.observe(lease("me", calls=()), 0.0)
    watch.observe(lease("other"), 0.0)
    for t in range(2, 21, 2):
        watch.observe(lease("me", calls=()), float(t))
        assert watch.lost(float(t)) == [], f"still within its lease at {t} s"
    watch.observe(lease("me", calls=()), 21.0)
    assert [x.instance for x in watch.lost(21.0)] == ["other"]


def test_renewals_keep_a_lease_alive_and_a_lease_without_calls_is_never_reaped() -> None:
    watch = LeaseWatch("me", lease_s=20)
    for t in range(0, 100, 2):
        watch.observe(lease("me", calls=()), float(t))
        watch.observe(lease("busy"), float(t))
        if t < 10:
            watch.observe(lease("idle", calls=()), float(t))
    assert watch.lost(99.0) == []


def test_nothing_is_reaped_while_the_reaper_cannot_see_its_own_renewals() -> None:
    """The log away looks like every gateway dead; after it returns everybody gets a fresh lease_s."""
    watch = LeaseWatch("me", lease_s=20)
    watch.observe(lease("me", calls=()), 0.0)
    watch.observe(lease("other"), 0.0)
    assert watch.lost(60.0) == [], "our own renewals stopped arriving: the log is away, not the others"
    watch.observe(lease("me", calls=()), 70.0)  # the log is back
    assert watch.lost(70.0) == [], "the other gets lease_s again from now to renew"
    for t in (75.0, 80.0, 85.0, 90.0):
        watch.observe(lease("me", calls=()), t)
    assert [x.instance for x in watch.lost(91.0)] == ["other"]


def test_a_stopped_lease_with_calls_left_is_reaped_at_once_and_a_reaped_one_never_again() -> None:
    watch = LeaseWatch("me", lease_s=20)
    watch.observe(lease("me", calls=()), 0.0)
    watch.observe(lease("gone", "stopped"), 0.0)
    assert [x.instance for x in watch.lost(0.0)] == ["gone"]
    watch.observe(lease("gone", "reaped", calls=()), 1.0)
    watch.observe(lease("me", calls=()), 50.0)
    assert watch.lost(50.0) == []


def test_a_lease_survives_its_own_json() -> None:
    original = Lease("gw-a", "serving", (CALL, LeasedCall("call-2", "globex", 5, "CA123")), renewed_ms=42)
    assert Lease.from_json(original.to_json()) == original
