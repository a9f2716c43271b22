"""The provider interfaces: speech recognition (ASR), speech synthesis (TTS), and the LLM.

A session owns one ASR stream per call and asks TTS and the LLM per turn. Everything a provider
returns is recorded as an event by the session, so the call core never sees a provider directly:
replay feeds it the recorded results instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from streams.audio.codecs import pcm16_to_mulaw

PCM_RATE = 16_000
"""Sessions work in 16 kHz mono signed 16-bit little-endian PCM; channels convert at the edges."""
MULAW_RATE = 8_000

SpeechCodec = Literal["pcm_s16le", "mulaw"]
"""How speech comes out of a TTS provider: 16-bit PCM at the rate asked for, or G.711 mu-law at 8 kHz
(a phone line's own format, which cloud providers make themselves)."""


class ProviderError(RuntimeError):
    """A provider failed; `retryable` says whether trying again may help, `retry_after_s` when (the
    provider's own Retry-After, if it sent one).

    `kind` is one of: timeout (no connection, no first byte, or a stall mid-stream in time),
    connection, rate_limited, server (5xx, overloaded), auth, bad_request, protocol (a malformed
    or truncated stream), error (anything else)."""

    def __init__(self, provider: str, kind: str, message: str, *, retryable: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{provider}: {kind}: {message}")
        self.provider = provider
        self.kind = kind
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class ProviderFailure:
    """One failed attempt on the way to an answer (see streams/providers/resilience.py)."""

    provider: str
    kind: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class ProviderSwitch:
    """The next provider of a chain took over; `reason`: timeout, error, rate_limited, circuit_open."""

    from_provider: str
    to_provider: str
    reason: str


@dataclass
class ChainReport:
    """What a request served by a chain of providers went through before it was answered (or not)."""

    failures: list[ProviderFailure] = field(default_factory=list)
    fallbacks: list[ProviderSwitch] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RecognizedWord:
    word: str
    start_ms: int
    end_ms: int
    confidence: float


@dataclass(frozen=True, slots=True)
class Recognition:
    """A recognition result; times are ms from the start of the stream's audio."""

    text: str
    is_final: bool
    confidence: float
    start_ms: int
    end_ms: int
    words: tuple[RecognizedWord, ...] = ()
    provider: str = ""
    """Who recognised it, where a chain of providers stands behind the stream (else: the stream's provider)."""
    model: str = ""
    failures: tuple[ProviderFailure, ...] = ()
    fallbacks: tuple[ProviderSwitch, ...] = ()


@dataclass(frozen=True, slots=True)
class AsrCapabilities:
    streaming: bool
    interim_results: bool
    word_timings: bool


class AsrStream(ABC):
    """One call's recognition: audio in as it arrives, results out per utterance."""

    @abstractmethod
    async def accept(self, pcm: bytes) -> Recognition | None:
        """Feeds 16 kHz PCM; may return an interim result for the utterance in progress."""

    @abstractmethod
    async def end_utterance(self) -> Recognition:
        """The caller stopped speaking: the final result for the audio since the last one."""

    @abstractmethod
    async def close(self) -> None: ...


class AsrProvider(ABC):
    name: str
    model: str
    capabilities: AsrCapabilities

    @abstractmethod
    async def open_stream(self, *, keywords: Sequence[str] = (), language: str = "en-US") -> AsrStream:
        """`keywords`: words and phrases the agent expects, to bias recognition where supported."""

    async def aclose(self) -> None:  # noqa: B027 (optional: most providers hold nothing open)
        """Releases what the provider holds open across streams (a cloud client's connections)."""


@dataclass(frozen=True, slots=True)
class TtsCapabilities:
    streaming: bool
    codecs: tuple[str, ...]


class TtsProvider(ABC):
    name: str
    capabilities: TtsCapabilities

    @abstractmethod
    def synthesize(self, text: str, *, voice: str, sample_rate: int = PCM_RATE) -> AsyncIterator[bytes]:
        """Speech for `text` as 16-bit mono PCM at `sample_rate`, in chunks as they are ready."""

    def synthesize_mulaw(self, text: str, *, voice: str) -> AsyncIterator[bytes]:
        """Speech for `text` as 8 kHz G.711 mu-law, for a phone line: the provider's own where it makes
        it (the cloud adapters override this), else its PCM at 8 kHz, encoded."""
        return _encoded(self.synthesize(text, voice=voice, sample_rate=MULAW_RATE))

    def speak(self, text: str, *, voice: str, sample_rate: int = PCM_RATE, codec: SpeechCodec = "pcm_s16le") -> Speech:
        """`synthesize` (or, for `mulaw`, `synthesize_mulaw`), with who is speaking and what failed on
        the way (a chain of providers says more)."""
        chunks = (self.synthesize_mulaw(text, voice=voice) if codec == "mulaw"
                  else self.synthesize(text, voice=voice, sample_rate=sample_rate))
        return Speech(chunks, self.name)

    async def aclose(self) -> None:  # noqa: B027 (optional: most providers hold nothing open)
        """Releases what the provider holds open (a cloud client's connections); nothing by default."""


async def _encoded(pcm: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in pcm:
            yield pcm16_to_mulaw(chunk)
    finally:
        await close_chunks(pcm)


async def close_chunks(chunks: AsyncIterator[bytes]) -> None:
    """Lets go of a synthesis stream that is not read to its end (a barge-in, a failure): its
    connection or process is released now, not whenever the garbage collector finds it."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


@dataclass
class Speech:
    """Speech being synthesized: its chunks, and who speaks them with which voice (`voice` empty:
    the one asked for), which a chain updates as it switches providers; `report` holds what failed,
    complete once the chunks are."""

    chunks: AsyncIterator[bytes]
    provider: str
    report: ChainReport = field(default_factory=ChainReport)
    voice: str = ""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None  # the tool's name, for role "tool"
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters_json: str  # a JSON schema for the arguments


@dataclass(frozen=True, slots=True)
class LlmRequest:
    request_id: str
    model: str
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True, slots=True)
class LlmResult:
    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    input_tokens: int
    output_tokens: int
    time_to_first_token_ms: int
    total_ms: int
    model: str
    provider: str = ""
    """Who answered, where a chain of providers stands behind the LLM (else: the LLM's name)."""
    failures: tuple[ProviderFailure, ...] = ()
    fallbacks: tuple[ProviderSwitch, ...] = ()


class LlmProvider(ABC):
    name: str

    @abstractmethod
    async def complete(self, request: LlmRequest) -> LlmResult: ...

    async def aclose(self) -> None:  # noqa: B027 (optional: most providers hold nothing open)
        """Releases what the provider holds open (a cloud client's connections); nothing by default."""
