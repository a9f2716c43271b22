"""What-if replay: a recorded call's inputs through another agent definition, compared turn by turn.

The caller's events (what was said, keys pressed, hang-ups, the call's start and memory) are fed to
the core as recorded. What the world answered the core (LLM decisions, tool results, the end of
speech, timers, a transfer's outcome) depends on what the core asked, so a small world stands in:

- an LLM answer is reused only for a request identical to the recorded one; otherwise the LLM given
  (the new model when its key is set, else the offline policy) answers it, and the turn says which;
- a tool's result is reused only for the same tool with the same arguments; otherwise the tool is
  never run (a what-if has no side effects): the core hears that it failed, and the turn says the
  tool would have been called;
- speech ends, timers fire and transfers complete where they did in the recording when the new core
  asked for the same thing; speech the recording never had ends at once, a timer it never had fires
  when the recorded clock passes it, and a transfer it never had stops the what-if (its outcome is
  unknowable).

The caller's later words were said to the old agent: turns after the first difference are marked so.
With the agent that took the call, every answer is the recorded one and nothing changes.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import (
    CallEnded,
    CallHangupRequested,
    CallStarted,
    GuardrailTriggered,
    HandoffCompleted,
    HandoffRequested,
    LlmDecided,
    LlmRequested,
    TimerFired,
    TimerSet,
    ToolFailed,
    ToolRequested,
    ToolSucceeded,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
)
from streams.call.core import (
    CORE_PRODUCER,
    CallLlm,
    CallState,
    CancelTimer,
    Decision,
    RunTool,
    Speak,
    StartTimer,
    Transfer,
    decide,
    new_state,
)
from streams.call.session import llm_decided, llm_failed
from streams.config.agents import AgentSpec
from streams.providers.base import LlmProvider, LlmRequest, ProviderError
from streams.redaction import default_redactor, redact_field

ActKind = Literal["say", "tool", "handoff", "hangup", "guardrail"]
RECORDED_ANSWER = "recorded answer"
SCRIPTED = "offline-scripted"
ASK = "(ask)"  # an LlmDecided's finish_reason: the LLM is to answer now, there is no recorded answer
NOT_RUN = "not run: a what-if never runs tools"
MAX_STEPS_PER_INPUT = 200
"""Answers the world gives in a row without a recorded input between: an agent that loops on itself
(a tool that always fails, retried by the LLM for ever) is stopped, and the report says so."""


@dataclass(frozen=True, slots=True)
class Act:
    """What the agent did that a caller or a system would notice."""

    kind: ActKind
    text: str = ""
    tool: str = ""
    arguments: str = ""
    target: str = ""
    reason: str = ""

    def describe(self) -> str:
        match self.kind:
            case "say":
                return f'say "{self.text}"'
            case "tool":
                return f"call {self.tool}({self.arguments})"
            case "handoff":
                return f"transfer to {self.target} ({self.reason})"
            case "hangup":
                return f"hang up ({self.reason})"
        return f"guardrail {self.reason}: {self.text}"


def act_of(payload: EventPayload) -> Act | None:
    match payload:
        case TtsRequested():
            return Act("say", text=payload.text)
        case ToolRequested():
            return Act("tool", tool=payload.tool, arguments=payload.arguments_json)
        case HandoffRequested():
            return Act("handoff", target=payload.target, reason=payload.reason)
        case CallHangupRequested():
            return Act("hangup", reason=payload.reason)
        case GuardrailTriggered():
            rule = f"{payload.stage} {payload.rule} -> {payload.action}"
            return Act("guardrail", text=payload.detail or "", reason=rule)
    return None


@dataclass
class _TurnLog:
    """One side's decisions cut into turns: turn 0 is the opening, turn k starts at `turn.taken` k-1."""

    callers: list[str] = field(default_factory=lambda: [""])
    acts: list[list[Act]] = field(default_factory=lambda: [[]])

    def add(self, payload: EventPayload) -> None:
        if isinstance(payload, TurnTaken):
            index = payload.turn_index + 1
            while len(self.acts) <= index:
                self.callers.append("")
                self.acts.append([])
            self.callers[index] = payload.caller_text
            return
        act = act_of(payload)
        if act is not None:
            self.acts[-1].append(act)

    @property
    def current(self) -> int:
        return len(self.acts) - 1


@dataclass(frozen=True)
class AgentRef:
    id: str
    version: str


@dataclass(frozen=True)
class TurnComparison:
    index: int
    caller: str
    then: tuple[Act, ...]
    now: tuple[Act, ...]
    after_difference: bool
    answered_by: str
    """Who answered the new agent's LLM requests in this turn: the recorded answer, the LLM given, or none."""
    notes: tuple[str, ...] = ()

    @property
    def same(self) -> bool:
        return self.then == self.now


@dataclass(frozen=True)
class WhatIfResult:
    call_id: str
    agent_then: AgentRef
    agent_now: AgentRef
    turns: tuple[TurnComparison, ...]
    llm: str
    """What answered a request that was not the recorded one."""
    problem: str | None = None
    """Why the call could not be compared (erased, no call.started): it then counts as neither."""

    @property
    def first_difference(self) -> int | None:
        return next((turn.index for turn in self.turns if not turn.same), None)

    @property
    def changed(self) -> bool:
        return self.problem is None and self.first_difference is not None

    @property
    def summary(self) -> str:
        if self.problem is not None:
            return f"not compared: {self.problem}"
        first = self.first_difference
        if first is None:
            return f"unchanged over {len(self.turns)} turns"
        changed = sum(1 for turn in self.turns if not turn.same)
        return f"changed from turn {first}: {changed} of {len(self.turns)} turns differ"

    def redacted(self) -> WhatIfResult:
        """Its text and tool arguments PII-redacted as ClickHouse holds them."""
        def acts(items: Iterable[Act]) -> tuple[Act, ...]:
            return tuple(replace(a, text=_redacted_text(a.text), arguments=_redacted_json(a.arguments)) for a in items)

        turns = tuple(replace(t, caller=_redacted_text(t.caller), then=acts(t.then), now=acts(t.now),
                              notes=tuple(_redacted_text(n) for n in t.notes)) for t in self.turns)
        return replace(self, turns=turns)

    def as_dict(self, *, redact: bool) -> dict[str, Any]:
        """JSON-able; `redact`: as `redacted()`."""
        if redact:
            return self.redacted().as_dict(redact=False)

        def acts(items: Iterable[Act]) -> list[dict[str, str]]:
            return [{"kind": a.kind, "text": a.text, "tool": a.tool, "arguments": a.arguments, "target": a.target,
                     "reason": a.reason} for a in items]

        return {
            "call_id": self.call_id,
            "agent_then": {"id": self.agent_then.id, "version": self.agent_then.version},
            "agent_now": {"id": self.agent_now.id, "version": self.agent_now.version},
            "changed": self.changed,
            "first_difference": self.first_difference,
            "summary": self.summary,
            "llm": self.llm,
            "problem": self.problem,
            "turns": [
                {"index": t.index, "caller": t.caller, "then": acts(t.then), "now": acts(t.now), "same": t.same,
                 "after_difference": t.after_difference, "answered_by": t.answered_by, "notes": list(t.notes)}
                for t in self.turns
            ],
        }


def _redacted_text(value: str) -> str:
    return default_redactor().redact(value) if value else value


def _redacted_json(value: str) -> str:
    return (redact_field("json", value, default_redactor()) or "") if value else value


@dataclass
class _RecordedTool:
    tool_call_id: str
    tool: str
    arguments_json: str
    position: int = -1
    """Where its last word was recorded; -1: the call ended before it had one."""
    result: ToolSucceeded | ToolFailed | None = None


def _final(payload: ToolSucceeded | ToolFailed) -> bool:
    return isinstance(payload, ToolSucceeded) or payload.dead_lettered


class _Recording:
    """What the world answered in the recorded call, and where."""

    def __init__(self, events: Sequence[Event[EventPayload]]) -> None:
        self.decisions: list[EventPayload] = []
        self.turns = _TurnLog()
        # What the core asked, by id, with where the world's answer was recorded (-1: never).
        self.llm_answers: dict[str, int] = {}
        self.speech: dict[str, int] = {}
        self.timers_set: dict[str, tuple[str, int]] = {}
        self.handoffs: dict[str, tuple[int, str]] = {}
        self.tools: dict[str, _RecordedTool] = {}
        for position, event in enumerate(events):
            p = event.payload
            if event.envelope.producer == CORE_PRODUCER:
                self.decisions.append(p)
                self.turns.add(p)
                match p:
                    case ToolRequested():
                        self.tools[p.tool_call_id] = _RecordedTool(p.tool_call_id, p.tool, p.arguments_json)
                    case LlmRequested():
                        self.llm_answers[p.request_id] = -1
                    case TtsRequested():
                        self.speech[p.request_id] = -1
                    case TimerSet():
                        self.timers_set[p.timer_id] = (p.name, p.due_us)
                    case HandoffRequested():
                        self.handoffs[p.handoff_id] = (-1, p.target)
                continue
            match p:
                case LlmDecided() if self.llm_answers.get(p.request_id) == -1:
                    self.llm_answers[p.request_id] = position
                case TtsCompleted() if self.speech.get(p.request_id) == -1:
                    self.speech[p.request_id] = position
                case ToolSucceeded() | ToolFailed() if _final(p) and p.tool_call_id in self.tools:
                    tool = self.tools[p.tool_call_id]
                    if tool.result is None:
                        tool.position, tool.result = position, p
                case HandoffCompleted() if self.handoffs.get(p.handoff_id, (0, ""))[0] == -1:
                    self.handoffs[p.handoff_id] = (position, self.handoffs[p.handoff_id][1])


def _answers_later(position: int | None, now: int) -> bool:
    """Whether the recording asked the same (`position`: where the world answered it, -1 never, None not
    asked) and the answer is still to come, or never came: the world answers the new core as it did the old."""
    return position is not None and (position == -1 or position > now)


def llm_requests_of(events: Sequence[Event[EventPayload]], agent: AgentSpec) -> dict[str, LlmRequest]:
    """The whole requests the core made to the LLM in a recorded call, by id, replayed with the agent that
    took it (the recording keeps only their summary, `llm.requested`)."""
    state = new_state(agent)
    requests: dict[str, LlmRequest] = {}
    for event in events:
        if event.envelope.producer == CORE_PRODUCER:
            continue
        state, decisions = decide(state, event)
        for decision in decisions:
            if isinstance(decision.action, CallLlm):
                requests[decision.action.request.request_id] = decision.action.request
    return requests


class _WhatIf:
    def __init__(self, events: Sequence[Event[EventPayload]], agent: AgentSpec, llm: LlmProvider, llm_label: str,
                 recorded_agent: AgentSpec | None, llm_timeout_s: float, *, same_model: bool) -> None:
        self.events = events
        self.recording = _Recording(events)
        self.llm = llm
        self.llm_label = llm_label
        self.llm_timeout_s = llm_timeout_s
        self.recorded_requests = llm_requests_of(events, recorded_agent) if recorded_agent is not None else None
        self.same_model = same_model
        self.state: CallState = new_state(agent)
        self.turns = _TurnLog()
        self.answered_by: dict[int, list[str]] = {}
        self.notes: dict[int, list[str]] = {}
        self.decided = 0  # how many of the new core's decisions so far
        self.diverged = False  # a decision differs from the recorded one, or an answer is not the recorded one
        self.position = -1
        self.envelope = events[0].envelope
        self.recorded_event = events[0]
        self.pending_llm: LlmRequest | None = None
        self.tools_waiting: dict[str, str] = {}  # recorded tool_call_id -> the new core's
        self.tools_used: set[str] = set()
        self.virtual_timers: dict[str, tuple[str, int]] = {}  # timer id -> (name, due): fired by the clock
        self.now: deque[EventPayload] = deque()
        self.stopped: str | None = None

    def note(self, text: str) -> None:
        self.notes.setdefault(self.turns.current, []).append(text)

    def answered(self, by: str) -> None:
        sources = self.answered_by.setdefault(self.turns.current, [])
        if by not in sources:
            sources.append(by)

    async def run(self) -> None:
        for position, event in enumerate(self.events):
            if self.stopped is not None:
                return
            self.position = position
            if event.envelope.producer == CORE_PRODUCER:
                continue
            if self.virtual_timers:
                await self._fire_timers(event.envelope)
            self.envelope = event.envelope
            self.recorded_event = event
            payload = self._as_answer(event.payload)
            if payload is not None:
                await self._feed(payload)

    def _as_answer(self, p: EventPayload) -> EventPayload | None:
        """The recorded input as the new core gets it: None where it answers something it did not ask."""
        match p:
            case LlmDecided():
                return p if self.pending_llm is not None and self.pending_llm.request_id == p.request_id else None
            case ToolSucceeded() | ToolFailed():
                new_id = self.tools_waiting.pop(p.tool_call_id, None) if _final(p) else None
                return None if new_id is None else replace(p, tool_call_id=new_id)
            case TimerFired():
                waiting = p.timer_id in self.state.timers.values() and p.timer_id not in self.virtual_timers
                return p if waiting else None
            case HandoffCompleted():
                return p if self.state.handoff_id == p.handoff_id else None
        return p

    async def _fire_timers(self, next_input: Envelope) -> None:
        """The new core's own timers whose time has come on the recorded clock, in order."""
        until_us = next_input.event_time_us
        while self.stopped is None:
            due = sorted((due, timer_id, name) for timer_id, (name, due) in self.virtual_timers.items()
                         if due <= until_us and timer_id in self.state.timers.values())
            if not due:
                return
            due_us, timer_id, name = due[0]
            del self.virtual_timers[timer_id]
            self.envelope = replace(next_input, event_time_us=due_us)
            await self._feed(TimerFired(timer_id=timer_id, name=name, set_by_seq=-1, due_us=due_us))

    async def _feed(self, payload: EventPayload) -> None:
        self.now.append(payload)
        steps = 0
        while self.now and self.stopped is None:
            steps += 1
            if steps > MAX_STEPS_PER_INPUT:
                self.stopped = f"the new agent went on answering itself for {MAX_STEPS_PER_INPUT} steps; stopped"
                self.note(self.stopped)
                return
            p = self.now.popleft()
            pending = self.pending_llm
            if isinstance(p, LlmDecided) and pending is not None and p.request_id == pending.request_id:
                p = await self._llm_answer(p)
            event = self.recorded_event
            if p is not event.payload:  # an answer of the world's own, or a recorded one for another id
                event = Event(replace(self.envelope, type=p.EVENT_TYPE, schema_version=p.EVENT_VERSION), p)
            self.state, decisions = decide(self.state, event)
            self._act(decisions)

    async def _llm_answer(self, recorded: LlmDecided) -> LlmDecided:
        request = self.pending_llm
        assert request is not None
        self.pending_llm = None
        if recorded.finish_reason != ASK and self.same_model and self._identical(request):
            self.answered(RECORDED_ANSWER)
            return recorded
        self.diverged = True
        self.answered(self.llm_label)
        try:
            result = await self.llm.complete(request, timeout_s=self.llm_timeout_s)
        except ProviderError as exc:
            self.note(f"the LLM failed: {exc}")
            return llm_failed(request, self.llm.name, 0)
        return llm_decided(request, result, self.llm.name)

    def _identical(self, request: LlmRequest) -> bool:
        if self.recorded_requests is not None:
            return self.recorded_requests.get(request.request_id) == request
        # The same definition, or the recorded one unknown: its request's summary, and nothing different before.
        return not self.diverged

    def _act(self, decisions: list[Decision]) -> None:
        recording = self.recording
        for decision in decisions:
            payload = decision.payload
            self.turns.add(payload)
            expected = recording.decisions[self.decided] if self.decided < len(recording.decisions) else None
            self.decided += 1
            if payload != expected:
                self.diverged = True
            match decision.action:
                case CallLlm(request=request):
                    self.pending_llm = request
                    if not _answers_later(recording.llm_answers.get(request.request_id), self.position):
                        self.now.append(_ask(request))  # not asked in the recording: answered now
                case RunTool(tool_call_id=new_id, name=name, arguments_json=arguments):
                    self._tool(new_id, name, arguments)
                case Speak(request_id=request_id):
                    if not _answers_later(recording.speech.get(request_id), self.position):
                        self.now.append(TtsCompleted(request_id=request_id, provider="what-if", voice="",
                                                     time_to_first_byte_ms=0, audio_ms=0, audio_bytes=0,
                                                     interrupted=False))
                case StartTimer(timer_id=timer_id, name=name, due_us=due):
                    if recording.timers_set.get(timer_id) != (name, due):
                        self.virtual_timers[timer_id] = (name, due)
                case CancelTimer(timer_id=timer_id):
                    self.virtual_timers.pop(timer_id, None)
                case Transfer(handoff_id=handoff_id, target=target):
                    position, recorded_target = recording.handoffs.get(handoff_id, (None, ""))
                    if recorded_target != target or not _answers_later(position, self.position):
                        self.stopped = (f"the new agent would have transferred the caller to {target}; what the "
                                        "transfer would have done is unknown, so the what-if stops here")
                        self.note(self.stopped)

    def _tool(self, new_id: str, name: str, arguments: str) -> None:
        for recorded in self.recording.tools.values():
            used = recorded.tool_call_id in self.tools_used
            if used or (recorded.tool, recorded.arguments_json) != (name, arguments):
                continue
            self.tools_used.add(recorded.tool_call_id)
            if recorded.result is None or recorded.position > self.position:
                self.tools_waiting[recorded.tool_call_id] = new_id  # its answer as recorded: later, or never
            else:
                self.now.append(replace(recorded.result, tool_call_id=new_id))
            return
        self.diverged = True
        self.note(f"would have called {name}({arguments}); {NOT_RUN}")
        self.now.append(ToolFailed(tool_call_id=new_id, tool=name, error=NOT_RUN, retryable=False, attempt=1,
                                   dead_lettered=True, latency_ms=0))

    def compare(self, agent_then: AgentRef, agent_now: AgentRef) -> WhatIfResult:
        then, now = self.recording.turns, self.turns
        comparisons: list[TurnComparison] = []
        first: int | None = None
        for index in range(max(len(then.acts), len(now.acts))):
            then_acts = tuple(then.acts[index]) if index < len(then.acts) else ()
            now_acts = tuple(now.acts[index]) if index < len(now.acts) else ()
            caller = then.callers[index] if index < len(then.callers) else ""
            notes = list(self.notes.get(index, []))
            now_caller = now.callers[index] if index < len(now.callers) else None
            if now_caller is not None and now_caller != caller:
                notes.append(f'the new agent took this turn on: "{now_caller}"')
            comparisons.append(TurnComparison(
                index=index, caller=caller, then=then_acts, now=now_acts,
                after_difference=first is not None and index > first,
                answered_by=", ".join(self.answered_by.get(index, [])) or "-", notes=tuple(notes)))
            if first is None and then_acts != now_acts:
                first = index
        return WhatIfResult(call_id=self.events[0].call_id, agent_then=agent_then, agent_now=agent_now,
                            turns=tuple(comparisons), llm=self.llm_label)


def _same_model(agent: AgentSpec, recorded_agent: AgentSpec | None) -> bool:
    """Whether the new agent's LLM is the one that answered (its model and options are in each request).
    The offline policy's model is the agent's script; without the recorded agent, that cannot be known."""
    if recorded_agent is None:
        return agent.llm.provider != SCRIPTED
    if agent.llm.provider != recorded_agent.llm.provider:
        return False
    return agent.llm.provider != SCRIPTED or agent.script == recorded_agent.script


def _ask(request: LlmRequest) -> LlmDecided:
    """A marker: the LLM is to answer `request` now (there is no recorded answer to reuse)."""
    return LlmDecided(request_id=request.request_id, provider="", model=request.model, text="", finish_reason=ASK,
                      input_tokens=0, output_tokens=0, time_to_first_token_ms=0, total_ms=0)


async def whatif_call(events: Sequence[Event[EventPayload]], agent: AgentSpec, llm: LlmProvider, llm_label: str, *,
                      recorded_agent: AgentSpec | None = None, llm_timeout_s: float = 20.0) -> WhatIfResult:
    """`events`: one call's events in seq order. `agent`: the definition to try. `llm` answers the requests
    that are not the recorded ones, `llm_label` says what it is. `recorded_agent`: the definition that took
    the call, where still at hand, so that requests are compared whole (else by their recorded summary)."""
    call_id = events[0].call_id if events else ""
    # Audio is no input of the core's (nor an answer of the world's): left out, the passes below are short.
    inputs = [event for event in events if not event.envelope.type.startswith("audio.")]
    started = next((e.payload for e in inputs if isinstance(e.payload, CallStarted)), None)
    version = agent.version
    now_ref = AgentRef(agent.id, version)
    if started is None:
        return WhatIfResult(call_id, AgentRef("", ""), now_ref, (), llm_label, problem="no call.started event")
    then_ref = AgentRef(started.agent_id, started.agent_version)
    if any(event.pii_withheld for event in inputs):
        return WhatIfResult(call_id, then_ref, now_ref, (), llm_label,
                            problem="its personal data was erased: there is nothing to replay it from")
    if not any(isinstance(e.payload, CallEnded) for e in inputs):
        return WhatIfResult(call_id, then_ref, now_ref, (), llm_label, problem="the call has not ended")
    if recorded_agent is not None and recorded_agent.version != started.agent_version:
        recorded_agent = None
    # The same definition makes the same requests until something differs: none to rebuild.
    rebuild = recorded_agent is not None and started.agent_version != version
    run = _WhatIf(inputs, agent, llm, llm_label, recorded_agent if rebuild else None, llm_timeout_s,
                  same_model=_same_model(agent, recorded_agent))
    await run.run()
    return run.compare(then_ref, now_ref)


def report_lines(result: WhatIfResult) -> list[str]:
    """The comparison as text, turn by turn (what `voxlog replay whatif` prints)."""
    head = (f"{result.call_id}: {result.summary} (agent {result.agent_then.id} {result.agent_then.version[:12]} -> "
            f"{result.agent_now.id} {result.agent_now.version[:12]})")
    lines = [head]
    first = result.first_difference
    for turn in result.turns:
        marks = []
        if turn.index == first:
            marks.append("FIRST DIFFERENCE")
        elif turn.after_difference:
            marks.append("after the first difference: the caller spoke to the old agent")
        label = f"  turn {turn.index}" + (f" [{'; '.join(marks)}]" if marks else "")
        lines.append(label + (f'  caller: "{turn.caller}"' if turn.caller else "  (opening)"))
        if turn.same:
            lines += [f"    same: {act.describe()}" for act in turn.then] or ["    same: (nothing)"]
        else:
            lines += [f"    then: {act.describe()}" for act in turn.then] or ["    then: (nothing)"]
            lines += [f"    now:  {act.describe()}" for act in turn.now] or ["    now:  (nothing)"]
        if turn.answered_by != "-":
            lines.append(f"    LLM: {turn.answered_by}")
        lines += [f"    note: {note}" for note in turn.notes]
    return lines


def report_json(results: Sequence[WhatIfResult]) -> str:
    """The comparisons as one JSON document (`--out report.json`)."""
    changed = sum(1 for r in results if r.changed)
    compared = sum(1 for r in results if r.problem is None)
    return json.dumps({"compared": compared, "changed": changed,
                       "calls": [r.as_dict(redact=False) for r in results]}, indent=2)
