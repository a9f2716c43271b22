"""Builds an agent's providers from its definition (offline ones now; cloud ones join here)."""

from __future__ import annotations

from streams.agents import AgentSpec
from streams.providers.base import AsrProvider, LlmProvider, TtsProvider
from streams.session import Providers


class UnknownProvider(ValueError):
    """The agent names a provider this installation does not have."""


def asr_provider(agent: AgentSpec) -> AsrProvider:
    if agent.asr.provider == "pocketsphinx":
        from streams.providers.asr_pocketsphinx import PocketsphinxAsr

        return PocketsphinxAsr()
    raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no ASR provider {agent.asr.provider!r}")


def llm_provider(agent: AgentSpec) -> LlmProvider:
    if agent.llm.provider == "offline-scripted":
        from streams.providers.llm_scripted import ScriptedLlm

        return ScriptedLlm(agent)
    raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no LLM provider {agent.llm.provider!r}")


def tts_provider(agent: AgentSpec) -> TtsProvider:
    if agent.tts.provider == "espeak-ng":
        from streams.providers.tts_espeak import EspeakTts

        return EspeakTts()
    raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no TTS provider {agent.tts.provider!r}")


def providers_for(agent: AgentSpec) -> Providers:
    return Providers(asr=asr_provider(agent), llm=llm_provider(agent), tts=tts_provider(agent))
