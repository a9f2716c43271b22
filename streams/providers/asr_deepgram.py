"""`deepgram`: live speech recognition over Deepgram's streaming WebSocket (`GET /v1/listen`), with the
official SDK (`AsyncDeepgramClient.listen.v1.connect`; `base_url` points it at another host: a
self-hosted Deepgram, or the test server).

What it sends. One WebSocket per stream (one call): linear16 at 16 kHz, mono, interim results,
`endpointing`, `utterance_end_ms`, `vad_events` and `smart_format`, the model and the language, and
the agent's keywords as `keyterm` (Nova-3) or `keywords` (older models, which have no keyterm). Audio
goes out as it arrives; when the session's VAD hears the caller stop, `Finalize` flushes what Deepgram
still holds. Between utterances the session sends no audio, and Deepgram closes a socket that gets
no data for 10 s (NET-0001), so a `KeepAlive` goes out after `keepalive_s` without a message.
`close()` sends `CloseStream` and waits (`stall_s`) for the server's summary `Metadata` and close.

What it reads. `Results`: interim (`is_final` false) and final segments (`is_final` true), an
utterance's end flagged by `speech_final` (endpointing) or `from_finalize` (the answer to Finalize);
`UtteranceEnd`, `SpeechStarted`, `Metadata` (its request id is kept in `request_id`), `Error`.
`accept` returns the newest result not yet returned, as an interim for the utterance so far (its
final segments and the open interim, joined). `end_utterance` joins the utterance's final segments.
Deepgram's times count from the first audio on the socket, which is the stream's audio: they are
used as they come. A word is its `punctuated_word` where there is one (so words and text agree).

When the final is complete. Deepgram answers `Finalize` with a `from_finalize` result "when there is
a noticeable amount of audio buffered" (its documentation on Finalize): not always. So where the
utterance was already closed by `speech_final` or `UtteranceEnd`, with nothing heard after, the
stream waits only `SETTLE_S` for that answer; otherwise for up to `first_token_s`.

Failures, as `ProviderError` kinds; a stream that failed raises the same error from then on, so a
fallback chain can move the utterance to another provider at once.
- timeout: no upgrade within `connect_s`; no final within `first_token_s` of `Finalize`; a send that
  could not go out within `stall_s`. Retryable.
- auth (401, 403 on the upgrade); rate_limited (429, with its Retry-After; retryable); server (5xx
  on the upgrade, close code 1011-1014 such as NET-0000 and NET-0001, or an `Error` message;
  retryable); bad_request (another 4xx on the upgrade, close code 1002/1003/1007/1008 such as
  DATA-0000 for audio Deepgram cannot decode, or an `Error` of variant SchemaError).
- connection: no TCP connection; the socket dropped without a close frame, or was closed unasked.
  Retryable.
- protocol: a message that is not JSON, or a `Results` whose fields are not the documented ones; an
  upgrade answered with something that is not HTTP. Retryable.
The API key is never logged, and is removed from any message that might echo it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    ErrorKind,
    ProviderError,
    Recognition,
    RecognizedWord,
)
from streams.providers.cloud import CloudProvider, StreamTimeouts, redact, status_error

with warnings.catch_warnings():
    # The SDK's async socket is built on websockets' legacy client, deprecated since websockets 14.
    warnings.simplefilter("ignore", DeprecationWarning)
    from deepgram import AsyncDeepgramClient
    from deepgram.core.api_error import ApiError
    from deepgram.environment import DeepgramClientEnvironment
    from deepgram.listen.v1.client import AsyncV1Client
    from deepgram.listen.v1.socket_client import AsyncV1SocketClient
    from deepgram.listen.v1.types import (
        ListenV1Error,
        ListenV1Metadata,
        ListenV1Results,
        ListenV1SpeechStarted,
        ListenV1UtteranceEnd,
    )
    from websockets.legacy.exceptions import InvalidStatusCode
from websockets.exceptions import ConnectionClosed, InvalidHandshake, WebSocketException

log = logging.getLogger(__name__)

NAME = "deepgram"
SAMPLE_RATE = 16_000
KEEPALIVE_S = 4.0  # Deepgram's guide: every 3-5 s; it closes a socket silent for 10 s
SETTLE_S = 0.25  # how long an utterance already closed by the server waits for a late Finalize answer

_background: set[asyncio.Task[None]] = set()
"""Clean-ups the SDK's websockets client does not cut short (an upgrade given up on, a close), left to
finish on their own; held here so that they are not garbage-collected midway."""

_SERVER_CLOSE_CODES = {1011, 1012, 1013, 1014}  # internal error, restart, try again later, bad gateway
_BAD_REQUEST_CLOSE_CODES = {1002, 1003, 1007, 1008}  # protocol error, unsupported or invalid data, policy


class DeepgramAsr(CloudProvider, AsrProvider):
    """Deepgram's live transcription (Nova). `base_url` is the WebSocket origin (`ws://` or `wss://`,
    `wss://api.deepgram.com` when None); `timeouts`: see the module's documentation."""

    name = NAME
    default_base_url = DeepgramClientEnvironment.PRODUCTION.production
    default_model = "nova-3"
    capabilities = AsrCapabilities(interim_results=True)

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        model: str = "",
        timeouts: StreamTimeouts | None = None,
        endpointing_ms: int = 300,
        utterance_end_ms: int = 1000,
        *,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        if endpointing_ms <= 0 or utterance_end_ms <= 0 or keepalive_s <= 0:
            raise ValueError("deepgram: endpointing_ms, utterance_end_ms and keepalive_s must be positive")
        self.endpointing_ms = endpointing_ms
        self.utterance_end_ms = utterance_end_ms
        self.keepalive_s = keepalive_s
        production = DeepgramClientEnvironment.PRODUCTION
        self._client = AsyncDeepgramClient(
            api_key=api_key,
            environment=DeepgramClientEnvironment(
                base=production.base, production=self.base_url, agent=production.agent,
                agent_rest=production.agent_rest,
            ),
        )

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> DeepgramStream:
        options: dict[str, Any] = {
            "model": self.model,
            "language": language,
            "encoding": "linear16",
            "sample_rate": SAMPLE_RATE,
            "channels": 1,
            "interim_results": True,
            "endpointing": self.endpointing_ms,
            "utterance_end_ms": self.utterance_end_ms,
            "vad_events": True,
            "smart_format": True,
        }
        if keywords:
            # Nova-3 takes `keyterm` and refuses `keywords`; older models know only `keywords`.
            options["keyterm" if self.model.startswith("nova-3") else "keywords"] = list(keywords)
        stream = DeepgramStream(api_key=self._api_key, timeouts=self.timeouts, keepalive_s=self.keepalive_s)
        await stream.connect(self._client.listen.v1, options)
        return stream


@dataclass(frozen=True, slots=True)
class _Segment:
    text: str
    confidence: float
    words: tuple[RecognizedWord, ...]
    end_ms: int


@dataclass
class _Utterance:
    """The results for the audio since the last final."""

    start_ms: int
    segments: list[_Segment] = field(default_factory=list)
    closed: bool = False  # the server ended it (speech_final, UtteranceEnd) and heard nothing after
    finalized: bool = False  # the answer to Finalize (from_finalize) came

    def text(self, *more: _Segment) -> str:
        return " ".join(s.text for s in (*self.segments, *more) if s.text)

    def words(self, *more: _Segment) -> tuple[RecognizedWord, ...]:
        return tuple(w for s in (*self.segments, *more) for w in s.words)


class DeepgramStream(AsrStream):
    """One call's recognition on one Deepgram WebSocket."""

    def __init__(self, *, api_key: str, timeouts: StreamTimeouts, keepalive_s: float) -> None:
        super().__init__(NAME)
        self._api_key = api_key
        self._timeouts = timeouts
        self._keepalive_s = keepalive_s
        self._exit = contextlib.AsyncExitStack()
        self._socket: AsyncV1SocketClient | None = None
        self._reader: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()  # set by the reader on each message and when it stops
        self._utterance = _Utterance(start_ms=0)
        self._interim: Recognition | None = None  # the newest result, not yet returned by `accept`
        self._last_sent = 0.0
        self._last_message = 0.0
        self._finalizing = False  # a Finalize is out and `end_utterance` waits for its answer
        self.request_id: str | None = None

    # -- AsrStream ------------------------------------------------------------------------------
    async def _accept(self, pcm: bytes) -> Recognition | None:
        if pcm:  # an empty binary message would tell Deepgram the audio has ended
            await self._send(lambda socket: socket.send_media(pcm), "audio")
        interim, self._interim = self._interim, None
        return interim

    async def _end_utterance(self) -> Recognition:
        utterance = self._utterance
        if self.fed_ms > utterance.start_ms or utterance.segments:
            self._finalizing = True
            try:
                await self._send(lambda socket: socket.send_finalize(), "Finalize")
                await self._await_final(self._last_sent)
            finally:
                self._finalizing = False
        segments = [s for s in utterance.segments if s.text]
        words = utterance.words()
        if words:  # each segment's confidence weighs as much as it has words
            confidence = sum(s.confidence * len(s.words) for s in segments) / len(words)
        else:
            confidence = sum(s.confidence for s in segments) / len(segments) if segments else 0.0
        end_ms = self.fed_ms
        self._utterance = _Utterance(start_ms=end_ms)
        self._interim = None
        return Recognition(
            text=utterance.text(),
            is_final=True,
            confidence=confidence,
            start_ms=utterance.start_ms,
            end_ms=end_ms,
            words=words,
        )

    async def _close(self) -> None:
        """Sends CloseStream and lets go of the socket within `stall_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeouts.stall_s
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._reader is not None and self._failed is None:
            try:
                await self._send(lambda socket: socket.send_close_stream(), "CloseStream")
                # The server's Metadata, then its close.
                await asyncio.wait({self._reader}, timeout=max(0.0, deadline - loop.time()))
            except ProviderError as exc:
                log.debug("deepgram: closing the stream: %s", exc)
        tasks = [task for task in (self._keepalive, self._reader) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Not `asyncio.timeout`: the SDK's websockets client, closing, waits up to 10 s for the server's
        # close frame and then for the server to end the TCP connection, and does not give that up when
        # cancelled. It goes on in the background.
        await asyncio.wait({_in_background(self._release())}, timeout=max(0.0, deadline - loop.time()))

    # -- the connection -------------------------------------------------------------------------
    async def connect(self, listen: AsyncV1Client, options: Mapping[str, Any]) -> None:
        """Opens the socket within `connect_s` and starts reading it."""
        # Not `asyncio.timeout`: cancelled mid-handshake, the SDK's websockets client first waits for
        # the server to close the TCP connection, up to 10 s; that clean-up goes on in the background.
        opening = asyncio.ensure_future(self._exit.enter_async_context(listen.connect(**options)))
        try:
            await asyncio.wait({opening}, timeout=self._timeouts.connect_s)
        finally:
            timed_out = not opening.done()
            if timed_out:
                opening.cancel()
                _in_background(self._abandon(opening))
        if timed_out:
            raise self._error(
                ErrorKind.TIMEOUT, f"no WebSocket upgrade within {self._timeouts.connect_s:g} s", retryable=True
            )
        try:
            self._socket = opening.result()
        except ApiError as exc:  # the upgrade was refused with an HTTP status
            # The SDK keeps only the status; the response's headers (Retry-After) are on the
            # websockets exception it was raised from.
            refusal = exc.__context__
            headers = refusal.headers if isinstance(refusal, InvalidStatusCode) else {}
            body = exc.body if isinstance(exc.body, str) else "the WebSocket upgrade was refused"
            raise status_error(NAME, exc.status_code or 0, redact(body, self._api_key), headers) from None
        except InvalidHandshake as exc:
            raise self._error(ErrorKind.PROTOCOL, f"the WebSocket upgrade failed: {exc}", retryable=True) from None
        except (OSError, WebSocketException) as exc:
            raise self._error(ErrorKind.CONNECTION, f"could not connect: {exc}", retryable=True) from None
        loop = asyncio.get_running_loop()
        self._last_sent = self._last_message = loop.time()
        self._reader = asyncio.create_task(self._read())
        self._keepalive = asyncio.create_task(self._keep_alive())

    async def _abandon(self, opening: asyncio.Future[AsyncV1SocketClient]) -> None:
        """Lets a cancelled upgrade finish its clean-up, and closes the socket if it opened after all."""
        await asyncio.wait({opening})
        if not opening.cancelled() and opening.exception() is None:
            await self._release()

    async def _release(self) -> None:
        try:
            await self._exit.aclose()
        except (OSError, WebSocketException) as exc:
            log.debug("deepgram: the socket did not close cleanly: %s", redact(repr(exc), self._api_key))

    async def _read(self) -> None:
        socket = self._socket
        assert socket is not None
        try:
            while True:
                self._take(await socket.recv())
                self._changed.set()
        except ConnectionClosed as exc:
            if not self._closed:  # (not a close we asked for)
                self._fail(self._closed_error(exc))
        except ProviderError as exc:
            self._fail(exc)
        except ValueError as exc:
            self._fail(self._error(ErrorKind.PROTOCOL, f"a message that is not JSON: {exc}", retryable=True))
        except (OSError, WebSocketException) as exc:
            self._fail(self._error(ErrorKind.CONNECTION, f"the socket failed: {exc}", retryable=True))
        finally:
            self._changed.set()

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._last_sent + self._keepalive_s - loop.time()))
            if loop.time() - self._last_sent >= self._keepalive_s:
                try:
                    await self._send(lambda socket: socket.send_keep_alive(), "KeepAlive")
                except ProviderError:
                    return  # the stream has failed: the next call says so

    async def _send(self, send: Callable[[AsyncV1SocketClient], Awaitable[None]], what: str) -> None:
        if self._failed is not None:
            raise self._failed
        assert self._socket is not None
        try:
            async with self._send_lock, asyncio.timeout(self._timeouts.stall_s):
                await send(self._socket)
        except TimeoutError:
            raise self._fail(self._error(
                ErrorKind.TIMEOUT, f"sending {what} was blocked for {self._timeouts.stall_s:g} s", retryable=True
            )) from None
        except ConnectionClosed as exc:
            raise self._fail(self._closed_error(exc)) from None
        except (OSError, WebSocketException) as exc:
            error = self._error(ErrorKind.CONNECTION, f"sending {what} failed: {exc}", retryable=True)
            raise self._fail(error) from None
        self._last_sent = asyncio.get_running_loop().time()

    async def _await_final(self, finalize_sent: float) -> None:
        """Waits for the answer to Finalize (see the module's documentation)."""
        loop = asyncio.get_running_loop()
        deadline = finalize_sent + self._timeouts.first_token_s
        while True:
            if self._failed is not None:
                raise self._failed
            utterance = self._utterance
            if utterance.finalized:
                return
            settled = max(finalize_sent, self._last_message) + SETTLE_S
            until = min(deadline, settled) if utterance.closed else deadline
            if loop.time() >= until:
                if utterance.closed:
                    return
                raise self._fail(self._error(
                    ErrorKind.TIMEOUT, f"no final result within {self._timeouts.first_token_s:g} s of Finalize",
                    retryable=True,
                ))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(until):
                    await self._changed.wait()

    # -- what the server sends ------------------------------------------------------------------
    def _take(self, message: object) -> None:
        self._last_message = asyncio.get_running_loop().time()
        if isinstance(message, ListenV1Results):
            self._take_results(message)
        elif isinstance(message, ListenV1UtteranceEnd):
            self._utterance.closed = True
        elif isinstance(message, ListenV1Metadata):
            self.request_id = message.request_id
        elif isinstance(message, ListenV1Error):
            variant = message.variant or "Error"
            text = redact(f"{variant}: {message.description or message.message or ''}", self._api_key)
            if variant == "SchemaError":  # the server could not parse a message the client sent
                raise ProviderError(NAME, ErrorKind.BAD_REQUEST, f"error message: {text}")
            raise ProviderError(NAME, ErrorKind.SERVER, f"error message: {text}", retryable=True)
        elif isinstance(message, ListenV1SpeechStarted):
            log.debug("deepgram: speech started at %s s", message.timestamp)
        else:  # a message type this SDK does not know, which the SDK hands over unparsed (or as None)
            log.debug("deepgram: ignored a message: %.200r", message)

    def _take_results(self, results: ListenV1Results) -> None:
        segment = self._segment(results)
        request_id = getattr(results.metadata, "request_id", None)
        if isinstance(request_id, str):
            self.request_id = request_id
        utterance = self._utterance
        # An answer to Finalize that comes after `end_utterance` stopped waiting for it (see SETTLE_S)
        # is not the answer to the next one: its words join the open utterance, but do not end it.
        answer = bool(results.from_finalize) and self._finalizing
        if results.is_final:
            utterance.segments.append(segment)
            if results.speech_final or answer:
                utterance.closed = True
            elif segment.text:
                utterance.closed = False
            utterance.finalized = utterance.finalized or answer
            more: tuple[_Segment, ...] = ()
        else:
            if segment.text:
                utterance.closed = False
            more = (segment,)
        if segment.text:
            self._interim = Recognition(
                text=utterance.text(*more),
                is_final=False,
                confidence=segment.confidence,
                start_ms=utterance.start_ms,
                end_ms=segment.end_ms,
                words=utterance.words(*more),
            )

    def _segment(self, results: ListenV1Results) -> _Segment:
        """The best alternative of a Results message, checked: the SDK builds its models unchecked."""
        try:
            alternatives = results.channel.alternatives
            if not alternatives:
                return _Segment("", 0.0, (), _ms(results.start + results.duration))
            best = alternatives[0]
            if not isinstance(best.transcript, str):
                raise TypeError(f"transcript is {type(best.transcript).__name__}")
            words = tuple(
                RecognizedWord(
                    word=w.punctuated_word if isinstance(w.punctuated_word, str) and w.punctuated_word else str(w.word),
                    start_ms=_ms(w.start),
                    end_ms=_ms(w.end),
                    confidence=_unit(w.confidence),
                )
                for w in best.words or ()
            )
            end_ms = _ms(results.start + results.duration)
            return _Segment(best.transcript.strip(), _unit(best.confidence), words, end_ms)
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise self._error(ErrorKind.PROTOCOL, f"a Results message not as documented: {exc}",
                              retryable=True) from None

    # -- failures -------------------------------------------------------------------------------
    def _error(self, kind: ErrorKind, message: str, *, retryable: bool) -> ProviderError:
        return ProviderError(NAME, kind, redact(message, self._api_key), retryable=retryable)

    def _fail(self, error: ProviderError) -> ProviderError:
        self._changed.set()  # (an `end_utterance` waiting for its final learns of it at once)
        return super()._fail(error)

    def _closed_error(self, exc: ConnectionClosed) -> ProviderError:
        frame = exc.rcvd
        if frame is None:
            return self._error(ErrorKind.CONNECTION, "the socket dropped without a close frame", retryable=True)
        reason = f"close code {frame.code}" + (f" ({frame.reason})" if frame.reason else "")
        if frame.code in _SERVER_CLOSE_CODES:
            return self._error(ErrorKind.SERVER, f"the server closed the stream: {reason}", retryable=True)
        if frame.code in _BAD_REQUEST_CLOSE_CODES:
            return self._error(ErrorKind.BAD_REQUEST, f"the server refused the stream: {reason}", retryable=False)
        return self._error(ErrorKind.CONNECTION, f"the server closed the stream unasked: {reason}", retryable=True)


def _in_background(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def _ms(seconds: float) -> int:
    return round(float(seconds) * 1000)


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))
