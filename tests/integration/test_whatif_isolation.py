"""A what-if asked through the API runs in a child process (`gateway.whatif_isolation`): a tenant's agent
file with a pattern that backtracks without end costs its own request, not the gateway's event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.whatif_isolation import WhatIfBusy, WhatIfChildren, WhatIfFailed, whatif_isolated
from streams.config.agents import AgentSpec, load_agents
from streams.providers.settings import ProviderSettings
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.core_calls import CallerStep, play_call

AGENT = next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")
STEPS = (CallerStep("say", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!"), CallerStep("say", "bye"))


def test_the_child_compares_as_the_gateway_would() -> None:
    events = asyncio.run(play_call(AGENT, STEPS)).events
    reworded = AgentSpec.model_validate({**AGENT.model_dump(mode="json"), "greeting": "Hi there."})
    result = asyncio.run(whatif_isolated(events, reworded, AGENT, ProviderSettings()))
    assert result.first_difference == 0
    assert result.turns[0].now[0].text.endswith("Hi there.")
    assert not asyncio.run(whatif_isolated(events, AGENT, AGENT, ProviderSettings())).changed


def test_a_pattern_that_backtracks_for_ever_is_stopped_and_the_loop_keeps_running() -> None:
    events = asyncio.run(play_call(AGENT, STEPS)).events
    evil = AgentSpec.model_validate({**AGENT.model_dump(mode="json"), "guardrails": {
        **AGENT.guardrails.model_dump(mode="json"), "blocked_input": ["^(a+)+$"]}})

    async def run() -> tuple[float, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        began = time.monotonic()
        with pytest.raises(WhatIfFailed, match="took longer than 3 s"):
            await whatif_isolated(events, evil, AGENT, ProviderSettings(), deadline_s=3)
        ticker.cancel()
        return time.monotonic() - began, ticks

    elapsed, ticks = asyncio.run(run())
    assert elapsed < 20  # stopped at its deadline, not when the pattern gives up (never, for 60 a's)
    assert ticks >= 10  # the event loop ran all along


def test_a_gateway_runs_a_few_whatifs_at_once_and_refuses_more_at_once() -> None:
    events = asyncio.run(play_call(AGENT, STEPS)).events
    evil = AgentSpec.model_validate({**AGENT.model_dump(mode="json"), "guardrails": {
        **AGENT.guardrails.model_dump(mode="json"), "blocked_input": ["^(a+)+$"]}})
    children = WhatIfChildren(limit=1)

    async def run() -> None:
        slow = asyncio.create_task(children.run(events, evil, AGENT, ProviderSettings(), deadline_s=3))
        await asyncio.sleep(0)  # the task takes its slot before its first wait (starting the child)
        assert children.running == 1
        with pytest.raises(WhatIfBusy, match="1 what-ifs are running on this gateway"):
            await children.run(events, AGENT, AGENT, ProviderSettings())
        with pytest.raises(WhatIfFailed):
            await slow
        assert children.running == 0  # its slot is free again, whatever became of it
        assert not (await children.run(events, AGENT, AGENT, ProviderSettings())).changed

    asyncio.run(run())
