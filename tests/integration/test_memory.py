"""Long-term memory end to end: a caller books, hangs up, calls again and is greeted with what the
agent remembers; the summary travels the log (call.summarized), ClickHouse (caller_memory) and
back into the new call as a recorded memory.loaded, so replay still verifies."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest

from consumers.event_reader import read_call
from projections.caller_memory import MemoryProjection
from projections.projection_runner import ProjectionRunner
from projections.store import AnalyticsStore
from schemas.events import CallSummarized, MemoryLoaded, TtsRequested
from schemas.topics import CALLS
from streams.call.replay import agent_for, verify_call
from streams.memory import caller_key
from tests.integration.test_call_e2e import agent_done_speaking, events_of, speech
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow
def fresh_number() -> str:
    """A caller of this run's own: a shared broker remembers every earlier run's callers."""
    return f"+1555{random.randrange(10**7):07d}"


async def call_and_say(stack: LocalStack, *lines: str, number: str = "+15557770042") -> str:
    caller = stack.caller(from_=number, to="+15550100")
    instructions = await caller.dial()
    async with caller:
        await caller.connect(instructions)
        before = 0
        for line in lines:
            await agent_done_speaking(caller, beyond=before)
            before = len(caller.agent_audio)
            await caller.send_mulaw(speech(line))
        await asyncio.wait_for(caller.closed.wait(), 30)
    return instructions.parameters["call_id"]


async def test_a_caller_who_calls_again_is_greeted_with_what_the_agent_remembers(
    log_bootstrap: str | None, store: AnalyticsStore, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, kafka_bootstrap=log_bootstrap)
    number = fresh_number()
    async with local_stack(settings) as stack:
        stack.gateway.analytics = store  # this process's ClickHouse, the test's own database
        first = await call_and_say(stack, "i would like to book an appointment for tomorrow at ten",
                                   "no thank you goodbye", number=number)
        key = caller_key("demo", number)
        assert key is not None
        for _ in range(600):  # the summariser works after the call (on a shared broker, after others' calls)
            async with stack.gateway.backend.admin() as admin:
                memory = (await read_call(admin, key, topics=(CALLS,))).events
            if memory:
                break
            await asyncio.sleep(0.1)
        (summarized,) = memory
        assert isinstance(summarized.payload, CallSummarized)
        assert summarized.payload.call_id == first
        # The visit as the calendar booked it, said in the caller's zone (this number's: the calendar's).
        assert re.fullmatch(r"you booked a visit for [A-Z][a-z]+day, [A-Z][a-z]+ \d{1,2} at 10:00 AM "
                            r"\(confirmation [A-Z2-7]{6}\)", summarized.payload.summary), summarized.payload.summary
        await ProjectionRunner(stack.gateway.backend, store, MemoryProjection()).run(asyncio.Event(),
                                                                                     until_caught_up=True)

        second = await call_and_say(stack, "no thank you goodbye", number=number)
        events = await events_of(stack, second)
    loaded = next(e.payload for e in events if isinstance(e.payload, MemoryLoaded))
    assert [s.call_id for s in loaded.summaries] == [first]
    assert [e.type for e in events[:3]] == ["call.started", "memory.loaded", "call.answered"]
    greeting = next(e.payload.text for e in events if isinstance(e.payload, TtsRequested))
    assert f"Welcome back to Acme. Last time {summarized.payload.summary}" in greeting, greeting
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical
