"""The call session: the hot path of one call, in the process that owns its media socket.

    caller audio -> VAD -> ASR -> core -> LLM -> TTS -> paced agent audio

The session is the call's activity: it ties recognition (`recognition.AudioRecognition`: audio in,
VAD, ASR) and speech out (`speech_out.SpeechOut`: TTS, pacing, playback) to the pure core. Their
tasks and its own run side by side, so no step waits on another's I/O; everything they observe
arrives as an input of the call (`inputs.CallInputs`), which the core task records, puts to
`core.decide`, records the decisions of, and acts on: ask the LLM, speak, stop speaking, run a tool
(with a deadline), transfer, hang up, set and cancel timers; and it keeps the caller's audio only
while their consent allows (`core.keeps_caller_audio`). Every step is an event, appended without
waiting on the log (the producer only blocks when its bounded buffer is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from producers.event_writer import CallRecorder
from schemas.base import Event, EventPayload
from schemas.events import (
    CallAnswered,
    CallEnded,
    DtmfReceived,
    ErrorRaised,
    HandoffCompleted,
    LlmDecided,
    MemoryLoaded,
    TimerFired,
    ToolCallSpec,
    ToolFailed,
    ToolSucceeded,
    TranscriptFinal,
)
from streams.audio.formats import PCM_RATE
from streams.call.core import (
    CORE_PRODUCER,
    Action,
    CallLlm,
    CallState,
    CancelTimer,
    Hangup,
    RunTool,
    Speak,
    StartTimer,
    StopSpeaking,
    Transfer,
    decide,
    keeps_caller_audio,
    new_state,
    outcome,
)
from streams.call.inputs import CallInputs, Ending, Input
from streams.call.recognition import AudioRecognition
from streams.call.speech_out import SpeechOut
from streams.call.transport import InboundCall, MediaTransport, TransportClosed
from streams.config.agents import AgentSpec
from streams.providers.base import AsrProvider, LlmProvider, LlmRequest, LlmResult, ProviderError, TtsProvider
from streams.rate_limit import TokenBucket

log = logging.getLogger(__name__)

BAD_INPUT_RECORDED = 10
"""Malformed frames recorded one by one; after these they are counted, so a broken peer cannot fill the log."""
BAD_INPUT_LIMIT = 1000
"""Malformed frames after which the call is ended (`protocol_error`): nothing sensible is arriving."""
AUDIO_STOP_S = 2.0
"""How long a call's audio task has to finish what it is doing once the call is over."""
AUDIO_AHEAD_LIMIT_US = 2_000_000
"""How far the caller's audio may run ahead of the call's clock. A carrier that delivers a stalled
network's backlog at once stays within it; frames beyond it come faster than anyone speaks (a flood,
which would fill the log and the recording with hours of "audio" in seconds), and are dropped."""
DTMF_PER_S = 10.0
DTMF_BURST = 20
"""Key presses taken a second, and at once: more than a thumb can press; a flood of them is dropped."""


@dataclass(frozen=True)
class Providers:
    asr: AsrProvider
    llm: LlmProvider
    tts: TtsProvider


@dataclass(frozen=True)
class SessionLimits:
    llm_timeout_s: float = 20.0


@dataclass
class TurnLatency:
    """Voice to voice: from the moment the caller's turn was detected as over to the first agent frame."""

    turn_index: int
    end_of_speech_us: int
    first_audio_us: int | None = None

    @property
    def voice_to_voice_ms(self) -> float | None:
        return None if self.first_audio_us is None else (self.first_audio_us - self.end_of_speech_us) / 1000


@dataclass
class SessionReport:
    call_id: str
    end_reason: str = ""
    turns: list[TurnLatency] = field(default_factory=list)


def now_us() -> int:
    return time.time_ns() // 1000


class CallSession:
    """One call's activity. Its channel pushes what it sees (`hear`, `dtmf`, `observe`, `bad_input`) and
    ends it (`closed`, `end_now`, `refused`); `run` runs the call to its `call.ended`."""

    def __init__(
        self,
        call: InboundCall,
        agent: AgentSpec,
        transport: MediaTransport,
        recorder: CallRecorder,
        providers: Providers,
        *,
        tool_replies: asyncio.Queue[Event[EventPayload]] | None = None,
        limits: SessionLimits = SessionLimits(),
        clock_us: Callable[[], int] = now_us,
        memory: MemoryLoaded | None = None,
    ) -> None:
        self.call = call
        self.memory = memory
        """What is remembered of the caller: recorded right after call.started, before the greeting."""
        self.agent = agent
        self.transport = transport
        self.recorder = recorder
        self.providers = providers
        self.limits = limits
        self.clock_us = clock_us
        self.state: CallState = new_state(agent, call.started)
        self.report = SessionReport(call.call_id)
        self._inputs = CallInputs(lambda: self.state.turn_index)
        self._recognition = AudioRecognition(providers.asr, agent.keywords, transport, recorder, self._inputs, clock_us,
                                             vad=agent.vad)
        self._recognition.keep_audio = keeps_caller_audio(self.state)  # opt_in: nothing before a yes
        self._speech = SpeechOut(providers.tts, transport, recorder, self._inputs, self._spawn, self._agent_audio)
        self._tool_replies = tool_replies
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tool_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()
        self._pending_turn: TurnLatency | None = None
        self._hanging_up: asyncio.Task[None] | None = None
        self._bad_inputs = 0
        self._ending = False
        self._heard_us = 0  # the caller's audio taken so far, by its length
        # The floods' guards keep time by a monotonic clock: the wall clock, stepped back by NTP, would have
        # them drop a call's audio and keys, and end it, for no fault of the caller's.
        self._opened_s = time.monotonic()
        self._keys = TokenBucket(DTMF_PER_S, DTMF_BURST, self._opened_s)
        self._start()

    def _start(self) -> None:
        """call.started (with what is remembered of the caller, and the answer) goes first into the
        call's inputs, when the session is made: whatever the channel reports before `run` (the caller
        gone already) and whatever fails after (opening recognition can) comes after it in the log."""
        self._started_us = self.clock_us()
        self._inputs.submit(self.call.started)
        if self.memory is not None:
            self._inputs.submit(self.memory)
        self._inputs.submit(CallAnswered(answered_by=None))

    # -- what channels call -------------------------------------------------------------------
    async def hear(self, pcm16: bytes, raw: bytes, codec: str, sample_rate: int) -> None:
        """One inbound frame: 16 kHz PCM for VAD and ASR, and the bytes as received for the record."""
        if self._ended.is_set():
            return
        heard_us = self._heard_us + len(pcm16) * 500_000 // PCM_RATE  # 2 bytes a sample
        ahead_us = heard_us - int((time.monotonic() - self._opened_s) * 1_000_000)
        if ahead_us > AUDIO_AHEAD_LIMIT_US:
            self.bad_input("session.audio", f"caller audio {ahead_us // 1000} ms ahead of the call's clock: "
                                            f"frame dropped")
            return
        self._heard_us = heard_us
        await self._recognition.hear(pcm16, raw, codec, sample_rate)

    def dtmf(self, digit: str) -> None:
        now_s = time.monotonic()
        if self._keys.delay(now_s) > 0:
            self.bad_input("session.dtmf", f"key {digit[:4]!r} dropped: more than {DTMF_PER_S:g} presses a second")
            return
        self._keys.take(now_s)
        self._inputs.submit(DtmfReceived(digit=digit, offset_ms=self._recognition.offset_ms))

    def bad_input(self, component: str, message: str) -> None:
        """A malformed frame or message from the channel: skipped; the first few recorded, the rest counted,
        and a call that brings nothing else ends."""
        self._bad_inputs += 1
        count = self._bad_inputs
        if count <= BAD_INPUT_RECORDED:
            text = message[:500]
        elif count == BAD_INPUT_RECORDED + 1:
            text = f"more malformed input follows: counted, not recorded one by one ({message[:200]})"
        elif count == BAD_INPUT_LIMIT:
            self.observe(ErrorRaised(component=component, provider=None, kind="bad_input", retryable=False,
                                     fatal=True, message=f"{count} malformed frames: the call is ended"))
            self.end_now("protocol_error", f"{count} malformed frames from {component}")
            return
        else:
            return
        self.observe(ErrorRaised(component=component, provider=None, kind="bad_input", message=text,
                                 retryable=False, fatal=False))

    def observe(self, payload: EventPayload) -> None:
        """Records something the channel saw (a malformed frame, a carrier status) as an input of the call."""
        if not self._ended.is_set():
            self._inputs.submit(payload)

    def closed(self, reason: str) -> None:
        """The far end is gone: the call ends with this reason."""
        self.closed_with(reason)

    @property
    def ending(self) -> bool:
        """Whether the call has been told to end (or has ended)."""
        return self._ending or self._ended.is_set() or self.state.ended

    def end_now(self, reason: str, detail: str) -> None:
        """Ends the call from our side at once (the gateway is shutting down, or cannot record it): the
        caller is hung up now, the call.ended follows in the log as soon as the log takes it."""
        self.closed_with(reason, detail)
        if self._hanging_up is None:
            self._hanging_up = asyncio.create_task(self._hang_up_quietly(), name=f"{self.call.call_id}/end-now")

    async def refused(self, detail: str) -> None:
        """The call is not taken on after all (no capacity, the log away): the caller is hung up, and
        nothing of the call is recorded but its refusal."""
        log.warning("call %s hung up before it started: %s", self.call.call_id, detail)
        self._ended.set()
        self.report.end_reason = "refused"
        await self._hang_up_quietly()

    async def _hang_up_quietly(self) -> None:
        with contextlib.suppress(TransportClosed):
            await self.transport.hangup()

    def closed_with(self, reason: str, detail: str | None = None) -> None:
        """The call ends with this reason (the far end is gone, the gateway is shutting down...); the
        first reason given stands."""
        if not self._ending and not self._ended.is_set() and not self.state.ended:
            self._ending = True
            self._inputs.end(reason, detail, self.clock_us())

    # -- the session --------------------------------------------------------------------------
    async def run(self) -> SessionReport:
        audio = self._spawn(self._recognition.run(self._deaf), "audio")
        replies = self._spawn(self._reply_loop(), "tool-replies") if self._tool_replies is not None else None
        try:
            await self._core_loop()
        finally:
            self._ended.set()
            self._recognition.stop()
            # The audio task ends at the stop it was just given: waited for, not cancelled, so that a chunk
            # it is writing (its seq taken, its send waiting for the topic's metadata) is not lost, leaving
            # a gap in the call's seq. Cancelled only if a recogniser holds it up.
            await asyncio.wait({audio}, timeout=AUDIO_STOP_S)
            tasks = [task for task in (audio, replies, *self._tasks) if task is not None]
            for task in tasks:
                task.cancel()
            await self._speech.close()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):  # a crash was reported as it happened
                    await task
            for handle in [*self._timers.values(), *self._tool_deadlines.values()]:
                handle.cancel()
            if self._hanging_up is not None:
                await asyncio.wait({self._hanging_up}, timeout=5.0)  # a carrier slow to hang up holds nothing up
            await self.recorder.writer.flush()
        return self.report

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=f"{self.call.call_id}/{name}")
        task.add_done_callback(self._crashed)
        return task

    def _crashed(self, task: asyncio.Task[None]) -> None:
        """A task of the call died of a bug: the call ends with the error in the log, rather than
        leaving the caller in silence."""
        if task.cancelled() or task.exception() is None or self._ended.is_set():
            return
        exc = task.exception()
        log.error("call %s: %s failed", self.call.call_id, task.get_name(), exc_info=exc)
        message = f"{task.get_name()}: {type(exc).__name__}: {exc}"[:500]
        self._inputs.submit(ErrorRaised(component="session", provider=None, kind="crashed", message=message,
                                        retryable=False, fatal=True))
        self.end_now("error", message)

    def _deaf(self, detail: str) -> None:
        self.end_now("error", detail)

    def _background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = self._spawn(coroutine, name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- core ---------------------------------------------------------------------------------
    async def _core_loop(self) -> None:
        while True:
            item = await self._inputs.next()
            if isinstance(item, Ending):  # the audio gathered so far goes before the end
                await self._recognition.end_recording()
                await self._speech.end_recording()
                item = Input(self._call_ended(item))
            event = await self.recorder.record(
                item.payload, causation_id=item.causation_id, correlation_id=item.correlation_id
            )
            self._observe(event)
            self.state, decisions = decide(self.state, event)
            # Before the decisions are recorded (no await between): no caller chunk follows a refusal in the log.
            self._recognition.keep_audio = keeps_caller_audio(self.state)
            for decision in decisions:
                recorded = await self.recorder.record(
                    decision.payload, causation_id=event.envelope.event_id, producer=CORE_PRODUCER
                )
                if decision.action is not None:
                    await self._act(decision.action, recorded)
            if isinstance(event.payload, CallEnded):
                self.report.end_reason = event.payload.reason
                return

    def _call_ended(self, ending: Ending) -> CallEnded:
        return CallEnded(reason=ending.reason, duration_ms=(ending.at_us - self._started_us) // 1000,
                         outcome=outcome(self.state), detail=ending.detail)

    def _observe(self, event: Event[EventPayload]) -> None:
        """Per-turn latency bookkeeping, from the session's own clock."""
        if isinstance(event.payload, TranscriptFinal) and event.payload.text.strip() and self._pending_turn is None:
            self._pending_turn = TurnLatency(self.state.turn_index, self._recognition.speech_stopped_us)

    def _agent_audio(self) -> None:
        """A frame of agent audio was played: the first after a turn ends its voice-to-voice latency."""
        if self._pending_turn is not None:
            self._pending_turn.first_audio_us = self.clock_us()
            self.report.turns.append(self._pending_turn)
            self._pending_turn = None

    async def _act(self, action: Action, recorded: Event[EventPayload]) -> None:
        match action:
            case CallLlm():
                self._background(self._ask_llm(action, recorded.envelope.event_id), "llm")
            case Speak():
                self._speech.say(action, recorded.envelope.event_id)
            case StopSpeaking():
                await self._speech.stop()
            case RunTool():
                # The recorded tool.requested is the command; the worker's reply comes back through
                # the replies queue. A deadline keeps a silent worker from stalling the call.
                loop = asyncio.get_running_loop()
                self._tool_deadlines[action.tool_call_id] = loop.call_later(
                    max(0.0, (action.deadline_us - self.clock_us()) / 1e6), self._tool_timed_out, action,
                    self.clock_us()
                )
            case Transfer():
                self._background(self._transfer(action, recorded.envelope.event_id), "transfer")
            case Hangup():
                self._background(self._hang_up(action), "hangup")
            case StartTimer():
                delay = max(0.0, (action.due_us - self.clock_us()) / 1e6)
                self._timers[action.timer_id] = asyncio.get_running_loop().call_later(
                    delay, self._fire, action, recorded.seq
                )
            case CancelTimer():
                handle = self._timers.pop(action.timer_id, None)
                if handle is not None:
                    handle.cancel()

    def _fire(self, timer: StartTimer, set_by_seq: int) -> None:
        self._timers.pop(timer.timer_id, None)
        self._inputs.submit(TimerFired(timer_id=timer.timer_id, name=timer.name, set_by_seq=set_by_seq,
                                       due_us=timer.due_us))

    def _tool_timed_out(self, action: RunTool, asked_us: int) -> None:
        self._tool_deadlines.pop(action.tool_call_id, None)
        self._inputs.submit(
            ToolFailed(
                tool_call_id=action.tool_call_id,
                tool=action.name,
                error="no reply from the tool worker by the tool's deadline",
                retryable=False,
                attempt=0,
                dead_lettered=True,
                latency_ms=(self.clock_us() - asked_us) // 1000,
                failure="deadline",
            )
        )

    async def _reply_loop(self) -> None:
        assert self._tool_replies is not None
        while True:
            reply = await self._tool_replies.get()
            payload = reply.payload
            if isinstance(payload, ToolSucceeded | ToolFailed):
                final = isinstance(payload, ToolSucceeded) or payload.dead_lettered
                if final:
                    handle = self._tool_deadlines.pop(payload.tool_call_id, None)
                    if handle is None:
                        continue  # timed out already, or a duplicate reply
                    handle.cancel()
                self._inputs.submit(payload, causation_id=reply.envelope.event_id)

    async def _ask_llm(self, action: CallLlm, causation_id: str) -> None:
        request = action.request
        llm = self.providers.llm
        started = time.perf_counter()
        try:
            result = await llm.complete(request, timeout_s=self.limits.llm_timeout_s)
        except ProviderError as exc:
            self._inputs.report("llm", exc.report, causation_id)
            self._llm_failed(request, causation_id, started)
            return
        self._inputs.report("llm", result.report, causation_id)
        self._inputs.submit(llm_decided(request, result, llm.name), causation_id=causation_id,
                            correlation_id=request.request_id)

    def _llm_failed(self, request: LlmRequest, causation_id: str, started: float) -> None:
        elapsed = int((time.perf_counter() - started) * 1000)
        self._inputs.submit(llm_failed(request, self.providers.llm.name, elapsed), causation_id=causation_id,
                            correlation_id=request.request_id)

    async def _transfer(self, action: Transfer, causation_id: str) -> None:
        try:
            result, detail = await self.transport.transfer(action.target)
        except TransportClosed as exc:
            result, detail = "failed", str(exc)
        self._inputs.submit(
            HandoffCompleted(handoff_id=action.handoff_id, target=action.target, outcome=result, detail=detail),
            causation_id=causation_id,
        )

    async def _hang_up(self, action: Hangup) -> None:
        handoff = action.reason == "handoff"
        with contextlib.suppress(TransportClosed):
            if handoff:
                await self.transport.detach()  # the caller is with a human now: do not end their call
            else:
                await self.transport.hangup()
        self._inputs.end("handoff" if handoff else "agent_hangup", action.reason, self.clock_us())


def llm_decided(request: LlmRequest, result: LlmResult, llm_name: str) -> LlmDecided:
    """The LLM's answer as the core hears it."""
    return LlmDecided(
        request_id=request.request_id,
        provider=result.provider or llm_name,
        model=result.model,
        text=result.text,
        tool_calls=tuple(
            ToolCallSpec(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in result.tool_calls
        ),
        finish_reason=result.finish_reason,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        time_to_first_token_ms=result.time_to_first_token_ms,
        total_ms=result.total_ms,
    )


def llm_failed(request: LlmRequest, llm_name: str, elapsed_ms: int) -> LlmDecided:
    """No provider answered: an empty decision (`error`), on which the core says the agent's fallback line."""
    return LlmDecided(request_id=request.request_id, provider=llm_name, model=request.model, text="", tool_calls=(),
                      finish_reason="error", input_tokens=0, output_tokens=0, time_to_first_token_ms=elapsed_ms,
                      total_ms=elapsed_ms)
