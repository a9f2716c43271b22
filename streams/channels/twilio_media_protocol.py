"""Twilio Media Streams: the protocol of the bidirectional WebSocket a `<Connect><Stream>` opens.

Twilio sends JSON text messages: `connected`, then `start` (stream and call SIDs, tracks, the
`<Parameter>`s as customParameters, the media format: 8 kHz mono mu-law), then `media` every 20 ms
(base64 mu-law, 160 bytes), `dtmf` on key presses, `mark` when playback reaches a mark we sent (or a
`clear` dropped it), and `stop` before it closes. We send `media` (base64 8 kHz mu-law), `mark` and
`clear`, each naming the streamSid. See https://www.twilio.com/docs/voice/media-streams/websocket-messages

This module is the protocol alone, with no socket: parse what Twilio sends, serialise both
directions, precise `TwilioProtocolError`s, `MediaStreamReader` (one stream's messages in order,
never failing on a bad one) and the audio conversion. The socket and the session's `MediaTransport`
over it are the gateway's (`gateway.twilio_media_transport`); the simulated caller speaks this too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from streams.audio.codecs import Resampler, mulaw_to_pcm16, pcm16_to_mulaw
from streams.audio.formats import MULAW_FRAME_BYTES, MULAW_RATE, PCM_RATE

MAX_MESSAGE_CHARS = 64 * 1024
"""Twilio's messages are a few hundred bytes; this bounds the parser's work on garbage."""
EXCERPT_CHARS = 120
MULAW_ENCODING = "audio/x-mulaw"
DTMF_DIGITS = frozenset("0123456789*#ABCD")
INBOUND_TRACKS = frozenset({"inbound", "outbound"})


class TwilioProtocolError(ValueError):
    """A message that is not what Twilio's Media Streams protocol says: `reason` says exactly what,
    `excerpt` shows the start of the offending message."""

    def __init__(self, reason: str, raw: str | bytes | None = None) -> None:
        self.reason = reason
        self.excerpt = excerpt(raw) if raw is not None else ""
        super().__init__(reason)


def excerpt(raw: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """The start of a message, printable, for logs and audit events."""
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        text = repr(data[:limit])
        return text + ("..." if len(data) > limit else "")
    return raw[:limit] + ("..." if len(raw) > limit else "")


# --------------------------------------------------------------------------- events from Twilio


@dataclass(frozen=True, slots=True)
class MediaFormat:
    encoding: str = MULAW_ENCODING
    sample_rate: int = MULAW_RATE
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str = "Call"
    version: str = "1.0.0"


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: tuple[str, ...] = ("inbound",)
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    media_format: MediaFormat = MediaFormat()
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Media:
    """One 20 ms frame. `payload` is the 8 kHz mu-law as received (what `audio.caller_chunk` stores);
    `pcm` is the same audio as 16 kHz 16-bit PCM, filled in by `MediaStreamReader` for the inbound track."""

    stream_sid: str
    track: str
    chunk: int
    timestamp_ms: int
    payload: bytes
    sequence_number: int | None = None
    pcm: bytes = b""


@dataclass(frozen=True, slots=True)
class Dtmf:
    stream_sid: str
    digit: str
    track: str = "inbound_track"
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """Twilio's answer to a mark we sent: playback reached it (or a clear dropped the audio before it)."""

    stream_sid: str
    name: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    stream_sid: str
    account_sid: str
    call_sid: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message `MediaStreamReader` skipped: why, and the start of it."""

    reason: str
    excerpt: str


InboundEvent = Connected | Start | Media | Dtmf | Mark | Stop
MediaEvent = InboundEvent | Malformed


# --------------------------------------------------------------------------- messages to Twilio


@dataclass(frozen=True, slots=True)
class OutboundMedia:
    stream_sid: str
    payload: bytes
    """8 kHz mu-law."""


@dataclass(frozen=True, slots=True)
class OutboundMark:
    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class OutboundClear:
    stream_sid: str


OutboundMessage = OutboundMedia | OutboundMark | OutboundClear


# --------------------------------------------------------------------------- parsing helpers


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_JSON_IN = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_OUT = json.JSONEncoder(separators=(",", ":"))
"""Made once: `json.loads` and `json.dumps` given arguments build a new decoder or encoder per call
(measured on a media message: 12.8 against 5.1 us to parse, 8.5 against 6.2 us to write)."""


def _load_object(raw: str | bytes) -> dict[str, Any]:
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TwilioProtocolError(f"message is not UTF-8 text: {exc.reason} at byte {exc.start}", raw) from exc
    elif isinstance(raw, str):
        text = raw
    else:
        raise TwilioProtocolError(f"message must be text, got {type(raw).__name__}")
    if len(text) > MAX_MESSAGE_CHARS:
        raise TwilioProtocolError(f"message is {len(text)} characters, more than {MAX_MESSAGE_CHARS}", text)
    try:
        value = _JSON_IN.decode(text)
    except RecursionError as exc:
        raise TwilioProtocolError("bad JSON: nested too deeply", text) from exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise TwilioProtocolError(f"bad JSON: {exc}", text) from exc
    if not isinstance(value, dict):
        raise TwilioProtocolError(f"message must be a JSON object, got {type(value).__name__}", text)
    return value


class _Reader:
    """Field access on one parsed message, with errors that name the field path."""

    def __init__(self, raw: str | bytes, message: dict[str, Any]) -> None:
        self.raw = raw
        self.message = message

    def fail(self, reason: str) -> NoReturn:
        raise TwilioProtocolError(reason, self.raw)

    def obj(self, parent: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        if key not in parent:
            self.fail(f"missing field '{path}'")
        value = parent[key]
        if not isinstance(value, dict):
            self.fail(f"field '{path}' must be an object, got {type(value).__name__}")
        return value

    def string(self, parent: Mapping[str, Any], key: str, path: str, *, empty: bool = False) -> str:
        if key not in parent:
            self.fail(f"missing field '{path}'")
        value = parent[key]
        if not isinstance(value, str):
            self.fail(f"field '{path}' must be a string, got {type(value).__name__}")
        if not empty and not value:
            self.fail(f"field '{path}' is empty")
        return value

    def counter(self, parent: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> int | None:
        """Twilio's counters are decimal strings ("1"); plain JSON integers are accepted too."""
        if key not in parent:
            if required:
                self.fail(f"missing field '{path}'")
            return None
        value = parent[key]
        if isinstance(value, bool) or not isinstance(value, int | str):
            self.fail(f"field '{path}' must be a non-negative integer string, got {type(value).__name__}")
        if isinstance(value, str):
            if not value.isascii() or not value.isdigit() or len(value) > 18:
                self.fail(f"field '{path}' must be a non-negative integer string, got {value[:24]!r}")
            return int(value)
        if value < 0:
            self.fail(f"field '{path}' must be non-negative, got {value}")
        return value

    def stream_sid(self) -> str:
        return self.string(self.message, "streamSid", "streamSid")

    def sequence(self) -> int | None:
        return self.counter(self.message, "sequenceNumber", "sequenceNumber", required=False)


def _decode_payload(reader: _Reader, payload: str, path: str) -> bytes:
    try:
        data = base64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        reader.fail(f"field '{path}' is not valid base64: {exc}")
    if len(data) != MULAW_FRAME_BYTES:
        reader.fail(f"field '{path}' is {len(data)} bytes, expected {MULAW_FRAME_BYTES} (20 ms of 8 kHz mu-law)")
    return data


# --------------------------------------------------------------------------- parse / dump inbound


def parse_inbound(raw: str | bytes) -> InboundEvent:
    """Parses one message from Twilio; raises TwilioProtocolError saying exactly what is wrong."""
    message = _load_object(raw)
    reader = _Reader(raw, message)
    event = reader.string(message, "event", "event")
    if event == "connected":
        return Connected(
            protocol=reader.string(message, "protocol", "protocol"),
            version=reader.string(message, "version", "version"),
        )
    if event == "start":
        return _parse_start(reader)
    if event == "media":
        media = reader.obj(message, "media", "media")
        track = reader.string(media, "track", "media.track")
        if track not in INBOUND_TRACKS:
            reader.fail(f"field 'media.track' must be inbound or outbound, got {track[:24]!r}")
        chunk = reader.counter(media, "chunk", "media.chunk")
        timestamp = reader.counter(media, "timestamp", "media.timestamp")
        assert chunk is not None
        assert timestamp is not None
        payload = _decode_payload(reader, reader.string(media, "payload", "media.payload"), "media.payload")
        return Media(
            stream_sid=reader.stream_sid(),
            track=track,
            chunk=chunk,
            timestamp_ms=timestamp,
            payload=payload,
            sequence_number=reader.sequence(),
        )
    if event == "dtmf":
        dtmf = reader.obj(message, "dtmf", "dtmf")
        digit = reader.string(dtmf, "digit", "dtmf.digit")
        if digit not in DTMF_DIGITS:
            reader.fail(f"field 'dtmf.digit' must be one of 0-9 * # A-D, got {digit[:24]!r}")
        track = reader.string(dtmf, "track", "dtmf.track") if "track" in dtmf else "inbound_track"
        return Dtmf(stream_sid=reader.stream_sid(), digit=digit, track=track, sequence_number=reader.sequence())
    if event == "mark":
        mark = reader.obj(message, "mark", "mark")
        return Mark(
            stream_sid=reader.stream_sid(),
            name=reader.string(mark, "name", "mark.name"),
            sequence_number=reader.sequence(),
        )
    if event == "stop":
        stop = reader.obj(message, "stop", "stop")
        return Stop(
            stream_sid=reader.stream_sid(),
            account_sid=reader.string(stop, "accountSid", "stop.accountSid"),
            call_sid=reader.string(stop, "callSid", "stop.callSid"),
            sequence_number=reader.sequence(),
        )
    reader.fail(f"unknown event {event[:40]!r}")


def _parse_start(reader: _Reader) -> Start:
    message = reader.message
    start = reader.obj(message, "start", "start")
    stream_sid = reader.string(start, "streamSid", "start.streamSid")
    if "streamSid" in message and reader.stream_sid() != stream_sid:
        reader.fail("field 'streamSid' differs from 'start.streamSid'")
    tracks_value = start.get("tracks", ["inbound"])
    if not isinstance(tracks_value, list) or not tracks_value:
        reader.fail("field 'start.tracks' must be a non-empty array")
    for track in tracks_value:
        if not isinstance(track, str) or track not in INBOUND_TRACKS:
            reader.fail(f"field 'start.tracks' holds {track!r}; expected inbound or outbound")
    params_value = start.get("customParameters", {})
    if not isinstance(params_value, dict):
        reader.fail("field 'start.customParameters' must be an object")
    for name, value in params_value.items():
        if not isinstance(value, str):
            reader.fail(f"field 'start.customParameters.{name}' must be a string, got {type(value).__name__}")
    fmt = reader.obj(start, "mediaFormat", "start.mediaFormat")
    encoding = reader.string(fmt, "encoding", "start.mediaFormat.encoding")
    rate = reader.counter(fmt, "sampleRate", "start.mediaFormat.sampleRate")
    channels = reader.counter(fmt, "channels", "start.mediaFormat.channels")
    if (encoding, rate, channels) != (MULAW_ENCODING, MULAW_RATE, 1):
        reader.fail(
            f"unsupported media format {encoding} {rate} Hz x{channels}; expected {MULAW_ENCODING} {MULAW_RATE} Hz x1"
        )
    return Start(
        stream_sid=stream_sid,
        account_sid=reader.string(start, "accountSid", "start.accountSid"),
        call_sid=reader.string(start, "callSid", "start.callSid"),
        tracks=tuple(tracks_value),
        custom_parameters=dict(params_value),
        media_format=MediaFormat(encoding, MULAW_RATE, 1),
        sequence_number=reader.sequence(),
    )


def _with_sequence(message: dict[str, Any], sequence_number: int | None) -> dict[str, Any]:
    if sequence_number is not None:
        message["sequenceNumber"] = str(sequence_number)
    return message


def inbound_message(event: InboundEvent) -> dict[str, Any]:
    """The JSON object Twilio sends for this event, field for field (counters as strings)."""
    if isinstance(event, Connected):
        return {"event": "connected", "protocol": event.protocol, "version": event.version}
    if isinstance(event, Start):
        message = _with_sequence({"event": "start"}, event.sequence_number)
        message["start"] = {
            "accountSid": event.account_sid,
            "streamSid": event.stream_sid,
            "callSid": event.call_sid,
            "tracks": list(event.tracks),
            "mediaFormat": {
                "encoding": event.media_format.encoding,
                "sampleRate": event.media_format.sample_rate,
                "channels": event.media_format.channels,
            },
            "customParameters": dict(event.custom_parameters),
        }
        message["streamSid"] = event.stream_sid
        return message
    if isinstance(event, Media):
        message = _with_sequence({"event": "media"}, event.sequence_number)
        message["media"] = {
            "track": event.track,
            "chunk": str(event.chunk),
            "timestamp": str(event.timestamp_ms),
            "payload": base64.b64encode(event.payload).decode("ascii"),
        }
        message["streamSid"] = event.stream_sid
        return message
    if isinstance(event, Dtmf):
        message = {"event": "dtmf", "streamSid": event.stream_sid}
        _with_sequence(message, event.sequence_number)
        message["dtmf"] = {"track": event.track, "digit": event.digit}
        return message
    if isinstance(event, Mark):
        message = _with_sequence({"event": "mark"}, event.sequence_number)
        message["streamSid"] = event.stream_sid
        message["mark"] = {"name": event.name}
        return message
    message = _with_sequence({"event": "stop"}, event.sequence_number)
    message["streamSid"] = event.stream_sid
    message["stop"] = {"accountSid": event.account_sid, "callSid": event.call_sid}
    return message


def dump_inbound(event: InboundEvent) -> str:
    """Serialises an event as Twilio sends it (for test callers and fixtures)."""
    return _JSON_OUT.encode(inbound_message(event))


# --------------------------------------------------------------------------- outbound messages


def media_message(stream_sid: str, mulaw: bytes) -> str:
    """`{"event":"media","streamSid":...,"media":{"payload":<base64 8 kHz mu-law>}}`."""
    if not stream_sid:
        raise ValueError("stream_sid is required")
    if not mulaw:
        raise ValueError("media payload is empty")
    payload = base64.b64encode(mulaw).decode("ascii")
    return _JSON_OUT.encode({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})


def mark_message(stream_sid: str, name: str) -> str:
    """`{"event":"mark","streamSid":...,"mark":{"name":...}}`."""
    if not stream_sid:
        raise ValueError("stream_sid is required")
    if not isinstance(name, str) or not name:
        raise ValueError("mark name must be a non-empty string")
    return _JSON_OUT.encode({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """`{"event":"clear","streamSid":...}`."""
    if not stream_sid:
        raise ValueError("stream_sid is required")
    return _JSON_OUT.encode({"event": "clear", "streamSid": stream_sid})


def dump_outbound(message: OutboundMessage) -> str:
    if isinstance(message, OutboundMedia):
        return media_message(message.stream_sid, message.payload)
    if isinstance(message, OutboundMark):
        return mark_message(message.stream_sid, message.name)
    return clear_message(message.stream_sid)


def parse_outbound(raw: str | bytes) -> OutboundMessage:
    """Parses a message sent to Twilio, as strictly as Twilio does (error 31924 otherwise): only
    media (non-empty base64 mu-law), mark (non-empty name) and clear, each with its streamSid."""
    message = _load_object(raw)
    reader = _Reader(raw, message)
    event = reader.string(message, "event", "event")
    if event == "media":
        media = reader.obj(message, "media", "media")
        encoded = reader.string(media, "payload", "media.payload")
        try:
            payload = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            reader.fail(f"field 'media.payload' is not valid base64: {exc}")
        if not payload:
            reader.fail("field 'media.payload' is empty")
        return OutboundMedia(reader.stream_sid(), payload)
    if event == "mark":
        mark = reader.obj(message, "mark", "mark")
        return OutboundMark(reader.stream_sid(), reader.string(mark, "name", "mark.name"))
    if event == "clear":
        return OutboundClear(reader.stream_sid())
    reader.fail(f"unknown event {event[:40]!r} (Twilio accepts media, mark, clear)")


# --------------------------------------------------------------------------- audio conversion


class PhoneAudioCodec(Protocol):
    """Converts between the session's 16 kHz 16-bit PCM and Twilio's 8 kHz mu-law, one direction
    per instance's method; implementations may keep filter state across 20 ms frames."""

    def decode(self, mulaw: bytes) -> bytes:
        """8 kHz mu-law in, 16 kHz 16-bit PCM out."""
        ...

    def encode(self, pcm: bytes) -> bytes:
        """16 kHz 16-bit PCM in, 8 kHz mu-law out."""
        ...


class StreamingPhoneCodec:
    """`streams.audio`'s G.711 tables and streaming resamplers: a 20 ms frame in gives exactly a
    20 ms frame out (4 ms of filter delay), with no seams at frame boundaries."""

    def __init__(self) -> None:
        self._up = Resampler(MULAW_RATE, PCM_RATE)
        self._down = Resampler(PCM_RATE, MULAW_RATE)

    def decode(self, mulaw: bytes) -> bytes:
        return self._up.process(mulaw_to_pcm16(mulaw))

    def encode(self, pcm: bytes) -> bytes:
        return pcm16_to_mulaw(self._down.process(pcm))

    def reset_encoder(self) -> None:
        """Forgets agent audio held in the filter (after a clear)."""
        self._down = Resampler(PCM_RATE, MULAW_RATE)


# --------------------------------------------------------------------------- one stream, in order


class MediaStreamReader:
    """Turns one stream's messages, in the order they came, into typed events.

    Inbound-track media carry `pcm` (16 kHz) unless `decode_audio` is False. Anything that breaks
    the protocol (bad JSON, unknown event, missing field, bad payload, a binary frame, a second
    start, events before start or for another streamSid) comes back as `Malformed`: one bad message
    never ends the stream.
    """

    def __init__(self, codec: PhoneAudioCodec | None = None, *, decode_audio: bool = True) -> None:
        self._decoder = codec
        self._decode_audio = decode_audio
        self.stream_sid: str | None = None

    def read(self, message: str | bytes) -> MediaEvent:
        """One WebSocket message: text as Twilio sends it, bytes for a binary frame."""
        if isinstance(message, bytes):
            return Malformed("binary WebSocket frame; Twilio sends JSON text", excerpt(message))
        try:
            event = parse_inbound(message)
        except TwilioProtocolError as exc:
            return Malformed(exc.reason, exc.excerpt)
        if isinstance(event, Connected):
            return event
        if isinstance(event, Start):
            if self.stream_sid is not None:
                return Malformed(f"second start message (stream {event.stream_sid}) on stream {self.stream_sid}",
                                 excerpt(message))
            self.stream_sid = event.stream_sid
            return event
        if self.stream_sid is None:
            return Malformed(f"{type(event).__name__.lower()} message before start", excerpt(message))
        if event.stream_sid != self.stream_sid:
            return Malformed(f"message for stream {event.stream_sid}, this is stream {self.stream_sid}",
                             excerpt(message))
        if isinstance(event, Media) and self._decode_audio and event.track == "inbound":
            if self._decoder is None:
                self._decoder = StreamingPhoneCodec()
            # Built again field by field: dataclasses.replace's generic path cost more than the decoding.
            return Media(event.stream_sid, event.track, event.chunk, event.timestamp_ms, event.payload,
                         event.sequence_number, self._decoder.decode(event.payload))
        return event
