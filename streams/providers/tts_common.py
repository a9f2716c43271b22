"""What the cloud speech-synthesis adapters (`tts_elevenlabs`, `tts_playht`) share: their skeleton
(`CloudTts`: an HTTP client with the distinct timeouts of `cloud.StreamTimeouts`), reading an audio
body as it streams in, within those deadlines, with HTTP failures as `ProviderError` kinds; and
turning the bytes of that body into whole 16-bit samples at the rate the caller asked for.

Deadlines. The first byte of audio must come within `first_token_s` of the request (which covers the
connection and the response headers too), each later piece within `stall_s` of the one before
(`cloud.timed_events`). A missed deadline raises `ProviderError(timeout)` at once, whatever the
server does afterwards, and the response is closed: a body read only in part cannot be reused, so
the connection is dropped and the server sees the client go.

The body. Audio arrives cut wherever the network cut it, so a 16-bit sample may be split between two
pieces: `PcmChunks` and `streams.audio.codecs.WavChunks` hold back the odd byte and hand on whole samples
only. A body that ends mid-sample, or short of the size its WAV header declared, lost audio: a retryable `protocol`
error. A successful status whose content type is JSON or text carries a message where audio was
expected (a gateway's error page, an answer to the wrong `accept`): a `protocol` error too, with the
message in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from abc import abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

from streams.audio.codecs import Resampler
from streams.providers.base import ErrorKind, ProviderError, TtsProvider
from streams.providers.cloud import CloudProvider, StreamTimeouts, redact, timed_events

_MESSAGE_BYTES = 4096
"""How much of a body that is a message, not audio, is read for the error: enough for any message."""


@dataclass(frozen=True, slots=True)
class AudioResponse:
    """A response whose status said that audio follows: its headers and its body as it arrives."""

    headers: Mapping[str, str]
    body: AsyncIterator[bytes]


OpenResponse = Callable[[contextlib.AsyncExitStack], Awaitable[AudioResponse]]
"""Sends the request and returns the response once its status is known to be a success; registers
the response's closing on the stack; raises `ProviderError` for an error status."""


class CloudTts(CloudProvider, TtsProvider):
    """A cloud voice's skeleton: an HTTP client that keeps its connections for the next request, and
    the audio of a response read within the deadlines (`_audio`). A vendor sends its request
    (`open_response` for `_audio`) and says what its error bodies say (`_describe`)."""

    def __init__(self, api_key: str, base_url: str | None, model: str, timeouts: StreamTimeouts | None) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        # `httpx`, which the ElevenLabs SDK uses too (the LLM SDKs use its fork `httpx2`).
        timeout = httpx.Timeout(**self.timeouts.http().as_dict())

        async def keep_timeouts(request: httpx.Request) -> None:
            # An SDK on this client (ElevenLabs') passes one number, its read timeout, as every timeout.
            request.extensions["timeout"] = timeout.as_dict()

        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                       event_hooks={"request": [keep_timeouts]})

    async def aclose(self) -> None:
        """Closes the connections kept open for the next request."""
        await self._http.aclose()

    def _audio(self, open_response: OpenResponse) -> AsyncGenerator[bytes, None]:
        return read_audio(self.name, self.timeouts, open_response, secret=self._api_key, describe=self._describe)

    @staticmethod
    @abstractmethod
    def _describe(body: object) -> str | None:
        """The message of one of the provider's JSON error bodies, if it is one."""


async def read_audio(
    provider: str,
    timeouts: StreamTimeouts,
    open_response: OpenResponse,
    *,
    secret: str,
    describe: Callable[[object], str | None],
) -> AsyncGenerator[bytes, None]:
    """The audio body of the response `open_response` opens, piece by piece as it arrives, within the
    deadlines of `timeouts`; the response is closed whatever happens. `describe` finds the message in
    a provider's JSON error body; `secret` (the API key) is kept out of every message.

    Raises ProviderError: timeout, connection (no response), protocol (the body broke off, held no
    audio at all, or is a message rather than audio), and whatever `open_response` raises."""
    first_byte_deadline = asyncio.get_running_loop().time() + timeouts.first_token_s
    streaming = False
    received = 0
    async with contextlib.AsyncExitStack() as stack:
        try:
            try:
                async with asyncio.timeout_at(first_byte_deadline):
                    response = await open_response(stack)
            except TimeoutError:
                raise ProviderError(
                    provider, ErrorKind.TIMEOUT, f"no response within {timeouts.first_token_s:g} s", retryable=True
                ) from None
            body = timed_events(provider, response.body, timeouts, first_byte_deadline, _is_audio_piece)
            content_type = response.headers.get("content-type", "")
            if "json" in content_type or content_type.startswith("text/"):
                text = await _start_of(body)
                message = redact(_message(text, describe), secret)
                raise ProviderError(provider, ErrorKind.PROTOCOL,
                                    f"a {content_type} body where audio was expected: {message}")
            streaming = True
            async for piece in body:
                received += len(piece)
                yield piece
        except httpx.TimeoutException:
            raise ProviderError(provider, ErrorKind.TIMEOUT, "the request timed out", retryable=True) from None
        except httpx.HTTPError as exc:
            if streaming:
                raise ProviderError(
                    provider, ErrorKind.PROTOCOL, "the audio stream broke off before its end", retryable=True
                ) from exc
            raise ProviderError(
                provider, ErrorKind.CONNECTION, redact(str(exc) or type(exc).__name__, secret), retryable=True
            ) from exc
    if not received:
        raise ProviderError(provider, ErrorKind.PROTOCOL, "the response held no audio", retryable=True)


def _is_audio_piece(piece: bytes) -> bool:
    return bool(piece)


async def _start_of(body: AsyncIterator[bytes]) -> bytes:
    data = b""
    async for piece in body:
        data += piece
        if len(data) >= _MESSAGE_BYTES:
            break
    return data[:_MESSAGE_BYTES]


def _message(text: bytes, describe: Callable[[object], str | None]) -> str:
    try:
        found = describe(json.loads(text))
    except ValueError:
        found = None
    return found or text.decode("utf-8", errors="replace").strip()[:300]


class AudioDecoder(Protocol):
    """Turns a provider's audio bytes, cut anywhere, into the PCM the caller asked for."""

    def feed(self, data: bytes) -> bytes:
        """The PCM `data` completes (may be empty); ValueError where it is not the audio expected."""

    def end(self) -> bytes:
        """The PCM held back, at the end of the stream; ValueError where the stream stopped short."""


async def decode(
    provider: str, pieces: AsyncGenerator[bytes, None], decoder: AudioDecoder
) -> AsyncGenerator[bytes, None]:
    """`pieces` through `decoder`, each non-empty output as soon as there is one; `pieces` is closed
    when this is. Audio that does not decode is a retryable `protocol` error (the answer was damaged)."""
    async with contextlib.aclosing(pieces):
        try:
            async for piece in pieces:
                if chunk := decoder.feed(piece):
                    yield chunk
            rest = decoder.end()
        except ValueError as exc:
            raise ProviderError(provider, ErrorKind.PROTOCOL, str(exc), retryable=True) from None
    if rest:
        yield rest


class PcmChunks:
    """Whole 16-bit little-endian mono samples from a byte stream cut anywhere, resampled from the
    provider's rate to the caller's."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self._resampler = Resampler(from_rate, to_rate, aligned=True)
        self._odd = b""

    def feed(self, data: bytes) -> bytes:
        """The samples `data` completes, at the caller's rate (may be empty)."""
        data = self._odd + data
        whole = len(data) - len(data) % 2
        self._odd = data[whole:]
        return self._resampler.process(data[:whole])

    def end(self) -> bytes:
        """What is held back; raises ValueError where the stream stopped in the middle of a sample."""
        if self._odd:
            raise ValueError("the audio ended in the middle of a sample (an odd number of bytes)")
        return self._resampler.flush()


