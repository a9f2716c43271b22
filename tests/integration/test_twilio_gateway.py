"""The Twilio side of the gateway, end to end over real sockets.

A FastAPI app with `gateway.twilio_webhook_routes.twilio_router` and a minimal media endpoint built on
`gateway.twilio_media_transport` runs under uvicorn on a free port; `voxlog.sim.twilio_caller.TwilioCaller` plays
Twilio (signed webhooks, the media WebSocket); `voxlog.sim.fake_twilio.FakeTwilio` plays Twilio's REST
API for the real twilio SDK behind `TwilioMediaTransport.transfer` / `hangup`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import socket
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import numpy as np
import pytest
from fastapi import FastAPI, WebSocket

from gateway.twilio_media_transport import TwilioMediaTransport, iterate_media, wait_for_start
from gateway.twilio_webhook_routes import CallRejected, RejectedWebhook, twilio_router, validate_media_handshake
from schemas.events import CallStatus
from streams.audio.codecs import Resampler, mulaw_to_pcm16, pcm16_to_mulaw, resample_pcm16
from streams.call.transport import TransportClosed
from streams.channels.twilio_media_protocol import (
    Dtmf,
    Malformed,
    Mark,
    Media,
    MediaEvent,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    Start,
    Stop,
)
from streams.channels.twilio_rest import TwilioRest, TwilioRestError
from streams.channels.twilio_webhook_protocol import IDEMPOTENCY_HEADER, dial_twiml
from voxlog.sim.fake_twilio import FakeTwilio, new_account_sid
from voxlog.sim.stack import serve_app
from voxlog.sim.twilio_caller import TwilioCaller, parse_stream_twiml

AUTH_TOKEN = "f3c1d2e4b5a697887766554433221100"
ACCOUNT_SID = new_account_sid()
REJECTED_NUMBER = "+15559990000"

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- the app under test


@dataclass
class Gateway:
    """The app's observable side: what its hooks and its media endpoint saw."""

    base_url: str = ""
    public_url: str | None = None
    replica_url: str | None = None
    inbound: list[dict[str, str]] = field(default_factory=list)
    statuses: list[tuple[str, CallStatus]] = field(default_factory=list)
    rejected: list[RejectedWebhook] = field(default_factory=list)
    handshakes_refused: int = 0
    events: asyncio.Queue[MediaEvent] = field(default_factory=asyncio.Queue)
    streams: asyncio.Queue[tuple[Start, TwilioMediaTransport]] = field(default_factory=asyncio.Queue)
    handler_done: asyncio.Event = field(default_factory=asyncio.Event)
    handler_errors: list[BaseException] = field(default_factory=list)

    async def next_event(self, timeout_s: float = 5.0) -> MediaEvent:
        return await asyncio.wait_for(self.events.get(), timeout_s)

    async def events_until(self, predicate: type[MediaEvent], timeout_s: float = 5.0) -> list[MediaEvent]:
        seen: list[MediaEvent] = []
        while True:
            event = await self.next_event(timeout_s)
            seen.append(event)
            if isinstance(event, predicate):
                return seen

    async def stream(self, timeout_s: float = 5.0) -> tuple[Start, TwilioMediaTransport]:
        return await asyncio.wait_for(self.streams.get(), timeout_s)


def build_app(gateway: Gateway, rest: TwilioRest | None) -> FastAPI:
    async def on_inbound(form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, Mapping[str, str]]:
        gateway.inbound.append(dict(form))
        if form.get("To") == REJECTED_NUMBER:
            raise CallRejected("no agent answers this number")
        return f"call-{form['CallSid'][-8:]}", {"tenant": "acme", "agent": "front-desk", "from": form["From"]}

    async def on_status(call_sid: str, status: CallStatus, query: Mapping[str, str]) -> None:
        gateway.statuses.append((call_sid, status))

    async def on_rejected(info: RejectedWebhook) -> None:
        gateway.rejected.append(info)

    app = FastAPI()
    app.include_router(
        twilio_router(lambda: AUTH_TOKEN, gateway.public_url, on_inbound, on_status, on_rejected=on_rejected,
                      replica_url=gateway.replica_url)
    )

    @app.websocket("/twilio/media")
    async def media(websocket: WebSocket) -> None:
        if not validate_media_handshake(AUTH_TOKEN, websocket, gateway.public_url, gateway.replica_url):
            gateway.handshakes_refused += 1
            await websocket.close(code=1008)
            return
        await websocket.accept()
        try:
            events = iterate_media(websocket)
            start = await wait_for_start(events)
            if start is None:
                return
            await gateway.events.put(start)
            await gateway.streams.put((start, TwilioMediaTransport.from_start(websocket, start, rest=rest)))
            async for event in events:
                await gateway.events.put(event)
        except BaseException as exc:  # the test fails on any: the reader must end quietly
            gateway.handler_errors.append(exc)
            raise
        finally:
            gateway.handler_done.set()

    return app


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


@pytest.fixture
async def gateway(fake_twilio: FakeTwilio) -> AsyncIterator[Gateway]:
    gw = Gateway()
    rest = TwilioRest(ACCOUNT_SID, AUTH_TOKEN, base_url=fake_twilio.base_url)
    async with serve_app(build_app(gw, rest)) as base_url:
        gw.base_url = base_url
        yield gw


def make_caller(gw: Gateway, **kwargs: object) -> TwilioCaller:
    return TwilioCaller(gw.base_url, AUTH_TOKEN, account_sid=ACCOUNT_SID, **kwargs)  # type: ignore[arg-type]


async def connected_call(gw: Gateway, **kwargs: object) -> tuple[TwilioCaller, Start, TwilioMediaTransport]:
    caller = make_caller(gw, **kwargs)
    instructions = await caller.dial()
    await caller.connect(instructions)
    start, transport = await gw.stream()
    assert isinstance(await gw.next_event(), Start)
    return caller, start, transport


# --------------------------------------------------------------------------- audio helpers


def tone(freq_hz: float, seconds: float, rate: int, amplitude: int = 8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * math.pi * freq_hz * t)).astype("<i2").tobytes()


def dominant_hz(pcm: bytes, rate: int) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[int(np.argmax(spectrum))])


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2)))


# --------------------------------------------------------------------------- webhooks


async def test_signed_voice_webhook_answers_connect_stream_twiml(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    response = await caller.ring()
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    instructions = parse_stream_twiml(response.text)
    port = gateway.base_url.rsplit(":", 1)[1]
    assert instructions.url == f"ws://127.0.0.1:{port}/twilio/media"
    assert instructions.parameters == {
        "tenant": "acme",
        "agent": "front-desk",
        "from": caller.from_,
        "call_id": f"call-{caller.call_sid[-8:]}",
    }
    (form,) = gateway.inbound
    assert form["CallSid"] == caller.call_sid
    assert form["From"] == caller.from_
    assert form["To"] == caller.to
    assert form["Direction"] == "inbound"
    assert gateway.rejected == []


async def test_public_url_decides_signed_url_and_stream_url(fake_twilio: FakeTwilio) -> None:
    gw = Gateway(public_url="https://voice.example.com")
    async with serve_app(build_app(gw, None)) as base_url:
        gw.base_url = base_url
        caller = make_caller(gw, public_url="https://voice.example.com")
        instructions = await caller.dial()
        assert instructions.url == "wss://voice.example.com/twilio/media"
        # Signed for the public URL: the local URL the request really reached is not what Twilio signs.
        local = make_caller(gw)
        assert (await local.ring()).status_code == 403
        assert gw.rejected[-1].url == "https://voice.example.com/twilio/voice"
        # The handshake is signed over the public wss:// URL too.
        await caller.connect(instructions)
        start, _transport = await gw.stream()
        assert start.custom_parameters["call_id"] == f"call-{caller.call_sid[-8:]}"
        await caller.stop()
        await asyncio.wait_for(gw.handler_done.wait(), 5)
        assert gw.handshakes_refused == 0


async def test_a_replica_names_its_own_stream_url_and_takes_what_is_signed_over_either(
        fake_twilio: FakeTwilio) -> None:
    """Behind a load balancer (the public URL), a replica's `<Stream>` names its own address, where Twilio
    connects and which it signs; webhooks signed over the public URL or the replica's are taken, and over
    any other address refused (named by the public URL)."""
    gw = Gateway(public_url="https://voice.example.com", replica_url="https://gw-2.voice.example.com")
    async with serve_app(build_app(gw, None)) as base_url:
        gw.base_url = base_url
        caller = make_caller(gw, public_url="https://voice.example.com")
        instructions = await caller.dial()
        assert instructions.url == "wss://gw-2.voice.example.com/twilio/media"
        assert (await make_caller(gw, public_url="https://gw-2.voice.example.com").ring()).status_code == 200
        assert (await make_caller(gw, public_url="https://gw-3.voice.example.com").ring()).status_code == 403
        assert gw.rejected[-1].url == "https://voice.example.com/twilio/voice"
        await caller.connect(instructions)  # signed over the replica's wss:// URL
        start, _transport = await gw.stream()
        assert start.custom_parameters["call_id"] == f"call-{caller.call_sid[-8:]}"
        await caller.stop()
        await asyncio.wait_for(gw.handler_done.wait(), 5)
        assert gw.handshakes_refused == 0
        # A handshake signed over an address that is neither is refused.
        elsewhere = make_caller(gw, public_url="https://voice.example.com")
        with pytest.raises(Exception, match="403"):
            await elsewhere.connect(replace(instructions, url="wss://gw-3.voice.example.com/twilio/media"))
        assert gw.handshakes_refused == 1


async def test_forwarded_headers_without_public_url(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    signed_for = "https://edge.example.net/twilio/voice"
    response = await caller.ring(
        signed_url=signed_for,
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "edge.example.net"},
    )
    assert response.status_code == 200, response.text
    assert parse_stream_twiml(response.text).url == "wss://edge.example.net/twilio/media"


async def test_bad_or_missing_signature_is_403_and_reported(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    wrong_token = await caller.ring(signature="bm90IHRoZSByaWdodCBzaWduYXR1cmU=")
    missing = await caller.ring(sign=False)

    def tamper(form: dict[str, str]) -> None:
        form["From"] = "+15550009999"

    tampered = await caller.ring(tamper=tamper)
    for response in (wrong_token, missing, tampered):
        assert response.status_code == 403
        assert response.text == "invalid Twilio signature"
    assert [r.reason for r in gateway.rejected] == ["bad signature", "missing signature", "bad signature"]
    info = gateway.rejected[0]
    assert info.path == "/twilio/voice"
    assert info.call_sid == caller.call_sid
    assert info.account_sid == ACCOUNT_SID
    assert info.remote == "127.0.0.1"
    assert info.url == f"{gateway.base_url}/twilio/voice"
    assert gateway.inbound == []  # never reached the hook


async def test_rejected_call_gets_reject_twiml(gateway: Gateway) -> None:
    caller = make_caller(gateway, to=REJECTED_NUMBER)
    response = await caller.ring()
    assert response.status_code == 200
    assert "<Reject" in response.text
    assert "<Stream" not in response.text


async def test_status_callback_is_verified_and_mapped(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    response = await caller.send_status("completed", duration_s=42, sip_response_code=200)
    assert response.status_code == 204
    (call_sid, status), *_ = gateway.statuses
    assert call_sid == caller.call_sid
    assert status.status == "completed"
    assert status.provider == "twilio"
    assert status.duration_s == 42
    assert status.sip_response_code == 200
    assert status.raw["CallSid"] == caller.call_sid
    assert status.raw["CallbackSource"] == "call-progress-events"
    assert all(isinstance(v, str) for v in status.raw.values())

    bad = await caller.send_status("busy", signature="AAAA")
    assert bad.status_code == 403
    assert gateway.rejected[-1].path == "/twilio/status"
    assert len(gateway.statuses) == 1


async def test_webhook_refuses_non_form_bodies(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    response = await caller.ring(headers={"Content-Type": "application/json"})
    assert response.status_code == 415


async def test_a_replayed_voice_webhook_makes_no_second_call_and_is_audited(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    token = {IDEMPOTENCY_HEADER: "idempotency-voice-1"}
    first = await caller.ring(headers=token)
    retried = await caller.ring(headers=token)  # Twilio's retry: the same request, its token included
    assert (first.status_code, retried.status_code) == (200, 200)
    assert retried.text == first.text, "a retry gets the same TwiML, naming the same call"
    # Copies of the signed request: with a token of their own (the caller's default), and with none.
    replays = [await caller.ring(), await caller.ring(), await caller.ring(headers={IDEMPOTENCY_HEADER: ""})]
    assert [r.status_code for r in replays] == [403, 403, 403]
    assert {r.text for r in replays} == {"replayed Twilio request"}
    assert len(gateway.inbound) == 1, "one call, however often the request came"
    assert [(r.path, r.call_sid, r.account_sid) for r in gateway.rejected] == [
        ("/twilio/voice", caller.call_sid, ACCOUNT_SID)] * 3
    assert all(r.reason.startswith("replayed request") for r in gateway.rejected)
    await caller.connect(parse_stream_twiml(retried.text))  # and the call still connects, once
    start, _transport = await gateway.stream()
    assert start.custom_parameters["call_id"] == f"call-{caller.call_sid[-8:]}"
    await caller.stop()
    await asyncio.wait_for(gateway.handler_done.wait(), 5)


async def test_a_replayed_status_callback_records_one_event(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    sent_at = datetime.now(UTC).replace(microsecond=0)
    params = {**caller.voice_params(CallStatus="completed"), "CallbackSource": "call-progress-events",
              "SequenceNumber": "3", "Timestamp": format_datetime(sent_at), "CallDuration": "42"}
    token = {IDEMPOTENCY_HEADER: "idempotency-status-1"}
    delivered = [await caller.post_webhook(caller.status_path, params, headers=token) for _ in range(2)]
    replays = [await caller.post_webhook(caller.status_path, params) for _ in range(3)]
    assert [r.status_code for r in delivered] == [204, 204], "sent, and retried by Twilio"
    assert [r.status_code for r in replays] == [403, 403, 403]
    assert [(sid, status.status) for sid, status in gateway.statuses] == [(caller.call_sid, "completed")]
    # A callback signed long ago is refused even when nothing remembers it: its Timestamp is signed too.
    stale = {**params, "SequenceNumber": "2", "Timestamp": format_datetime(sent_at - timedelta(hours=2))}
    assert (await caller.post_webhook(caller.status_path, stale)).status_code == 403
    assert len(gateway.statuses) == 1
    assert [r.path for r in gateway.rejected] == ["/twilio/status"] * 4
    assert "signed Timestamp" in gateway.rejected[-1].reason


async def test_a_burst_of_distinct_webhooks_is_answered_as_usual(gateway: Gateway) -> None:
    callers = [make_caller(gateway) for _ in range(25)]
    rung = await asyncio.gather(*(caller.ring() for caller in callers))
    assert [r.status_code for r in rung] == [200] * len(callers)
    assert len({parse_stream_twiml(r.text).parameters["call_id"] for r in rung}) == len(callers)
    progress = ("ringing", "in-progress", "completed")
    statuses = await asyncio.gather(*(caller.send_status(status, sequence=n)
                                      for caller in callers for n, status in enumerate(progress)))
    assert {r.status_code for r in statuses} == {204}
    assert len(gateway.inbound) == len(callers)
    assert len(gateway.statuses) == len(callers) * len(progress)
    assert gateway.rejected == []


# --------------------------------------------------------------------------- media stream in


async def test_media_stream_events_are_parsed(gateway: Gateway) -> None:
    caller, start, _transport = await connected_call(gateway)
    assert start.call_sid == caller.call_sid
    assert start.account_sid == ACCOUNT_SID
    assert start.stream_sid == caller.stream_sid
    assert start.tracks == ("inbound",)
    assert start.custom_parameters["call_id"] == f"call-{caller.call_sid[-8:]}"
    assert start.custom_parameters["tenant"] == "acme"
    assert start.sequence_number == 1

    speech = tone(440, 0.2, 16000)
    sent_mulaw = pcm16_to_mulaw(resample_pcm16(speech, 16000, 8000))
    assert await caller.send_pcm16(speech, realtime=True, speed=4.0) == 10
    await caller.send_dtmf("5")
    await caller.send_dtmf("#")
    await caller.stop()

    events = await gateway.events_until(Stop)
    media = [e for e in events if isinstance(e, Media)]
    assert [m.chunk for m in media] == list(range(1, 11))
    assert [m.timestamp_ms for m in media] == [20 * i for i in range(10)]
    assert b"".join(m.payload for m in media) == sent_mulaw
    assert all(len(m.pcm) == 640 for m in media)
    assert all(m.track == "inbound" for m in media)
    heard = b"".join(m.pcm for m in media)
    assert abs(dominant_hz(heard, 16000) - 440) < 10
    assert rms(heard) > 0.5 * rms(speech)
    sequence = [e.sequence_number for e in events if isinstance(e, Media | Dtmf | Stop)]
    assert sequence == list(range(2, 2 + len(sequence)))  # start was 1
    assert [e.digit for e in events if isinstance(e, Dtmf)] == ["5", "#"]
    assert not any(isinstance(e, Malformed) for e in events)
    stop = events[-1]
    assert isinstance(stop, Stop)
    assert stop.call_sid == caller.call_sid
    await asyncio.wait_for(gateway.handler_done.wait(), 5)
    assert gateway.handler_errors == []


async def test_malformed_frames_are_reported_and_skipped(gateway: Gateway) -> None:
    caller, start, _transport = await connected_call(gateway)
    sid = start.stream_sid
    payload_160 = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence

    def media_json(sequence: int, payload: str, stream_sid: str = sid) -> str:
        inner = {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": payload}
        return json.dumps({"event": "media", "sequenceNumber": str(sequence), "media": inner, "streamSid": stream_sid})

    bad_frames: list[tuple[str | bytes, str]] = [
        ("{not json", "bad JSON"),
        ("[1, 2, 3]", "must be a JSON object"),
        (b"\x00\x01binary", "binary WebSocket frame"),
        (json.dumps({"event": "hello", "streamSid": sid}), "unknown event 'hello'"),
        (
            json.dumps({"event": "media", "streamSid": sid, "media": {"track": "inbound", "chunk": "1"}}),
            "missing field 'media.timestamp'",
        ),
        (media_json(9, "!!!notbase64!!!"), "not valid base64"),
        (media_json(10, "AAAA"), "3 bytes, expected 160"),
        (media_json(11, payload_160, "MZ" + "0" * 32), "this is stream"),
        (json.dumps({"event": "dtmf", "streamSid": sid, "dtmf": {"digit": "x"}}), "dtmf.digit"),
        (json.dumps({"event": "mark", "streamSid": sid, "mark": {}}), "missing field 'mark.name'"),
        (json.dumps({"event": "start", "start": {}}), "missing field 'start.streamSid'"),
    ]
    for raw, _ in bad_frames:
        await caller.send_raw(raw)
    await caller.send_raw(media_json(12, payload_160))
    events = await gateway.events_until(Media)
    malformed = [e for e in events if isinstance(e, Malformed)]
    assert len(malformed) == len(bad_frames)
    for event, (raw, expected) in zip(malformed, bad_frames, strict=True):
        assert expected in event.reason, (event.reason, raw)
        assert event.excerpt
    media = events[-1]
    assert isinstance(media, Media)
    assert media.payload == b"\xff" * 160
    assert len(media.pcm) == 640
    await caller.stop()
    await asyncio.wait_for(gateway.handler_done.wait(), 5)
    assert gateway.handler_errors == []


async def test_abrupt_close_ends_the_reader_cleanly(gateway: Gateway) -> None:
    caller, _start, transport = await connected_call(gateway)
    await caller.send_mulaw(b"\xff" * 800, realtime=False)
    for _ in range(5):
        assert isinstance(await gateway.next_event(), Media)
    await caller.abort()
    await asyncio.wait_for(gateway.handler_done.wait(), 5)
    assert gateway.handler_errors == []
    assert gateway.events.empty()

    async def play_until_refused() -> None:
        for _ in range(50):  # the first sends after the drop may still reach the kernel buffer
            await transport.play(b"\x00" * 640)
            await asyncio.sleep(0.01)

    with pytest.raises(TransportClosed):
        await play_until_refused()


async def test_unsigned_media_handshake_is_refused(gateway: Gateway) -> None:
    caller = make_caller(gateway)
    instructions = await caller.dial()
    with pytest.raises(Exception, match="403"):
        await caller.connect(instructions, sign_handshake=False)
    assert gateway.handshakes_refused == 1


# --------------------------------------------------------------------------- media stream out


async def test_play_sends_twilio_mulaw(gateway: Gateway) -> None:
    caller, _start, transport = await connected_call(gateway, realtime_playback=False)
    agent = tone(1000, 0.4, 16000, amplitude=10000)
    frames = [agent[i : i + 640] for i in range(0, len(agent), 640)]
    for frame in frames:
        await transport.play(frame)
    await caller.wait_until(lambda: len(caller.messages(OutboundMedia)) == len(frames))

    assert caller.protocol_errors == []
    media = caller.messages(OutboundMedia)
    assert all(isinstance(m, OutboundMedia) and len(m.payload) == 160 for m in media)
    # Exactly what streams.audio's streaming resampler and G.711 encoder make of these frames ...
    reference = Resampler(16000, 8000)
    expected = b"".join(pcm16_to_mulaw(reference.process(frame)) for frame in frames)
    assert bytes(caller.agent_audio) == expected
    # ... which is the tone, at 8 kHz, at the level it was played (after the 4 ms filter delay).
    heard = mulaw_to_pcm16(bytes(caller.agent_audio))[2 * 64 :]
    assert abs(dominant_hz(heard, 8000) - 1000) < 15
    assert rms(heard) == pytest.approx(rms(agent), rel=0.05)
    assert transport.frames_sent == len(frames)
    await caller.stop()


async def test_mark_is_echoed_after_playback_and_clear_flushes(gateway: Gateway) -> None:
    caller, _start, transport = await connected_call(gateway)
    silence = b"\x00" * 640
    for _ in range(15):  # 300 ms of agent audio queued at the caller
        await transport.play(silence)
    await transport.mark("greeting-done")
    sent_at = asyncio.get_running_loop().time()
    mark = await gateway.events_until(Mark, timeout_s=5)
    echoed_after = asyncio.get_running_loop().time() - sent_at
    assert isinstance(mark[-1], Mark)
    assert mark[-1].name == "greeting-done"
    assert echoed_after > 0.2  # Twilio answers once the 300 ms before it has played

    for _ in range(100):  # 2 s queued
        await transport.play(silence)
    await transport.mark("long-reply")
    await caller.wait_until(lambda: len(caller.messages(OutboundMark)) == 2)
    await transport.clear()
    cleared_at = asyncio.get_running_loop().time()
    events = await gateway.events_until(Mark, timeout_s=5)
    assert isinstance(events[-1], Mark)
    assert events[-1].name == "long-reply"
    assert asyncio.get_running_loop().time() - cleared_at < 1.0  # flushed, not played out
    assert caller.clears == 1
    assert isinstance(caller.messages()[-1], OutboundClear)
    assert caller.marks_echoed == ["greeting-done", "long-reply"]
    assert caller.protocol_errors == []
    await caller.stop()


# --------------------------------------------------------------------------- REST: transfer, hangup


async def test_transfer_updates_the_live_call_through_the_sdk(gateway: Gateway, fake_twilio: FakeTwilio) -> None:
    caller, start, transport = await connected_call(gateway)
    fake_twilio.add_call(caller.from_, caller.to, sid=start.call_sid)

    outcome = await transport.transfer("+15557654321")
    assert outcome == ("connected", None)
    (request,) = fake_twilio.requests_for("update_call", start.call_sid)
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{start.call_sid}.json"
    assert request.auth_ok
    assert request.auth_user == ACCOUNT_SID
    assert request.params == {"Twiml": dial_twiml("+15557654321")}
    assert "<Dial><Number>+15557654321</Number></Dial>" in request.params["Twiml"]
    assert request.headers["user-agent"].startswith("twilio-python/")

    sip = await transport.transfer("sip:desk@pbx.example.com")
    assert sip == ("connected", None)
    assert "<Sip>sip:desk@pbx.example.com</Sip>" in fake_twilio.requests_for("update_call")[-1].params["Twiml"]

    fake_twilio.fail_next(404, 20404, "The requested resource was not found", operation="update_call")
    failed = await transport.transfer("+15557654321")
    assert failed[0] == "failed"
    assert failed[1] is not None
    assert "20404" in failed[1]

    invalid = await transport.transfer("not a number")
    assert invalid[0] == "failed"
    await caller.stop()


async def test_hangup_completes_the_call_and_closes_the_stream(gateway: Gateway, fake_twilio: FakeTwilio) -> None:
    caller, start, transport = await connected_call(gateway)
    fake_twilio.add_call(caller.from_, caller.to, sid=start.call_sid)
    await transport.hangup()
    (request,) = fake_twilio.requests_for("update_call", start.call_sid)
    assert request.params == {"Status": "completed"}
    assert fake_twilio.calls[start.call_sid]["status"] == "completed"
    await asyncio.wait_for(caller.closed.wait(), 5)
    assert caller.closed_by_agent
    assert caller.close_code == 1000
    await asyncio.wait_for(gateway.handler_done.wait(), 5)
    assert gateway.handler_errors == []
    assert transport.closed
    with pytest.raises(TransportClosed):
        await transport.mark("after-hangup")
    await transport.hangup()  # idempotent
    assert len(fake_twilio.requests_for("update_call")) == 1


async def test_hangup_closes_the_stream_even_when_rest_fails(gateway: Gateway, fake_twilio: FakeTwilio) -> None:
    caller, _start, transport = await connected_call(gateway)
    fake_twilio.fail_next(500, 20500, "Internal Server Error")
    await transport.hangup()
    await asyncio.wait_for(caller.closed.wait(), 5)
    assert caller.closed_by_agent


async def test_rest_client_create_call_and_errors(fake_twilio: FakeTwilio) -> None:
    rest = TwilioRest(ACCOUNT_SID, AUTH_TOKEN, base_url=fake_twilio.base_url)
    call = await rest.create_call(
        "+15551230000",
        "+15550002222",
        "https://voice.example.com/twilio/voice",
        "https://voice.example.com/twilio/status",
    )
    assert call.status == "queued"
    assert call.direction == "outbound-api"
    assert call.to == "+15551230000"
    assert call.from_ == "+15550002222"
    (request,) = fake_twilio.requests_for("create_call")
    assert request.params["Url"] == "https://voice.example.com/twilio/voice"
    assert request.params["StatusCallback"] == "https://voice.example.com/twilio/status"
    assert request.getlist("StatusCallbackEvent") == ["initiated", "ringing", "answered", "completed"]
    assert (await rest.fetch_call(call.sid)).sid == call.sid
    assert (await rest.cancel_call(call.sid)).status == "canceled"

    with pytest.raises(TwilioRestError) as not_found:
        await rest.complete_call("CA" + uuid.uuid4().hex)
    assert not_found.value.status == 404
    assert not_found.value.code == 20404
    assert not_found.value.more_info == "https://www.twilio.com/docs/errors/20404"

    with pytest.raises(TwilioRestError) as not_live:
        await rest.update_call_twiml(call.sid, dial_twiml("+15557654321"))
    assert not_live.value.code == 21220

    wrong = TwilioRest(ACCOUNT_SID, "not-the-token", base_url=fake_twilio.base_url)
    with pytest.raises(TwilioRestError) as unauthorized:
        await wrong.fetch_call(call.sid)
    assert (unauthorized.value.status, unauthorized.value.code) == (401, 20003)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    unreachable = TwilioRest(ACCOUNT_SID, AUTH_TOKEN, base_url=f"http://127.0.0.1:{dead_port}", timeout_s=2)
    with pytest.raises(TwilioRestError) as down:
        await unreachable.fetch_call(call.sid)
    assert down.value.status is None
    assert "ConnectionError" in down.value.message

    with pytest.raises(ValueError, match="call SID"):
        await rest.complete_call("../../Accounts")
