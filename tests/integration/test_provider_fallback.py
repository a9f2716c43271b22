"""A cloud LLM killed mid-turn: the caller still gets an answer, from the next provider of the
agent's chain, and the log tells what happened. The real OpenAI and Anthropic SDKs talk to a local
server that replays their recorded wire protocols (tests/provider_server.py); the caller is a real
Twilio media stream with synthesized speech, through the real gateway."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import yaml

from consumers.event_reader import read_call
from schemas.events import CallSummarized, ErrorRaised, LlmDecided, ProviderFallback, TtsCompleted, TtsRequested
from schemas.topics import CALLS
from streams.call.replay import agent_for, verify_call
from streams.memory import caller_key
from streams.providers.registry import ProviderRegistry
from streams.providers.settings import ProviderSettings
from tests.integration.test_call_e2e import AGENT_NUMBER, agent_done_speaking, events_of, speech
from tests.provider_server import Fault, ProviderServer
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings
from voxlog.sim.stack import local_stack

pytestmark = pytest.mark.slow

ANSWER = "Sure, I can book a technician for Tuesday."  # the text of both providers' text fixtures


def cloud_agents(folder: Path) -> Path:
    """The demo agents, the front desk on GPT-4o with Claude behind it."""
    shutil.copytree(DEFAULT_AGENTS_DIR, folder)
    path = folder / "demo" / "front-desk.yaml"
    agent = yaml.safe_load(path.read_text())
    agent["llm"] = {"provider": "openai", "model": "gpt-4o", "timeout_s": 5,
                    "fallbacks": [{"provider": "anthropic", "model": "claude-haiku-4-5"}]}
    path.write_text(yaml.safe_dump(agent))
    return folder


@pytest.mark.parametrize("failure", ["killed", "stalled"])
async def test_a_provider_that_dies_mid_turn_is_replaced_within_the_turn(failure: str, tmp_path: Path) -> None:
    number = "+15557770421"
    async with ProviderServer() as server:
        # The turn: cut off after a few tokens. A cut stream is retried once (it may be a dropped
        # connection), so a dead provider cuts both; a stall is not (it would cost a second timeout).
        attempts = 2 if failure == "killed" else 1
        fault = Fault(close_after_chunks=3) if failure == "killed" else Fault(stall_before_chunk=3, stall_s=60)
        for _ in range(attempts):
            server.reply("openai/chat_text_stream", fault)
        server.reply("anthropic/messages_text_stream")  # the turn again, from the fallback
        server.reply("openai/chat_text_stream")  # the summary of the call, after it ends
        keys = ProviderSettings(openai_api_key="sk-test-fallback", openai_base_url=f"{server.base_url}/v1",
                                anthropic_api_key="sk-ant-test-fallback", anthropic_base_url=server.base_url)
        settings = Settings(home=tmp_path / "home", agents_dir=cloud_agents(tmp_path / "agents"))
        async with local_stack(settings) as stack:
            stack.gateway.provider_registry = ProviderRegistry(keys)
            caller = stack.caller(from_=number, to=AGENT_NUMBER)
            instructions = await caller.dial()
            async with caller:
                await caller.connect(instructions)
                await agent_done_speaking(caller)  # consent notice and greeting
                heard = len(caller.agent_audio)
                await caller.send_mulaw(speech("can someone come and fix my internet"))
                assert await caller.agent_speaks_beyond(heard), "the caller got an answer"
                await agent_done_speaking(caller)
                await caller.stop()
            call_id = instructions.parameters["call_id"]
            events = await events_of(stack, call_id)
            memory = await _summary(stack.gateway.backend, caller_key("demo", number))

    decided = [e.payload for e in events if isinstance(e.payload, LlmDecided)]
    assert [(d.provider, d.text) for d in decided] == [("anthropic", ANSWER)]
    errors = [e.payload for e in events if isinstance(e.payload, ErrorRaised)]
    assert [(e.component, e.provider) for e in errors] == [("llm", "openai")] * attempts
    assert {e.kind for e in errors} == {"protocol" if failure == "killed" else "timeout"}, errors
    (switch,) = [e.payload for e in events if isinstance(e.payload, ProviderFallback)]
    assert (switch.capability, switch.from_provider, switch.to_provider) == ("llm", "openai", "anthropic")
    assert switch.reason == ("error" if failure == "killed" else "timeout")
    assert any(isinstance(e.payload, TtsRequested) and e.payload.text == ANSWER for e in events)
    order = [e.type for e in events if e.type in ("error.raised", "provider.fallback", "llm.decided")]
    assert order == ["error.raised"] * attempts + ["provider.fallback", "llm.decided"]
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical, "replay needs no provider"

    assert [r.path for r in server.requests] == \
        ["/v1/chat/completions"] * attempts + ["/v1/messages", "/v1/chat/completions"]
    assert server.requests[attempts].json()["model"] == "claude-haiku-4-5", "the fallback asks for its own model"
    assert memory is not None
    assert memory.source.startswith("llm:openai/"), memory.source
    assert memory.summary == ANSWER.rstrip(".")


async def _summary(backend: object, key: str | None) -> CallSummarized | None:
    """The call's summary on the caller's memory stream, once the summariser has written it."""
    assert key is not None
    for _ in range(150):
        async with backend.admin() as admin:  # type: ignore[attr-defined]
            found = [e.payload for e in (await read_call(admin, key, topics=(CALLS,))).events
                     if isinstance(e.payload, CallSummarized)]
        if found:
            return found[-1]
        await asyncio.sleep(0.1)
    return None


async def test_what_claude_says_with_its_tool_call_is_spoken_whole_before_the_answer(tmp_path: Path) -> None:
    """Claude's "Let me book that for you." comes with its tool call: the caller hears it while the
    booking runs, and the answer after it, not over it."""
    agents = cloud_agents(tmp_path / "agents")
    path = agents / "demo" / "front-desk.yaml"
    agent = yaml.safe_load(path.read_text())
    agent["llm"] = {"provider": "anthropic", "model": "claude-haiku-4-5"}
    path.write_text(yaml.safe_dump(agent))
    async with ProviderServer() as server:
        server.reply("anthropic/messages_tool_use_stream")
        server.reply("anthropic/messages_after_tool_result")
        server.reply("anthropic/messages_text_stream")  # the summary of the call, after it ends
        keys = ProviderSettings(anthropic_api_key="sk-ant-test-preamble", anthropic_base_url=server.base_url)
        settings = Settings(home=tmp_path / "home", agents_dir=agents)
        async with local_stack(settings) as stack:
            stack.gateway.provider_registry = ProviderRegistry(keys)
            caller = stack.caller(from_="+15557770422", to=AGENT_NUMBER)
            instructions = await caller.dial()
            async with caller:
                await caller.connect(instructions)
                await agent_done_speaking(caller)
                heard = len(caller.agent_audio)
                await caller.send_mulaw(speech("i would like to book an appointment on tuesday"))
                assert await caller.agent_quiet(1.5, 60, beyond=heard)
                await caller.stop()
            events = await events_of(stack, instructions.parameters["call_id"])

    requested = [e.payload for e in events if isinstance(e.payload, TtsRequested)]
    completed = {e.payload.request_id: e.payload for e in events if isinstance(e.payload, TtsCompleted)}
    assert [r.text for r in requested[1:]] == ["Let me book that for you.", "You're booked for Tuesday at 2 pm."]
    preamble, answer = (completed[r.request_id] for r in requested[1:])
    assert not preamble.interrupted, "said whole"
    assert preamble.audio_ms > 500
    assert not answer.interrupted
    assert answer.audio_ms > 500
    order = [e.type for e in events if e.type in ("tool.requested", "tool.succeeded", "tts.requested")]
    assert order[1:] == ["tts.requested", "tool.requested", "tool.succeeded", "tts.requested"]
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical
