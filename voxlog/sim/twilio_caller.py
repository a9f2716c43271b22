"""A test caller that behaves as Twilio does towards a running voxlog gateway.

It places a call the way Twilio's network would: a signed `POST /twilio/voice` webhook with the form
parameters Twilio sends, reads the TwiML for `<Connect><Stream url=...>` and its `<Parameter>`s,
opens the media WebSocket (handshake signed too), sends `connected`, `start` (with the parameters as
customParameters) and 20 ms `media` messages of 8 kHz mu-law paced in real time (or faster), with
sequenceNumber / chunk / timestamp counting as Twilio counts them. Concurrently it receives what the
agent sends (`media`, `mark`, `clear`), checks each as strictly as Twilio would, keeps the agent's
audio and a timed log, and answers marks the way Twilio does: when playback of the audio queued
before the mark would have finished (at once for marks still queued when a `clear` arrives). It can
press keys (`dtmf`), send anything raw, end with `stop` or drop the connection abruptly, and send
signed status callbacks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from streams.audio.codecs import pcm16_to_mulaw, resample_pcm16
from streams.audio.formats import MULAW_FRAME_BYTES, MULAW_RATE
from streams.channels.twilio_media_protocol import (
    Connected,
    Dtmf,
    InboundEvent,
    Mark,
    Media,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    OutboundMessage,
    Start,
    Stop,
    TwilioProtocolError,
    dump_inbound,
    parse_outbound,
)
from streams.channels.twilio_webhook_protocol import SIGNATURE_HEADER, compute_twilio_signature
from voxlog.sim.media_peer import MediaPeer

MULAW_SILENCE = 0xFF
FRAME_S = 0.020


def new_sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@dataclass(frozen=True)
class StreamInstructions:
    """What `<Connect><Stream>` TwiML told Twilio to do."""

    url: str
    parameters: dict[str, str]
    twiml: str


def parse_stream_twiml(twiml: str) -> StreamInstructions:
    """Finds `<Response><Connect><Stream url=...>` and its `<Parameter name= value=/>`s."""
    root = ET.fromstring(twiml)
    if root.tag != "Response":
        raise ValueError(f"TwiML root is <{root.tag}>, expected <Response>")
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise ValueError(f"no <Connect><Stream url=...> in TwiML: {twiml}")
    parameters: dict[str, str] = {}
    for parameter in stream.findall("./Parameter"):
        name = parameter.get("name")
        if name is None:
            raise ValueError("<Parameter> without a name")
        parameters[name] = parameter.get("value", "")
    return StreamInstructions(url=str(stream.get("url")), parameters=parameters, twiml=twiml)


@dataclass(frozen=True)
class Received:
    """One message from the agent: when (seconds since the WebSocket opened), what."""

    at: float
    raw: str | bytes
    message: OutboundMessage | None
    error: str | None = None


@dataclass
class TwilioCaller(MediaPeer):
    """Plays one call against a gateway at `base_url` (http://127.0.0.1:PORT).

    `public_url` is the URL Twilio is configured with (what it signs); by default the gateway's own.
    `realtime_playback` False echoes marks as soon as they arrive instead of after the audio before
    them would have played.
    """

    base_url: str
    auth_token: str
    account_sid: str = field(default_factory=lambda: new_sid("AC"))
    call_sid: str = field(default_factory=lambda: new_sid("CA"))
    stream_sid: str = field(default_factory=lambda: new_sid("MZ"))
    from_: str = "+15550001111"
    to: str = "+15550002222"
    public_url: str | None = None
    voice_path: str = "/twilio/voice"
    status_path: str = "/twilio/status"
    direction: str = "inbound"
    """inbound, or outbound-api for a call the platform placed (the person answering is the far end)."""
    realtime_playback: bool = True
    http: httpx.AsyncClient | None = None
    """A client to post webhooks with (base URL `base_url`), shared by many callers; else one per post."""

    log: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._init_peer(realtime_playback=self.realtime_playback)
        self._sequence = 0
        self._chunk = 0
        self._send_lock = asyncio.Lock()
        self._next_frame_at = 0.0
        """When the frame after the last one sent in real time is due: a phone's stream has no gap and no
        burst where one `send_mulaw` ends and the next begins."""
        self.start_event: Start | None = None

    # ------------------------------------------------------------------ webhooks

    def _public(self, path: str) -> str:
        base = (self.public_url or self.base_url).rstrip("/")
        return base + path

    def voice_params(self, **overrides: str) -> dict[str, str]:
        """The form Twilio posts to the voice webhook for an inbound call."""
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": "ringing" if self.direction == "inbound" else "in-progress",
            "CallToken": "%7B%22parentCallInfoToken%22%3A%22%22%7D",
            "Called": self.to,
            "CalledCity": "SAN FRANCISCO",
            "CalledCountry": "US",
            "CalledState": "CA",
            "CalledZip": "94105",
            "Caller": self.from_,
            "CallerCity": "OAKLAND",
            "CallerCountry": "US",
            "CallerState": "CA",
            "CallerZip": "94612",
            "Direction": self.direction,
            "From": self.from_,
            "FromCity": "OAKLAND",
            "FromCountry": "US",
            "FromState": "CA",
            "FromZip": "94612",
            "StirVerstat": "TN-Validation-Passed-A",
            "To": self.to,
            "ToCity": "SAN FRANCISCO",
            "ToCountry": "US",
            "ToState": "CA",
            "ToZip": "94105",
        }
        params.update(overrides)
        return params

    async def post_webhook(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        signed_url: str | None = None,
        signature: str | None = None,
        sign: bool = True,
        tamper: Callable[[dict[str, str]], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POSTs a form as Twilio does, signed over `signed_url` (default: the public URL of `path`).
        `signature` overrides the computed one; `tamper` edits the form after signing."""
        url = signed_url or self._public(path)
        form = dict(params)
        request_headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
            "X-Home-Region": "us1",
        }
        if sign:
            request_headers[SIGNATURE_HEADER] = signature or compute_twilio_signature(self.auth_token, url, form)
        request_headers.update(headers or {})
        if tamper is not None:
            tamper(form)
        if self.http is not None:
            return await self.http.post(path, data=form, headers=request_headers)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
            return await client.post(path, data=form, headers=request_headers)

    async def ring(self, **kwargs: Any) -> httpx.Response:
        """The voice webhook for this call; keyword arguments go to `post_webhook`."""
        return await self.post_webhook(self.voice_path, self.voice_params(), **kwargs)

    async def dial(self) -> StreamInstructions:
        """Rings and returns the stream instructions; fails on anything but 200 with stream TwiML."""
        response = await self.ring()
        if response.status_code != 200:
            raise AssertionError(f"voice webhook answered {response.status_code}: {response.text}")
        return parse_stream_twiml(response.text)

    async def send_status(
        self,
        status: str,
        *,
        duration_s: int | None = None,
        sip_response_code: int | None = None,
        sequence: int = 0,
        **kwargs: Any,
    ) -> httpx.Response:
        """A status callback as Twilio sends it (call-progress-events)."""
        params = self.voice_params(CallStatus=status)
        params.update(
            {
                "CallbackSource": "call-progress-events",
                "SequenceNumber": str(sequence),
                "Timestamp": format_datetime(datetime.now(UTC).replace(microsecond=0)),
            }
        )
        if duration_s is not None:
            params["CallDuration"] = str(duration_s)
            params["Duration"] = str(max(1, -(-duration_s // 60)))
        if sip_response_code is not None:
            params["SipResponseCode"] = str(sip_response_code)
        return await self.post_webhook(self.status_path, params, **kwargs)

    # ------------------------------------------------------------------ media stream

    async def connect(
        self,
        instructions: StreamInstructions,
        *,
        connect_url: str | None = None,
        sign_handshake: bool = True,
        send_start: bool = True,
        tracks: tuple[str, ...] = ("inbound",),
    ) -> None:
        """Opens the stream's WebSocket and sends `connected` and `start`.

        `connect_url` is where to connect when the TwiML names a public host this machine cannot
        reach (the handshake is still signed over the TwiML's URL). By default the TwiML's URL with
        its host replaced by `base_url`'s when they differ.
        """
        target = connect_url or self._local_ws_url(instructions.url)
        headers = {"User-Agent": "Twilio.TmeWs/1.0"}
        if sign_handshake:
            headers[SIGNATURE_HEADER] = compute_twilio_signature(self.auth_token, instructions.url, {})
        await self._open(target, headers)
        await self.send_event(Connected())
        if send_start:
            self.start_event = Start(
                stream_sid=self.stream_sid,
                account_sid=self.account_sid,
                call_sid=self.call_sid,
                tracks=tracks,
                custom_parameters=dict(instructions.parameters),
                sequence_number=self._next_sequence(),
            )
            await self._send_text(dump_inbound(self.start_event))

    def _local_ws_url(self, stream_url: str) -> str:
        stream = urlsplit(stream_url)
        local = urlsplit(self.base_url)
        if stream.netloc == local.netloc:
            return stream_url
        public_prefix = urlsplit(self.public_url).path.rstrip("/") if self.public_url else ""
        path = (
            stream.path[len(public_prefix) :]
            if public_prefix and stream.path.startswith(public_prefix)
            else stream.path
        )
        return urlunsplit(("wss" if local.scheme == "https" else "ws", local.netloc, path, "", ""))

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    async def send_event(self, event: InboundEvent) -> None:
        """Sends an event as Twilio would (sequence numbers assigned here for all but connected)."""
        async with self._send_lock:
            if not isinstance(event, Connected) and event.sequence_number is None:
                event = _with_sequence(event, self._next_sequence())
            await self._send_text(dump_inbound(event))

    async def send_raw(self, data: str | bytes) -> None:
        """Anything at all, as one WebSocket message (text for str, binary for bytes)."""
        async with self._send_lock:
            await self._send_text(data)

    async def send_mulaw(self, mulaw: bytes, *, realtime: bool = True, speed: float = 1.0) -> int:
        """Streams 8 kHz mu-law as 20 ms media messages (the last padded with silence), paced in real
        time (`speed` times faster) unless `realtime` is False; returns the number of chunks."""
        if not mulaw:
            return 0
        frames = [mulaw[i : i + MULAW_FRAME_BYTES] for i in range(0, len(mulaw), MULAW_FRAME_BYTES)]
        if len(frames[-1]) < MULAW_FRAME_BYTES:
            frames[-1] = frames[-1] + bytes([MULAW_SILENCE]) * (MULAW_FRAME_BYTES - len(frames[-1]))
        started = max(time.monotonic(), self._next_frame_at)
        if realtime:
            self._next_frame_at = started + len(frames) * FRAME_S / speed
        for index, payload in enumerate(frames):
            if realtime:
                due = started + index * FRAME_S / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with self._send_lock:
                self._chunk += 1
                event = Media(
                    stream_sid=self.stream_sid,
                    track="inbound",
                    chunk=self._chunk,
                    timestamp_ms=(self._chunk - 1) * 20,
                    payload=payload,
                    sequence_number=self._next_sequence(),
                )
                await self._send_text(dump_inbound(event))
        return len(frames)

    async def send_pcm16(self, pcm: bytes, rate: int = 16000, *, realtime: bool = True, speed: float = 1.0) -> int:
        """Streams 16-bit PCM at `rate`, converted to 8 kHz mu-law as the phone network would."""
        return await self.send_mulaw(pcm16_to_mulaw(resample_pcm16(pcm, rate, 8000)), realtime=realtime, speed=speed)

    async def send_dtmf(self, digit: str) -> None:
        await self.send_event(Dtmf(stream_sid=self.stream_sid, digit=digit))

    async def stop(self, *, close: bool = True) -> None:
        """Twilio's end of stream: `stop`, then a normal close."""
        await self.send_event(Stop(stream_sid=self.stream_sid, account_sid=self.account_sid, call_sid=self.call_sid))
        if close:
            await self.close()

    # ------------------------------------------------------------------ what the agent sends

    async def _on_message(self, raw: str | bytes) -> None:
        at = time.monotonic() - self.opened_at
        if isinstance(raw, bytes):
            error = "binary frame; Twilio accepts JSON text only"
            self.protocol_errors.append(error)
            self.log.append(Received(at, raw, None, error))
        else:
            try:
                message = parse_outbound(raw)
            except TwilioProtocolError as exc:
                self.protocol_errors.append(exc.reason)
                self.log.append(Received(at, raw, None, exc.reason))
            else:
                if message.stream_sid != self.stream_sid:
                    error = f"streamSid {message.stream_sid} is not this stream's {self.stream_sid}"
                    self.protocol_errors.append(error)
                    self.log.append(Received(at, raw, message, error))
                else:
                    self.log.append(Received(at, raw, message))
                    self._play(message)

    def _play(self, message: OutboundMessage) -> None:
        if isinstance(message, OutboundMedia):
            self._hear(message.payload, len(message.payload) / MULAW_RATE)
        elif isinstance(message, OutboundMark):
            self.speaker.mark(message.name)
        elif isinstance(message, OutboundClear):
            self._clear()

    async def _send_mark(self, name: str) -> None:
        await self.send_event(Mark(stream_sid=self.stream_sid, name=name))

    def messages(self, kind: type[OutboundMessage] | None = None) -> list[OutboundMessage]:
        return [r.message for r in self.log if r.message is not None and (kind is None or isinstance(r.message, kind))]


def _with_sequence(event: InboundEvent, sequence: int) -> InboundEvent:
    if isinstance(event, Connected):
        return event  # the one message without a sequence number
    return replace(event, sequence_number=sequence)
