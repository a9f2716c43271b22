"""How late the event loop runs what is due. Every call of a gateway process shares its one loop: when
the loop has more to do than it can take, each call feels it as late frames and late turns, and this
is where it shows first. `/metrics` serves it (`voxlog_event_loop_lag_seconds`); the benchmarks sample
it finer, in the gateways and in the callers' process (`voxlog bench calls`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
"""Seconds: a few ms is a loop at work; tens of ms are heard (a frame is 20 ms)."""
GATEWAY_PERIOD_S = 0.1
"""How often a gateway samples its loop: a stall of tens of ms is caught often enough, at no cost."""


def loop_lag_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("voxlog_event_loop_lag_seconds",
                     f"How much later than due this process's event loop woke a timer, sampled every "
                     f"{GATEWAY_PERIOD_S * 1000:.0f} ms.", buckets=LAG_BUCKETS, registry=registry)


async def watch_loop_lag(period_s: float, observe: Callable[[float], None], stop: asyncio.Event) -> None:
    """Until `stop`: wakes every `period_s` and observes how much later than asked it woke (seconds)."""
    while not stop.is_set():
        asked = time.perf_counter()  # not the loop's clock: uvloop's is in whole ms, read once an iteration
        await asyncio.sleep(period_s)
        observe(max(0.0, time.perf_counter() - asked - period_s))
