"""`playht`: speech from PlayHT's streaming HTTP API (v2), with `httpx` (PlayHT publishes no Python SDK
for it that fits: its `pyht` speaks gRPC and a private inference address).

What it sends. One `POST {base_url}/api/v2/tts/stream` per text with the API key in `AUTHORIZATION`
and the account's id in `X-USER-ID`, and a JSON body: `text`, `voice` (a PlayHT or cloned voice:
`s3://voice-cloning-zero-shot/.../manifest.json`), `voice_engine` (`Play3.0-mini`, PlayHT's
low-latency model, by default), `output_format` and `sample_rate`. For PCM it asks for `wav` (the
documented default) at the caller's rate, kept within the API's 8-48 kHz, with `accept: audio/wav`;
for mu-law, headerless `mulaw` at 8 kHz with `accept: audio/basic`, what a Twilio media
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
from streams.audio.formats import MULAW_RATE
from streams.providers.base import ErrorKind, ProviderError, TtsCapabilities
from streams.providers.cloud import StreamTimeouts
from streams.providers.tts_common import AudioResponse, CloudTts, decode

__all__ = ["PlayHtTts"]

NAME = "playht"
STREAM_PATH = "/api/v2/tts/stream"
MIN_RATE, MAX_RATE = 8_000, 48_000


class PlayHtTts(CloudTts):
    """PlayHT voices (`s3://.../manifest.json`): 16-bit mono PCM at any rate, or G.711 mu-law at 8 kHz
    straight from the API.

    Args:
        api_key: the secret key, sent as `AUTHORIZATION`.
        user_id: the account's user id, sent as `X-USER-ID`.
        base_url: the API's host (`https://api.play.ht` when None).
        model: the voice engine (`Play3.0-mini`, `PlayDialog` ...).
        timeouts: connect, first byte of audio, and the longest gap between pieces of it.
    """

    name = NAME
    default_base_url = "https://api.play.ht"
    default_model = "Play3.0-mini"
    capabilities = TtsCapabilities(codecs=("pcm_s16le", "mulaw"))

    def __init__(self, api_key: str, user_id: str, base_url: str | None = None, model: str = "",
                 timeouts: StreamTimeouts | None = None) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        if not user_id:
            raise ValueError("playht: a user id is required")
        self._user_id = user_id

    def _voice(self, voice: str) -> str:
        if not voice.strip():
            raise ProviderError(NAME, ErrorKind.BAD_REQUEST, "a PlayHT voice is required")
        return voice

    def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        """A WAV at the caller's rate (within the API's), mixed down and resampled as its header says."""
        wire_rate = min(max(sample_rate, MIN_RATE), MAX_RATE)
        wav = self._request(text, voice, output_format="wav", sample_rate=wire_rate, accept="audio/wav")
        return decode(NAME, wav, WavChunks(sample_rate))

    def _synthesize_mulaw(self, text: str, voice: str) -> AsyncIterator[bytes]:
        """Headerless mu-law, as the API sends it: what a Twilio media stream carries, with nothing
        decoded and encoded again on the way."""
        return self._request(text, voice, output_format="mulaw", sample_rate=MULAW_RATE, accept="audio/basic")

    def _request(
        self, text: str, voice: str, *, output_format: str, sample_rate: int, accept: str
    ) -> AsyncGenerator[bytes, None]:
        """The response body for `text`, as it arrives."""
        request = self._http.build_request(
            "POST",
            STREAM_PATH,
            json={
                "text": text,
                "voice": voice,
                "voice_engine": self.model,
                "output_format": output_format,
                "sample_rate": sample_rate,
            },
            headers={"AUTHORIZATION": self._api_key, "X-USER-ID": self._user_id, "accept": accept},
        )

        async def open_response(stack: contextlib.AsyncExitStack) -> AudioResponse:
            response = await self._http.send(request, stream=True)
            stack.push_async_callback(response.aclose)
            if not response.is_success:
                await response.aread()
                raise self._status_failure(response)
            return AudioResponse(response.headers, response.aiter_bytes())

        return self._audio(open_response)

    def _status_failure(self, response: httpx.Response) -> ProviderError:
        try:
            message = self._describe(response.json())
        except (ValueError, UnicodeDecodeError):
            message = None
        text = message or response.text.strip()[:300] or response.reason_phrase
        return self._status_error(response.status_code, text, response.headers)

    @staticmethod
    def _describe(body: object) -> str | None:
        """`{"error_message", "error_id"}`."""
        if not isinstance(body, Mapping):
            return None
        message = body.get("error_message") or body.get("message") or body.get("error")
        if not isinstance(message, str):
            return None
        error_id = body.get("error_id")
        return f"{error_id}: {message}" if isinstance(error_id, str) else message
