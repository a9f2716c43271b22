"""Consent refused by speech and by DTMF, through the real gateway, with a caller played exactly as
Twilio plays one (and a widget page): from the refusal on, no caller audio in the log, no recording
(not even the agent's side) and no working files, the calls table says why, and the call goes on
(the caller's problem becomes a ticket); replay verifies the call identically. Under opt_in, a yes
records the caller from the yes on."""

from __future__ import annotations

import asyncio
import io
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.event_reader import read_call
from projections.calls import CallsProjection
from projections.projection_runner import ProjectionRunner
from projections.recordings import RecordingsProjection
from projections.store import AnalyticsStore
from projections.tables import CALLS
from schemas.base import Event, EventPayload
from schemas.events import (
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
    ToolSucceeded,
    TranscriptFinal,
)
from streams.audio.formats import PCM_RATE
from streams.call.replay import agent_for, verify_call
from streams.config.agents import Consent
from tests.integration.test_call_e2e import AGENT_NUMBER, agent_done_speaking, speech
from tests.speech import synthesize_pcm16
from voxlog.settings import Settings
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.media_peer import MediaPeer
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.widget_page import WidgetPage

pytestmark = pytest.mark.slow

LINE_SILENCE = bytes([0xFF]) * 8000
"""A second of an open line with nobody speaking (8 kHz mu-law)."""


def agents(folder: Path, *, rule: str | None = None, mode: str | None = None) -> Path:
    """The demo agents, the tenant under `rule` and the front desk asking in `mode`."""
    return demo_agents_with(folder, tenant={"consent": {"rule": rule}} if rule else None,
                            front_desk={"consent": {"mode": mode}} if mode else None)


async def answered(peer: MediaPeer, heard: int) -> None:
    """Waits for the agent's answer to what was just said (on a busy machine or a broker, slower than a
    pause), then for it to finish."""
    assert await peer.agent_speaks_beyond(heard), "the agent did not answer"
    assert await peer.agent_quiet()


async def events_of(stack: LocalStack, call_id: str) -> list[Event[EventPayload]]:
    await stack.gateway.wait_idle(30)
    async with stack.gateway.backend.admin() as admin:
        return (await read_call(admin, call_id)).events


def one(events: list[Event[EventPayload]], kind: type[EventPayload]) -> Event[EventPayload]:
    (found,) = [e for e in events if isinstance(e.payload, kind)]
    return found


async def project(stack: LocalStack, store: AnalyticsStore) -> None:
    """The calls and recordings projections over the whole log, as `voxlog serve` runs them."""
    for projection in (CallsProjection(stack.gateway.router),
                       RecordingsProjection(stack.gateway.recordings_path, stack.gateway.recordings)):
        await ProjectionRunner(stack.gateway.backend, store, projection).run(asyncio.Event(), until_caught_up=True)


def calls_row(store: AnalyticsStore, call_id: str) -> dict[str, Any]:
    names = ("consent", "consent_mode", "consent_method", "recording_withheld", "outcome")
    (row,) = store.query(f"SELECT {', '.join(names)} FROM {CALLS.name} FINAL WHERE call_id = {{c:String}}",
                         {"c": call_id}).rows
    return dict(zip(names, row, strict=True))


def files_of(stack: LocalStack, call_id: str) -> list[str]:
    root = stack.gateway.recordings_path
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if call_id in p.name)


def assert_refused_and_served(events: list[Event[EventPayload]], method: str, mode: str, rule: str,
                              stack: LocalStack) -> Event[EventPayload]:
    """The log of a call whose caller refused: when, how, under what; nothing of the caller's audio
    after it; the caller's words and the agent's work after it all the same."""
    started = one(events, CallStarted).payload
    assert isinstance(started, CallStarted)
    assert (started.parameters["consent_rule"], started.parameters["consent_mode"]) == (rule, mode)
    refusal = one(events, ConsentRefused)
    assert isinstance(refusal.payload, ConsentRefused)
    assert refusal.payload.method == method
    assert not [e for e in events if isinstance(e.payload, ConsentGiven)]
    chunks = [e.seq for e in events if isinstance(e.payload, CallerAudioChunk)]
    assert all(seq < refusal.seq for seq in chunks), "no caller audio after the refusal"
    if method == "speech":  # the refusal itself was heard: on the log until then, sealed
        assert chunks
    before = [e for e in events if isinstance(e.payload, CallerAudioChunk)]
    assert all(e.pii_withheld and e.payload.audio == b"" for e in before), "the call's audio key was destroyed"
    heard_after = [e.payload.text for e in events if isinstance(e.payload, TranscriptFinal) and e.seq > refusal.seq]
    assert any("internet" in text for text in heard_after), heard_after  # what they said is kept as words
    tool = one(events, ToolSucceeded)
    assert tool.seq > refusal.seq
    assert isinstance(tool.payload, ToolSucceeded)
    assert tool.payload.tool == "create_ticket", "the call went on: the caller's problem became a ticket"
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert ended.outcome == "ticket_created"
    assert [e.seq for e in events] == list(range(len(events)))
    result = verify_call(events, agent_for(events, stack.gateway.router))
    assert result.identical, result.divergence
    return refusal


@pytest.mark.parametrize(("method", "rule", "mode"), [
    ("dtmf", "all_party", None),  # the tenant's all-party rule makes the notice-only front desk offer a refusal
    ("speech", None, "opt_out"),  # the agent's own mode
])
async def test_consent_refused_by_speech_and_by_dtmf_no_recording_no_retained_caller_audio_the_call_goes_on(
    log_bootstrap: str | None, store: AnalyticsStore, tmp_path: Path, method: str, rule: str | None, mode: str | None
) -> None:
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=log_bootstrap,
                        agents_dir=agents(tmp_path / "agents", rule=rule, mode=mode))
    async with local_stack(settings) as stack:
        caller = stack.caller(from_="+15557770031", to=AGENT_NUMBER)
        instructions = await caller.dial()
        call_id = instructions.parameters["call_id"]
        async with caller:
            await caller.connect(instructions)
            if method == "dtmf":
                # The line open, then the key while the notice still plays ("press 2 or say no"). What of
                # the line the session has not yet taken in when the refusal is decided is not kept either.
                await caller.send_mulaw(LINE_SILENCE)
                heard = len(caller.agent_audio)
                await caller.send_dtmf("2")
            else:
                await agent_done_speaking(caller)
                heard = len(caller.agent_audio)
                await caller.send_mulaw(speech("no, please do not record this call"))
            await answered(caller, heard)  # "Understood: this call will not be recorded."
            heard = len(caller.agent_audio)
            await caller.send_mulaw(speech("i have a problem with my internet"))
            await answered(caller, heard)  # after the refusal, the agent serves the call
            await caller.send_mulaw(speech("no thank you goodbye"))
            await asyncio.wait_for(caller.closed.wait(), 30)
        assert caller.closed_by_agent
        events = await events_of(stack, call_id)
        refusal = assert_refused_and_served(events, method, "opt_out", rule or "one_party", stack)
        assert isinstance(refusal.payload, ConsentRefused)
        assert "press 2" in refusal.payload.prompt_text
        if log_bootstrap is not None:
            return  # the projections are tested on the embedded log (a shared broker holds others' calls)
        await project(stack, store)
        assert store.query("SELECT count() FROM recordings FINAL WHERE call_id = {c:String}",
                           {"c": call_id}).rows == [(0,)], "no recording row"
        assert files_of(stack, call_id) == [f"demo/.withheld/{call_id}"], "no recording, no working files"
    assert calls_row(store, call_id) == {"consent": "refused", "consent_mode": "opt_out", "consent_method": method,
                                         "recording_withheld": "consent_refused", "outcome": "ticket_created"}


async def test_in_the_widget_a_refusal_is_spoken(store: AnalyticsStore, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", agents_dir=agents(tmp_path / "agents", rule="all_party"))
    async with local_stack(settings) as stack, \
            WidgetPage(stack.base_url.replace("http://", "ws://") + "/widget/ws") as page:
        await page.connect()
        await page.wait_until(lambda: bool(stack.gateway.sessions), timeout_s=10)
        (call_id,) = stack.gateway.sessions
        assert await page.agent_quiet(), "the agent never spoke"
        for line in ("no, please do not record this", "i have a problem with my internet", "no thank you goodbye"):
            heard = len(page.agent_audio)
            await page.send_pcm16(synthesize_pcm16(line) + bytes(32_000))  # then a second of quiet
            await answered(page, heard)
        await asyncio.wait_for(page.closed.wait(), 30)
        events = await events_of(stack, call_id)
        refusal = assert_refused_and_served(events, "speech", "opt_out", "all_party", stack)
        assert isinstance(refusal.payload, ConsentRefused)
        assert refusal.payload.prompt_text.endswith(Consent().widget_refuse_prompt)  # no keys to press
        await project(stack, store)
        assert files_of(stack, call_id) == [f"demo/.withheld/{call_id}"]


async def test_opt_in_records_the_caller_only_from_their_yes(store: AnalyticsStore, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", agents_dir=agents(tmp_path / "agents", mode="opt_in"))
    async with local_stack(settings) as stack:
        caller = stack.caller(from_="+15557770032", to=AGENT_NUMBER)
        instructions = await caller.dial()
        call_id = instructions.parameters["call_id"]
        async with caller:
            await caller.connect(instructions)
            await agent_done_speaking(caller)  # the question
            for line in ("yes that's fine", "i have a problem with my internet", "no thank you goodbye"):
                heard = len(caller.agent_audio)
                await caller.send_mulaw(speech(line))
                await answered(caller, heard)
            await asyncio.wait_for(caller.closed.wait(), 30)
        events = await events_of(stack, call_id)
        given = one(events, ConsentGiven)
        assert isinstance(given.payload, ConsentGiven)
        assert given.payload.method == "speech"
        chunks = [e for e in events if isinstance(e.payload, CallerAudioChunk)]
        assert chunks, "the caller is recorded after the yes"
        assert min(e.seq for e in chunks) > given.seq, "nothing of the caller's audio before the yes"
        first = chunks[0].payload
        assert isinstance(first, CallerAudioChunk)
        assert first.offset_ms > 0, "the yes itself was heard, not kept"
        assert verify_call(events, agent_for(events, stack.gateway.router)).identical
        await project(stack, store)
        (row,) = store.query("SELECT complete, caller_audio_ms FROM recordings FINAL WHERE call_id = {c:String}",
                             {"c": call_id}).rows
        wav = stack.gateway.recordings_path / "demo" / f"{call_id}.wav"
        with wave.open(io.BytesIO(wav.read_bytes())) as recording:
            frames = np.frombuffer(recording.readframes(recording.getnframes()), dtype="<i2").reshape(-1, 2)
    assert row == (1, sum(c.payload.duration_ms for c in chunks))  # type: ignore[attr-defined]
    caller = np.abs(frames[:, 0]).astype(np.int64)
    # Silence where the caller's audio was not kept, up to the resampler's reach: its linear-phase filter
    # spreads the first kept sample over half its length (4.4 ms at 8 to 16 kHz) on either side, so what
    # the first kept chunk starts with rings, faintly, in the 5 ms before it (none of it audio not kept).
    reach = PCM_RATE * 5 // 1000
    assert not caller[: first.offset_ms * 16 - reach].any(), "silence where the caller's audio was not kept"
    assert caller[first.offset_ms * 16 :].mean() > 50, "the caller after the yes is on the left"
    assert np.abs(frames[:, 1]).mean() > 50, "the agent, question included, on the right"
    assert calls_row(store, call_id) == {"consent": "given", "consent_mode": "opt_in", "consent_method": "speech",
                                         "recording_withheld": "", "outcome": "ticket_created"}
