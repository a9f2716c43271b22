"""Twilio's wire formats: Media Streams messages, webhook signatures, TwiML, status callbacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.websockets import WebSocketState
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from gateway.twilio_media_transport import TwilioMediaTransport, iterate_media
from gateway.twilio_webhook_routes import media_stream_url, public_request_url, validate_media_handshake
from streams.call.transport import TransportClosed
from streams.channels.twilio_media_protocol import (
    Connected,
    Dtmf,
    InboundEvent,
    Malformed,
    Mark,
    Media,
    MediaFormat,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    OutboundMessage,
    Start,
    Stop,
    StreamingPhoneCodec,
    TwilioProtocolError,
    clear_message,
    dump_inbound,
    dump_outbound,
    inbound_message,
    mark_message,
    media_message,
    parse_inbound,
    parse_outbound,
)
from streams.channels.twilio_rest import TwilioCall, TwilioRestError
from streams.channels.twilio_webhook_protocol import (
    Replayed,
    ReplayGuard,
    WebhookAnswer,
    compute_twilio_signature,
    connect_stream_twiml,
    dial_twiml,
    hangup_twiml,
    reject_twiml,
    status_callback_payload,
    validate_twilio_request,
)

HEX = "0123456789abcdef"


def sids(prefix: str) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=32, max_size=32).map(lambda h: prefix + h)


counters = st.integers(min_value=0, max_value=10**15)
sequences = st.none() | counters
names = st.text(min_size=1, max_size=30)

connected_events = st.builds(Connected, protocol=names, version=names)
start_events = st.builds(
    Start,
    stream_sid=sids("MZ"),
    account_sid=sids("AC"),
    call_sid=sids("CA"),
    tracks=st.lists(st.sampled_from(["inbound", "outbound"]), min_size=1, max_size=2).map(tuple),
    custom_parameters=st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=5),
    media_format=st.just(MediaFormat()),
    sequence_number=sequences,
)
media_events = st.builds(
    Media,
    stream_sid=sids("MZ"),
    track=st.sampled_from(["inbound", "outbound"]),
    chunk=counters,
    timestamp_ms=counters,
    payload=st.binary(min_size=160, max_size=160),
    sequence_number=sequences,
)
dtmf_events = st.builds(
    Dtmf,
    stream_sid=sids("MZ"),
    digit=st.sampled_from(list("0123456789*#ABCD")),
    track=st.just("inbound_track"),
    sequence_number=sequences,
)
mark_events = st.builds(Mark, stream_sid=sids("MZ"), name=names, sequence_number=sequences)
stop_events = st.builds(
    Stop, stream_sid=sids("MZ"), account_sid=sids("AC"), call_sid=sids("CA"), sequence_number=sequences
)
inbound_events: st.SearchStrategy[InboundEvent] = st.one_of(
    connected_events, start_events, media_events, dtmf_events, mark_events, stop_events
)
outbound_messages: st.SearchStrategy[OutboundMessage] = st.one_of(
    st.builds(OutboundMedia, stream_sid=sids("MZ"), payload=st.binary(min_size=1, max_size=400)),
    st.builds(OutboundMark, stream_sid=sids("MZ"), name=names),
    st.builds(OutboundClear, stream_sid=sids("MZ")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def parses_or_protocol_error(raw: str | bytes) -> None:
    try:
        event = parse_inbound(raw)
    except TwilioProtocolError as exc:
        error = exc
    else:
        assert isinstance(event, Connected | Start | Media | Dtmf | Mark | Stop)
        return
    assert error.reason
    assert str(error) == error.reason


def outbound_parses_or_protocol_error(raw: str | bytes) -> None:
    try:
        message = parse_outbound(raw)
    except TwilioProtocolError as exc:
        error = exc
    else:
        assert isinstance(message, OutboundMedia | OutboundMark | OutboundClear)
        return
    assert error.reason


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside nested dicts and lists."""
    found: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append((*prefix, key))
            found.extend(paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.append((*prefix, index))
            found.extend(paths(child, (*prefix, index)))
    return found


def mutate(message: dict[str, Any], path: tuple[Any, ...], replacement: Any, delete: bool) -> dict[str, Any]:
    copy = json.loads(json.dumps(message))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return copy  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- parser robustness


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text_parses_or_raises_protocol_error(raw: str) -> None:
    parses_or_protocol_error(raw)
    outbound_parses_or_protocol_error(raw)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_protocol_error(raw: bytes) -> None:
    parses_or_protocol_error(raw)
    outbound_parses_or_protocol_error(raw)


@settings(max_examples=300)
@given(json_values)
def test_any_json_parses_or_raises_protocol_error(value: Any) -> None:
    parses_or_protocol_error(json.dumps(value))
    outbound_parses_or_protocol_error(json.dumps(value))


@settings(max_examples=500)
@given(inbound_events, st.data())
def test_mutated_twilio_messages_parse_or_raise_protocol_error(event: InboundEvent, data: st.DataObject) -> None:
    message = inbound_message(event)
    path = data.draw(st.sampled_from(paths(message)))
    delete = data.draw(st.booleans())
    replacement = data.draw(json_values)
    parses_or_protocol_error(json.dumps(mutate(message, path, replacement, delete)))


@settings(max_examples=300)
@given(outbound_messages, st.data())
def test_mutated_outbound_messages_parse_or_raise_protocol_error(message: OutboundMessage, data: st.DataObject) -> None:
    obj = json.loads(dump_outbound(message))
    path = data.draw(st.sampled_from(paths(obj)))
    outbound_parses_or_protocol_error(json.dumps(mutate(obj, path, data.draw(json_values), data.draw(st.booleans()))))


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(TwilioProtocolError, match=r"nested too deeply|bad JSON"):
        parse_inbound("[" * 30_000 + "]" * 30_000)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=300)
@given(inbound_events)
def test_inbound_messages_round_trip(event: InboundEvent) -> None:
    assert parse_inbound(dump_inbound(event)) == event
    assert parse_inbound(dump_inbound(event).encode()) == event


@settings(max_examples=300)
@given(outbound_messages)
def test_outbound_messages_round_trip(message: OutboundMessage) -> None:
    assert parse_outbound(dump_outbound(message)) == message


def test_outbound_messages_are_exactly_twilios_shape() -> None:
    sid = "MZ" + "a" * 32
    assert json.loads(media_message(sid, b"\xff\x7f")) == {
        "event": "media",
        "streamSid": sid,
        "media": {"payload": base64.b64encode(b"\xff\x7f").decode()},
    }
    assert json.loads(mark_message(sid, "m1")) == {"event": "mark", "streamSid": sid, "mark": {"name": "m1"}}
    assert json.loads(clear_message(sid)) == {"event": "clear", "streamSid": sid}
    with pytest.raises(ValueError, match="empty"):
        media_message(sid, b"")
    with pytest.raises(ValueError, match="mark name"):
        mark_message(sid, "")


# --------------------------------------------------------------------------- Twilio's own examples

STREAM = "MZ18ad3ab5a668481ce02b83e7395059f0"
ACCOUNT = "AC123"
CALL = "CA123"

DOC_EXAMPLES: list[tuple[str, InboundEvent]] = [
    ('{"event": "connected", "protocol": "Call", "version": "1.0.0"}', Connected("Call", "1.0.0")),
    (
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": ACCOUNT,
                    "streamSid": STREAM,
                    "callSid": CALL,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
                },
                "streamSid": STREAM,
            }
        ),
        Start(
            STREAM,
            ACCOUNT,
            CALL,
            ("inbound",),
            {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
            MediaFormat(),
            1,
        ),
    ),
    (
        json.dumps(
            {
                "event": "media",
                "sequenceNumber": "3",
                "media": {
                    "track": "outbound",
                    "chunk": "1",
                    "timestamp": "5",
                    "payload": base64.b64encode(bytes(range(160))).decode(),
                },
                "streamSid": STREAM,
            }
        ),
        Media(STREAM, "outbound", 1, 5, bytes(range(160)), 3),
    ),
    (
        json.dumps(
            {
                "event": "dtmf",
                "streamSid": STREAM,
                "sequenceNumber": "5",
                "dtmf": {"track": "inbound_track", "digit": "1"},
            }
        ),
        Dtmf(STREAM, "1", "inbound_track", 5),
    ),
    (
        json.dumps({"event": "mark", "sequenceNumber": "4", "streamSid": STREAM, "mark": {"name": "my label"}}),
        Mark(STREAM, "my label", 4),
    ),
    (
        json.dumps(
            {
                "event": "stop",
                "sequenceNumber": "5",
                "stop": {"accountSid": ACCOUNT, "callSid": CALL},
                "streamSid": STREAM,
            }
        ),
        Stop(STREAM, ACCOUNT, CALL, 5),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), DOC_EXAMPLES)
def test_twilio_documented_messages_parse(raw: str, expected: InboundEvent) -> None:
    assert parse_inbound(raw) == expected


def _media(**media: Any) -> str:
    body = {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": base64.b64encode(b"\xff" * 160).decode()}
    body.update(media)
    return json.dumps({"event": "media", "sequenceNumber": "2", "media": body, "streamSid": STREAM})


def _start(**fmt: Any) -> str:
    media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1, **fmt}
    start = {"accountSid": ACCOUNT, "streamSid": STREAM, "callSid": CALL, "tracks": ["inbound"]}
    return json.dumps({"event": "start", "start": {**start, "mediaFormat": media_format}, "streamSid": STREAM})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{", "bad JSON"),
        ("", "bad JSON"),
        ('{"event": NaN}', "bad JSON: NaN is not valid JSON"),
        ('"media"', "must be a JSON object, got str"),
        ("{}", "missing field 'event'"),
        ('{"event": 7}', "field 'event' must be a string, got int"),
        ('{"event": "ping"}', "unknown event 'ping'"),
        ('{"event": "media", "streamSid": "MZ1"}', "missing field 'media'"),
        (_media(payload="%%%"), "field 'media.payload' is not valid base64"),
        (_media(payload="/w=="), "field 'media.payload' is 1 bytes, expected 160 (20 ms of 8 kHz mu-law)"),
        (_media(payload=base64.b64encode(b"\xff" * 320).decode()), "is 320 bytes, expected 160"),
        (_media(payload=""), "field 'media.payload' is empty"),
        (_media(payload=None), "field 'media.payload' must be a string, got NoneType"),
        (_media(chunk="-1"), "field 'media.chunk' must be a non-negative integer string, got '-1'"),
        (_media(chunk=True), "field 'media.chunk' must be a non-negative integer string, got bool"),
        (_media(timestamp="1.5"), "field 'media.timestamp' must be a non-negative integer string"),
        (_media(track="both"), "field 'media.track' must be inbound or outbound"),
        (_start(encoding="audio/x-l16"), "unsupported media format audio/x-l16 8000 Hz x1"),
        (_start(sampleRate=16000), "unsupported media format audio/x-mulaw 16000 Hz"),
        (_start(channels=2), "x2"),
        (
            json.dumps({"event": "start", "start": {"streamSid": STREAM}, "streamSid": "MZother"}),
            "field 'streamSid' differs from 'start.streamSid'",
        ),
        (
            json.dumps({"event": "stop", "streamSid": STREAM, "stop": {"accountSid": ACCOUNT}}),
            "missing field 'stop.callSid'",
        ),
        ('{"event": "mark", "streamSid": "MZ1", "mark": "x"}', "field 'mark' must be an object, got str"),
        ('{"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "12"}}', "field 'dtmf.digit' must be one of"),
    ],
)
def test_malformed_messages_say_what_is_wrong(raw: str, reason: str) -> None:
    with pytest.raises(TwilioProtocolError) as error:
        parse_inbound(raw)
    assert reason in error.value.reason
    assert error.value.excerpt == raw[:120] + ("..." if len(raw) > 120 else "")


def test_non_utf8_bytes_are_a_protocol_error() -> None:
    with pytest.raises(TwilioProtocolError, match="not UTF-8"):
        parse_inbound(b'{"event": "\xff"}')


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": ""}}', "field 'media.payload' is empty"),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "AAA"}}', "not valid base64"),
        ('{"event": "mark", "streamSid": "MZ1", "mark": {"name": ""}}', "field 'mark.name' is empty"),
        ('{"event": "clear"}', "missing field 'streamSid'"),
        ('{"event": "start", "streamSid": "MZ1"}', "unknown event 'start' (Twilio accepts media, mark, clear)"),
    ],
)
def test_outbound_parser_is_as_strict_as_twilio(raw: str, reason: str) -> None:
    with pytest.raises(TwilioProtocolError) as error:
        parse_outbound(raw)
    assert reason in error.value.reason


# --------------------------------------------------------------------------- signatures


def reference_signature(token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's documented algorithm, independently: URL + each sorted name and value, HMAC-SHA1."""
    data = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


urls = st.sampled_from(
    ["https://voice.example.com/twilio/voice", "http://127.0.0.1:8000/twilio/status?x=1", "https://a.example/p"]
)
form_params = st.dictionaries(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12),
    st.text(max_size=20),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200)
@given(urls, form_params, st.text(min_size=1, max_size=40))
def test_signatures_validate_with_the_sdk(url: str, params: dict[str, str], token: str) -> None:
    signature = RequestValidator(token).compute_signature(url, params)
    assert signature == reference_signature(token, url, params)
    assert compute_twilio_signature(token, url, params) == signature
    assert validate_twilio_request(token, url, params, signature)
    assert validate_twilio_request(token, url, list(params.items()), signature)
    assert not validate_twilio_request(token + "x", url, params, signature)
    assert not validate_twilio_request(token, url + "x", params, signature)
    name = sorted(params)[0]
    assert not validate_twilio_request(token, url, {**params, name: params[name] + "!"}, signature)
    assert not validate_twilio_request(token, url, {**params, "Extra": "1"}, signature)
    assert not validate_twilio_request(token, url, params, None)
    assert not validate_twilio_request(token, url, params, "")
    assert not validate_twilio_request("", url, params, signature)


def test_signature_tolerates_the_default_port_like_twilio() -> None:
    params = {"CallSid": "CA1", "From": "+15550001111"}
    signed = compute_twilio_signature("tok", "https://voice.example.com:443/twilio/voice", params)
    assert validate_twilio_request("tok", "https://voice.example.com/twilio/voice", params, signed)


def test_repeated_parameters_are_signed_each() -> None:
    pairs = [("StatusCallbackEvent", "ringing"), ("StatusCallbackEvent", "answered"), ("To", "+1555")]
    url = "https://voice.example.com/x"
    expected = base64.b64encode(
        hmac.new(
            b"tok", (url + "StatusCallbackEventansweredStatusCallbackEventringingTo+1555").encode(), "sha1"
        ).digest()
    ).decode()
    assert compute_twilio_signature("tok", url, pairs) == expected
    assert validate_twilio_request("tok", url, pairs, expected)
    assert not validate_twilio_request("tok", url, pairs[1:], expected)


# --------------------------------------------------------------------------- URLs


def connection(
    path: str = "/twilio/voice",
    *,
    kind: str = "http",
    host: str = "127.0.0.1:8000",
    scheme: str = "http",
    headers: Mapping[str, str] | None = None,
    query: bytes = b"",
    root_path: str = "",
) -> HTTPConnection:
    raw_headers = [(b"host", host.encode())] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": kind,
        "path": root_path + path,
        "root_path": root_path,
        "raw_path": (root_path + path).encode(),
        "query_string": query,
        "headers": raw_headers,
        "scheme": scheme,
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    return HTTPConnection(scope)


def test_public_url_wins_and_keeps_its_prefix() -> None:
    conn = connection(query=b"a=1")
    assert public_request_url(conn, "https://voice.example.com") == "https://voice.example.com/twilio/voice?a=1"
    assert public_request_url(conn, "https://voice.example.com/vx/") == "https://voice.example.com/vx/twilio/voice?a=1"
    assert media_stream_url(conn, "https://voice.example.com/vx") == "wss://voice.example.com/vx/twilio/media"
    assert media_stream_url(conn, "http://localhost:8000") == "ws://localhost:8000/twilio/media"


def test_request_url_without_public_url_honours_forwarded_headers() -> None:
    assert public_request_url(connection(), None) == "http://127.0.0.1:8000/twilio/voice"
    forwarded = connection(headers={"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "edge.example.net"})
    assert public_request_url(forwarded, None) == "https://edge.example.net/twilio/voice"
    assert media_stream_url(forwarded, None) == "wss://edge.example.net/twilio/media"
    mounted = connection(root_path="/vx")
    assert public_request_url(mounted, None) == "http://127.0.0.1:8000/vx/twilio/voice"
    assert media_stream_url(mounted, None) == "ws://127.0.0.1:8000/vx/twilio/media"


def test_websocket_handshake_url_is_ws_scheme() -> None:
    ws = connection("/twilio/media", kind="websocket", scheme="ws")
    assert public_request_url(ws, "https://voice.example.com") == "wss://voice.example.com/twilio/media"
    assert public_request_url(ws, None) == "ws://127.0.0.1:8000/twilio/media"
    proxied = connection("/twilio/media", kind="websocket", scheme="ws", headers={"X-Forwarded-Proto": "https"})
    assert public_request_url(proxied, None) == "wss://127.0.0.1:8000/twilio/media"


def test_bad_public_url_is_refused() -> None:
    with pytest.raises(ValueError, match="public URL"):
        public_request_url(connection(), "voice.example.com")


# --------------------------------------------------------------------------- TwiML


def test_connect_stream_twiml() -> None:
    twiml = connect_stream_twiml("wss://voice.example.com/twilio/media", {"call_id": "c-1", "note": 'a&b<"c>'})
    assert twiml.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(twiml)
    assert root.tag == "Response"
    (connect,) = list(root)
    assert connect.tag == "Connect"
    (stream,) = list(connect)
    assert stream.tag == "Stream"
    assert stream.attrib == {"url": "wss://voice.example.com/twilio/media"}
    assert [(p.get("name"), p.get("value")) for p in stream] == [("call_id", "c-1"), ("note", 'a&b<"c>')]
    with pytest.raises(ValueError, match="query string"):
        connect_stream_twiml("wss://voice.example.com/twilio/media?call=1", {})
    with pytest.raises(ValueError, match="ws"):
        connect_stream_twiml("https://voice.example.com/twilio/media", {})


def test_dial_and_hangup_twiml() -> None:
    number = ET.fromstring(dial_twiml("+15557654321"))
    assert number.find("./Dial/Number") is not None
    assert number.findtext("./Dial/Number") == "+15557654321"
    sip = ET.fromstring(dial_twiml("sip:desk@pbx.example.com", caller_id="+15550001111", timeout_s=20))
    assert sip.findtext("./Dial/Sip") == "sip:desk@pbx.example.com"
    dial = sip.find("./Dial")
    assert dial is not None
    assert dial.attrib == {"callerId": "+15550001111", "timeout": "20"}
    for bad in ("", "5557654321", "+0123", "sip:nohost", "tel:+15557654321", "+1555<x>"):
        with pytest.raises(ValueError, match="transfer target"):
            dial_twiml(bad)
    hangup = ET.fromstring(hangup_twiml())
    assert [child.tag for child in hangup] == ["Hangup"]
    reject = ET.fromstring(reject_twiml("busy"))
    assert reject.find("./Reject") is not None
    assert reject.find("./Reject").attrib == {"reason": "busy"}  # type: ignore[union-attr]


# --------------------------------------------------------------------------- status callbacks


def test_status_callback_payload() -> None:
    params = {
        "CallSid": "CA1",
        "CallStatus": "completed",
        "CallDuration": "42",
        "SipResponseCode": "200",
        "Duration": "1",
        "From": "+15550001111",
    }
    status = status_callback_payload(params)
    assert status.status == "completed"
    assert status.provider == "twilio"
    assert status.duration_s == 42
    assert status.sip_response_code == 200
    assert status.raw == params
    ringing = status_callback_payload({"CallSid": "CA1", "CallStatus": "ringing", "SipResponseCode": ""})
    assert (ringing.duration_s, ringing.sip_response_code) == (None, None)
    odd = status_callback_payload({"CallStatus": "busy", "CallDuration": "soon"})
    assert odd.duration_s is None
    with pytest.raises(ValueError, match="CallStatus"):
        status_callback_payload({"CallSid": "CA1"})


# --------------------------------------------------------------------------- audio


def test_codec_keeps_twenty_millisecond_frames() -> None:
    codec = StreamingPhoneCodec()
    for _ in range(5):
        assert len(codec.decode(b"\xff" * 160)) == 640
        assert len(codec.encode(b"\x00" * 640)) == 160


# --------------------------------------------------------------------------- reader and transport on a stand-in socket


class StandInSocket:
    """Just enough of Starlette's WebSocket for the reader and the transport."""

    def __init__(self, incoming: list[dict[str, Any]] | None = None, *, fail_send: bool = False) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[str] = []
        self.closed_with: int | None = None
        self.fail_send = fail_send
        self.application_state = WebSocketState.CONNECTED

    async def receive(self) -> dict[str, Any]:
        if not self.incoming:
            raise RuntimeError('Cannot call "receive" once a disconnect message has been received.')
        return self.incoming.pop(0)

    async def send_text(self, text: str) -> None:
        if self.fail_send:
            raise OSError("connection reset")
        self.sent.append(text)

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code
        self.application_state = WebSocketState.DISCONNECTED


def text(event: InboundEvent) -> dict[str, Any]:
    return {"type": "websocket.receive", "text": dump_inbound(event)}


async def test_reader_checks_stream_order_and_ends_at_disconnect() -> None:
    start = Start(STREAM, ACCOUNT, CALL, sequence_number=1)
    media = Media(STREAM, "inbound", 1, 0, b"\xff" * 160, 2)
    socket = StandInSocket(
        [
            text(Media(STREAM, "inbound", 1, 0, b"\xff" * 160, 1)),
            text(start),
            text(start),
            text(media),
            {"type": "websocket.receive", "bytes": b"\x00"},
            text(Mark("MZother", "m", 3)),
            {"type": "websocket.disconnect", "code": 1006},
            text(media),  # never read: the socket is gone
        ]
    )
    events = [event async for event in iterate_media(socket)]  # type: ignore[arg-type]
    assert isinstance(events[0], Malformed)
    assert events[0].reason == "media message before start"
    assert events[1] == start
    assert isinstance(events[2], Malformed)
    assert "second start" in events[2].reason
    assert isinstance(events[3], Media)
    assert len(events[3].pcm) == 640
    assert isinstance(events[4], Malformed)
    assert "binary" in events[4].reason
    assert isinstance(events[5], Malformed)
    assert "MZother" in events[5].reason
    assert len(events) == 6


async def test_reader_ends_when_receive_fails() -> None:
    events = [event async for event in iterate_media(StandInSocket([]))]  # type: ignore[arg-type]
    assert events == []


class StandInRest:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, str, str | None]] = []

    async def update_call_twiml(self, call_sid: str, twiml: str) -> TwilioCall:
        self.calls.append(("twiml", call_sid, twiml))
        if self.error:
            raise self.error
        return TwilioCall(call_sid, "in-progress", "inbound", None, None)

    async def complete_call(self, call_sid: str) -> TwilioCall:
        self.calls.append(("complete", call_sid, None))
        if self.error:
            raise self.error
        return TwilioCall(call_sid, "completed", "inbound", None, None)


async def test_transport_messages_and_rest_outcomes() -> None:
    socket = StandInSocket()
    rest = StandInRest()
    transport = TwilioMediaTransport(socket, STREAM, CALL, rest=rest)  # type: ignore[arg-type]
    assert transport.channel == "phone"
    await transport.play(b"\x00" * 640)
    await transport.mark("m1")
    await transport.clear()
    sent = [parse_outbound(raw) for raw in socket.sent]
    assert isinstance(sent[0], OutboundMedia)
    assert len(sent[0].payload) == 160
    assert sent[1:] == [OutboundMark(STREAM, "m1"), OutboundClear(STREAM)]
    with pytest.raises(ValueError, match="even length"):
        await transport.play(b"\x00" * 3)

    assert await transport.transfer("+15557654321") == ("connected", None)
    assert rest.calls[-1] == ("twiml", CALL, dial_twiml("+15557654321"))
    outcome, detail = await transport.transfer("nobody")
    assert outcome == "failed"
    assert detail is not None
    assert "transfer target" in detail

    await transport.hangup()
    last_call: tuple[str, str, str | None] = rest.calls[-1]
    assert last_call == ("complete", CALL, None)
    assert socket.closed_with == 1000
    with pytest.raises(TransportClosed):
        await transport.play(b"\x00" * 640)


async def test_transport_failures() -> None:
    rest = StandInRest(TwilioRestError("update call twiml", "Not found", status=404, code=20404))
    socket = StandInSocket()
    transport = TwilioMediaTransport(socket, STREAM, CALL, rest=rest)  # type: ignore[arg-type]
    outcome, detail = await transport.transfer("+15557654321")
    assert outcome == "failed"
    assert detail == "twilio update call twiml: HTTP 404, error 20404: Not found"
    await transport.hangup()  # REST failed; the stream is closed anyway
    assert socket.closed_with == 1000

    no_rest = TwilioMediaTransport(StandInSocket(), STREAM, CALL)  # type: ignore[arg-type]
    assert (await no_rest.transfer("+15557654321"))[0] == "failed"

    broken = TwilioMediaTransport(StandInSocket(fail_send=True), STREAM, CALL)  # type: ignore[arg-type]
    with pytest.raises(TransportClosed):
        await broken.mark("m")
    assert broken.closed


def test_media_handshake_signature() -> None:
    url = "wss://voice.example.com/twilio/media"
    for signed_url in (url, "https://voice.example.com/twilio/media"):
        signature = compute_twilio_signature("tok", signed_url, {})
        ws = connection("/twilio/media", kind="websocket", scheme="ws", headers={"X-Twilio-Signature": signature})
        assert validate_media_handshake("tok", ws, "https://voice.example.com")
        assert not validate_media_handshake("other", ws, "https://voice.example.com")
        assert not validate_media_handshake("tok", ws, "https://elsewhere.example.com")
    unsigned = connection("/twilio/media", kind="websocket", scheme="ws")
    assert not validate_media_handshake("tok", unsigned, "https://voice.example.com")


# --------------------------------------------------------------------------- replays


class Clock:
    """Time that moves only when the test moves it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY = "/twilio/voice c2lnbmF0dXJlLW9mLXRoZS1maXJzdA=="


async def test_a_retry_gets_the_first_answer_and_a_copy_is_refused() -> None:
    clock = Clock()
    guard = ReplayGuard(window_s=3600, retry_window_s=60, clock=clock)
    answer, first = guard.admit(KEY, "token-1")
    assert first
    guard.settle(KEY, answer, Response(b"<Response/>", media_type="application/xml"))
    retried, first = guard.admit(KEY, "token-1")  # Twilio's retry: the same request, the same token
    assert not first
    assert retried is answer
    assert await retried == WebhookAnswer(200, b"<Response/>", "application/xml")
    for token in ("token-2", None, ""):  # a copy: another token, or none
        with pytest.raises(Replayed, match="replayed request"):
            guard.admit(KEY, token)
    clock.now += 61  # later than any retry of Twilio's: even its token makes it a copy
    with pytest.raises(Replayed):
        guard.admit(KEY, "token-1")
    clock.now += 3600  # past the window: forgotten
    assert guard.admit(KEY, "token-1")[1]
    assert len(guard) == 1


async def test_without_a_token_a_repeat_is_never_a_retry() -> None:
    guard = ReplayGuard()
    guard.admit(KEY, None)
    with pytest.raises(Replayed):
        guard.admit(KEY, None)


async def test_a_failed_first_try_is_forgotten_so_the_retry_is_handled_afresh() -> None:
    guard = ReplayGuard()
    answer, _ = guard.admit(KEY, "token-1")
    waiting, first = guard.admit(KEY, "token-1")  # came while the first was still being handled
    assert not first
    guard.settle(KEY, answer, None)
    assert await waiting is None
    assert guard.admit(KEY, "token-1")[1]


async def test_the_replay_store_stays_within_its_bound() -> None:
    clock = Clock()
    guard = ReplayGuard(max_entries=8, window_s=3600, retry_window_s=60, clock=clock)
    for n in range(1_000):
        assert guard.admit(f"/twilio/status sig-{n}", f"token-{n}")[1]
        clock.now += 0.01
        assert len(guard) <= 8
        assert len(guard._recent) <= 8
    with pytest.raises(Replayed):
        guard.admit("/twilio/status sig-999", None)  # the newest are remembered ...
    assert guard.admit("/twilio/status sig-0", None)[1]  # ... the oldest made room for them
    clock.now += 3601
    guard.admit("/twilio/status later", "token")
    assert (len(guard), len(guard._recent)) == (1, 1), "expired entries go at the next request"


def test_a_signed_timestamp_older_than_the_window_is_a_replay() -> None:
    now = datetime(2025, 12, 4, 12, 0, tzinfo=UTC).timestamp()
    guard = ReplayGuard(window_s=3600, wall_clock=lambda: now)

    def sent(seconds_ago: float) -> dict[str, str]:
        return {"Timestamp": format_datetime(datetime.fromtimestamp(now - seconds_ago, UTC))}

    guard.check_timestamp(sent(10))
    guard.check_timestamp(sent(-30))  # Twilio's clock a little ahead
    guard.check_timestamp({})  # voice webhooks have none
    guard.check_timestamp({"Timestamp": "not a date"})
    with pytest.raises(Replayed, match="signed Timestamp"):
        guard.check_timestamp(sent(3601))
