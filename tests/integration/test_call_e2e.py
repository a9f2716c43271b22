"""A caller played exactly as Twilio plays one, through the real gateway, on both log backends:
signed webhook, media WebSocket with real synthesised speech as mu-law, the agent's audio back,
the whole event sequence in the log, and replay of the recorded call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from consumers.event_reader import read_call
from schemas.base import Event, EventPayload
from schemas.codec import EventCodec
from schemas.events import AuditRecorded, CallEnded, CallStatus, ErrorRaised, TtsRequested
from schemas.topics import AUDIT, CALL_TOPICS
from streams.audio.codecs import pcm16_to_mulaw
from streams.call.replay import agent_for, verify_call
from streams.channels.twilio_media_protocol import OutboundClear, OutboundMedia
from tests.speech import synthesize_pcm16
from voxlog.bench_vad import SPEECH_DBFS, active_level, noise
from voxlog.settings import Settings
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.twilio_caller import TwilioCaller

pytestmark = pytest.mark.slow

AGENT_NUMBER = "+15550100"


@pytest.fixture
async def stack(log_bootstrap: str | None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path, kafka_bootstrap=log_bootstrap)
    async with local_stack(settings) as running:
        yield running


def speech(text: str) -> bytes:
    """Caller speech as Twilio carries it: 8 kHz mu-law, then a second of silence to end the turn."""
    return pcm16_to_mulaw(synthesize_pcm16(text, rate=8000)) + bytes([0xFF]) * 8000


async def agent_done_speaking(caller: TwilioCaller, *, beyond: int = 0) -> None:
    """Until the agent has answered (said more than `beyond` bytes: what it had said when the caller
    spoke, however long its answer takes to begin) and fallen silent."""
    assert await caller.agent_quiet(beyond=beyond) or caller.closed.is_set(), "the agent never spoke"


async def say(caller: TwilioCaller, text: str, line: Callable[[str], bytes] = speech) -> None:
    """The caller says `text` (as `line` carries it), and waits for the agent's whole answer."""
    before = len(caller.agent_audio)
    await caller.send_mulaw(line(text))
    await agent_done_speaking(caller, beyond=before)


async def events_of(stack: LocalStack, call_id: str) -> list[Event[EventPayload]]:
    await stack.gateway.wait_idle(30)
    async with stack.gateway.backend.admin() as admin:
        return (await read_call(admin, call_id)).events


def types(events: list[Event[EventPayload]]) -> list[str]:
    return [e.type for e in events if not e.type.startswith("audio.")]


def loud(mulaw: bytes) -> bool:
    """Mu-law codes near 0x7F/0xFF are silence; speech has codes far from them."""
    return sum(1 for b in mulaw if (b & 0x7F) < 0x70) > len(mulaw) // 10


async def test_a_caller_books_an_appointment_and_says_goodbye(stack: LocalStack) -> None:
    caller = stack.caller(from_="+15557770001", to=AGENT_NUMBER)
    instructions = await caller.dial()
    call_id = instructions.parameters["call_id"]
    async with caller:
        await caller.connect(instructions)
        await agent_done_speaking(caller)
        greeting_bytes = len(caller.agent_audio)
        assert loud(bytes(caller.agent_audio)), "the greeting should be speech, not silence"
        await say(caller, "i would like to book an appointment for tomorrow at ten")
        assert len(caller.agent_audio) > greeting_bytes, "the agent answered the booking"
        await caller.send_mulaw(speech("no thank you goodbye"))
        await asyncio.wait_for(caller.closed.wait(), 30)  # the agent says goodbye and hangs up
    assert caller.closed_by_agent
    assert not caller.protocol_errors
    assert caller.messages(OutboundMedia)

    events = await events_of(stack, call_id)
    seen = types(events)
    expected_order = ["call.started", "call.answered", "consent.given", "tts.requested", "speech.started",
                      "speech.stopped", "transcript.final", "turn.taken", "llm.requested", "llm.decided",
                      "tool.requested", "tool.succeeded", "llm.requested", "llm.decided", "tts.requested",
                      "call.hangup_requested", "call.ended"]
    position = 0
    for name in seen:
        if position < len(expected_order) and name == expected_order[position]:
            position += 1
    assert position == len(expected_order), f"missing {expected_order[position:]} in {seen}"
    assert [e.seq for e in events] == list(range(len(events))), "seq is gap-free and ordered"
    caller_chunks = [e for e in events if e.type == "audio.caller_chunk"]
    assert caller_chunks[0].payload.codec == "mulaw"  # type: ignore[attr-defined]
    assert sum(1 for e in events if e.type == "audio.agent_chunk") > 100
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert (ended.reason, ended.outcome) == ("agent_hangup", "booked")
    (hangup,) = stack.twilio.requests_for("update_call", caller.call_sid)
    assert hangup.params["Status"] == "completed", "the hang-up went through Twilio's REST API"
    said = [e.payload.text for e in events if isinstance(e.payload, TtsRequested)]
    assert any("booked" in text for text in said), said

    agent = agent_for(events, stack.gateway.router)
    assert verify_call(events, agent).identical


def on_a_rumbling_line(text: str) -> bytes:
    """`text` from a car: road rumble 13 dB under the voice, through the speech and the 1.5 s after it."""
    pcm = active_level(np.frombuffer(synthesize_pcm16(text, rate=8000), dtype="<i2").astype(np.float64), SPEECH_DBFS)
    line = np.concatenate([pcm, np.zeros(12_000)])
    line += noise("rumble", line.size, -35.0, np.random.default_rng(len(text)), ())
    return pcm16_to_mulaw(np.clip(np.rint(line), -32768, 32767).astype("<i2").tobytes())


async def test_on_a_rumbling_line_an_agent_with_silero_takes_each_turn(log_bootstrap: str | None,
                                                                        tmp_path: Path) -> None:
    """The energy judge hears road rumble as speech and holds the caller's turn open: the agent never
    answers (docs/performance.md, `voxlog bench vad`). An agent with `vad: silero` answers each turn."""
    agents = demo_agents_with(tmp_path / "agents", front_desk={"vad": "silero"})
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=log_bootstrap, agents_dir=agents,
                        webhook_secret="a-secret-of-this-test")
    async with local_stack(settings) as stack:
        caller = stack.caller(from_="+15557770002", to=AGENT_NUMBER)
        instructions = await caller.dial()
        call_id = instructions.parameters["call_id"]
        async with caller:
            await caller.connect(instructions)
            await agent_done_speaking(caller)
            await say(caller, "i would like to book an appointment for tomorrow at ten", on_a_rumbling_line)
            await caller.send_mulaw(on_a_rumbling_line("no thank you goodbye"))
            await asyncio.wait_for(caller.closed.wait(), 30)
        events = await events_of(stack, call_id)
    assert caller.closed_by_agent
    assert [e.type for e in events].count("speech.started") == 2, types(events)
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert (ended.reason, ended.outcome) == ("agent_hangup", "booked")


async def call_events_in_log(stack: LocalStack) -> int:
    async with stack.gateway.backend.admin() as admin:
        return sum([sum((await admin.end_offsets(topic)).values()) for topic in CALL_TOPICS])


async def test_a_bad_signature_is_refused_and_only_audited(stack: LocalStack) -> None:
    before = await call_events_in_log(stack)
    caller = TwilioCaller(stack.base_url, "not-the-auth-token", to=AGENT_NUMBER)
    response = await caller.ring()
    assert response.status_code == 403
    assert await call_events_in_log(stack) == before, "nothing about a call was logged"
    async with stack.gateway.backend.admin() as admin:
        records = [r async for r in admin.read_key([AUDIT], caller.call_sid.encode())]
    assert records, "the rejection is audited"
    audit = EventCodec().decode(records[-1].value).payload
    assert isinstance(audit, AuditRecorded)
    assert (audit.action, audit.outcome, audit.detail) == ("webhook.rejected", "denied", "bad signature")


async def test_malformed_frames_are_recorded_and_the_call_goes_on(stack: LocalStack) -> None:
    caller = stack.caller(to=AGENT_NUMBER)
    instructions = await caller.dial()
    call_id = instructions.parameters["call_id"]
    async with caller:
        await caller.connect(instructions)
        await caller.send_raw("{not json")
        bad_media = {"event": "media", "streamSid": caller.stream_sid, "media": {"payload": "@@@"}}
        await caller.send_raw(json.dumps(bad_media))
        await caller.send_raw(b"\x00\x01binary")
        assert (await caller.send_status("in-progress")).status_code == 204
        await agent_done_speaking(caller)
        await caller.stop()
    # Twilio's final status arrives after the stream has stopped: it still joins the call's record.
    await stack.gateway.wait_idle(30)
    assert (await caller.send_status("completed", duration_s=7, sip_response_code=200)).status_code == 204
    events = await events_of(stack, call_id)
    statuses = [e.payload for e in events if isinstance(e.payload, CallStatus)]
    assert [(s.status, s.duration_s, s.sip_response_code) for s in statuses] == [
        ("in-progress", None, None), ("completed", 7, 200)]
    assert [e.seq for e in events] == list(range(len(events)))
    errors = [e.payload for e in events if isinstance(e.payload, ErrorRaised)]
    assert len(errors) == 3
    assert all(e.kind == "bad_input" and e.component == "gateway.twilio" for e in errors)
    (ended,) = [e.payload for e in events if isinstance(e.payload, CallEnded)]
    assert ended.reason == "caller_hangup"


async def test_an_abrupt_close_ends_the_call_cleanly(stack: LocalStack) -> None:
    caller = stack.caller(to=AGENT_NUMBER)
    instructions = await caller.dial()
    call_id = instructions.parameters["call_id"]
    await caller.connect(instructions)
    await asyncio.sleep(1.0)
    await caller.abort()
    events = await events_of(stack, call_id)
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert ended.reason == "socket_closed"
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical


async def test_speaking_over_the_agent_stops_it_and_clears_twilio(stack: LocalStack) -> None:
    caller = stack.caller(to=AGENT_NUMBER)
    instructions = await caller.dial()
    call_id = instructions.parameters["call_id"]
    async with caller:
        await caller.connect(instructions)
        await caller.wait_until(lambda: len(caller.agent_audio) > 8000, timeout_s=20)  # a second of greeting
        await caller.send_mulaw(speech("my internet is down"))
        await caller.wait_until(lambda: bool(caller.messages(OutboundClear)), timeout_s=10)
        # Its answer to what was said over it, not the greeting it cut short: on a loaded machine the
        # recogniser can take seconds, and hanging up first ended the call before its turn was taken.
        await agent_done_speaking(caller, beyond=caller.heard_at_clear)
        await caller.stop()
    assert caller.clears >= 1
    events = await events_of(stack, call_id)
    seen = types(events)
    assert "turn.barge_in" in seen
    barge = seen.index("turn.barge_in")
    greeting_done = next(e for e in events if e.type == "tts.completed")
    assert greeting_done.payload.interrupted  # type: ignore[attr-defined]
    assert "turn.taken" in seen[barge:]
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical


async def test_health_reports_the_log(stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        health = (await client.get("/healthz")).json()
    assert health["status"] == "ok"
    assert health["live_calls"] == 0
