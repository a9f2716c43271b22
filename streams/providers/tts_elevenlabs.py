"""`elevenlabs`: speech from ElevenLabs' text-to-speech API, streamed, with the official SDK
(`AsyncElevenLabs`; `base_url` points it at a proxy, a data-residency host or the test server).

What it sends. One `POST {base_url}/v1/text-to-speech/{voice_id}/stream` per text, with `xi-api-key`;
the query's `output_format` matches what the caller asked for: `pcm_{rate}` (16-bit little-endian
mono PCM) at the caller's rate where the API has it (8, 16, 22.05, 24, 32, 44.1 and 48 kHz: `pcm_16000`
for the web widget), else at the next rate up, resampled here; `ulaw_8000` (G.711 mu-law, what a
Twilio media stream carries) for mu-law. The body holds the text, the adapter's `model_id`
(`eleven_flash_v2_5`, ElevenLabs' low-latency model, by default) and, where given, `voice_settings`
(stability, similarity, speed ... for this request); `optimize_streaming_latency` (0-4) goes in the
query where given.

What it reads. The audio as it arrives, handed on at once in whole samples (`tts_common`): nothing is
buffered beyond an odd byte.

Failures, as `ProviderError` kinds. The SDK's retries are off (its streaming call has none, and
`max_retries=0` says so): the resilience layer decides what to retry and where to fall back.
- timeout: no connection within `connect_s`, no first byte of audio within `first_token_s` of the
  request, or a gap of more than `stall_s` between pieces of it. Retryable.
- connection: the request could not be sent, or no response came back. Retryable.
- rate_limited (429: too many requests or concurrent requests): retryable, with the `retry-after`.
- server (5xx): retryable. auth (401, 403). bad_request (400, 404 voice not found, 422 validation, an
  empty or malformed voice id): not retryable.
- protocol: the body broke off or ended mid-sample (retryable), or is a JSON message, not audio.
The SDK speaks `httpx` and gives it one number for every timeout; a request hook puts back the
distinct connect, read and pool timeouts of `StreamTimeouts` (`tts_common.CloudTts`). The API key is never logged and is
removed from any message that might echo it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence

from elevenlabs import VoiceSettings
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core import ApiError
from elevenlabs.core.parse_error import ParsingError
from elevenlabs.environment import ElevenLabsEnvironment

from streams.providers.base import ErrorKind, ProviderError, TtsCapabilities
from streams.providers.cloud import StreamTimeouts
from streams.providers.tts_common import AudioResponse, CloudTts, PcmChunks, decode

__all__ = ["ElevenLabsTts"]

NAME = "elevenlabs"
PCM_RATES = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
"""The rates of the API's `pcm_*` output formats (44.1 kHz needs a Pro plan)."""
MULAW_FORMAT = "ulaw_8000"

_VOICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ElevenLabsTts(CloudTts):
    """ElevenLabs voices by id (`JBFqnCBsd6RMkjVDRZzb` ...): 16-bit mono PCM at any rate, or G.711
    mu-law at 8 kHz straight from the API.

    Args:
        api_key: the `xi-api-key`.
        base_url: the API's host (`https://api.elevenlabs.io` when None), without `/v1`.
        model: the `model_id` sent with every request.
        timeouts: connect, first byte of audio, and the longest gap between pieces of it.
        optimize_streaming_latency: 0 (none) to 4 (most, text normalisation off); the API's default
            when None.
        voice_settings: overrides the voice's stored settings for every request; the stored ones
            when None.
    """

    name = NAME
    default_base_url = ElevenLabsEnvironment.PRODUCTION.value
    default_model = "eleven_flash_v2_5"
    capabilities = TtsCapabilities(codecs=("pcm_s16le", "mulaw"))

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        model: str = "",
        timeouts: StreamTimeouts | None = None,
        *,
        optimize_streaming_latency: int | None = None,
        voice_settings: VoiceSettings | None = None,
    ) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        if optimize_streaming_latency is not None and not 0 <= optimize_streaming_latency <= 4:
            raise ValueError(f"optimize_streaming_latency must be within 0..4, got {optimize_streaming_latency}")
        self.optimize_streaming_latency = optimize_streaming_latency
        self.voice_settings = voice_settings
        self._client = AsyncElevenLabs(api_key=api_key, base_url=self.base_url, httpx_client=self._http)

    def _voice(self, voice: str) -> str:
        # The id goes into the request's path: only what an id can hold.
        if not _VOICE_ID.match(voice):
            raise ProviderError(NAME, ErrorKind.BAD_REQUEST, f"not an ElevenLabs voice id: {voice!r}")
        return voice

    def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        """Asks for the caller's rate where the API has it, else the next one up, resampled here."""
        wire_rate = _wire_rate(sample_rate)
        return decode(NAME, self._request(text, voice, f"pcm_{wire_rate}"), PcmChunks(wire_rate, sample_rate))

    def _synthesize_mulaw(self, text: str, voice: str) -> AsyncIterator[bytes]:
        """As the API sends it (`ulaw_8000`): what a Twilio media stream carries, with nothing decoded
        and encoded again on the way."""
        return self._request(text, voice, MULAW_FORMAT)

    def _request(self, text: str, voice: str, output_format: str) -> AsyncGenerator[bytes, None]:
        """The response body for `text` in `output_format`, as it arrives."""

        async def open_response(stack: contextlib.AsyncExitStack) -> AudioResponse:
            try:
                response = await stack.enter_async_context(
                    self._client.text_to_speech.with_raw_response.stream(
                        voice,
                        text=text,
                        model_id=self.model,
                        output_format=output_format,
                        optimize_streaming_latency=self.optimize_streaming_latency,
                        voice_settings=self.voice_settings,
                        request_options={"max_retries": 0},
                    )
                )
            except (ApiError, ParsingError) as exc:
                message = self._describe(exc.body) or str(exc.body)[:300]
                raise self._status_error(exc.status_code or 0, message, exc.headers or {}) from exc
            return AudioResponse(response.headers, response.data)

        return self._audio(open_response)

    @staticmethod
    def _describe(body: object) -> str | None:
        """`{"detail": {"status", "message"}}`, or FastAPI's validation errors `{"detail": [{"loc", "msg"}, ...]}`."""
        detail = body.get("detail") if isinstance(body, Mapping) else None
        if isinstance(detail, str):
            return detail
        if isinstance(detail, Mapping):
            status, message = detail.get("status"), detail.get("message")
            return ": ".join(str(part) for part in (status, message) if part) or None
        if isinstance(detail, Sequence):
            problems = [
                f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', '')}"
                for item in detail
                if isinstance(item, Mapping)
            ]
            return "; ".join(problems) or None
        return None


def _wire_rate(sample_rate: int) -> int:
    """The rate asked of the API: the caller's where it has it, else the next one up (the highest at most)."""
    return next((rate for rate in PCM_RATES if rate >= sample_rate), PCM_RATES[-1])
