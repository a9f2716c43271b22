"""A Twilio Media Streams WebSocket as a call's media: the socket side of
`streams.channels.twilio_media_protocol`.

`iterate_media` reads an accepted socket into the protocol's typed events and never dies on a bad
frame; `wait_for_start` waits for the stream's `start`; `TwilioMediaTransport` is the session's
`MediaTransport` for a phone call: agent audio, marks and clears out on the socket, hang-up and
transfer through Twilio's REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from streams.call.transport import Channel, MediaTransport, TransportClosed
from streams.channels.twilio_media_protocol import (
    Malformed,
    MediaEvent,
    MediaStreamReader,
    PhoneAudioCodec,
    Start,
    Stop,
    StreamingPhoneCodec,
    clear_message,
    mark_message,
    media_message,
)
from streams.channels.twilio_rest import CallControl, TwilioRestError
from streams.channels.twilio_webhook_protocol import dial_twiml

log = logging.getLogger(__name__)


async def iterate_media(
    websocket: WebSocket,
    codec: PhoneAudioCodec | None = None,
    *,
    decode_audio: bool = True,
) -> AsyncIterator[MediaEvent]:
    """Reads an accepted Twilio media WebSocket until it closes, yielding `MediaStreamReader`'s
    events (a message that breaks the protocol as `Malformed`). The iterator ends when the socket
    closes, cleanly or not; it never raises for the far end's doing."""
    reader = MediaStreamReader(codec, decode_audio=decode_audio)
    while True:
        try:
            message = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        kind = message.get("type")
        if kind == "websocket.disconnect":
            return
        if kind != "websocket.receive":
            continue
        text = message.get("text")
        yield reader.read(text if text is not None else message.get("bytes") or b"")


async def wait_for_start(events: AsyncIterator[MediaEvent], timeout_s: float = 10.0) -> Start | None:
    """Consumes events up to the stream's `start`; None if the socket closes, stops or times out first.
    What it skips (connected, malformed frames) is logged."""

    async def first_start() -> Start | None:
        async for event in events:
            if isinstance(event, Start):
                return event
            if isinstance(event, Stop):
                return None
            if isinstance(event, Malformed):
                log.warning("twilio media: malformed frame before start: %s (%s)", event.reason, event.excerpt)
        return None

    try:
        return await asyncio.wait_for(first_start(), timeout_s)
    except TimeoutError:
        log.warning("twilio media: no start message within %.1f s", timeout_s)
        return None


class TwilioMediaTransport(MediaTransport):
    """A phone call's media over a Twilio Media Streams socket: agent audio out as 8 kHz mu-law,
    marks and clears; hang-up and transfer through Twilio's REST API (`rest`)."""

    channel: Channel = "phone"

    def __init__(
        self,
        websocket: WebSocket,
        stream_sid: str,
        call_sid: str,
        *,
        rest: CallControl | None = None,
        codec: PhoneAudioCodec | None = None,
        transfer_twiml: Callable[[str], str] = dial_twiml,
    ) -> None:
        self.websocket = websocket
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.rest = rest
        self.codec: PhoneAudioCodec = codec if codec is not None else StreamingPhoneCodec()
        self.transfer_twiml = transfer_twiml
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._hung_up = False
        self.frames_sent = 0

    @classmethod
    def from_start(
        cls,
        websocket: WebSocket,
        start: Start,
        *,
        rest: CallControl | None = None,
        codec: PhoneAudioCodec | None = None,
        transfer_twiml: Callable[[str], str] = dial_twiml,
    ) -> TwilioMediaTransport:
        return cls(websocket, start.stream_sid, start.call_sid, rest=rest, codec=codec, transfer_twiml=transfer_twiml)

    @property
    def closed(self) -> bool:
        return self._closed or self.websocket.application_state == WebSocketState.DISCONNECTED

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            if self.closed:
                raise TransportClosed(f"twilio stream {self.stream_sid} is closed")
            try:
                await self.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                self._closed = True
                raise TransportClosed(f"twilio stream {self.stream_sid} closed: {exc!r}") from exc

    async def play(self, frame: bytes) -> None:
        """Sends 20 ms of 16 kHz 16-bit PCM as 8 kHz mu-law (any whole number of samples works)."""
        if len(frame) % 2:
            raise ValueError(f"16-bit PCM frame must have an even length, got {len(frame)} bytes")
        if not frame:
            return
        mulaw = self.codec.encode(frame)
        if mulaw:  # a resampler may hold back the first few samples
            await self.play_mulaw(mulaw)

    async def play_mulaw(self, mulaw: bytes) -> None:
        """Sends audio already in Twilio's format (8 kHz mu-law)."""
        await self._send(media_message(self.stream_sid, mulaw))
        self.frames_sent += 1

    async def play_speech(self, frame: bytes) -> None:
        await self.play_mulaw(frame)

    async def clear(self) -> None:
        await self._send(clear_message(self.stream_sid))
        reset = getattr(self.codec, "reset_encoder", None)
        if callable(reset):
            reset()

    async def mark(self, name: str) -> None:
        await self._send(mark_message(self.stream_sid, name))

    async def transfer(self, target: str) -> tuple[str, str | None]:
        """Redirects the live call to `<Dial>target</Dial>`. Twilio then ends this media stream
        (stop, close) and bridges the caller; ('connected', None) means Twilio accepted the new
        instructions, the dialled leg's own outcome comes later on the Dial action callback."""
        try:
            twiml = self.transfer_twiml(target)
        except ValueError as exc:
            return "failed", str(exc)
        if self.rest is None:
            return "failed", "no Twilio REST client configured"
        try:
            await self.rest.update_call_twiml(self.call_sid, twiml)
        except (TwilioRestError, ValueError) as exc:
            log.warning("twilio transfer of %s to %s failed: %s", self.call_sid, target, exc)
            return "failed", str(exc)
        return "connected", None

    async def hangup(self) -> None:
        """Completes the call through the REST API, then closes the socket. Closing a
        `<Connect><Stream>` socket alone also ends the call (no TwiML follows it), so a REST failure
        is logged, not raised."""
        if self._hung_up:
            return
        self._hung_up = True
        if self.rest is not None:
            try:
                await self.rest.complete_call(self.call_sid)
            except (TwilioRestError, ValueError) as exc:
                log.warning("twilio hangup of %s through REST failed (%s); closing the stream", self.call_sid, exc)
        await self.close()

    async def detach(self) -> None:
        """After a transfer Twilio bridges the caller elsewhere and ends this stream itself; we only
        close our side, never complete the call (that would hang up on the human)."""
        self._hung_up = True
        await self.close()

    async def close(self, code: int = 1000) -> None:
        async with self._send_lock:
            if self.closed:
                self._closed = True
                return
            self._closed = True
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.websocket.close(code)
