"""gateway.loop_lag: a loop held up is seen held up, by about as long as it was."""

from __future__ import annotations

import asyncio
import time

from gateway.loop_lag import watch_loop_lag


async def test_a_loop_held_up_shows_as_lag_as_long_as_the_hold() -> None:
    lags: list[float] = []
    sampled = asyncio.Event()

    def observe(lag: float) -> None:
        lags.append(lag)
        sampled.set()

    stop = asyncio.Event()
    watching = asyncio.create_task(watch_loop_lag(0.005, observe, stop))
    await sampled.wait()  # the watch runs: a sample of the free loop
    sampled.clear()
    # A callback that holds the loop for 100 ms (blocking work, a long collection pass).
    asyncio.get_running_loop().call_soon(time.sleep, 0.1)
    await sampled.wait()
    stop.set()
    await watching
    assert max(lags) >= 0.09  # the timer due 5 ms in woke after the hold, however busy the machine
    assert min(lags) >= 0.0
