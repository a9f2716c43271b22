"""The provider interfaces: speech recognition (ASR), speech synthesis (TTS), and the LLM.

Each is a base class that does, in its public methods, what every provider of its capability does
(checking what it is given, the deadline, what a failure says), and leaves a vendor only its own
part: `_open_stream` and a stream's `_accept`, `_end_utterance`, `_close`; `_synthesize` (and
`_synthesize_mulaw` where the provider makes mu-law itself); `_complete`. What a provider can do is
declared in its `capabilities`, read where a decision depends on it.

A session owns one ASR stream per call and asks TTS and the LLM per turn. Everything a provider
returns is recorded as an event by the session, so the call core never sees a provider directly:
replay feeds it the recorded results instead. What failed on the way reaches the session one way,
whoever answered: a `ChainReport`, on the answer (`LlmResult.report`, `Recognition.report`,
`Speech.report`) or on the `ProviderError` raised when nobody did.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from streams.audio.codecs import pcm16_to_mulaw
from streams.audio.formats import MULAW_RATE, PCM_RATE

SpeechCodec = Literal["pcm_s16le", "mulaw"]
"""How speech comes out of a TTS provider: 16-bit PCM at the rate asked for, or G.711 mu-law at 8 kHz
(a phone line's own format, which cloud providers make themselves)."""


class ErrorKind(StrEnum):
    """How a provider failed, as `error.raised.kind` records it (a string in the log: these values are
    what replay and the projections read, so they never change)."""

    TIMEOUT = "timeout"
    """No connection, no first byte, or a stall mid-stream, in time."""
    CONNECTION = "connection"
    """The request could not be sent, no response came, or the connection dropped."""
    RATE_LIMITED = "rate_limited"
    SERVER = "server"
    """5xx, overloaded, or an error the provider sent in its stream."""
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    PROTOCOL = "protocol"
    """A malformed or truncated answer."""
    CIRCUIT_OPEN = "circuit_open"
    """Not asked: its circuit breaker is open."""
    CLOSED = "closed"
    """A stream used after its close."""
    ERROR = "error"
    """Anything else."""
    # What a provider on this machine says of itself: espeak-ng ...
    NOT_INSTALLED = "not_installed"
    FAILED = "failed"
    """espeak-ng exited with an error (an unknown voice, for one)."""
    EMPTY_OUTPUT = "empty_output"
    BAD_OUTPUT = "bad_output"
    # ... and pocketsphinx.
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    WORKER_FAILED = "worker_failed"
    """The recognition worker process could not start."""
    WORKER_EXITED = "worker_exited"
    CANCELLED = "cancelled"
    """A request to the worker was cancelled with its reply on the way."""
    MODEL_FAILED = "model_failed"
    DECODER_FAILED = "decoder_failed"
    BUSY = "busy"
    """A local worker had more queued than it could do in time, and refused at once."""

    def switch_reason(self) -> ErrorKind:
        """Why a chain moved to its next provider after this failure (`provider.fallback.reason`):
        timeout, rate_limited, circuit_open, busy, or error for every other kind."""
        passed_on = (ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED, ErrorKind.CIRCUIT_OPEN, ErrorKind.BUSY)
        return self if self in passed_on else ErrorKind.ERROR


@dataclass(frozen=True, slots=True)
class ProviderFailure:
    """One failed attempt on the way to an answer (see streams/providers/resilience.py)."""

    provider: str
    kind: ErrorKind
    message: str
    retryable: bool

    @classmethod
    def of(cls, error: ProviderError, provider: str | None = None) -> ProviderFailure:
        return cls(provider or error.provider, error.kind, str(error), error.retryable)


@dataclass(frozen=True, slots=True)
class ProviderSwitch:
    """The next provider of a chain took over; `reason`: timeout, error, rate_limited, circuit_open, busy."""

    from_provider: str
    to_provider: str
    reason: ErrorKind


@dataclass
class ChainReport:
    """What a request went through before it was answered (or not): each failed attempt, and each
    switch to the next provider of its chain. The session records it as `error.raised` and
    `provider.fallback` events."""

    failures: list[ProviderFailure] = field(default_factory=list)
    fallbacks: list[ProviderSwitch] = field(default_factory=list)

    def extend(self, other: ChainReport) -> None:
        self.failures += other.failures
        self.fallbacks += other.fallbacks


class ProviderError(RuntimeError):
    """A provider failed; `retryable` says whether trying again may help, `retry_after_s` when (the
    provider's own Retry-After, if it sent one). `report` says what failed: this failure alone, or
    (a chain whose every provider failed) what each of them did."""

    def __init__(self, provider: str, kind: ErrorKind, message: str, *, retryable: bool = False,
                 retry_after_s: float | None = None, report: ChainReport | None = None) -> None:
        super().__init__(f"{provider}: {kind}: {message}")
        self.provider = provider
        self.kind = kind
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.report = report if report is not None else ChainReport([ProviderFailure.of(self)])


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    local: bool = False
    """Runs on this machine's CPU: a busy machine slows it down, but it does not go away, so it gets
    a longer attempt timeout and its timeouts do not open its circuit (streams/providers/registry.py)."""


class Provider(ABC):
    """What every provider has: a name (the one the log records), a model, what it can do, a repr that
    says which it is (and never shows a key), and whatever it holds open across requests."""

    name: str
    model: str = ""
    capabilities: Capabilities

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self.model!r})"

    async def aclose(self) -> None:  # noqa: B027 (optional: most providers hold nothing open)
        """Releases what the provider holds open across requests (a cloud client's connections)."""


# -- speech recognition -------------------------------------------------------------------------------


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
    report: ChainReport = field(default_factory=ChainReport)
    """With a final result: what failed since the one before."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AsrCapabilities(Capabilities):
    interim_results: bool
    """`accept` returns interim results for the utterance in progress, before its final."""


class AsrStream(ABC):
    """One call's recognition: audio in as it arrives, results out per utterance, with times in ms of
    the audio fed to the stream across its utterances (`fed_ms`). The base checks every frame, keeps a
    stream that failed for good failing with that error (`_fail`), and makes `close` safe to repeat."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._fed_bytes = 0
        self._failed: ProviderError | None = None
        self._closed = False

    @property
    def fed_ms(self) -> int:
        return self._fed_bytes * 1000 // (PCM_RATE * 2)

    async def accept(self, pcm: bytes) -> Recognition | None:
        """Feeds 16 kHz PCM; may return an interim result for the utterance in progress."""
        if len(pcm) % 2:
            raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
        self._check_open()
        self._fed_bytes += len(pcm)
        return await self._accept(pcm)

    async def end_utterance(self) -> Recognition:
        """The caller stopped speaking: the final result for the audio since the last one."""
        self._check_open()
        return await self._end_utterance()

    async def close(self) -> None:
        """Lets go of what the stream holds; a second call does nothing."""
        if not self._closed:
            self._closed = True
            await self._close()

    def _fail(self, error: ProviderError) -> ProviderError:
        """Fails the stream for good with its first error: every later call raises that one at once,
        so a chain can move the utterance to another provider."""
        if self._failed is None:
            self._failed = error
        return self._failed

    def _check_open(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise ProviderError(self.provider, ErrorKind.CLOSED, "the recognition stream is closed")

    @abstractmethod
    async def _accept(self, pcm: bytes) -> Recognition | None: ...

    @abstractmethod
    async def _end_utterance(self) -> Recognition: ...

    @abstractmethod
    async def _close(self) -> None: ...


class AsrProvider(Provider):
    capabilities: AsrCapabilities

    async def open_stream(self, *, keywords: Sequence[str] = (), language: str = "en-US") -> AsrStream:
        """A stream for one call. `keywords`: words and phrases the agent expects, to bias recognition
        where the provider can (blank ones and repeats left out)."""
        return await self._open_stream(tuple(dict.fromkeys(k.strip() for k in keywords if k.strip())), language)

    @abstractmethod
    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> AsrStream: ...


# -- speech synthesis ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TtsCapabilities(Capabilities):
    codecs: tuple[SpeechCodec, ...] = ("pcm_s16le",)
    """What the provider makes itself: 16-bit PCM, and `mulaw` where it also makes 8 kHz mu-law (asked
    for it, a provider without it has its PCM encoded)."""


@dataclass
class Speech:
    """Speech being synthesized: its chunks, and who speaks them with which voice (`voice` empty:
    the one asked for), which a chain updates as it switches providers; `report` holds what failed,
    complete once the chunks are."""

    chunks: AsyncIterator[bytes]
    provider: str
    report: ChainReport = field(default_factory=ChainReport)
    voice: str = ""


class TtsProvider(Provider):
    capabilities: TtsCapabilities = TtsCapabilities()

    def speak(self, text: str, *, voice: str, sample_rate: int = PCM_RATE, codec: SpeechCodec = "pcm_s16le") -> Speech:
        """`synthesize`, with who is speaking and what failed (the session's way in: a chain's speech
        says more, as it goes)."""
        report = ChainReport()
        return Speech(_reported(self.synthesize(text, voice=voice, sample_rate=sample_rate, codec=codec), report),
                      self.name, report)

    async def synthesize(self, text: str, *, voice: str, sample_rate: int = PCM_RATE,
                         codec: SpeechCodec = "pcm_s16le") -> AsyncIterator[bytes]:
        """Speech for `text`, in chunks as they are ready: 16-bit mono PCM at `sample_rate`, or (`mulaw`)
        8 kHz G.711 mu-law, the provider's own where its capabilities say it makes it, else its PCM at
        8 kHz, encoded. Nothing for empty text; `bad_request` for a voice or a rate it cannot take."""
        if sample_rate <= 0:
            raise ProviderError(self.name, ErrorKind.BAD_REQUEST, f"sample rate must be positive, got {sample_rate}")
        voice = self._voice(voice)
        if not text.strip():
            return
        if codec == "pcm_s16le":
            chunks = self._synthesize(text, voice, sample_rate)
        elif "mulaw" in self.capabilities.codecs:
            chunks = self._synthesize_mulaw(text, voice)
        else:
            chunks = _encoded(self._synthesize(text, voice, MULAW_RATE))
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await close_chunks(chunks)

    def _voice(self, voice: str) -> str:
        """The voice as the provider takes it; ProviderError (`bad_request`) for one it cannot take."""
        return voice

    @abstractmethod
    def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        """16-bit mono PCM at `sample_rate` for non-empty `text`."""

    def _synthesize_mulaw(self, text: str, voice: str) -> AsyncIterator[bytes]:
        """8 kHz mu-law for non-empty `text`, made by the provider: only where its capabilities say so."""
        raise NotImplementedError(f"{self.name} makes no mu-law of its own")


async def _encoded(pcm: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in pcm:
            yield pcm16_to_mulaw(chunk)
    finally:
        await close_chunks(pcm)


async def _reported(chunks: AsyncIterator[bytes], report: ChainReport) -> AsyncIterator[bytes]:
    """`chunks`, what failed also put in `report` (the speech's, which the session records)."""
    try:
        async for chunk in chunks:
            yield chunk
    except ProviderError as exc:
        report.extend(exc.report)
        raise
    finally:
        await close_chunks(chunks)


async def close_chunks(chunks: AsyncIterator[bytes]) -> None:
    """Lets go of a synthesis stream that is not read to its end (a barge-in, a failure): its
    connection or process is released now, not whenever the garbage collector finds it."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


# -- the LLM ------------------------------------------------------------------------------------------


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
    report: ChainReport = field(default_factory=ChainReport)
    """What failed before the answer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LlmCapabilities(Capabilities):
    prompted: bool = True
    """Does what its prompt asks (a language model); False for a policy that follows a script of its
    own (the offline one), which cannot, say, summarise a call."""


class LlmProvider(Provider):
    capabilities: LlmCapabilities = LlmCapabilities()

    async def complete(self, request: LlmRequest, *, timeout_s: float | None = None) -> LlmResult:
        """The answer to `request`, within `timeout_s` where given (past it, a `timeout` ProviderError)."""
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await self._complete(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise ProviderError(self.name, ErrorKind.TIMEOUT, f"no answer within {timeout_s:g} s",
                                retryable=True) from None

    @abstractmethod
    async def _complete(self, request: LlmRequest) -> LlmResult: ...
