"""Builds an agent's providers from its definition: each capability a chain of the agent's choice
and its fallbacks (streams/providers/resilience.py), with the keys from `ProviderSettings`.

One registry lives as long as the gateway: circuit breakers (per provider, model and endpoint) and
rate limits (per provider key) are shared by every call, which is what makes them worth having.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import SecretStr

from streams.agents import AgentSpec, Provider
from streams.providers.base import AsrProvider, LlmProvider, TtsProvider
from streams.providers.resilience import ChainLlm, CircuitBreaker, Guarded, ProviderChain
from streams.providers.settings import ProviderSettings
from streams.rate_limit import TokenBucket
from streams.session import Providers

LLM_ATTEMPT_TIMEOUT_S = 8.0
"""One LLM attempt's limit where the agent sets none (the adapters' connect, first-token and stall
timeouts are shorter, so a stalled provider is given up sooner)."""
LLM_CHAIN_DEADLINE_S = 18.0
"""The whole chain's; under the session's own limit for a decision (20 s), so the chain, not the
session, reports what failed."""


SCRIPTED_POLICY = "offline-scripted"


class UnknownProvider(ValueError):
    """The agent names a provider this installation does not have, or one it has no key for."""


@dataclass
class ProviderRegistry:
    settings: ProviderSettings = field(default_factory=ProviderSettings)
    breakers: dict[tuple[str, str, str], CircuitBreaker] = field(default_factory=dict)
    buckets: dict[tuple[str, str], TokenBucket] = field(default_factory=dict)
    clients: dict[tuple[str, str, str], LlmProvider] = field(default_factory=dict)

    def providers_for(self, agent: AgentSpec) -> Providers:
        return Providers(asr=asr_provider(agent), llm=self.llm(agent), tts=tts_provider(agent))

    def llm(self, agent: AgentSpec) -> LlmProvider:
        members = [self._llm_member(agent, spec) for spec in (agent.llm, *agent.llm.fallbacks)]
        return ChainLlm(ProviderChain("llm", members, deadline_s=LLM_CHAIN_DEADLINE_S))

    def summary_llm(self, agent: AgentSpec) -> LlmProvider | None:
        """The agent's LLM chain for summarising its calls: its language models only (the offline
        scripted policy follows a script, it cannot summarise); None when it has none."""
        specs = [spec for spec in (agent.llm, *agent.llm.fallbacks) if spec.provider != SCRIPTED_POLICY]
        if not specs:
            return None
        members = [self._llm_member(agent, spec) for spec in specs]
        return ChainLlm(ProviderChain("llm", members, deadline_s=LLM_CHAIN_DEADLINE_S))

    def _llm_member(self, agent: AgentSpec, spec: Provider) -> Guarded[LlmProvider]:
        provider: LlmProvider
        endpoint, key = "", None
        if spec.provider == SCRIPTED_POLICY:
            from streams.providers.llm_scripted import ScriptedLlm

            provider = ScriptedLlm(agent)
        elif spec.provider == "openai":
            key = self._key(agent, spec.provider, self.settings.openai_api_key, "OPENAI_API_KEY")
            endpoint = self.settings.openai_base_url or ""
            provider = self._client(spec.provider, endpoint, key, self._openai)
        elif spec.provider == "anthropic":
            key = self._key(agent, spec.provider, self.settings.anthropic_api_key, "ANTHROPIC_API_KEY")
            endpoint = self.settings.anthropic_base_url or ""
            provider = self._client(spec.provider, endpoint, key, self._anthropic)
        else:
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no LLM provider {spec.provider!r}")
        return Guarded(provider, spec.provider, spec.model, self._breaker(spec.provider, spec.model, endpoint),
                       spec.timeout_s or LLM_ATTEMPT_TIMEOUT_S, self._bucket(spec.provider, key))

    def _client(self, provider: str, endpoint: str, key: SecretStr,
                make: Callable[[str, str | None], LlmProvider]) -> LlmProvider:
        """One client per provider, endpoint and key, shared by every call: its connections stay open."""
        ident = (provider, endpoint, _key_id(key))
        if ident not in self.clients:
            self.clients[ident] = make(key.get_secret_value(), endpoint or None)
        return self.clients[ident]

    @staticmethod
    def _openai(api_key: str, base_url: str | None) -> LlmProvider:
        from streams.providers.llm_openai import OpenAiLlm

        return OpenAiLlm(api_key=api_key, base_url=base_url)

    @staticmethod
    def _anthropic(api_key: str, base_url: str | None) -> LlmProvider:
        from streams.providers.llm_anthropic import AnthropicLlm

        return AnthropicLlm(api_key=api_key, base_url=base_url)

    async def aclose(self) -> None:
        """Closes the cloud providers' clients (their connection pools)."""
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            await client.aclose()

    def _breaker(self, provider: str, model: str, endpoint: str) -> CircuitBreaker:
        return self.breakers.setdefault((provider, model, endpoint), CircuitBreaker())

    def _bucket(self, provider: str, key: SecretStr | None) -> TokenBucket | None:
        per_minute = self.settings.requests_per_minute.get(provider)
        if key is None or not per_minute:
            return None
        key_id = _key_id(key)
        if (provider, key_id) not in self.buckets:
            burst = max(1, per_minute // 60)
            self.buckets[(provider, key_id)] = TokenBucket(per_minute / 60.0, burst, 0.0)
        return self.buckets[(provider, key_id)]

    def _key(self, agent: AgentSpec, provider: str, key: SecretStr | None, variable: str) -> SecretStr:
        if key is None or not key.get_secret_value():
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id} uses {provider}, and {variable} is not set")
        return key


def _key_id(key: SecretStr) -> str:
    """Which key, without the key: 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:12]


def asr_provider(agent: AgentSpec) -> AsrProvider:
    if agent.asr.provider == "pocketsphinx":
        from streams.providers.asr_pocketsphinx import PocketsphinxAsr

        return PocketsphinxAsr()
    raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no ASR provider {agent.asr.provider!r}")


def tts_provider(agent: AgentSpec) -> TtsProvider:
    if agent.tts.provider == "espeak-ng":
        from streams.providers.tts_espeak import EspeakTts

        return EspeakTts()
    raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no TTS provider {agent.tts.provider!r}")
