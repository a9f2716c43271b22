"""Prometheus metrics, from the events a process records: latency per turn, per provider, per agent
and prompt version; errors, fallbacks, tool calls, calls. `GET /metrics` serves them.

The fold reads only the events (never the clock), so what a metric says is what the log says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.base import Event, EventPayload
from schemas.events import (
    BargeIn,
    CallEnded,
    CallRefused,
    CallStarted,
    ErrorRaised,
    LlmDecided,
    LlmRequested,
    ProviderFallback,
    SpeechStopped,
    ToolFailed,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
)

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Seconds: voice agents live between 200 ms and 2 s."""
MAX_CALLS_TRACKED = 10_000


def voice_to_voice_ms(speech_end_us: int, tts_requested_us: int, first_byte_ms: int) -> float:
    """From the end of the caller's speech (speech.stopped) to the agent's first audio byte (the
    turn's first tts.requested plus its time to first byte), from event times alone."""
    return (tts_requested_us - speech_end_us) / 1000 + first_byte_ms


@dataclass
class _Call:
    agent: str
    prompt_hash: str = ""
    speech_stopped_us: int | None = None
    turn_first_tts: str | None = None
    turn_speech_end_us: int | None = None
    tts_requested_us: dict[str, int] = field(default_factory=dict)
    llm_model: dict[str, tuple[str, str]] = field(default_factory=dict)


class CallMetrics:
    """The metric families, in a registry of their own (`registry`), and the fold that fills them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("voxlog_calls", "Calls started.", ["tenant", "agent", "channel", "direction"], registry=r)
        self.calls_ended = Counter("voxlog_calls_ended", "Calls ended.", ["tenant", "agent", "reason", "outcome"],
                                   registry=r)
        self.live = Gauge("voxlog_calls_live", "Calls in progress.", ["tenant", "agent"], registry=r)
        self.refused = Counter("voxlog_calls_refused", "Calls refused by admission control (the caller heard busy).",
                               ["tenant", "agent", "reason"], registry=r)
        self.turns = Counter("voxlog_turns", "Caller turns.", ["agent", "prompt_hash"], registry=r)
        self.voice_to_voice = Histogram(
            "voxlog_voice_to_voice_seconds", "End of the caller's speech to the agent's first audio byte.",
            ["agent", "prompt_hash"], buckets=LATENCY_BUCKETS, registry=r)
        self.asr = Histogram("voxlog_asr_final_latency_seconds", "Final transcript latency.", ["provider", "model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.llm_first_token = Histogram("voxlog_llm_first_token_seconds", "LLM time to first token.",
                                         ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.llm_total = Histogram("voxlog_llm_total_seconds", "LLM request, start to finish.", ["provider", "model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.llm_tokens = Counter("voxlog_llm_tokens", "Tokens.", ["provider", "model", "direction"], registry=r)
        self.tts_first_byte = Histogram("voxlog_tts_first_byte_seconds", "TTS time to first audio byte.",
                                        ["provider", "voice"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("voxlog_errors", "Errors recorded.", ["component", "provider", "kind"], registry=r)
        self.fallbacks = Counter("voxlog_provider_fallbacks", "Switches to the next provider of a chain.",
                                 ["capability", "from_provider", "to_provider"], registry=r)
        self.tool_calls = Counter("voxlog_tool_calls", "Tool call results.", ["tool", "outcome"], registry=r)
        self.tool_latency = Histogram("voxlog_tool_latency_seconds", "Tool worker time per attempt.", ["tool"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.barge_ins = Counter("voxlog_barge_ins", "Callers speaking over the agent.", ["agent"], registry=r)
        self._calls: dict[str, _Call] = {}

    def observe(self, event: Event[EventPayload]) -> None:
        if event.type.startswith("audio."):
            return  # most of a call, and no metric's business: keep the hot path cheap
        p, now = event.payload, event.envelope.event_time_us
        if isinstance(p, CallStarted):
            if len(self._calls) >= MAX_CALLS_TRACKED:
                self._calls.pop(next(iter(self._calls)))
            self._calls[event.call_id] = _Call(p.agent_id)
            self.calls.labels(event.tenant_id, p.agent_id, p.channel, p.direction).inc()
            self.live.labels(event.tenant_id, p.agent_id).inc()
            return
        if isinstance(p, CallRefused):
            self.refused.labels(event.tenant_id, p.agent_id, p.reason).inc()
            return
        call = self._calls.get(event.call_id)
        if call is None:
            return  # not a call this process started (a dial, a memory stream, an audit record)
        match p:
            case SpeechStopped():
                call.speech_stopped_us = now
            case TurnTaken():
                self.turns.labels(call.agent, call.prompt_hash).inc()
                call.turn_first_tts, call.turn_speech_end_us = None, call.speech_stopped_us or now
            case TranscriptFinal():
                self.asr.labels(p.provider, p.model).observe(p.latency_ms / 1000)
            case LlmRequested():
                call.prompt_hash = p.prompt_hash
                call.llm_model[p.request_id] = (p.provider, p.model)
            case LlmDecided():
                self.llm_first_token.labels(p.provider, p.model).observe(p.time_to_first_token_ms / 1000)
                self.llm_total.labels(p.provider, p.model).observe(p.total_ms / 1000)
                self.llm_tokens.labels(p.provider, p.model, "input").inc(p.input_tokens)
                self.llm_tokens.labels(p.provider, p.model, "output").inc(p.output_tokens)
            case TtsRequested():
                call.tts_requested_us[p.request_id] = now
                if call.turn_first_tts is None and call.turn_speech_end_us is not None:
                    call.turn_first_tts = p.request_id
            case TtsCompleted():
                if p.audio_ms:  # a speech cut before its first byte has no time to it
                    self.tts_first_byte.labels(p.provider, p.voice).observe(p.time_to_first_byte_ms / 1000)
                requested = call.tts_requested_us.pop(p.request_id, None)
                if p.request_id == call.turn_first_tts and requested is not None and call.turn_speech_end_us:
                    ms = voice_to_voice_ms(call.turn_speech_end_us, requested, p.time_to_first_byte_ms)
                    self.voice_to_voice.labels(call.agent, call.prompt_hash).observe(ms / 1000)
                    call.turn_speech_end_us = None
            case ErrorRaised():
                self.errors.labels(p.component, p.provider or "", p.kind).inc()
            case ProviderFallback():
                self.fallbacks.labels(p.capability, p.from_provider, p.to_provider).inc()
            case ToolSucceeded():
                self.tool_calls.labels(p.tool, "succeeded").inc()
                self.tool_latency.labels(p.tool).observe(p.latency_ms / 1000)
            case ToolFailed():
                self.tool_calls.labels(p.tool, "failed" if p.dead_lettered or not p.retryable else "retried").inc()
                self.tool_latency.labels(p.tool).observe(p.latency_ms / 1000)
            case BargeIn():
                self.barge_ins.labels(call.agent).inc()
            case CallEnded():
                self.calls_ended.labels(event.tenant_id, call.agent, p.reason, p.outcome or "").inc()
                self.live.labels(event.tenant_id, call.agent).dec()
                del self._calls[event.call_id]
