"""Recorded calls made without a gateway: input events played through the core the way a session does
(`CoreSim`), and whole calls whose world answers as a gateway's would (`play_call`). For the tests of the
core and of replay, and the replay benchmark."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import (
    AgentAudioChunk,
    CallAnswered,
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    DtmfReceived,
    HandoffCompleted,
    SpeechStarted,
    SpeechStopped,
    TimerFired,
    ToolFailed,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
)
from streams.call.core import (
    CORE_PRODUCER,
    CallLlm,
    CallState,
    CancelTimer,
    Decision,
    Hangup,
    RunTool,
    Speak,
    StartTimer,
    StopSpeaking,
    Transfer,
    decide,
    new_state,
    outcome,
)
from streams.call.session import llm_decided
from streams.config.agents import AgentSpec
from streams.providers.llm_scripted import ScriptedLlm

FRAME_MS = 20
SILENT_FRAME = b"\xff" * 160  # 20 ms of mu-law silence at 8 kHz


class CoreSim:
    def __init__(self, agent: AgentSpec, call_id: str = "call-1", start_us: int = 1_800_000_000_000_000) -> None:
        self.agent = agent
        self.call_id = call_id
        self.state: CallState = new_state(agent)
        self.events: list[Event[EventPayload]] = []
        self.now_us = start_us

    def _event(self, payload: EventPayload, producer: str) -> Event[EventPayload]:
        envelope = Envelope(event_id=f"e{len(self.events)}", tenant_id=self.agent.tenant, call_id=self.call_id,
                            seq=len(self.events), type=payload.EVENT_TYPE, schema_version=payload.EVENT_VERSION,
                            event_time_us=self.now_us, producer=producer, producer_version="test")
        event = Event(envelope, payload)
        self.events.append(event)
        return event

    def feed(self, payload: EventPayload, *, after_ms: int = 20) -> list[Decision]:
        self.now_us += after_ms * 1000
        event = self._event(payload, "voxlog.session")
        self.state, decisions = decide(self.state, event)
        for decision in decisions:
            self._event(decision.payload, CORE_PRODUCER)
        return decisions

    def feed_all(self, payloads: Iterable[EventPayload]) -> list[Decision]:
        out: list[Decision] = []
        for payload in payloads:
            out += self.feed(payload)
        return out


# -- a whole call played against the core, the world answering as a gateway's would -------------------------


@dataclass(frozen=True)
class CallerStep:
    """What the caller does next: `say` words after the agent has finished speaking, `barge` words over it,
    `press` a key, or stay silent for `silence_s` (the core's timers fire meanwhile)."""

    kind: Literal["say", "barge", "press", "silence"]
    text: str = ""
    silence_s: float = 0.0


async def play_call(agent: AgentSpec, steps: Sequence[CallerStep], *, call_id: str = "call-1",
                    failing_tools: frozenset[str] = frozenset(), handoff_outcome: str = "connected",
                    audio: bool = False) -> CoreSim:
    """A recorded call: the caller's steps, the core's decisions, and the world's answers as a session
    records them (the offline scripted policy for the LLM, tools that succeed unless named in
    `failing_tools`, speech that ends before the caller's next words unless they barge in, timers that
    fire in silences, transfers with `handoff_outcome`), ended by the caller if the agent did not hang up.
    `audio`: with both sides' audio chunks, a 20 ms frame of mu-law each, while each side speaks."""
    sim = CoreSim(agent, call_id=call_id)
    frames = {"caller": 0, "agent": 0}

    def speech(side: Literal["caller", "agent"], duration_ms: int, tts_request_id: str | None = None) -> None:
        if not audio:
            return
        for _ in range(duration_ms // FRAME_MS):
            index = frames[side]
            frames[side] += 1
            offset_ms = index * FRAME_MS
            sim.feed(CallerAudioChunk(codec="mulaw", sample_rate=8000, chunk_index=index, offset_ms=offset_ms,
                                      duration_ms=FRAME_MS, audio=SILENT_FRAME) if side == "caller"
                     else AgentAudioChunk(codec="mulaw", sample_rate=8000, chunk_index=index, offset_ms=offset_ms,
                                          duration_ms=FRAME_MS, audio=SILENT_FRAME, tts_request_id=tts_request_id),
                     after_ms=0)
    llm = ScriptedLlm(agent)
    speaking: list[str] = []
    timers: dict[str, tuple[str, int]] = {}
    hung_up = False

    async def answer(decisions: list[Decision]) -> None:
        nonlocal hung_up
        queue = deque(decisions)
        while queue:
            action = queue.popleft().action
            match action:
                case CallLlm(request=request):
                    result = await llm.complete(request, timeout_s=5)
                    queue.extend(sim.feed(llm_decided(request, result, llm.name)))
                case RunTool(tool_call_id=tool_call_id, name=name):
                    if name in failing_tools:
                        queue.extend(sim.feed(ToolFailed(tool_call_id=tool_call_id, tool=name, error="unreachable",
                                                         retryable=True, attempt=3, dead_lettered=True, latency_ms=5)))
                    else:
                        result_json = json.dumps({"when": "tomorrow at 10 am", "confirmation": "C123",
                                                  "ticket_id": "T42"})
                        queue.extend(sim.feed(ToolSucceeded(tool_call_id=tool_call_id, tool=name,
                                                            result_json=result_json, attempt=1, latency_ms=5)))
                case Speak(request_id=request_id):
                    speaking.append(request_id)
                case StopSpeaking(request_id=request_id) if request_id in speaking:
                    speaking.remove(request_id)
                    queue.extend(sim.feed(TtsCompleted(request_id=request_id, provider="flite", voice="slt",
                                                       time_to_first_byte_ms=30, audio_ms=400, audio_bytes=3200,
                                                       interrupted=True)))
                case StartTimer(timer_id=timer_id, name=name, due_us=due_us):
                    timers[timer_id] = (name, due_us)
                case CancelTimer(timer_id=timer_id):
                    timers.pop(timer_id, None)
                case Transfer(handoff_id=handoff_id, target=target):
                    queue.extend(sim.feed(HandoffCompleted(handoff_id=handoff_id, target=target,
                                                           outcome=handoff_outcome, detail=None)))
                case Hangup():
                    hung_up = True

    async def finish_speaking() -> None:
        while speaking and not hung_up:
            request_id = speaking.pop(0)
            speech("agent", 1500, request_id)
            await answer(sim.feed(TtsCompleted(request_id=request_id, provider="flite", voice="slt",
                                               time_to_first_byte_ms=30, audio_ms=1500, audio_bytes=12000,
                                               interrupted=False), after_ms=1500))

    await answer(sim.feed(CallStarted(channel="phone", direction="inbound", agent_id=agent.id,
                                      agent_version=agent.version, routed_by="number")))
    await answer(sim.feed(CallAnswered(answered_by=None)))
    for n, step in enumerate(steps):
        if hung_up:
            break
        if step.kind != "barge":
            await finish_speaking()
        if step.kind == "silence":
            until = sim.now_us + int(step.silence_s * 1_000_000)
            while not hung_up:
                due = sorted((due_us, timer_id, name) for timer_id, (name, due_us) in timers.items() if due_us <= until)
                if not due:
                    break
                due_us, timer_id, name = due[0]
                del timers[timer_id]
                sim.now_us = max(sim.now_us, due_us)
                await answer(sim.feed(TimerFired(timer_id=timer_id, name=name, set_by_seq=0, due_us=due_us),
                                      after_ms=0))
                await finish_speaking()
            sim.now_us = max(sim.now_us, until)
            continue
        if step.kind == "press":
            await answer(sim.feed(DtmfReceived(digit=step.text, offset_ms=0)))
            continue
        await answer(sim.feed(SpeechStarted(offset_ms=0)))
        speech("caller", 900)
        await answer(sim.feed(SpeechStopped(offset_ms=900, duration_ms=900), after_ms=900))
        await answer(sim.feed(TranscriptFinal(utterance_id=f"u{n}", text=step.text, confidence=0.9, provider="p",
                                              model="m", start_ms=0, end_ms=900, latency_ms=120)))
    await finish_speaking()
    reason = "agent_hangup" if hung_up else "caller_hangup"
    sim.feed(CallEnded(reason=reason, duration_ms=(sim.now_us - sim.events[0].envelope.event_time_us) // 1000,
                       outcome=outcome(sim.state)))
    return sim
