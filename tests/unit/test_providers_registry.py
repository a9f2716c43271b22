"""The registry: an agent's choices become chains from the tables of factories, each member guarded
as what it declares of itself asks, cloud adapters shared, and what cannot be served said."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from streams.config.agents import AgentSpec, Provider, Voice, load_agents
from streams.providers.registry import (
    LLM_ATTEMPT_TIMEOUT_S,
    LOCAL_SPEECH_ATTEMPT_TIMEOUT_S,
    SPEECH_ATTEMPT_TIMEOUT_S,
    ProviderRegistry,
    UnknownProvider,
)
from streams.providers.resilience import ChainLlm
from streams.providers.settings import ProviderSettings
from voxlog.settings import DEFAULT_AGENTS_DIR

KEYS = ProviderSettings(openai_api_key=SecretStr("sk-registry"), deepgram_api_key=SecretStr("dg-registry"),
                        elevenlabs_api_key=SecretStr("xi-registry"))


def front_desk(**choices: Provider | Voice) -> AgentSpec:
    agent = next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")
    return agent.model_copy(update=choices)


@pytest.fixture
async def registry() -> AsyncIterator[ProviderRegistry]:
    made = ProviderRegistry(KEYS)
    yield made
    await made.aclose()


def test_the_offline_providers_are_guarded_as_providers_on_this_machine(registry: ProviderRegistry) -> None:
    agent = front_desk(asr=Provider(provider="pocketsphinx"), llm=Provider(provider="offline-scripted"),
                       tts=Voice(provider="espeak-ng"))
    for chain, timeout_s in ((registry.asr(agent).chain, LOCAL_SPEECH_ATTEMPT_TIMEOUT_S),  # type: ignore[attr-defined]
                             (registry.tts(agent).chain, LOCAL_SPEECH_ATTEMPT_TIMEOUT_S),  # type: ignore[attr-defined]
                             (registry.llm(agent).chain, LLM_ATTEMPT_TIMEOUT_S)):  # type: ignore[attr-defined]
        (member,) = chain.members
        assert member.provider.capabilities.local
        assert member.attempt_timeout_s == timeout_s
        assert not member.breaker.counts_timeouts, "a busy machine is slow, not gone"


def test_cloud_members_get_the_cloud_guards_and_share_one_adapter(registry: ProviderRegistry) -> None:
    agent = front_desk(asr=Provider(provider="deepgram", fallbacks=(Provider(provider="pocketsphinx"),)),
                       tts=Voice(provider="elevenlabs", voice="JBFqnCBsd6RMkjVDRZzb", timeout_s=2))
    deepgram, pocketsphinx = registry.asr(agent).chain.members  # type: ignore[attr-defined]
    (elevenlabs,) = registry.tts(agent).chain.members  # type: ignore[attr-defined]
    assert (deepgram.name, deepgram.model) == ("deepgram", "nova-3"), "the adapter's default model"
    assert deepgram.attempt_timeout_s == SPEECH_ATTEMPT_TIMEOUT_S
    assert deepgram.breaker.counts_timeouts
    assert pocketsphinx.attempt_timeout_s == LOCAL_SPEECH_ATTEMPT_TIMEOUT_S
    assert elevenlabs.attempt_timeout_s == 2, "the agent's own timeout"
    again = registry.asr(front_desk(asr=Provider(provider="deepgram"))).chain.members[0]  # type: ignore[attr-defined]
    assert again.provider is deepgram.provider, "one adapter per provider, endpoint, key and model"
    assert again.breaker is deepgram.breaker


def test_only_an_llm_that_follows_its_prompt_summarises_calls(registry: ProviderRegistry) -> None:
    assert registry.summary_llm(front_desk(llm=Provider(provider="offline-scripted"))) is None
    both = front_desk(llm=Provider(provider="openai", model="gpt-4o",
                                   fallbacks=(Provider(provider="offline-scripted"),)))
    summary = registry.summary_llm(both)
    assert isinstance(summary, ChainLlm)
    assert [m.name for m in summary.chain.members] == ["openai"]


def test_what_cannot_be_served_is_said_per_capability(registry: ProviderRegistry) -> None:
    agent = front_desk(asr=Provider(provider="sphinx-9000"), llm=Provider(provider="anthropic"),
                       tts=Voice(provider="playht", voice="v"))
    assert registry.problems(agent) == [
        "agent demo/front-desk: no ASR provider 'sphinx-9000'",
        "agent demo/front-desk uses anthropic, and ANTHROPIC_API_KEY is not set",
        "agent demo/front-desk uses playht, and PLAYHT_API_KEY is not set",
    ]
    with pytest.raises(UnknownProvider):
        registry.asr(agent)
    assert registry.problems(front_desk()) == []
