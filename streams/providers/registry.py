"""Builds an agent's providers from its definition: each capability a chain of the agent's choice
and its fallbacks (streams/providers/resilience.py), with the keys from `ProviderSettings`.

One registry lives as long as the gateway: circuit breakers (per provider, model and endpoint) and
rate limits (per provider key) are shared by every call, which is what makes them worth having.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import SecretStr

from streams.call.session import Providers
from streams.config.agents import AgentSpec, Provider, Voice
from streams.providers.asr_chain import ChainAsr
from streams.providers.base import AsrProvider, LlmProvider, TtsProvider
from streams.providers.resilience import ChainLlm, CircuitBreaker, Guarded, ProviderChain
from streams.providers.settings import ProviderSettings
from streams.providers.tts_chain import ChainTts
from streams.rate_limit import TokenBucket

P = TypeVar("P")
C = TypeVar("C")

LLM_ATTEMPT_TIMEOUT_S = 8.0
"""One LLM attempt's limit where the agent sets none (the adapters' connect, first-token and stall
timeouts are shorter, so a stalled provider is given up sooner)."""
LLM_CHAIN_DEADLINE_S = 18.0
"""The whole chain's; under the session's own limit for a decision (20 s), so the chain, not the
session, reports what failed."""
SPEECH_ATTEMPT_TIMEOUT_S = 3.0
"""A cloud speech provider's limit, where the agent sets none: to open its stream or give its first
audio (TTS), to take a frame or give an utterance's final result (ASR)."""
OFFLINE_ATTEMPT_TIMEOUT_S = 10.0
"""The offline providers' (pocketsphinx, espeak-ng): they run on this machine's CPU, which a busy
machine slows down but which does not go away."""
SPEECH_CHAIN_DEADLINE_S = 10.0


SCRIPTED_POLICY = "offline-scripted"
OFFLINE_SPEECH = frozenset({"pocketsphinx", "espeak-ng"})


class UnknownProvider(ValueError):
    """The agent names a provider this installation does not have, or one it has no key for."""


@dataclass
class ProviderRegistry:
    settings: ProviderSettings = field(default_factory=ProviderSettings)
    breakers: dict[tuple[str, str, str], CircuitBreaker] = field(default_factory=dict)
    buckets: dict[tuple[str, str], TokenBucket] = field(default_factory=dict)
    clients: dict[tuple[str, ...], Any] = field(default_factory=dict)
    """The cloud providers' adapters, one per provider, endpoint, key (and model or voice engine,
    where the adapter is made for one), shared by every call: their connections stay open."""

    def providers_for(self, agent: AgentSpec) -> Providers:
        return Providers(asr=self.asr(agent), llm=self.llm(agent), tts=self.tts(agent))

    def problems(self, agent: AgentSpec) -> list[str]:
        """Why this registry cannot serve `agent`'s calls, a line per capability (an unknown provider,
        a key that is not set); none when it can."""
        found = []
        for capability in (self.asr, self.llm, self.tts):
            try:
                capability(agent)
            except UnknownProvider as exc:
                found.append(str(exc))
        return found

    def asr(self, agent: AgentSpec) -> AsrProvider:
        members = [self._asr_member(agent, spec) for spec in (agent.asr, *agent.asr.fallbacks)]
        return ChainAsr(ProviderChain("asr", members, deadline_s=SPEECH_CHAIN_DEADLINE_S))

    def tts(self, agent: AgentSpec) -> TtsProvider:
        specs = (agent.tts, *agent.tts.fallbacks)
        members = [self._tts_member(agent, spec) for spec in specs]
        return ChainTts(ProviderChain("tts", members, deadline_s=SPEECH_CHAIN_DEADLINE_S),
                        voices=[spec.voice for spec in specs])

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
            from streams.providers.llm_openai import OpenAiLlm

            # One client for all the models of a key: the model is the request's.
            provider, endpoint, key = self._cloud(agent, spec.provider, "OPENAI_API_KEY", self.settings.openai_base_url,
                                                  "", lambda k, url: OpenAiLlm(api_key=k, base_url=url))
        elif spec.provider == "anthropic":
            from streams.providers.llm_anthropic import AnthropicLlm

            provider, endpoint, key = self._cloud(
                agent, spec.provider, "ANTHROPIC_API_KEY", self.settings.anthropic_base_url, "",
                lambda k, url: AnthropicLlm(api_key=k, base_url=url))
        else:
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no LLM provider {spec.provider!r}")
        return Guarded(provider, spec.provider, spec.model,
                       self._breaker(spec.provider, spec.model, endpoint, local=spec.provider == SCRIPTED_POLICY),
                       spec.timeout_s or LLM_ATTEMPT_TIMEOUT_S, self._bucket(spec.provider, key))

    def _asr_member(self, agent: AgentSpec, spec: Provider) -> Guarded[AsrProvider]:
        provider: AsrProvider
        endpoint, key = "", None
        if spec.provider == "pocketsphinx":
            from streams.providers.asr_pocketsphinx import PocketsphinxAsr

            provider = PocketsphinxAsr()
        elif spec.provider == "deepgram":
            from streams.providers.asr_deepgram import DeepgramAsr

            model = spec.model or "nova-3"
            provider, endpoint, key = self._cloud(
                agent, spec.provider, "DEEPGRAM_API_KEY", self.settings.deepgram_base_url, model,
                lambda k, url: DeepgramAsr(api_key=k, base_url=url, model=model))
        elif spec.provider == "whisper":
            from streams.providers.asr_whisper import WhisperAsr

            model = spec.model or "whisper-1"
            provider, endpoint, key = self._cloud(
                agent, spec.provider, "OPENAI_API_KEY", self.settings.openai_base_url, model,
                lambda k, url: WhisperAsr(api_key=k, base_url=url, model=model))
        else:
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no ASR provider {spec.provider!r}")
        return self._speech_member(spec.provider, spec.model or provider.model, spec.timeout_s, provider, endpoint,
                                   key)

    def _tts_member(self, agent: AgentSpec, spec: Voice) -> Guarded[TtsProvider]:
        provider: TtsProvider
        endpoint, key = "", None
        if spec.provider == "espeak-ng":
            from streams.providers.tts_espeak import EspeakTts

            provider = EspeakTts()
        elif spec.provider == "elevenlabs":
            from streams.providers.tts_elevenlabs import ElevenLabsTts

            model = spec.model or "eleven_flash_v2_5"
            provider, endpoint, key = self._cloud(
                agent, spec.provider, "ELEVENLABS_API_KEY", self.settings.elevenlabs_base_url, model,
                lambda k, url: ElevenLabsTts(api_key=k, base_url=url, model=model))
        elif spec.provider == "playht":
            from streams.providers.tts_playht import PlayHtTts

            user = self._key(agent, spec.provider, self.settings.playht_user_id, "PLAYHT_USER_ID")
            engine = spec.model or "Play3.0-mini"
            provider, endpoint, key = self._cloud(
                agent, spec.provider, "PLAYHT_API_KEY", self.settings.playht_base_url, engine,
                lambda k, url: PlayHtTts(api_key=k, user_id=user.get_secret_value(), base_url=url,
                                         voice_engine=engine))
        else:
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no TTS provider {spec.provider!r}")
        return self._speech_member(spec.provider, spec.model, spec.timeout_s, provider, endpoint, key)

    def _speech_member(self, name: str, model: str, timeout_s: float | None, provider: P, endpoint: str,
                       key: SecretStr | None) -> Guarded[P]:
        default = OFFLINE_ATTEMPT_TIMEOUT_S if name in OFFLINE_SPEECH else SPEECH_ATTEMPT_TIMEOUT_S
        return Guarded(provider, name, model, self._breaker(name, model, endpoint, local=name in OFFLINE_SPEECH),
                       timeout_s or default, self._bucket(name, key))

    def _cloud(self, agent: AgentSpec, provider: str, variable: str, base_url: str | None, model: str,
               make: Callable[[str, str | None], C]) -> tuple[C, str, SecretStr]:
        """A cloud provider's adapter, `make(key, base_url)`: one per provider, endpoint, key and model,
        shared by every call (`clients`: its connections stay open); with its endpoint and key, which
        its breaker and rate limit go by. The key is the setting named like `variable`."""
        secret = self._key(agent, provider, getattr(self.settings, variable.lower()), variable)
        endpoint = base_url or ""
        ident = (provider, endpoint, _key_id(secret), model)
        if ident not in self.clients:
            self.clients[ident] = make(secret.get_secret_value(), base_url or None)
        client: C = self.clients[ident]
        return client, endpoint, secret

    async def aclose(self) -> None:
        """Closes the cloud providers' clients (their connection pools)."""
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            await client.aclose()

    def _breaker(self, provider: str, model: str, endpoint: str, *, local: bool = False) -> CircuitBreaker:
        return self.breakers.setdefault((provider, model, endpoint), CircuitBreaker(counts_timeouts=not local))

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
