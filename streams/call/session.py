"""The call session: the hot path of one call, in the process that owns its media socket.

    caller audio -> VAD -> ASR -> core -> LLM -> TTS -> paced agent audio

Three tasks per call, so no step waits on another's I/O: the audio task (records each caller chunk,
runs VAD and recognition), the core task (records each input event, asks the pure core what to do,
records its decisions and starts their actions), and the speech task (synthesises and paces the
agent's audio out in 20 ms frames, recording each frame). Every step is an event, appended without
waiting on the log (the producer only blocks when its bounded buffer is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from producers.events import CallRecorder
from schemas.base import Event, EventPayload
from schemas.events import (
    AgentAudioChunk,
    CallAnswered,
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    DtmfReceived,
    ErrorRaised,
    HandoffCompleted,
    LlmDecided,
    MemoryLoaded,
    ProviderFallback,
    SpeechStarted,
    SpeechStopped,
    TimerFired,
    ToolCallSpec,
    ToolFailed,
    ToolSucceeded,
    TranscriptFinal,
    TranscriptInterim,
    TtsCompleted,
    Word,
)
from streams.audio.vad import Vad
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
    new_state,
)
from streams.call.transport import InboundCall, MediaTransport, TransportClosed
from streams.config.agents import AgentSpec
from streams.providers.base import (
    PCM_RATE,
    AsrProvider,
    AsrStream,
    LlmProvider,
    LlmRequest,
    ProviderError,
    ProviderFailure,
    ProviderSwitch,
    Recognition,
    TtsProvider,
    close_chunks,
)
from streams.providers.resilience import ChainExhausted

log = logging.getLogger(__name__)

FRAME_MS = 20
FRAME_BYTES = PCM_RATE * 2 * FRAME_MS // 1000  # 640: 20 ms of 16 kHz 16-bit mono
PREROLL_FRAMES = 15  # 300 ms before the VAD's confirmation go to the recogniser with the speech
BAD_INPUT_RECORDED = 10
"""Malformed frames recorded one by one; after these they are counted, so a broken peer cannot fill the log."""
BAD_INPUT_LIMIT = 1000
"""Malformed frames after which the call is ended (`protocol_error`): nothing sensible is arriving."""


@dataclass(frozen=True)
class Providers:
    asr: AsrProvider
    llm: LlmProvider
    tts: TtsProvider


@dataclass(frozen=True)
class SessionLimits:
    llm_timeout_s: float = 20.0
    tts_timeout_s: float = 20.0
    tool_timeout_s: float = 30.0


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
class _Input:
    payload: EventPayload
    causation_id: str | None = None
    correlation_id: str | None = None


@dataclass
class SessionReport:
    call_id: str
    end_reason: str = ""
    turns: list[TurnLatency] = field(default_factory=list)


def now_us() -> int:
    return time.time_ns() // 1000


class CallSession:
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
        self.state: CallState = new_state(agent)
        self.report = SessionReport(call.call_id)
        self._inputs: asyncio.Queue[_Input | None] = asyncio.Queue()
        self._audio: asyncio.Queue[tuple[bytes, bytes, str, int] | None] = asyncio.Queue(maxsize=500)
        self._tool_replies = tool_replies
        self._vad = Vad()
        # The VAD confirms speech only after it has lasted a while; recognition needs that start too.
        self._preroll: deque[bytes] = deque(maxlen=PREROLL_FRAMES)
        self._asr: AsrStream | None = None
        # The recogniser hears only speech, so its clock runs behind the call's; this maps one to the other.
        self._asr_fed_ms = 0
        self._asr_shift_ms = 0
        self._caller_chunks = 0
        self._agent_chunks = 0
        self._utterances = 0
        self._speech: asyncio.Task[None] | None = None
        self._speaking_id: str | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()
        self._pending_turn: TurnLatency | None = None
        self._last_speech_stop_us = 0
        self._tool_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._hanging_up: asyncio.Task[None] | None = None
        self._bad_inputs = 0
        self._ending = False
        self._start()

    def _start(self) -> None:
        """call.started (with what is remembered of the caller, and the answer) goes first into the
        call's inputs, when the session is made: whatever the channel reports before `run` (the caller
        gone already) and whatever fails after (opening recognition can) comes after it in the log."""
        self._started_us = self.clock_us()
        call = self.call
        self._submit(CallStarted(channel=call.channel, direction=call.direction, agent_id=self.agent.id,
                                 agent_version=self.agent.version, from_number=call.from_number,
                                 to_number=call.to_number, provider_call_id=call.provider_call_id,
                                 routed_by=call.routed_by, parameters=dict(call.parameters)))
        if self.memory is not None:
            self._submit(self.memory)
        self._submit(CallAnswered(answered_by=None))

    # -- what channels call -------------------------------------------------------------------
    async def hear(self, pcm16: bytes, raw: bytes, codec: str, sample_rate: int) -> None:
        """One inbound frame: 16 kHz PCM for VAD and ASR, and the bytes as received for the record."""
        if self._ended.is_set():
            return
        await self._audio.put((pcm16, raw, codec, sample_rate))

    def dtmf(self, digit: str) -> None:
        self._submit(DtmfReceived(digit=digit, offset_ms=self._caller_chunks * FRAME_MS))

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
            self._submit(payload)

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
            self._submit(self._ended_payload(reason, detail))

    # -- the session --------------------------------------------------------------------------
    async def run(self) -> SessionReport:
        audio = self._spawn(self._audio_loop(), "audio")
        replies = self._spawn(self._reply_loop(), "tool-replies") if self._tool_replies is not None else None
        try:
            await self._core_loop()
        finally:
            self._ended.set()
            while not self._audio.empty():  # a channel blocked on a full queue (a dead audio task) goes on
                self._audio.get_nowait()
            self._audio.put_nowait(None)
            for task in [audio, replies, self._speech, *self._tasks]:
                if task is not None and not task.done():
                    task.cancel()
            for task in [audio, replies, self._speech, *self._tasks]:
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            for handle in [*self._timers.values(), *self._tool_deadlines.values()]:
                handle.cancel()
            if self._asr is not None:
                await self._asr.close()
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
        self._submit(ErrorRaised(component="session", provider=None, kind="crashed", message=message,
                                 retryable=False, fatal=True))
        self.end_now("error", message)

    def _background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = self._spawn(coroutine, name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _submit(
        self, payload: EventPayload, *, causation_id: str | None = None, correlation_id: str | None = None
    ) -> None:
        self._inputs.put_nowait(_Input(payload, causation_id, correlation_id))

    def _ended_payload(self, reason: str, detail: str | None = None) -> CallEnded:
        names = set(self.state.tool_names.values())
        if self.state.handoff_id is not None:
            outcome = "handed_off"
        elif "book_appointment" in names:
            outcome = "booked"
        elif "create_ticket" in names:
            outcome = "ticket_created"
        elif self.state.turn_index == 0:
            outcome = "abandoned"
        else:
            outcome = "resolved"
        return CallEnded(
            reason=reason, duration_ms=(self.clock_us() - self._started_us) // 1000, outcome=outcome, detail=detail
        )

    # -- core ---------------------------------------------------------------------------------
    async def _core_loop(self) -> None:
        while True:
            item = await self._inputs.get()
            if item is None:
                return
            event = await self.recorder.record(
                item.payload, causation_id=item.causation_id, correlation_id=item.correlation_id
            )
            self._observe(event)
            self.state, decisions = decide(self.state, event)
            for decision in decisions:
                recorded = await self.recorder.record(
                    decision.payload, causation_id=event.envelope.event_id, producer=CORE_PRODUCER
                )
                if decision.action is not None:
                    await self._act(decision.action, recorded)
            if isinstance(event.payload, CallEnded):
                self.report.end_reason = event.payload.reason
                return

    def _observe(self, event: Event[EventPayload]) -> None:
        """Per-turn latency bookkeeping, from the session's own clock."""
        if isinstance(event.payload, TranscriptFinal) and event.payload.text.strip() and self._pending_turn is None:
            self._pending_turn = TurnLatency(self.state.turn_index, self._last_speech_stop_us)

    async def _act(self, action: Action, recorded: Event[EventPayload]) -> None:
        match action:
            case CallLlm():
                self._background(self._ask_llm(action, recorded.envelope.event_id), "llm")
            case Speak():
                # After what is being said, not over it ("let me check that" and then the answer);
                # a barge-in (StopSpeaking) stops both.
                before = self._speech if self._speech is not None and not self._speech.done() else None
                self._speaking_id = action.request_id
                self._speech = self._spawn(self._speak(action, recorded.envelope.event_id, before), "speech")
            case StopSpeaking():
                if self._speech is not None and not self._speech.done():
                    self._speech.cancel()
                with contextlib.suppress(TransportClosed):
                    await self.transport.clear()
            case RunTool():
                # The recorded tool.requested is the command; the worker's reply comes back through
                # the replies queue. A deadline keeps a silent worker from stalling the call.
                loop = asyncio.get_running_loop()
                self._tool_deadlines[action.tool_call_id] = loop.call_later(
                    self.limits.tool_timeout_s, self._tool_timed_out, action
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
        self._submit(TimerFired(timer_id=timer.timer_id, name=timer.name, set_by_seq=set_by_seq, due_us=timer.due_us))

    def _tool_timed_out(self, action: RunTool) -> None:
        self._tool_deadlines.pop(action.tool_call_id, None)
        self._submit(
            ToolFailed(
                tool_call_id=action.tool_call_id,
                tool=action.name,
                error="no reply from the tool worker",
                retryable=False,
                attempt=0,
                dead_lettered=True,
                latency_ms=int(self.limits.tool_timeout_s * 1000),
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
                self._submit(payload, causation_id=reply.envelope.event_id)

    async def _ask_llm(self, action: CallLlm, causation_id: str) -> None:
        request = action.request
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.providers.llm.complete(request), self.limits.llm_timeout_s)
        except ChainExhausted as exc:
            self._record_attempts("llm", exc.report.failures, exc.report.fallbacks, self.state.turn_index, causation_id)
            self._llm_failed(request, causation_id, started)
            return
        except (TimeoutError, ProviderError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else getattr(exc, "kind", "error")
            failure = ProviderFailure(self.providers.llm.name, kind, str(exc), True)
            self._record_attempts("llm", (failure,), (), self.state.turn_index, causation_id)
            self._llm_failed(request, causation_id, started)
            return
        self._record_attempts("llm", result.failures, result.fallbacks, self.state.turn_index, causation_id)
        self._submit(
            LlmDecided(
                request_id=request.request_id,
                provider=result.provider or self.providers.llm.name,
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
            ),
            causation_id=causation_id,
            correlation_id=request.request_id,
        )

    def _record_attempts(self, component: str, failures: Sequence[ProviderFailure],
                         fallbacks: Sequence[ProviderSwitch], turn_index: int, causation_id: str | None = None) -> None:
        """What a provider chain went through: an error per failed attempt, a fallback per switch."""
        for failure in failures:
            self._submit(ErrorRaised(component=component, provider=failure.provider, kind=failure.kind,
                                     message=failure.message[:500], retryable=failure.retryable, fatal=False),
                         causation_id=causation_id)
        for switch in fallbacks:
            self._submit(ProviderFallback(capability=component, from_provider=switch.from_provider,
                                          to_provider=switch.to_provider, reason=switch.reason,
                                          turn_index=turn_index),
                         causation_id=causation_id)

    def _llm_failed(self, request: LlmRequest, causation_id: str, started: float) -> None:
        """No provider answered: an empty decision (`error`), on which the core says the agent's fallback line."""
        elapsed = int((time.perf_counter() - started) * 1000)
        self._submit(
            LlmDecided(
                request_id=request.request_id,
                provider=self.providers.llm.name,
                model=request.model,
                text="",
                tool_calls=(),
                finish_reason="error",
                input_tokens=0,
                output_tokens=0,
                time_to_first_token_ms=elapsed,
                total_ms=elapsed,
            ),
            causation_id=causation_id,
            correlation_id=request.request_id,
        )

    async def _transfer(self, action: Transfer, causation_id: str) -> None:
        try:
            outcome, detail = await self.transport.transfer(action.target)
        except TransportClosed as exc:
            outcome, detail = "failed", str(exc)
        self._submit(
            HandoffCompleted(handoff_id=action.handoff_id, target=action.target, outcome=outcome, detail=detail),
            causation_id=causation_id,
        )

    async def _hang_up(self, action: Hangup) -> None:
        with contextlib.suppress(TransportClosed):
            if action.reason == "handoff":
                await self.transport.detach()  # the caller is with a human now: do not end their call
            else:
                await self.transport.hangup()
        self._submit(self._ended_payload("handoff" if action.reason == "handoff" else "agent_hangup", action.reason))

    # -- speech out ---------------------------------------------------------------------------
    async def _speak(self, action: Speak, causation_id: str, before: asyncio.Task[None] | None = None) -> None:
        """Says `action`'s text once `before` (the speech in progress) is over; cancelled, it cancels
        `before` too, and records every speech it ends as interrupted."""
        if before is not None:
            try:
                await asyncio.wait({before})  # not `await before`: a speech that ends interrupted returns
            except asyncio.CancelledError:
                before.cancel()
                self._submit(TtsCompleted(request_id=action.request_id, provider=self.providers.tts.name,
                                          voice=action.voice, time_to_first_byte_ms=0, audio_ms=0, audio_bytes=0,
                                          interrupted=True), causation_id=causation_id)
                raise
        codec, rate = self.transport.speech_codec, self.transport.speech_rate
        speech = self.providers.tts.speak(action.text, voice=action.voice, sample_rate=rate, codec=codec)
        frame_bytes = rate * FRAME_MS // 1000 * (1 if codec == "mulaw" else 2)
        silence = b"\xff" if codec == "mulaw" else b"\0"
        requested = time.perf_counter()
        first_byte_ms = 0
        frames_sent = 0
        interrupted = False
        pending = b""
        loop = asyncio.get_running_loop()
        start = 0.0
        await self._show("agent", action.text, final=True)
        try:
            async for chunk in speech.chunks:
                if not first_byte_ms:
                    first_byte_ms = int((time.perf_counter() - requested) * 1000)
                    start = loop.time()
                pending += chunk
                while len(pending) >= frame_bytes:
                    frame, pending = pending[:frame_bytes], pending[frame_bytes:]
                    await self._play(frame, action.request_id, start + frames_sent * FRAME_MS / 1000)
                    frames_sent += 1
            if pending:
                await self._play(
                    pending.ljust(frame_bytes, silence), action.request_id, start + frames_sent * FRAME_MS / 1000
                )
                frames_sent += 1
            await self.transport.mark(action.request_id)
        except asyncio.CancelledError:
            interrupted = True
        except ProviderError as exc:
            if not isinstance(exc, ChainExhausted):  # a chain's failures are in its report
                self._record_attempts("tts", [ProviderFailure(speech.provider, exc.kind, str(exc), exc.retryable)],
                                      (), self.state.turn_index, causation_id)
        except TransportClosed as exc:
            self._submit(ErrorRaised(component="transport", provider=self.call.channel, kind="closed",
                                     message=str(exc), retryable=False, fatal=False), causation_id=causation_id)
        finally:
            await close_chunks(speech.chunks)
            self._record_attempts("tts", speech.report.failures, speech.report.fallbacks, self.state.turn_index,
                                  causation_id)
            self._submit(
                TtsCompleted(
                    request_id=action.request_id,
                    provider=speech.provider,
                    voice=speech.voice or action.voice,
                    time_to_first_byte_ms=first_byte_ms,
                    audio_ms=frames_sent * FRAME_MS,
                    audio_bytes=frames_sent * frame_bytes,
                    interrupted=interrupted,
                ),
                causation_id=causation_id,
            )

    async def _play(self, frame: bytes, request_id: str, due: float) -> None:
        """Sends one frame when its time comes (real-time pacing) and records it."""
        delay = due - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.transport.play_speech(frame)
        if self._pending_turn is not None and self._pending_turn.first_audio_us is None:
            self._pending_turn.first_audio_us = self.clock_us()
            self.report.turns.append(self._pending_turn)
            self._pending_turn = None
        await self.recorder.record(
            AgentAudioChunk(
                codec=self.transport.speech_codec,
                sample_rate=self.transport.speech_rate,
                chunk_index=self._agent_chunks,
                offset_ms=self._agent_chunks * FRAME_MS,
                duration_ms=FRAME_MS,
                audio=frame,
                tts_request_id=request_id,
            )
        )
        self._agent_chunks += 1

    # -- audio in -----------------------------------------------------------------------------
    async def _audio_loop(self) -> None:
        try:
            self._asr = await self.providers.asr.open_stream(keywords=self.agent.keywords)
        except ProviderError as exc:  # every recogniser of the chain: the call has no ears
            self._asr_failed(exc)
            self.end_now("error", f"speech recognition unavailable: {exc}"[:500])
            return
        while True:
            item = await self._audio.get()
            if item is None:
                return
            pcm16, raw, codec, rate = item
            offset_ms = self._caller_chunks * FRAME_MS
            await self.recorder.record(
                CallerAudioChunk(
                    codec="mulaw" if codec == "mulaw" else "pcm_s16le",
                    sample_rate=rate,
                    chunk_index=self._caller_chunks,
                    offset_ms=offset_ms,
                    duration_ms=FRAME_MS,
                    audio=raw,
                )
            )
            self._caller_chunks += 1
            assert self._asr is not None
            self._preroll.append(pcm16)
            for vad_event in self._vad.process(pcm16):
                if vad_event.kind == "speech_started":
                    self._submit(SpeechStarted(offset_ms=vad_event.offset_ms))
                    earlier = list(self._preroll)[:-1]
                    self._asr_shift_ms = offset_ms - len(earlier) * FRAME_MS - self._asr_fed_ms
                    for frame in earlier:
                        await self._feed(frame)
                else:
                    self._last_speech_stop_us = self.clock_us()
                    self._submit(SpeechStopped(offset_ms=vad_event.offset_ms, duration_ms=vad_event.duration_ms))
                    await self._finish_utterance()
            if self._vad.in_speech:
                interim = await self._feed(pcm16)
                if interim is not None and interim.text:
                    await self.recorder.record(
                        TranscriptInterim(
                            utterance_id=f"u{self._utterances}",
                            text=interim.text,
                            confidence=interim.confidence,
                            provider=interim.provider or self.providers.asr.name,
                            model=interim.model or self.providers.asr.model,
                            start_ms=interim.start_ms + self._asr_shift_ms,
                            end_ms=interim.end_ms + self._asr_shift_ms,
                        )
                    )
                    await self._show("caller", interim.text, final=False)

    async def _feed(self, pcm16: bytes) -> Recognition | None:
        assert self._asr is not None
        self._asr_fed_ms += FRAME_MS
        try:
            return await self._asr.accept(pcm16)
        except ProviderError as exc:
            self._asr_failed(exc)  # the utterance's end tries again (a chain: from its first provider)
            return None

    async def _finish_utterance(self) -> None:
        assert self._asr is not None
        stopped = time.perf_counter()
        try:
            result = await self._asr.end_utterance()
        except ProviderError as exc:
            self._asr_failed(exc)
            return
        self._record_attempts("asr", result.failures, result.fallbacks, self.state.turn_index)
        utterance_id = f"u{self._utterances}"
        self._utterances += 1
        shift = self._asr_shift_ms
        self._submit(
            TranscriptFinal(
                utterance_id=utterance_id,
                text=result.text,
                confidence=result.confidence,
                words=tuple(
                    Word(word=w.word, start_ms=w.start_ms + shift, end_ms=w.end_ms + shift, confidence=w.confidence)
                    for w in result.words
                ),
                provider=result.provider or self.providers.asr.name,
                model=result.model or self.providers.asr.model,
                language="en-US",
                start_ms=result.start_ms + shift,
                end_ms=result.end_ms + shift,
                latency_ms=int((time.perf_counter() - stopped) * 1000),
            )
        )
        if result.text:
            await self._show("caller", result.text, final=True)

    def _asr_failed(self, exc: ProviderError) -> None:
        """Recognition failed: what the chain went through, or the one provider's error."""
        if isinstance(exc, ChainExhausted):
            self._record_attempts("asr", exc.report.failures, exc.report.fallbacks, self.state.turn_index)
        else:
            failure = ProviderFailure(self.providers.asr.name, exc.kind, str(exc), exc.retryable)
            self._record_attempts("asr", [failure], (), self.state.turn_index)

    async def _show(self, speaker: str, text: str, *, final: bool) -> None:
        with contextlib.suppress(TransportClosed):
            await self.transport.send_transcript("caller" if speaker == "caller" else "agent", text, final)
