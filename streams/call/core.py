"""The call core: the conversation policy as a pure function of the call's events.

    decide(state, event) -> (state, decisions)

No clock, no randomness, no I/O: time is the events' `event_time_us`, ids are derived from the call
id and counters in the state, and everything the outside world says (transcripts, LLM decisions,
tool results, timers, caller memory) arrives as a recorded event. Each `Decision` is an event
payload to record, plus the action the session must take for it. Replaying a call's recorded
inputs through `decide` gives the same decisions, which is what `voxlog replay verify` checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from schemas.base import Event, EventPayload
from schemas.events import (
    BargeIn,
    CallAnswered,
    CallEnded,
    CallHangupRequested,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
    DtmfReceived,
    GuardrailTriggered,
    HandoffCompleted,
    HandoffRequested,
    LlmDecided,
    LlmRequested,
    MemoryLoaded,
    SpeechStarted,
    SpeechStopped,
    TimerCancelled,
    TimerFired,
    TimerSet,
    ToolFailed,
    ToolRequested,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
)
from streams.call.transport import DEFAULT_SPEECH, SPEECH_FORMATS, SpeechFormat
from streams.config.agents import LOOKUP_ID, AgentSpec, Consent, Handoff
from streams.config.consent import ConsentMode, answer_of, recorded_mode, request_after
from streams.providers.base import ChatMessage, LlmRequest, ToolSpec

RETURNED_FROM_HANDOFF = "returned_from"
"""call.started parameter: the call whose transfer failed and brought the caller back (its id)."""

CORE_PRODUCER = "voxlog.core"
CORE_VERSION = "2"
"""Bumped when the policy changes on purpose: replay of older calls is then expected to differ."""

# Tools the core itself understands, offered to the LLM beside the agent's own.
TRANSFER_TOOL = ToolSpec(
    "transfer_to_human",
    "Hand the call to a human colleague when the caller asks for one or you cannot help.",
    '{"properties":{"reason":{"type":"string"}},"type":"object"}',
)
END_CALL_TOOL = ToolSpec(
    "end_call", "End the call after saying goodbye.", '{"properties":{"reason":{"type":"string"}},"type":"object"}'
)


# Actions: what the session must do for a decision. The payload is what gets recorded.
@dataclass(frozen=True, slots=True)
class CallLlm:
    request: LlmRequest


@dataclass(frozen=True, slots=True)
class Speak:
    request_id: str
    text: str
    voice: str


@dataclass(frozen=True, slots=True)
class StopSpeaking:
    request_id: str


@dataclass(frozen=True, slots=True)
class RunTool:
    tool_call_id: str
    name: str
    arguments_json: str
    idempotency_key: str
    deadline_us: int
    """When the call stops waiting for the worker's reply (the tool's `timeout_s` after it was asked)."""


@dataclass(frozen=True, slots=True)
class Transfer:
    handoff_id: str
    target: str


@dataclass(frozen=True, slots=True)
class Hangup:
    reason: str


@dataclass(frozen=True, slots=True)
class StartTimer:
    timer_id: str
    name: str
    due_us: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer_id: str


Action = CallLlm | Speak | StopSpeaking | RunTool | Transfer | Hangup | StartTimer | CancelTimer


@dataclass(frozen=True, slots=True)
class Decision:
    payload: EventPayload
    action: Action | None = None


Phase = Literal["new", "looking_up", "listening", "thinking", "ended"]
"""`looking_up`: answered, the caller being looked up in the CRM before the greeting (words heard wait)."""
ConsentState = Literal["not_asked", "pending", "given", "refused"]


@dataclass(frozen=True)
class CallState:
    """Everything the core remembers about a call; replaced, never mutated."""

    agent: AgentSpec
    call_id: str = ""
    phase: Phase = "new"
    started_us: int = 0
    turn_index: int = 0
    history: tuple[ChatMessage, ...] = ()
    memory: tuple[str, ...] = ()
    heard: tuple[str, ...] = ()  # final transcripts since the last turn
    heard_ids: tuple[str, ...] = ()
    caller_speaking: bool = False
    speaking: str | None = None  # TTS request being played
    barged_in_on: str | None = None
    """The speech a barge-in has stopped, until its `tts.completed` arrives: the caller speaking again in
    between (a pause, a breath) is no second barge-in, so the far end is told to drop its audio once."""
    pending_llm: str | None = None
    pending_tools: tuple[str, ...] = ()
    tool_names: dict[str, str] = field(default_factory=dict)
    achieved: str | None = None
    """The outcome the agent file declares for the last of its tools that succeeded."""
    llm_count: int = 0
    tts_count: int = 0
    timer_count: int = 0
    timers: dict[str, str] = field(default_factory=dict)  # name -> timer id
    silence_reprompted: bool = False
    hangup_after_speech: str | None = None  # reason, once the goodbye has been spoken
    handoff_id: str | None = None
    returned_from_handoff: bool = False
    """The caller came back to the agent because the human could not be reached."""
    outbound: bool = False
    """The platform placed this call (the agent speaks first to someone it called)."""
    party_number: str = ""
    """The other party's number: the caller's, or the callee's of a placed call (for the tools' CRM, desk
    and calendar)."""
    contact_first_name: str = ""
    contact_name: str = ""
    contact_context: str = ""
    """Who the CRM says is calling (the caller lookup's result), for the greeting and the LLM."""
    speech: SpeechFormat = DEFAULT_SPEECH
    """What the channel plays, from `call.started`: what each `tts.requested` records."""
    channel: str = "unknown"
    consent_mode: ConsentMode = "notice"
    """The mode the call runs under: what its `call.started` recorded, else the agent's own."""
    consent: ConsentState = "not_asked"
    """`pending` from the notice (opt_out) or the question (opt_in) until the caller's answer; a refusal
    stands for the rest of the call."""
    consent_prompt: str = ""
    """What the caller was told about recording: each consent event's `prompt_text`."""
    opening: str | None = None
    """opt_in: the greeting, said once the caller has answered the question."""
    ended: bool = False


STATE_FIELDS = frozenset(f.name for f in fields(CallState))


def evolve(state: CallState, **changes: Any) -> CallState:
    """`state` with `changes`: `dataclasses.replace` without its generic path (every field through
    `__init__` again), which was most of the core's time. The state has no `__post_init__` to skip."""
    unknown = changes.keys() - STATE_FIELDS
    if unknown:
        raise TypeError(f"CallState has no field {', '.join(sorted(unknown))}")
    new = object.__new__(CallState)
    new.__dict__.update(state.__dict__, **changes)
    return new


def says(text: str, phrase: str) -> bool:
    """Whether the caller's words contain the phrase, as whole words (a plural 's' allowed)."""
    return re.search(rf"\b{re.escape(phrase.lower())}s?\b", text.lower()) is not None


def handoff_id_of(call_id: str) -> str:
    """A call's handoff id (one at a time; the carrier's report of the human's leg names it)."""
    return f"{call_id}/handoff"


def new_state(agent: AgentSpec, started: CallStarted | None = None) -> CallState:
    """A call's state before its first event; with its `call.started` at hand, already under its consent
    mode (what the session keeps of the caller's audio before the core has decided anything)."""
    state = CallState(agent=agent, consent_mode=agent.consent.mode)
    return state if started is None else evolve(state, consent_mode=consent_mode_of(agent, started))


def consent_mode_of(agent: AgentSpec, started: CallStarted) -> ConsentMode:
    """The mode a call runs under: as its start recorded it (the gateway applies the tenant's rule), else
    the agent's own (calls recorded before consent modes, sessions made outside a gateway)."""
    return recorded_mode(started.parameters) or agent.consent.mode


def keeps_caller_audio(state: CallState) -> bool:
    """Whether the caller's audio may be kept (recorded as `audio.caller_chunk`) now: never after a
    refusal, and under opt_in only once the caller agreed. What the session does with each frame."""
    if state.consent == "refused":
        return False
    return state.consent_mode != "opt_in" or state.consent == "given"


def outcome(state: CallState) -> str:
    """What the call achieved, for its `call.ended`, whoever ends it: handed to a human; else what its
    tools achieved, as the agent file declares; else whether the caller got as far as a turn."""
    if state.handoff_id is not None:
        return "handed_off"
    if state.achieved is not None:
        return state.achieved
    return "resolved" if state.turn_index else "abandoned"


def decide(state: CallState, event: Event[EventPayload]) -> tuple[CallState, list[Decision]]:
    """The whole policy. Events the core does not act on leave the state as it is."""
    if state.ended:
        return state, []
    p = event.payload
    now = event.envelope.event_time_us
    match p:
        case CallStarted():
            returned = RETURNED_FROM_HANDOFF in p.parameters
            return evolve(state, call_id=event.call_id, started_us=now, returned_from_handoff=returned,
                           outbound=p.direction == "outbound",
                           party_number=(p.to_number if p.direction == "outbound" else p.from_number) or "",
                           speech=SPEECH_FORMATS.get(p.channel, DEFAULT_SPEECH),
                           channel=p.channel, consent_mode=consent_mode_of(state.agent, p)), []
        case MemoryLoaded():
            return evolve(state, memory=tuple(s.summary for s in p.summaries)), []
        case CallAnswered():
            lookup = state.agent.caller_lookup
            if lookup is not None and state.party_number and not state.returned_from_handoff:
                return _look_up_caller(state, lookup.tool, now)
            return _greet(evolve(state, phase="listening"), now)
        case SpeechStarted():
            return _caller_started(state, p.offset_ms)
        case SpeechStopped():
            return _caller_stopped(evolve(state, caller_speaking=False), now)
        case TranscriptFinal():
            return _heard(state, p, now)
        case LlmDecided():
            return _llm_decided(state, p, now)
        case ToolSucceeded() | ToolFailed() if state.phase == "looking_up" and p.tool_call_id == LOOKUP_ID:
            if isinstance(p, ToolFailed) and not p.dead_lettered:
                return state, []  # the worker tries again; the greeting waits for its last word (or the deadline)
            return _greet(_looked_up(evolve(state, phase="listening"), p), now)
        case ToolSucceeded() | ToolFailed():
            return _tool_result(state, p, now)
        case TtsCompleted():
            return _finished_speaking(state, p, now)
        case TimerFired():
            return _timer_fired(state, p, now)
        case DtmfReceived():
            return _pressed(state, p.digit, now)
        case HandoffCompleted():
            if p.outcome == "connected":
                return _hangup(state, "handoff")
            return _say(evolve(state, handoff_id=None), _unavailable(state.agent))
        case CallEnded():
            return evolve(state, ended=True, phase="ended"), []
    return state, []


# -- helpers that build decisions ---------------------------------------------------------------


def _say(state: CallState, text: str) -> tuple[CallState, list[Decision]]:
    request_id = f"{state.call_id}/tts/{state.tts_count}"
    voice = state.agent.tts.voice
    payload = TtsRequested(
        request_id=request_id,
        text=text,
        provider=state.agent.tts.provider,
        voice=voice,
        codec=state.speech.codec,
        sample_rate=state.speech.sample_rate,
    )
    state = evolve(
        state,
        tts_count=state.tts_count + 1,
        speaking=request_id,
        history=(*state.history, ChatMessage("assistant", text)),
    )
    return state, [Decision(payload, Speak(request_id, text, voice))]


def _set_timer(state: CallState, name: str, due_us: int) -> tuple[CallState, list[Decision]]:
    state, decisions = _cancel_timer(state, name)
    timer_id = f"{state.call_id}/timer/{state.timer_count}"
    state = evolve(state, timer_count=state.timer_count + 1, timers={**state.timers, name: timer_id})
    return state, [
        *decisions,
        Decision(TimerSet(timer_id=timer_id, name=name, due_us=due_us), StartTimer(timer_id, name, due_us)),
    ]


def _cancel_timer(state: CallState, name: str) -> tuple[CallState, list[Decision]]:
    timer_id = state.timers.get(name)
    if timer_id is None:
        return state, []
    timers = {k: v for k, v in state.timers.items() if k != name}
    return evolve(state, timers=timers), [
        Decision(TimerCancelled(timer_id=timer_id, name=name), CancelTimer(timer_id))
    ]


def _hangup(state: CallState, reason: str) -> tuple[CallState, list[Decision]]:
    decisions: list[Decision] = []
    for name in list(state.timers):
        state, cancelled = _cancel_timer(state, name)
        decisions += cancelled
    state = evolve(state, phase="ended")
    return state, [*decisions, Decision(CallHangupRequested(reason=reason), Hangup(reason))]


def _unavailable(agent: AgentSpec) -> str:
    return agent.handoff.unavailable if agent.handoff else Handoff.model_fields["unavailable"].default


def _look_up_caller(state: CallState, tool_name: str, now: int) -> tuple[CallState, list[Decision]]:
    tool = state.agent.tool(tool_name)
    assert tool is not None  # the agent file's validation holds it
    arguments = json.dumps({"phone": state.party_number})
    key, deadline = f"{state.call_id}/{LOOKUP_ID}", now + int(tool.timeout_s * 1_000_000)
    request = ToolRequested(tool_call_id=LOOKUP_ID, tool=tool.name, arguments_json=arguments, idempotency_key=key,
                            operation=tool.operation, caller_number=state.party_number, deadline_us=deadline)
    state = evolve(state, phase="looking_up", tool_names={**state.tool_names, LOOKUP_ID: tool.name})
    return state, [Decision(request, RunTool(LOOKUP_ID, tool.name, arguments, key, deadline))]


def _looked_up(state: CallState, p: ToolSucceeded | ToolFailed) -> CallState:
    """What the lookup found: a known contact's names and context, or nothing (not found, failed, late)."""
    if isinstance(p, ToolFailed):
        return state
    try:
        found = json.loads(p.result_json)
    except ValueError:
        return state
    if not isinstance(found, dict) or not found.get("found"):
        return state
    facts = {k: found.get(k) for k in ("name", "company", "email")}
    details = found.get("details")
    if isinstance(details, dict):
        facts.update({str(k): v for k, v in details.items()})
    context = "; ".join(f"{k}: {v}" for k, v in facts.items() if isinstance(v, str | int | float) and str(v).strip())
    # Bounded: what a CRM holds is anybody's typing, and the greeting speaks it.
    return evolve(state, contact_first_name=str(found.get("first_name") or "").strip()[:40],
                  contact_name=str(found.get("name") or "").strip()[:80], contact_context=context[:1000])


def _greet(state: CallState, now: int) -> tuple[CallState, list[Decision]]:
    agent = state.agent
    state, limit = _set_timer(state, "max_duration", now + agent.guardrails.max_duration_s * 1_000_000)
    # A caller back from a transfer nobody answered hears why, not the greeting again.
    if state.returned_from_handoff:
        opening = _unavailable(agent)
    elif state.outbound and agent.outbound_greeting:
        opening = agent.outbound_greeting
    elif state.contact_first_name and agent.caller_lookup is not None and agent.caller_lookup.greeting:
        opening = agent.caller_lookup.greeting.replace("{first_name}", state.contact_first_name).replace(
            "{name}", state.contact_name or state.contact_first_name)
    elif state.memory and agent.returning_greeting:
        opening = agent.returning_greeting.replace("{last_call}", state.memory[0])
    else:
        opening = agent.greeting
    consent = agent.consent
    widget = state.channel == "widget"  # the widget has no keys: its prompts speak of words only
    if state.consent_mode == "opt_in":
        # The question first; the greeting once the caller has answered it.
        question = consent.widget_question if widget else consent.question
        state = evolve(state, consent="pending", consent_prompt=question, opening=opening)
        state, asked = _say(state, question)
        return state, [*limit, *asked]
    notice = consent.text
    if state.consent_mode == "opt_out":
        # A notice is never left out where the caller must be able to refuse (a tenant's all-party rule).
        how = consent.widget_refuse_prompt if widget else consent.refuse_prompt
        notice = " ".join(part for part in (notice or Consent.model_fields["text"].default, how) if part)
    state, greeting = _say(state, f"{notice} {opening}" if notice else opening)
    decisions = [*limit, *greeting]
    if not notice:
        return state, decisions
    state = evolve(state, consent_prompt=notice)
    if state.consent_mode == "opt_out":
        return evolve(state, consent="pending"), decisions  # until the caller's first words or key
    # Continuing after the notice is consent to it; refusing means hanging up.
    given = ConsentGiven(kind=consent.kind, method="implied_by_continuing", prompt_text=notice)
    return evolve(state, consent="given"), [Decision(given), *decisions]


# -- consent: the caller's answer, by words or keys, and what the call keeps after it -------------


def _awaiting_answer(state: CallState) -> bool:
    """opt_in: the question is asked and not answered yet (silence is a refusal)."""
    return state.consent == "pending" and state.consent_mode == "opt_in"


def _consent_answer(state: CallState, text: str, ids: tuple[str, ...], now: int) -> tuple[CallState, list[Decision]]:
    """The caller's first words (or a key that is not a consent key) while consent is pending. An answer
    that goes on to ask for something ("yes, please book a visit") is also their first turn."""
    consent = state.agent.consent
    answer = answer_of(text, consent.accept_words, consent.refuse_words)
    asks = answer is not None and request_after(text, consent.accept_words, consent.refuse_words)
    if answer == "no":
        state, refused = _refuse(state, "speech", greet=not asks)
        return _and_heard(state, refused, text, ids, now) if asks else (state, refused)
    if state.consent_mode == "opt_out":
        # Whatever else the caller says goes on with the call: continuing is consent, and it is a turn.
        state, given = _give(state, "implied_by_continuing")
        return _and_heard(state, given, text, ids, now)
    if answer == "yes":
        state, given = _give(state, "speech", greet=not asks)
        return _and_heard(state, given, text, ids, now) if asks else (state, given)
    # opt_in, and no yes: nothing is kept. The caller asked for something else: they are served.
    state, refused = _refuse(state, "unclear", greet=False)
    return _and_heard(state, refused, text, ids, now)


def _and_heard(state: CallState, decisions: list[Decision], text: str, ids: tuple[str, ...],
               now: int) -> tuple[CallState, list[Decision]]:
    state, heard = _heard_text(state, text, ids, now)
    return state, decisions + heard


def _pressed(state: CallState, digit: str, now: int) -> tuple[CallState, list[Decision]]:
    """A key: a refusal key refuses at any time where the caller may refuse; under opt_in an agreement
    key agrees while the question is open. Both are kept for consent (pressed again, they do nothing);
    other keys are heard as words."""
    consent = state.agent.consent
    if state.consent_mode != "notice" and digit in consent.refuse_digits:
        return (state, []) if state.consent == "refused" else _refuse(state, "dtmf")
    if state.consent_mode == "opt_in" and digit in consent.accept_digits:
        return _give(state, "dtmf") if state.consent == "pending" else (state, [])
    if state.consent == "pending":
        return _consent_answer(state, f"pressed {digit}", (), now)
    return _heard_text(state, f"pressed {digit}", (), now)


def _give(state: CallState, method: str, *, greet: bool = True) -> tuple[CallState, list[Decision]]:
    consent = state.agent.consent
    state, decisions = _cancel_timer(state, "consent")
    state = evolve(state, consent="given")
    decisions.append(Decision(ConsentGiven(kind=consent.kind, method=method, prompt_text=state.consent_prompt)))
    if method == "implied_by_continuing":
        return state, decisions
    state, said = _reply(state, consent.accepted, greet=greet)
    return state, decisions + said


def _refuse(state: CallState, method: str, *, greet: bool = True) -> tuple[CallState, list[Decision]]:
    """A refusal (by `method`: speech, dtmf, silence, unclear): from now on nothing of the caller's audio
    is kept, and the call goes on."""
    consent = state.agent.consent
    state, decisions = _cancel_timer(state, "consent")
    state = evolve(state, consent="refused")
    decisions.append(Decision(ConsentRefused(kind=consent.kind, method=method, prompt_text=state.consent_prompt)))
    state, said = _reply(state, consent.refused, greet=greet)
    return state, decisions + said


def _reply(state: CallState, reply: str, *, greet: bool) -> tuple[CallState, list[Decision]]:
    """What the agent says to a consent answer: the reply, then the greeting the question held back
    (opt_in); nothing while the call is ending or being handed over."""
    opening = state.opening if greet else None
    state = evolve(state, opening=None)
    text = " ".join(part for part in (reply, opening) if part)
    if not text or state.phase != "listening" or state.hangup_after_speech is not None or state.handoff_id:
        return state, []
    return _say(state, text)


def _caller_started(state: CallState, offset_ms: int) -> tuple[CallState, list[Decision]]:
    state = evolve(state, caller_speaking=True, silence_reprompted=False)
    state, decisions = _cancel_timer(state, "silence")
    state, answering = _cancel_timer(state, "consent")  # the caller is answering: their words will say
    decisions += answering
    if state.speaking is not None and state.speaking != state.barged_in_on and state.hangup_after_speech is None:
        interrupted = state.speaking
        state = evolve(state, barged_in_on=interrupted)
        # How much had played is the session's to know: its tts.completed says (interrupted, audio_ms).
        decisions.append(
            Decision(
                BargeIn(offset_ms=offset_ms, interrupted_tts_request_id=interrupted, played_ms=0),
                StopSpeaking(interrupted),
            )
        )
    return state, decisions


def _caller_stopped(state: CallState, now: int) -> tuple[CallState, list[Decision]]:
    """opt_in: the caller stopped speaking with the question still open (their words may be no words,
    noise): the time to answer runs again."""
    if _awaiting_answer(state) and state.speaking is None and "consent" not in state.timers:
        return _set_timer(state, "consent", now + state.agent.consent.answer_timeout_s * 1_000_000)
    return state, []


def _heard(state: CallState, p: TranscriptFinal, now: int) -> tuple[CallState, list[Decision]]:
    text = p.text.strip()
    if not text or state.phase == "looking_up":
        return state, []  # ("hello?" into the silence before the greeting is no request)
    if state.consent == "pending":
        return _consent_answer(state, text, (p.utterance_id,), now)
    return _heard_text(state, text, (p.utterance_id,), now)


def _heard_text(state: CallState, text: str, ids: tuple[str, ...], now: int) -> tuple[CallState, list[Decision]]:
    state = evolve(state, heard=(*state.heard, text), heard_ids=state.heard_ids + ids)
    if state.pending_llm is not None or state.pending_tools or state.phase != "listening":
        return state, []  # the caller added to a turn already being answered; it joins the next one
    return _take_turn(state, now)


def _take_turn(state: CallState, now: int) -> tuple[CallState, list[Decision]]:
    agent = state.agent
    caller_text = " ".join(state.heard)
    turn = TurnTaken(
        turn_index=state.turn_index, caller_text=caller_text, utterance_ids=state.heard_ids, end_of_turn_ms=0
    )
    state = evolve(
        state,
        heard=(),
        heard_ids=(),
        turn_index=state.turn_index + 1,
        history=(*state.history, ChatMessage("user", caller_text)),
    )
    decisions = [Decision(turn)]
    if state.turn_index > agent.guardrails.max_turns:
        decisions.append(
            Decision(
                GuardrailTriggered(
                    stage="input",
                    rule="max_turns",
                    action="hangup",
                    detail=str(agent.guardrails.max_turns),
                    turn_index=turn.turn_index,
                )
            )
        )
        state, said = _say(state, agent.goodbye)
        return evolve(state, hangup_after_speech="max_turns"), decisions + said
    for pattern in agent.guardrails.blocked_input:
        if re.search(pattern, caller_text):
            decisions.append(
                Decision(
                    GuardrailTriggered(
                        stage="input", rule=pattern, action="block", detail=caller_text, turn_index=turn.turn_index
                    )
                )
            )
            state, said = _say(state, agent.guardrails.refusal)
            return state, decisions + said
    if agent.handoff and any(says(caller_text, phrase) for phrase in agent.handoff.phrases):
        state, handed = _hand_off(state, "caller_asked")
        return state, decisions + handed
    state, asked = _ask_llm(state)
    return state, decisions + asked


def _hand_off(state: CallState, reason: str) -> tuple[CallState, list[Decision]]:
    agent = state.agent
    if agent.handoff is None:
        return _say(state, agent.fallback)
    handoff_id = handoff_id_of(state.call_id)
    summary = " | ".join(m.content for m in state.history if m.role == "user")[-500:]
    state, said = _say(evolve(state, handoff_id=handoff_id), agent.handoff.message)
    return state, [
        Decision(
            HandoffRequested(handoff_id=handoff_id, reason=reason, target=agent.handoff.target, summary=summary),
            Transfer(handoff_id, agent.handoff.target),
        ),
        *said,
    ]


def _ask_llm(state: CallState) -> tuple[CallState, list[Decision]]:
    agent = state.agent
    request_id = f"{state.call_id}/llm/{state.llm_count}"
    system = [
        ChatMessage("system", agent.prompts.persona),
        ChatMessage("system", agent.prompts.task),
        ChatMessage("system", agent.prompts.safety),
    ]
    if state.memory:
        system.append(ChatMessage("system", "What we know from this caller's earlier calls: " + " ".join(state.memory)))
    if state.contact_context:
        system.append(ChatMessage("system", "Who is calling, from the CRM: " + state.contact_context))
    messages = (*system, *state.history[-agent.context_messages :])
    tools = (
        *(ToolSpec(t.name, t.description, t.parameters_json) for t in agent.tools),
        *((TRANSFER_TOOL,) if agent.handoff else ()),
        END_CALL_TOOL,
    )
    parameters = {"temperature": "0", **agent.llm.options}
    request = LlmRequest(
        request_id=request_id, model=agent.llm.model, messages=tuple(messages), tools=tools, parameters=parameters
    )
    payload = LlmRequested(
        request_id=request_id,
        turn_index=state.turn_index - 1,
        agent_id=agent.id,
        prompt_id=agent.prompt_id,
        prompt_hash=agent.prompt_hash,
        provider=agent.llm.provider,
        model=agent.llm.model,
        parameters=parameters,
        message_count=len(messages),
        tools=tuple(t.name for t in tools),
    )
    state = evolve(state, pending_llm=request_id, llm_count=state.llm_count + 1)
    return state, [Decision(payload, CallLlm(request))]


def _llm_decided(state: CallState, p: LlmDecided, now: int) -> tuple[CallState, list[Decision]]:
    if p.request_id != state.pending_llm:
        return state, []  # an answer to a request the core no longer waits for
    agent = state.agent
    state = evolve(state, pending_llm=None)
    decisions: list[Decision] = []
    for call in p.tool_calls:
        if call.name == TRANSFER_TOOL.name:
            return _hand_off(state, "llm_decided")
        if call.name == END_CALL_TOOL.name:
            state, said = _say(state, p.text or agent.goodbye)
            return evolve(state, hangup_after_speech="goodbye"), said
    known = [c for c in p.tool_calls if agent.tool(c.name) is not None]
    if known:
        if p.text.strip():  # what the model says while its tools run ("Let me check that for you.")
            text, decisions = _guarded_output(state, p.text.strip())
            state, said = _say(state, text)
            decisions += said
        state = evolve(
            state,
            history=(
                *state.history,
                ChatMessage(
                    "assistant",
                    json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments_json} for c in known]),
                ),
            ),
        )
        for call in known:
            tool = agent.tool(call.name)
            assert tool is not None
            key, deadline = f"{state.call_id}/{call.id}", now + int(tool.timeout_s * 1_000_000)
            decisions.append(
                Decision(
                    ToolRequested(tool_call_id=call.id, tool=call.name, arguments_json=call.arguments_json,
                                  idempotency_key=key, operation=tool.operation, caller_number=state.party_number,
                                  deadline_us=deadline),
                    RunTool(call.id, call.name, call.arguments_json, key, deadline),
                )
            )
        state = evolve(
            state,
            pending_tools=tuple(c.id for c in known),
            tool_names={**state.tool_names, **{c.id: c.name for c in known}},
        )
        return state, decisions
    text, decisions = _guarded_output(state, p.text.strip() or agent.fallback)
    state, said = _say(state, text)
    return state, decisions + said


def _guarded_output(state: CallState, text: str) -> tuple[str, list[Decision]]:
    """`text`, or the agent's refusal where it matches a blocked output pattern (recorded)."""
    guardrails = state.agent.guardrails
    for pattern in guardrails.blocked_output:
        if re.search(pattern, text):
            triggered = GuardrailTriggered(
                stage="output", rule=pattern, action="rewrite", detail=text, turn_index=state.turn_index - 1
            )
            return guardrails.refusal, [Decision(triggered)]
    return text, []


def _tool_result(state: CallState, p: ToolSucceeded | ToolFailed, now: int) -> tuple[CallState, list[Decision]]:
    if p.tool_call_id not in state.pending_tools:
        return state, []
    if isinstance(p, ToolFailed) and not p.dead_lettered:
        return state, []  # the worker will try again; only its last word counts
    result = p.result_json if isinstance(p, ToolSucceeded) else json.dumps({"error": p.error})
    history = (*state.history, ChatMessage("tool", result, name=p.tool, tool_call_id=p.tool_call_id))
    pending = tuple(t for t in state.pending_tools if t != p.tool_call_id)
    state = evolve(state, history=history, pending_tools=pending)
    tool = state.agent.tool(state.tool_names[p.tool_call_id])
    if isinstance(p, ToolSucceeded) and tool is not None and tool.outcome is not None:
        state = evolve(state, achieved=tool.outcome)
    if pending:
        return state, []
    return _ask_llm(state)


def _finished_speaking(state: CallState, p: TtsCompleted, now: int) -> tuple[CallState, list[Decision]]:
    if p.request_id != state.speaking:
        return state, []
    state = evolve(state, speaking=None, barged_in_on=None)
    if state.hangup_after_speech is not None:
        return _hangup(state, state.hangup_after_speech)
    if state.handoff_id is not None or state.phase != "listening":
        return state, []
    decisions: list[Decision] = []
    if state.heard and state.pending_llm is None and not state.pending_tools:
        return _take_turn(state, now)  # the caller spoke while we talked: answer that now
    if not state.caller_speaking and state.pending_llm is None and not state.pending_tools:
        if _awaiting_answer(state):  # the question is said: the caller has this long to answer it
            return _set_timer(state, "consent", now + state.agent.consent.answer_timeout_s * 1_000_000)
        # (While tools run after "let me check", the silence is the agent's, not the caller's.)
        state, decisions = _set_timer(state, "silence", now + state.agent.guardrails.silence_reprompt_s * 1_000_000)
    return state, decisions


def _timer_fired(state: CallState, p: TimerFired, now: int) -> tuple[CallState, list[Decision]]:
    if state.timers.get(p.name) != p.timer_id:
        return state, []  # cancelled or replaced before it fired
    state = evolve(state, timers={k: v for k, v in state.timers.items() if k != p.name})
    agent = state.agent
    if p.name == "max_duration":
        state, said = _say(state, agent.goodbye)
        return evolve(state, hangup_after_speech="max_duration"), [
            Decision(
                GuardrailTriggered(
                    stage="input",
                    rule="max_duration",
                    action="hangup",
                    detail=str(agent.guardrails.max_duration_s),
                    turn_index=state.turn_index,
                )
            ),
            *said,
        ]
    if p.name == "consent":
        return _refuse(state, "silence") if _awaiting_answer(state) else (state, [])
    if p.name == "silence":
        if state.silence_reprompted:
            state, said = _say(state, agent.goodbye)
            return evolve(state, hangup_after_speech="silence"), said
        state, said = _say(evolve(state, silence_reprompted=True), agent.reprompt)
        return state, said
    return state, []
