"""`playht`: speech from PlayHT's streaming HTTP API (v2), with `httpx` (PlayHT publishes no Python SDK
for it that fits: its `pyht` speaks gRPC and a private inference address).

What it sends. One `POST {base_url}/api/v2/tts/stream` per text with the API key in `AUTHORIZATION`
and the account's id in `X-USER-ID`, and a JSON body: `text`, `voice` (a PlayHT or cloned voice:
`s3://voice-cloning-zero-shot/.../manifest.json`), `voice_engine` (`Play3.0-mini`, PlayHT's
low-latency model, by default), `output_format` and `sample_rate`. For PCM it asks for `wav` (the
documented default) at the caller's rate, kept within the API's 8-48 kHz, with `accept: audio/wav`;
for `synthesize_mulaw`, headerless `mulaw` at 8 kHz with `accept: audio/basic`, what a Twilio media
stream carries.

What it reads. The WAV header first (its sizes are placeholders in a stream; a declared data size is
honoured), then the samples as they arrive, handed on at once, whole, mixed down to mono and
resampled where the header's rate is not the caller's (`streams.audio.codecs.WavChunks`).

Failures, as `ProviderError` kinds; nothing is retried here (the resilience layer decides):
- timeout: no connection within `connect_s`, no first byte of audio within `first_token_s` of the
  request, or a gap of more than `stall_s` between pieces of it. Retryable.
- connection: the request could not be sent, or no response came back. Retryable.
- rate_limited (429): retryable, with the `retry-after`. server (5xx): retryable.
- auth (401, 403), bad_request (400, 404, 422; an empty voice): not retryable.
- protocol: the body broke off, ended mid-sample or short of its WAV header's size, is not a WAV
  (retryable); or is JSON, not audio (the 201 link PlayHT answers to `accept: application/json`).
The API key is never logged and is removed from any message that might echo it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

import httpx

from streams.audio.codecs import WavChunks
from streams.providers.base import PCM_RATE, ProviderError, TtsCapabilities, TtsProvider
from streams.providers.llm_common import StreamTimeouts, redact, status_error
from streams.providers.tts_common import AudioResponse, decode, http_timeouts, read_audio

__all__ = ["PlayHtTts"]

NAME = "playht"
DEFAULT_BASE_URL = "https://api.play.ht"
DEFAULT_VOICE_ENGINE = "Play3.0-mini"
STREAM_PATH = "/api/v2/tts/stream"
MIN_RATE, MAX_RATE = 8_000, 48_000
MULAW_RATE = 8_000


class PlayHtTts(TtsProvider):
    """PlayHT voices (`s3://.../manifest.json`): 16-bit mono PCM at any rate (`synthesize`), or G.711
    mu-law at 8 kHz straight from the API (`synthesize_mulaw`).

    Args:
        api_key: the secret key, sent as `AUTHORIZATION`.
        user_id: the account's user id, sent as `X-USER-ID`.
        base_url: the API's host (`https://api.play.ht` when None).
        voice_engine: the model (`Play3.0-mini`, `PlayDialog` ...).
        timeouts: connect, first byte of audio, and the longest gap between pieces of it.
    """

    name = NAME
    capabilities = TtsCapabilities(streaming=True, codecs=("pcm_s16le", "mulaw"))

    def __init__(
        self,
        api_key: str,
        user_id: str,
        base_url: str | None = None,
        voice_engine: str = DEFAULT_VOICE_ENGINE,
        timeouts: StreamTimeouts | None = None,
    ) -> None:
        if not api_key or not user_id:
            raise ValueError("playht: an API key and a user id are required")
        self.voice_engine = voice_engine
        self.timeouts = timeouts or StreamTimeouts()
        self.base_url = base_url or DEFAULT_BASE_URL
        self._api_key = api_key
        self._user_id = user_id
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=http_timeouts(self.timeouts))

    def __repr__(self) -> str:
        return f"PlayHtTts(voice_engine={self.voice_engine!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        """Closes the connections kept open for the next request."""
        await self._client.aclose()

    async def synthesize(self, text: str, *, voice: str, sample_rate: int = PCM_RATE) -> AsyncIterator[bytes]:
        """Speech for `text` as 16-bit mono PCM at `sample_rate`, in chunks as they arrive; nothing for
        empty text. Raises ProviderError (see the module)."""
        if sample_rate <= 0:
            raise ProviderError(NAME, "bad_request", f"sample rate must be positive, got {sample_rate}")
        _check_voice(voice)
        if not text.strip():
            return
        wire_rate = min(max(sample_rate, MIN_RATE), MAX_RATE)
        wav = self._audio(text, voice, output_format="wav", sample_rate=wire_rate, accept="audio/wav")
        async with contextlib.aclosing(decode(NAME, wav, WavChunks(sample_rate))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def synthesize_mulaw(self, text: str, *, voice: str) -> AsyncIterator[bytes]:
        """Speech for `text` as G.711 mu-law at 8 kHz (one byte a sample, no header), as the API sends
        it: for a caller on a Twilio line, whose media stream carries exactly that, with nothing
        decoded and encoded again on the way. Nothing for empty text."""
        _check_voice(voice)
        if not text.strip():
            return
        mulaw = self._audio(text, voice, output_format="mulaw", sample_rate=MULAW_RATE, accept="audio/basic")
        async with contextlib.aclosing(mulaw) as chunks:
            async for chunk in chunks:
                yield chunk

    def _audio(
        self, text: str, voice: str, *, output_format: str, sample_rate: int, accept: str
    ) -> AsyncGenerator[bytes, None]:
        """The response body for `text`, as it arrives."""
        request = self._client.build_request(
            "POST",
            STREAM_PATH,
            json={
                "text": text,
                "voice": voice,
                "voice_engine": self.voice_engine,
                "output_format": output_format,
                "sample_rate": sample_rate,
            },
            headers={"AUTHORIZATION": self._api_key, "X-USER-ID": self._user_id, "accept": accept},
        )

        async def open_response(stack: contextlib.AsyncExitStack) -> AudioResponse:
            response = await self._client.send(request, stream=True)
            stack.push_async_callback(response.aclose)
            if not response.is_success:
                await response.aread()
                raise self._status_failure(response)
            return AudioResponse(response.headers, response.aiter_bytes())

        return read_audio(NAME, self.timeouts, open_response, secret=self._api_key, describe=_message)

    def _status_failure(self, response: httpx.Response) -> ProviderError:
        try:
            message = _message(response.json())
        except (ValueError, UnicodeDecodeError):
            message = None
        text = redact(message or response.text.strip()[:300] or response.reason_phrase, self._api_key)
        return status_error(NAME, response.status_code, text, response.headers)


def _check_voice(voice: str) -> None:
    if not voice.strip():
        raise ProviderError(NAME, "bad_request", "a PlayHT voice is required")


def _message(body: object) -> str | None:
    """The message of an error body, `{"error_message", "error_id"}`."""
    if not isinstance(body, Mapping):
        return None
    message = body.get("error_message") or body.get("message") or body.get("error")
    if not isinstance(message, str):
        return None
    error_id = body.get("error_id")
    return f"{error_id}: {message}" if isinstance(error_id, str) else message
