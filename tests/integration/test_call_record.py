"""What a call's log says is what happened on the call, through the real gateway: the agent's speech
recorded in the format the phone line played, and the outcome the core decided for an ending the
session saw (the caller hanging up), both checked again by replay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas.events import AgentAudioChunk, CallEnded, TtsRequested
from streams.call.replay import agent_for, verify_call
from tests.integration.test_call_e2e import AGENT_NUMBER, agent_done_speaking, events_of
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow


@pytest.fixture
async def stack(log_bootstrap: str | None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path, kafka_bootstrap=log_bootstrap)
    async with local_stack(settings) as running:
        yield running


async def test_a_phone_call_records_the_speech_it_played_and_the_outcome_of_its_hang_up(stack: LocalStack) -> None:
    caller = stack.caller(to=AGENT_NUMBER)
    instructions = await caller.dial()
    async with caller:
        await caller.connect(instructions)
        await agent_done_speaking(caller)
        await caller.stop()  # after the greeting, before a word
    events = await events_of(stack, instructions.parameters["call_id"])

    (greeting,) = [e.payload for e in events if isinstance(e.payload, TtsRequested)]
    played = {(e.payload.codec, e.payload.sample_rate) for e in events
              if isinstance(e.payload, AgentAudioChunk) and e.payload.tts_request_id == greeting.request_id}
    assert played == {("mulaw", 8000)}, "a Twilio line plays 8 kHz mu-law"
    assert (greeting.codec, greeting.sample_rate) == ("mulaw", 8000)
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert (ended.reason, ended.outcome) == ("caller_hangup", "abandoned")
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical
