"""`whisper`: speech recognition with OpenAI's audio transcription API (`whisper-1`), through the
official SDK (`AsyncOpenAI`; `base_url` points it at an OpenAI-compatible gateway or the test server).

Whisper does not stream: `accept` keeps the utterance's PCM and returns None, and `end_utterance`
sends it as a 16 kHz mono 16-bit WAV in one `POST {base_url}/audio/transcriptions` (multipart) with
`response_format=verbose_json` and `timestamp_granularities=[word, segment]` (words for their timing,
segments for their `avg_logprob`), the language as its ISO-639-1 code, and the agent's keywords as
the `prompt` (Whisper's way to be told the spelling of names and terms). The provider holds one
client, so calls share its connections; `aclose()` releases them.

What it reads. The text; each word with its timing, moved by where the utterance began in the
stream (times count the audio fed to the stream across its utterances); the confidence, which
Whisper does not give per word: a segment's is `exp(avg_logprob)` (the mean per-token probability,
geometrically), clamped to 0..1; the utterance's is the mean over its segments weighted by their
length, and a word takes the confidence of the segment it lies in.

Failures, as `ProviderError` kinds, mapped as for the OpenAI LLM (`llm_openai.OPENAI_ERRORS`), the
SDK's own retries off (`max_retries=0`): timeout (no connection within `connect_s`, no answer within
`first_token_s`: the whole transcription is its first token), connection, rate_limited (with the
server's retry-after), server, auth, bad_request, and protocol for a body that is not the documented
JSON. A failed utterance's audio is dropped (the stream's times still count it); the stream itself
stays usable, each utterance being a request of its own.
"""

from __future__ import annotations

import asyncio
import io
import math
import wave

import openai
from openai.types.audio import TranscriptionVerbose

from streams.audio.formats import PCM_RATE
from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    ErrorKind,
    ProviderError,
    Recognition,
    RecognizedWord,
)
from streams.providers.cloud import CloudProvider, StreamTimeouts
from streams.providers.llm_openai import OPENAI_ERRORS, OpenAiLlm

NAME = "whisper"


class WhisperAsr(CloudProvider, AsrProvider):
    """`base_url` includes the API's version path (`https://api.openai.com/v1` when None)."""

    name = NAME
    default_base_url = OpenAiLlm.default_base_url
    default_model = "whisper-1"
    capabilities = AsrCapabilities(interim_results=False)

    def __init__(self, api_key: str, base_url: str | None = None, model: str = "",
                 timeouts: StreamTimeouts | None = None) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0,
                                          timeout=self.timeouts.http())

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> WhisperStream:
        return WhisperStream(self, prompt=", ".join(keywords), language=language.split("-")[0].lower())

    async def aclose(self) -> None:
        await self._client.close()

    async def transcribe(self, wav: bytes, *, prompt: str, language: str) -> TranscriptionVerbose:
        """One utterance's WAV, transcribed within the timeouts; failures as `ProviderError`."""
        try:
            async with asyncio.timeout(self.timeouts.first_token_s):
                result = await self._client.audio.transcriptions.create(
                    file=("utterance.wav", wav, "audio/wav"),
                    model=self.model,
                    response_format="verbose_json",
                    timestamp_granularities=["word", "segment"],
                    language=language,
                    prompt=prompt or openai.omit,
                )
        except TimeoutError:
            raise ProviderError(NAME, ErrorKind.TIMEOUT, f"no transcription within {self.timeouts.first_token_s:g} s",
                                retryable=True) from None
        except OPENAI_ERRORS.caught as exc:
            raise OPENAI_ERRORS.failure(NAME, self._api_key, exc, streaming=False) from exc
        if not isinstance(result, TranscriptionVerbose):  # a body of another content type, as text
            raise ProviderError(NAME, ErrorKind.PROTOCOL, "a response that is not verbose_json", retryable=True)
        return result


class WhisperStream(AsrStream):
    """One call's recognition: an utterance's audio is kept until its end, then transcribed."""

    def __init__(self, provider: WhisperAsr, *, prompt: str, language: str) -> None:
        super().__init__(NAME)
        self._provider = provider
        self._prompt = prompt
        self._language = language
        self._audio = bytearray()

    async def _accept(self, pcm: bytes) -> Recognition | None:
        self._audio += pcm
        return None

    async def _end_utterance(self) -> Recognition:
        pcm = bytes(self._audio)
        self._audio.clear()
        start_ms, end_ms = _ms_of(self._fed_bytes - len(pcm)), self.fed_ms
        if not pcm:
            return Recognition(text="", is_final=True, confidence=0.0, start_ms=start_ms, end_ms=end_ms)
        result = await self._provider.transcribe(_wav(pcm), prompt=self._prompt, language=self._language)
        try:
            return _recognition(result, start_ms, end_ms)
        except (AttributeError, TypeError, ValueError) as exc:  # the SDK builds its models unchecked
            raise ProviderError(NAME, ErrorKind.PROTOCOL, f"a transcription not as documented: {exc}",
                                retryable=True) from None

    async def _close(self) -> None:
        """Drops the audio of an unfinished utterance; the connections are the provider's."""
        self._audio.clear()


def _recognition(result: TranscriptionVerbose, start_ms: int, end_ms: int) -> Recognition:
    if not isinstance(result.text, str):
        raise TypeError(f"text is {type(result.text).__name__}")
    segments = [(float(s.start), float(s.end), _confidence(s.avg_logprob)) for s in result.segments or ()]
    weights = [max(end - start, 0.0) for start, end, _ in segments]
    if sum(weights) > 0:
        confidence = sum(w * c for w, (_, _, c) in zip(weights, segments, strict=True)) / sum(weights)
    else:
        confidence = sum(c for _, _, c in segments) / len(segments) if segments else 0.0

    def word_confidence(start: float, end: float) -> float:
        middle = (start + end) / 2
        return next((c for s, e, c in segments if s <= middle <= e), confidence)

    words = tuple(
        RecognizedWord(
            word=str(w.word).strip(),
            start_ms=start_ms + _ms(w.start),
            end_ms=start_ms + _ms(w.end),
            confidence=word_confidence(float(w.start), float(w.end)),
        )
        for w in result.words or ()
    )
    return Recognition(
        text=result.text.strip(), is_final=True, confidence=confidence, start_ms=start_ms, end_ms=end_ms, words=words
    )


def _confidence(avg_logprob: float) -> float:
    return min(1.0, max(0.0, math.exp(float(avg_logprob))))


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(PCM_RATE)
        wav.writeframes(pcm)
    return out.getvalue()


def _ms(seconds: float) -> int:
    return round(float(seconds) * 1000)


def _ms_of(pcm_bytes: int) -> int:
    return pcm_bytes * 1000 // (PCM_RATE * 2)
