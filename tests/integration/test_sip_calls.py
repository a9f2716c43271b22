"""A real softphone (Debian's baresip) calls the gateway over SIP on loopback, on both log backends: it
hears the greeting and the agent's answer (Whisper reads what it recorded), its RFC 4733 digits reach
the call, the call is in the log as `channel: sip` and replays identically; a REFER hands the caller to a
second baresip that answers, and a transfer nobody takes leaves the caller with the agent."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from consumers.event_reader import read_call
from schemas.base import Event, EventPayload
from schemas.events import (
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    DtmfReceived,
    HandoffCompleted,
    TranscriptFinal,
    TtsCompleted,
)
from streams.audio.codecs import frames, resample_pcm16, rms_dbfs, write_wav
from streams.call.replay import agent_for, verify_call
from streams.providers.asr_faster_whisper import packaged_model_dir
from tests.baresip_peer import BaresipPeer, baresip_peer, require_baresip, speech_wav_8k
from tests.speech import synthesize_pcm16
from voxlog.settings import Settings
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.sip_caller import free_sip_port
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow

AGENT = "+15550100"
LOUD_DBFS = -40.0


def sip_settings(home: Path, agents: Path | None = None, kafka: str | None = None,
                 codecs: str = "PCMU,PCMA") -> Settings:
    return Settings(home=home, kafka_bootstrap=kafka, agents_dir=agents, sip_bind=f"127.0.0.1:{free_sip_port()}",
                    sip_codecs=codecs)


def agent_uri(stack: LocalStack) -> str:
    assert stack.gateway.sip is not None
    return f"sip:{AGENT}@127.0.0.1:{stack.gateway.sip.port}"


def loud_seconds(pcm: bytes, rate: int) -> float:
    return sum(1 for frame in frames(pcm, rate, 20) if rms_dbfs(frame) > LOUD_DBFS) * 0.02


async def until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)


def fell_silent(peer: BaresipPeer, after_loud_s: float) -> bool:
    """The peer has heard more than `after_loud_s` of speech in all, and the last second was silent."""
    try:
        pcm, rate = peer.received_audio()
    except (FileNotFoundError, AssertionError, ValueError):
        return False
    tail = pcm[-rate * 2:]
    return loud_seconds(pcm, rate) > after_loud_s and len(tail) == rate * 2 and loud_seconds(tail, rate) == 0.0


async def greeting_heard(caller: BaresipPeer) -> tuple[bytes, int]:
    """What the caller has heard once the agent's greeting has ended, and its rate."""
    await until(lambda: fell_silent(caller, 2.0), 30, "the greeting heard, then silence")
    return caller.received_audio()


async def answer_heard(caller: BaresipPeer, ask: Path, before: bytes, rate: int) -> bytes:
    """The caller says `ask` once it has heard `before`; all it has heard once the agent's answer has ended."""
    await caller.play(ask)
    await until(lambda: fell_silent(caller, loud_seconds(before, rate) + 1.5), 60, "the agent's answer heard")
    return caller.received_audio()[0]


def words(pcm: bytes, rate: int) -> str:
    """What Whisper tiny.en (the packaged model) hears in `pcm`, lower case, letters only."""
    import numpy as np
    from faster_whisper import WhisperModel  # type: ignore[import-untyped]

    model_dir = packaged_model_dir()
    assert model_dir is not None
    audio = np.frombuffer(resample_pcm16(pcm, rate, 16_000), dtype="<i2").astype(np.float32) / 32768.0
    segments, _ = WhisperModel(str(model_dir), device="cpu", compute_type="int8").transcribe(audio, language="en")
    return re.sub(r"[^a-z ]", "", " ".join(s.text for s in segments).lower())


async def events_of(stack: LocalStack, call_id: str) -> list[Event[EventPayload]]:
    await stack.gateway.wait_idle(30)
    async with stack.gateway.backend.admin() as admin:
        return (await read_call(admin, call_id)).events


def conversation(events: list[Event[EventPayload]]) -> str:
    """Who said what in the call's log, in order, a line each: what a failed assertion on the audio shows
    beside it (a string, which pytest does not shorten as it does a list)."""
    return "\n".join(f"{e.type}: {getattr(e.payload, 'text', getattr(e.payload, 'digit', ''))}" for e in events
                     if e.type in ("transcript.final", "tts.requested", "dtmf.received", "turn.barge_in"))


def the_call(stack: LocalStack) -> str:
    [session] = stack.gateway.sessions.values()
    return session.call.call_id


@pytest.fixture
async def stack(log_bootstrap: str | None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    require_baresip()
    async with local_stack(sip_settings(tmp_path / "home", kafka=log_bootstrap)) as running:
        yield running


async def test_a_softphone_talks_to_the_agent(stack: LocalStack, tmp_path: Path) -> None:
    # Whisper tiny.en hears this through G.711 under any cut or loss tried; of "I would like to book a technician
    # visit", "book" reads as "welcome" and "visit" as "with it" most times, and the agent did not book (CI).
    ask = speech_wav_8k("I need an appointment with a technician for tomorrow morning.", tmp_path / "ask.wav")
    async with baresip_peer(tmp_path, user="caller") as caller:
        await caller.dial(agent_uri(stack))
        established = await caller.wait_event("CALL_ESTABLISHED")
        call_id = the_call(stack)
        async with httpx.AsyncClient() as client:
            health = (await client.get(f"{stack.base_url}/healthz")).json()
        assert health["sip"] == {"status": "ok", "listening": agent_uri(stack).split("@")[1], "calls": 1,
                                 "media_ports": 1}
        assert health["live_calls"] == 1
        greeting, rate = await greeting_heard(caller)
        await caller.send_dtmf("5")  # heard as words ("pressed 5"): the agent answers it, so wait for that
        await until(lambda: fell_silent(caller, loud_seconds(greeting, rate) + 1.0), 30, "the reply to the key")
        asked, rate = caller.received_audio()
        heard = await answer_heard(caller, ask, asked, rate)
        await caller.hangup()
        await caller.wait_event("CALL_CLOSED")

    events = await events_of(stack, call_id)
    said = words(greeting, rate)  # ("Acme" is beyond tiny.en)
    assert "thanks for calling" in said, said
    assert "how can i help you" in said, said
    answer = words(heard[len(asked):], rate)
    assert "book" in answer, f"{answer}\n{conversation(events)}"
    started = events[0].payload
    assert isinstance(started, CallStarted)
    assert (started.channel, started.to_number, started.provider_call_id) == ("sip", AGENT, established["id"])
    assert started.from_number == "caller"
    assert [e.payload.digit for e in events if isinstance(e.payload, DtmfReceived)] == ["5"]
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert (ended.reason, ended.outcome) == ("caller_hangup", "booked")
    spoken = [e.payload for e in events if isinstance(e.payload, TtsCompleted)]
    assert sum(p.audio_ms for p in spoken) / 1000 >= loud_seconds(heard, rate)  # what it heard, the agent said
    assert {e.type for e in events} >= {"audio.caller_chunk", "audio.agent_chunk", "transcript.final", "tool.succeeded"}
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical


async def test_a_g722_softphone_is_heard_at_16_khz(tmp_path: Path) -> None:
    """A softphone that speaks only G.722 calls a gateway that offers it (VOXLOG_SIP_CODECS): the call is
    wideband, the caller's audio recorded and recognised at 16 kHz, not 8, and the agent heard through it."""
    require_baresip()
    ask = tmp_path / "ask.wav"
    write_wav(ask, synthesize_pcm16("I need an appointment with a technician for tomorrow morning.", 16_000), 16_000)
    settings = sip_settings(tmp_path / "home", codecs="G722,PCMU,PCMA")
    async with local_stack(settings) as stack, baresip_peer(tmp_path, codec="g722") as caller:
        await caller.dial(agent_uri(stack))
        await caller.wait_event("CALL_ESTABLISHED")
        call_id = the_call(stack)
        greeting, rate = await greeting_heard(caller)
        heard = await answer_heard(caller, ask, greeting, rate)
        await caller.hangup()
        await caller.wait_event("CALL_CLOSED")
        events = await events_of(stack, call_id)
        router = stack.gateway.router

    assert rate == 16_000, "baresip decoded G.722"
    said = words(greeting, rate)
    assert "thanks for calling" in said, said
    chunks = [e.payload for e in events if isinstance(e.payload, CallerAudioChunk)]
    assert {(c.codec, c.sample_rate) for c in chunks} == {("pcm_s16le", 16_000)}
    assert sum(c.duration_ms for c in chunks) >= 2_000
    [transcript] = [e.payload.text for e in events if isinstance(e.payload, TranscriptFinal)]
    assert "appointment" in transcript.lower(), conversation(events)
    answer = words(heard[len(greeting):], rate)
    assert "book" in answer, f"{answer}\n{conversation(events)}"
    assert verify_call(events, agent_for(events, router)).identical


@pytest.mark.parametrize("human_answers", [True, False], ids=["answered", "refused"])
async def test_a_refer_hands_the_caller_to_a_human_or_leaves_them_with_the_agent(
        tmp_path: Path, human_answers: bool) -> None:
    require_baresip()
    human_cm = baresip_peer(tmp_path, user="human", auto_answer=human_answers)
    async with human_cm as human:
        agents = demo_agents_with(tmp_path / "agents", front_desk={"handoff": {"target": human.uri}})
        ask = speech_wav_8k("Can I talk to a human please?", tmp_path / "ask.wav")
        async with (local_stack(sip_settings(tmp_path / "home", agents)) as stack,
                    baresip_peer(tmp_path, user="caller") as caller):
            await caller.dial(agent_uri(stack))
            first = await caller.wait_event("CALL_ESTABLISHED")
            call_id = the_call(stack)
            await greeting_heard(caller)
            await caller.play(ask)
            transfer = await caller.wait_event("TRANSFER", timeout_s=60)
            assert transfer["param"] == human.uri
            if human_answers:
                assert (await human.wait_event("CALL_ESTABLISHED", timeout_s=20))["peeruri"] == caller.uri
                closed = await caller.wait_event("CALL_CLOSED", timeout_s=30)  # the agent's leg, ended by us
                assert closed["id"] == first["id"]
                events = await events_of(stack, call_id)
            else:
                await human.wait_event("CALL_INCOMING", timeout_s=20)
                await human.hangup()  # declines: the caller's INVITE to the human fails
                await handoff_completed(stack, call_id, 30)
                assert call_id in stack.gateway.sessions, "the caller is still with the agent"
                await caller.hangup()
                await caller.wait_event("CALL_CLOSED")
                events = await events_of(stack, call_id)

    [completed] = [e.payload for e in events if isinstance(e.payload, HandoffCompleted)]
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    if human_answers:
        assert completed.outcome == "connected"
        assert ended.reason == "handoff"
    else:
        assert completed.outcome != "connected"
        assert completed.detail is not None
        assert "REFER" in completed.detail
        assert ended.reason == "caller_hangup"
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical


async def handoff_completed(stack: LocalStack, call_id: str, timeout_s: float) -> None:
    """Until the live call's handoff.completed is in the log."""
    deadline = time.monotonic() + timeout_s
    while True:
        await stack.gateway.writer.flush()
        async with stack.gateway.backend.admin() as admin:
            if any(isinstance(e.payload, HandoffCompleted) for e in (await read_call(admin, call_id)).events):
                return
        assert time.monotonic() < deadline, "no handoff.completed in the log"
        await asyncio.sleep(0.2)
