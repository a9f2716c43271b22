"""What every LLM (`LlmProvider`, streams/providers/base.py) must do, whatever its vendor.

Each runs for real: OpenAI's and Anthropic's SDKs talk to a local server replaying their recorded
wire protocols (tests/provider_server.py); the offline scripted policy follows the demo agent's
script; the benchmarks' timeline LLM answers on its script. The wire details of the cloud LLMs
(what each sends, every way each fails) are in tests/unit/test_llm_providers.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from streams.call.core import END_CALL_TOOL
from streams.config.agents import AgentSpec, load_agents
from streams.providers.base import (
    ChatMessage,
    ErrorKind,
    LlmProvider,
    LlmRequest,
    ProviderError,
    ProviderFailure,
    ToolSpec,
)
from streams.providers.cloud import StreamTimeouts
from streams.providers.llm_anthropic import AnthropicLlm
from streams.providers.llm_openai import OpenAiLlm
from streams.providers.llm_scripted import ScriptedLlm
from streams.providers.timeline import Timeline, TimelineLlm
from tests.provider_server import Fault, ProviderServer
from voxlog.settings import DEFAULT_AGENTS_DIR

pytestmark = pytest.mark.timeout(120)

RELAXED = StreamTimeouts(connect_s=10.0, first_token_s=10.0, stall_s=10.0)  # a loaded machine is slow
CALLERS_DEADLINE_S = 0.2
"""What a session gives an LLM that never answers, in the deadline test: the answer would never come."""
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "error"}


def front_desk() -> AgentSpec:
    return next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")


def turn(agent: AgentSpec) -> LlmRequest:
    """A caller's turn as the core asks it: the prompts, the greeting, what the caller said, the tools."""
    prompts = (agent.prompts.persona, agent.prompts.task, agent.prompts.safety)
    tools = tuple(ToolSpec(t.name, t.description, t.parameters_json) for t in agent.tools)
    return LlmRequest("call-contract/llm/0", agent.llm.model,
                      (*(ChatMessage("system", p) for p in prompts), ChatMessage("assistant", agent.greeting),
                       ChatMessage("user", "i would like to book an appointment on tuesday")),
                      (*tools, END_CALL_TOOL), {"temperature": "0"})


@dataclass
class Llm:
    """One implementation: LLMs made to answer (`answering`: the recording of an answer queued where it
    replays one), to fail (`failing`) and never to answer (`silent`); None where it cannot fail (the
    scripted policy runs the agent's script in this process: the failure tests are not asked of it)."""

    make_answering: Callable[[], LlmProvider]
    make_failing: Callable[[], LlmProvider] | None
    make_silent: Callable[[], LlmProvider] | None
    made: list[LlmProvider] = field(default_factory=list)

    def answering(self) -> LlmProvider:
        return self._made(self.make_answering)

    def failing(self) -> LlmProvider:
        return self._made(self.make_failing)

    def silent(self) -> LlmProvider:
        return self._made(self.make_silent)

    def _made(self, make: Callable[[], LlmProvider] | None) -> LlmProvider:
        assert make is not None, "asked to fail an LLM that cannot: see `fallible_llm`"
        self.made.append(make())
        return self.made[-1]


def cloud(server: ProviderServer, make: Callable[[], LlmProvider], vendor: str, answer: str) -> Llm:
    def queued(reply: str, fault: Fault | None = None) -> LlmProvider:
        server.reply(reply, fault)
        return make()

    return Llm(lambda: queued(f"{vendor}/{answer}"), lambda: queued(f"{vendor}/server_error_500"),
               lambda: queued(f"{vendor}/{answer}", Fault(headers_delay_s=30.0)))


def timeline() -> Llm:
    script, agent = Timeline(llm_ms=0), front_desk()
    return Llm(lambda: TimelineLlm(script, agent), lambda: TimelineLlm(script, agent, failure="error"),
               lambda: TimelineLlm(script, agent, failure="stall"))


async def _llm(name: str, server: ProviderServer) -> AsyncIterator[Llm]:
    made = {
        "openai": lambda: cloud(server, lambda: OpenAiLlm("sk-contract", f"{server.base_url}/v1", timeouts=RELAXED),
                                "openai", "chat_tool_call_stream"),
        "anthropic": lambda: cloud(server, lambda: AnthropicLlm("sk-ant-contract", server.base_url, timeouts=RELAXED),
                                   "anthropic", "messages_tool_use_stream"),
        "offline-scripted": lambda: Llm(lambda: ScriptedLlm(front_desk()), None, None),
        "timeline": timeline,
    }[name]()
    yield made
    for provider in made.made:
        await provider.aclose()


@pytest.fixture(params=["openai", "anthropic", "offline-scripted", "timeline"])
async def llm(request: pytest.FixtureRequest, server: ProviderServer) -> AsyncIterator[Llm]:
    async for made in _llm(request.param, server):
        yield made


@pytest.fixture(params=["openai", "anthropic", "timeline"])
async def fallible_llm(request: pytest.FixtureRequest, server: ProviderServer) -> AsyncIterator[Llm]:
    """Every LLM that can fail or fall silent: all but the offline scripted policy."""
    async for made in _llm(request.param, server):
        yield made


async def test_an_answer_says_what_to_say_or_do_how_it_ended_and_what_it_took(llm: Llm) -> None:
    result = await llm.answering().complete(turn(front_desk()))
    assert result.text or result.tool_calls
    assert result.finish_reason in FINISH_REASONS
    assert (result.finish_reason == "tool_calls") == bool(result.tool_calls)
    for call in result.tool_calls:
        assert call.id
        assert call.name
        assert isinstance(json.loads(call.arguments_json), dict)
    assert result.model
    assert 0 <= result.time_to_first_token_ms <= result.total_ms
    assert result.input_tokens >= 0
    assert result.output_tokens >= 0
    assert (result.report.failures, result.report.fallbacks) == ([], [])


async def test_an_llm_that_fails_raises_a_provider_error_of_a_known_kind(fallible_llm: Llm) -> None:
    provider = fallible_llm.failing()
    with pytest.raises(ProviderError) as caught:
        await provider.complete(turn(front_desk()))
    error = caught.value
    assert type(error.kind) is ErrorKind
    assert error.provider == provider.name
    assert error.report.failures == [ProviderFailure.of(error)], "what the session records of it"


async def test_no_answer_within_the_callers_deadline_is_a_timeout(fallible_llm: Llm) -> None:
    provider = fallible_llm.silent()
    with pytest.raises(ProviderError) as caught:
        await provider.complete(turn(front_desk()), timeout_s=CALLERS_DEADLINE_S)
    assert (caught.value.kind, caught.value.retryable, caught.value.provider) == (ErrorKind.TIMEOUT, True,
                                                                                   provider.name)
