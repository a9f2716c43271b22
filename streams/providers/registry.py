"""Builds an agent's providers from its definition: each capability a chain of the agent's choice
and its fallbacks (streams/providers/resilience.py), with the keys from `ProviderSettings`.

The providers this installation has are three tables, one per capability, of factories by the name an
agent file uses (`LLMS`, `RECOGNISERS`, `VOICES`): a new vendor is one entry. A factory's module is
imported when an agent first uses it, so an installation pays for the SDKs it uses only.

One registry lives as long as the gateway: circuit breakers (per provider, model and endpoint) and
rate limits (per provider key) are shared by every call, which is what makes them worth having.
What a provider declares of itself decides its guards: one that runs on this machine's CPU
(`capabilities.local`) gets the longer attempt timeout, and its timeouts do not open its circuit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from pydantic import SecretStr

from streams.call.session import Providers
from streams.config.agents import AgentSpec, Provider, Voice
from streams.providers.asr_chain import ChainAsr
from streams.providers.base import AsrProvider, LlmProvider, TtsProvider
from streams.providers.base import Provider as AnyProvider
from streams.providers.resilience import ChainLlm, CircuitBreaker, Guarded, ProviderChain
from streams.providers.settings import ProviderSettings
from streams.providers.tts_chain import ChainTts
from streams.rate_limit import TokenBucket

P = TypeVar("P", bound=AnyProvider)

LLM_ATTEMPT_TIMEOUT_S = 8.0
"""One LLM attempt's limit where the agent sets none (the adapters' connect, first-token and stall
timeouts are shorter, so a stalled provider is given up sooner)."""
LLM_CHAIN_DEADLINE_S = 18.0
"""The whole chain's; under the session's own limit for a decision (20 s), so the chain, not the
session, reports what failed."""
SPEECH_ATTEMPT_TIMEOUT_S = 3.0
"""A cloud speech provider's limit, where the agent sets none: to open its stream or give its first
audio (TTS), to take a frame or give an utterance's final result (ASR)."""
LOCAL_SPEECH_ATTEMPT_TIMEOUT_S = 10.0
"""A speech provider's on this machine's CPU (faster-whisper, pocketsphinx, flite, espeak-ng), which a
busy machine slows down but which does not go away."""
SPEECH_CHAIN_DEADLINE_S = 10.0


class UnknownProvider(ValueError):
    """The agent names a provider this installation does not have, or one it has no key for."""


@dataclass(frozen=True)
class Local(Generic[P]):
    """A provider that needs no key: made afresh for each chain."""

    make: Callable[[AgentSpec], P]


@dataclass(frozen=True)
class Cloud(Generic[P]):
    """A provider reached with credentials: one adapter per endpoint, credentials and model, shared by
    every call (its connections stay open)."""

    make: Callable[[Sequence[str], str | None, str], P]
    """(credentials, endpoint or None for the provider's own, model or "" for the adapter's default)."""
    credentials: tuple[str, ...]
    """The `ProviderSettings` fields it needs: its API key first (its rate limit goes by it)."""
    endpoint: str
    """The `ProviderSettings` field of its endpoint."""
    per_model: bool = True
    """False: one adapter serves every model (the model is the request's)."""


@dataclass(frozen=True)
class Shared(Generic[P]):
    """A provider on this machine that holds something costly for every call (a model loaded in a
    worker process): one per registry, made from the settings, closed with the registry."""

    make: Callable[[ProviderSettings], P]


Factory = Local[P] | Cloud[P] | Shared[P]


@dataclass(frozen=True)
class Capability(Generic[P]):
    name: str
    """As events say it: asr, llm, tts."""
    factories: Mapping[str, Factory[P]]
    attempt_timeout_s: float
    local_attempt_timeout_s: float
    deadline_s: float


def _scripted(agent: AgentSpec) -> LlmProvider:
    from streams.providers.llm_scripted import ScriptedLlm

    return ScriptedLlm(agent)


def _openai(credentials: Sequence[str], endpoint: str | None, model: str) -> LlmProvider:
    from streams.providers.llm_openai import OpenAiLlm

    return OpenAiLlm(credentials[0], endpoint, model)


def _anthropic(credentials: Sequence[str], endpoint: str | None, model: str) -> LlmProvider:
    from streams.providers.llm_anthropic import AnthropicLlm

    return AnthropicLlm(credentials[0], endpoint, model)


def _pocketsphinx(agent: AgentSpec) -> AsrProvider:
    from streams.providers.asr_pocketsphinx import PocketsphinxAsr

    return PocketsphinxAsr()


def _faster_whisper(settings: ProviderSettings) -> AsrProvider:
    from streams.providers.asr_faster_whisper import FasterWhisperAsr
    from streams.providers.asr_pocketsphinx import PocketsphinxAsr

    return FasterWhisperAsr(model_dir=settings.whisper_model_dir, interim=PocketsphinxAsr(),
                            cpu_threads=settings.whisper_cpu_threads, workers=settings.whisper_workers,
                            max_wait_s=settings.whisper_max_wait_s)


def _deepgram(credentials: Sequence[str], endpoint: str | None, model: str) -> AsrProvider:
    from streams.providers.asr_deepgram import DeepgramAsr

    return DeepgramAsr(credentials[0], endpoint, model)


def _whisper(credentials: Sequence[str], endpoint: str | None, model: str) -> AsrProvider:
    from streams.providers.asr_whisper import WhisperAsr

    return WhisperAsr(credentials[0], endpoint, model)


def _espeak(agent: AgentSpec) -> TtsProvider:
    from streams.providers.tts_espeak import EspeakTts

    return EspeakTts()


def _flite(agent: AgentSpec) -> TtsProvider:
    from streams.providers.tts_flite import FliteTts

    return FliteTts()


def _elevenlabs(credentials: Sequence[str], endpoint: str | None, model: str) -> TtsProvider:
    from streams.providers.tts_elevenlabs import ElevenLabsTts

    return ElevenLabsTts(credentials[0], endpoint, model)


def _playht(credentials: Sequence[str], endpoint: str | None, model: str) -> TtsProvider:
    from streams.providers.tts_playht import PlayHtTts

    return PlayHtTts(credentials[0], credentials[1], endpoint, model)


LLMS = Capability[LlmProvider]("llm", {
    "offline-scripted": Local(_scripted),
    # One client for all the models of a key: the model is the request's.
    "openai": Cloud(_openai, ("openai_api_key",), "openai_base_url", per_model=False),
    "anthropic": Cloud(_anthropic, ("anthropic_api_key",), "anthropic_base_url", per_model=False),
}, LLM_ATTEMPT_TIMEOUT_S, LLM_ATTEMPT_TIMEOUT_S, LLM_CHAIN_DEADLINE_S)
RECOGNISERS = Capability[AsrProvider]("asr", {
    "faster-whisper": Shared(_faster_whisper),
    "pocketsphinx": Local(_pocketsphinx),
    "deepgram": Cloud(_deepgram, ("deepgram_api_key",), "deepgram_base_url"),
    "whisper": Cloud(_whisper, ("openai_api_key",), "openai_base_url"),
}, SPEECH_ATTEMPT_TIMEOUT_S, LOCAL_SPEECH_ATTEMPT_TIMEOUT_S, SPEECH_CHAIN_DEADLINE_S)
VOICES = Capability[TtsProvider]("tts", {
    "flite": Local(_flite),
    "espeak-ng": Local(_espeak),
    "elevenlabs": Cloud(_elevenlabs, ("elevenlabs_api_key",), "elevenlabs_base_url"),
    "playht": Cloud(_playht, ("playht_api_key", "playht_user_id"), "playht_base_url"),
}, SPEECH_ATTEMPT_TIMEOUT_S, LOCAL_SPEECH_ATTEMPT_TIMEOUT_S, SPEECH_CHAIN_DEADLINE_S)


@dataclass
class ProviderRegistry:
    settings: ProviderSettings = field(default_factory=ProviderSettings)
    breakers: dict[tuple[str, str, str], CircuitBreaker] = field(default_factory=dict)
    buckets: dict[tuple[str, str], TokenBucket] = field(default_factory=dict)
    clients: dict[tuple[str, ...], Any] = field(default_factory=dict)
    """The cloud providers' adapters (of whichever capability: `Any`), one per provider, endpoint,
    credentials (and model, where the adapter is made for one), and the shared local providers, one
    per provider: each shared by every call."""

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
        return ChainAsr(self._chain(RECOGNISERS, agent, (agent.asr, *agent.asr.fallbacks)))

    def llm(self, agent: AgentSpec) -> LlmProvider:
        return ChainLlm(self._chain(LLMS, agent, (agent.llm, *agent.llm.fallbacks)))

    def tts(self, agent: AgentSpec) -> TtsProvider:
        specs = (agent.tts, *agent.tts.fallbacks)
        return ChainTts(self._chain(VOICES, agent, specs), voices=[spec.voice for spec in specs])

    def whatif_llm(self, agent: AgentSpec) -> tuple[LlmProvider, str]:
        """What answers a what-if's new LLM requests, and what to call it: the agent's own LLM where this
        registry can reach it (its key set), else the offline scripted policy, saying why."""
        try:
            llm = self.llm(agent)
        except UnknownProvider as exc:
            return _scripted(agent), f"offline scripted policy (not {agent.llm.provider}/{agent.llm.model}: {exc})"
        if agent.llm.provider == "offline-scripted":
            return llm, "offline scripted policy"
        return llm, f"live {agent.llm.provider}/{agent.llm.model}"

    def summary_llm(self, agent: AgentSpec) -> LlmProvider | None:
        """The agent's LLM chain for summarising its calls: the members that do what a prompt asks
        (a scripted policy cannot); None when it has none."""
        chain = self._chain(LLMS, agent, (agent.llm, *agent.llm.fallbacks))
        members = [member for member in chain.members if member.provider.capabilities.prompted]
        return ChainLlm(replace(chain, members=members)) if members else None

    def _chain(self, capability: Capability[P], agent: AgentSpec,
               specs: Sequence[Provider | Voice]) -> ProviderChain[P]:
        members = [self._member(capability, agent, spec) for spec in specs]
        return ProviderChain(capability.name, members, deadline_s=capability.deadline_s)

    def _member(self, capability: Capability[P], agent: AgentSpec, spec: Provider | Voice) -> Guarded[P]:
        factory = capability.factories.get(spec.provider)
        if factory is None:
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id}: no {capability.name.upper()} provider "
                                  f"{spec.provider!r}")
        if isinstance(factory, Local):
            provider, endpoint, key = factory.make(agent), "", None
        elif isinstance(factory, Shared):
            if (spec.provider,) not in self.clients:
                self.clients[(spec.provider,)] = factory.make(self.settings)
            provider, endpoint, key = self.clients[(spec.provider,)], "", None
        else:
            provider, endpoint, key = self._cloud(agent, spec, factory)
        model = spec.model or provider.model
        local = provider.capabilities.local
        timeout_s = spec.timeout_s or (capability.local_attempt_timeout_s if local else capability.attempt_timeout_s)
        return Guarded(provider, spec.provider, model, self._breaker(spec.provider, model, endpoint, local=local),
                       timeout_s, self._bucket(spec.provider, key))

    def _cloud(self, agent: AgentSpec, spec: Provider | Voice, factory: Cloud[P]) -> tuple[P, str, SecretStr]:
        """The adapter `factory` makes for `spec`, shared by every call (`clients`: its connections stay
        open); with its endpoint and key, which its breaker and rate limit go by."""
        secrets = [self._secret(agent, spec.provider, name) for name in factory.credentials]
        base_url: str | None = getattr(self.settings, factory.endpoint)
        model = spec.model if factory.per_model else ""
        endpoint = base_url or ""
        ident = (spec.provider, endpoint, *map(_key_id, secrets), model)
        if ident not in self.clients:
            self.clients[ident] = factory.make([s.get_secret_value() for s in secrets], base_url or None, model)
        client: P = self.clients[ident]
        return client, endpoint, secrets[0]

    async def aclose(self) -> None:
        """Closes the cloud providers' clients (their connection pools) and the shared local providers
        (their worker processes)."""
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            await client.aclose()

    def _breaker(self, provider: str, model: str, endpoint: str, *, local: bool) -> CircuitBreaker:
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

    def _secret(self, agent: AgentSpec, provider: str, name: str) -> SecretStr:
        secret: SecretStr | None = getattr(self.settings, name)
        if secret is None or not secret.get_secret_value():
            raise UnknownProvider(f"agent {agent.tenant}/{agent.id} uses {provider}, and {name.upper()} is not set")
        return secret


def _key_id(key: SecretStr) -> str:
    """Which key, without the key: 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:12]
