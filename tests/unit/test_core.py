"""The call core: a pure function of events to decisions, and replay that proves it."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.base import EventPayload
from schemas.events import (
    BargeIn,
    CallAnswered,
    CallEnded,
    CallHangupRequested,
    CallStarted,
    ConsentGiven,
    HandoffCompleted,
    HandoffRequested,
    LlmDecided,
    LlmRequested,
    SpeechStarted,
    SpeechStopped,
    TimerFired,
    TimerSet,
    ToolCallSpec,
    ToolFailed,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
)
from streams.call.core import RETURNED_FROM_HANDOFF, CallLlm, Hangup, RunTool, Speak, StopSpeaking, Transfer, outcome
from streams.call.replay import verify_call
from streams.config.agents import AgentSpec, load_agents
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.core_calls import CoreSim

AGENT = next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")


def types(decisions: list[object]) -> list[str]:
    return [d.payload.EVENT_TYPE for d in decisions]  # type: ignore[attr-defined]


def started(sim: CoreSim) -> list[object]:
    sim.feed(CallStarted(channel="phone", direction="inbound", agent_id=AGENT.id, agent_version=AGENT.version,
                         routed_by="number"))
    return sim.feed(CallAnswered(answered_by=None))  # type: ignore[return-value]


def final(text: str, n: int = 0) -> TranscriptFinal:
    return TranscriptFinal(utterance_id=f"u{n}", text=text, confidence=0.9, provider="p", model="m", start_ms=0,
                           end_ms=1, latency_ms=1)


def done(request_id: str, interrupted: bool = False) -> TtsCompleted:
    return TtsCompleted(request_id=request_id, provider="p", voice="v", time_to_first_byte_ms=1, audio_ms=100,
                        audio_bytes=10, interrupted=interrupted)


def decided(request_id: str, text: str = "", calls: tuple[ToolCallSpec, ...] = ()) -> LlmDecided:
    return LlmDecided(request_id=request_id, provider="p", model="m", text=text, tool_calls=calls,
                      finish_reason="tool_calls" if calls else "stop", input_tokens=1, output_tokens=1,
                      time_to_first_token_ms=1, total_ms=1)


def test_answering_gives_consent_notice_greeting_and_a_call_limit() -> None:
    sim = CoreSim(AGENT)
    decisions = started(sim)
    assert types(decisions) == ["consent.given", "timer.set", "tts.requested"]
    greeting = decisions[2].payload  # type: ignore[attr-defined]
    assert isinstance(greeting, TtsRequested)
    assert greeting.text == f"{AGENT.consent.text} {AGENT.greeting}"
    assert isinstance(decisions[2].action, Speak)  # type: ignore[attr-defined]
    assert isinstance(decisions[0].payload, ConsentGiven)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("channel", "codec", "rate"),
                         [("phone", "mulaw", 8000), ("sip", "mulaw", 8000), ("widget", "pcm_s16le", 16000)])
def test_what_the_agent_says_is_recorded_in_the_format_its_channel_plays(
    channel: Literal["phone", "sip", "widget"], codec: str, rate: int
) -> None:
    sim = CoreSim(AGENT)
    sim.feed(CallStarted(channel=channel, direction="inbound", agent_id=AGENT.id, agent_version=AGENT.version,
                         routed_by="number"))
    greeting = sim.feed(CallAnswered(answered_by=None))[-1].payload
    assert isinstance(greeting, TtsRequested)
    assert (greeting.codec, greeting.sample_rate) == (codec, rate)


def test_a_booking_turn_runs_the_tool_then_answers() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    assert types(sim.feed(done("call-1/tts/0"))) == ["timer.set"]  # silence watch after the greeting
    assert types(sim.feed(SpeechStarted(offset_ms=100))) == ["timer.cancelled"]
    assert sim.feed(SpeechStopped(offset_ms=2000, duration_ms=1900)) == []
    turn = sim.feed(final("i would like to book an appointment"))
    assert types(turn) == ["turn.taken", "llm.requested"]
    request = turn[1].action
    assert isinstance(request, CallLlm)
    assert [m.role for m in request.request.messages][:3] == ["system", "system", "system"]
    assert request.request.messages[-1].content == "i would like to book an appointment"
    assert {t.name for t in request.request.tools} >= {"book_appointment", "transfer_to_human", "end_call"}

    call = ToolCallSpec(id="tc1", name="book_appointment", arguments_json='{"day": "tomorrow"}')
    tool = sim.feed(decided("call-1/llm/0", calls=(call,)))
    assert types(tool) == ["tool.requested"]
    assert isinstance(tool[0].action, RunTool)
    assert tool[0].payload.idempotency_key == "call-1/tc1"  # type: ignore[attr-defined]
    # A retryable failure is not the last word; the success is.
    assert sim.feed(ToolFailed(tool_call_id="tc1", tool="book_appointment", error="x", retryable=True, attempt=1,
                               dead_lettered=False, latency_ms=1)) == []
    again = sim.feed(ToolSucceeded(tool_call_id="tc1", tool="book_appointment", result_json='{"confirmation":"A1"}',
                                   attempt=2, latency_ms=1))
    assert types(again) == ["llm.requested"]
    assert again[0].action.request.messages[-1].role == "tool"  # type: ignore[union-attr]
    answer = sim.feed(decided("call-1/llm/1", text="You're booked."))
    assert types(answer) == ["tts.requested"]
    assert answer[0].payload.text == "You're booked."  # type: ignore[attr-defined]


def test_what_the_model_says_with_its_tool_calls_is_spoken_while_the_tools_run() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed(done("call-1/tts/0"))
    sim.feed(final("i would like to book an appointment"))
    call = ToolCallSpec(id="tc1", name="book_appointment", arguments_json='{"day": "tomorrow"}')
    tool = sim.feed(decided("call-1/llm/0", text="Let me check the calendar.", calls=(call,)))

    assert types(tool) == ["tts.requested", "tool.requested"]
    assert tool[0].payload.text == "Let me check the calendar."  # type: ignore[attr-defined]
    history = sim.state.history[-2:]
    assert [(m.role, m.content) for m in history] == [
        ("assistant", "Let me check the calendar."),
        ("assistant", json.dumps([{"id": "tc1", "name": "book_appointment", "arguments": '{"day": "tomorrow"}'}])),
    ]
    # Its end is not the caller's silence: the agent is still working.
    assert types(sim.feed(done("call-1/tts/1"))) == []
    again = sim.feed(ToolSucceeded(tool_call_id="tc1", tool="book_appointment", result_json='{"confirmation":"A1"}',
                                   attempt=1, latency_ms=1))
    assert types(again) == ["llm.requested"]
    assert types(sim.feed(decided("call-1/llm/1", text="You're booked."))) == ["tts.requested"]
    assert types(sim.feed(done("call-1/tts/2")))[-1] == "timer.set"  # the silence watch, after the answer


def test_caller_speaking_over_the_agent_is_a_barge_in() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    decisions = sim.feed(SpeechStarted(offset_ms=300))
    assert types(decisions) == ["turn.barge_in"]
    barge = decisions[0]
    assert isinstance(barge.payload, BargeIn)
    assert barge.payload.interrupted_tts_request_id == "call-1/tts/0"
    assert isinstance(barge.action, StopSpeaking)
    # The cut speech reports back; nothing else is owed until the caller finishes.
    assert types(sim.feed(done("call-1/tts/0", interrupted=True))) == []
    assert types(sim.feed(final("my internet is down"))) == ["turn.taken", "llm.requested"]


def test_a_caller_who_pauses_before_the_cut_speech_reports_back_barges_in_once() -> None:
    """Speaking, a breath, speaking again, all before the stopped speech's `tts.completed` (a busy
    gateway): one barge-in, one `clear` to the far end, not one per stretch of speech."""
    sim = CoreSim(AGENT)
    started(sim)
    assert types(sim.feed(SpeechStarted(offset_ms=300))) == ["turn.barge_in"]
    assert sim.feed(SpeechStopped(offset_ms=900, duration_ms=600)) == []
    assert sim.feed(SpeechStarted(offset_ms=1100)) == []
    assert types(sim.feed(done("call-1/tts/0", interrupted=True))) == []
    assert types(sim.feed(final("sorry to interrupt, my internet is down"))) == ["turn.taken", "llm.requested"]
    # The next speech can be barged in on as the first was.
    sim.feed(SpeechStopped(offset_ms=3000, duration_ms=1900))
    sim.feed(decided("call-1/llm/0", text="I can help with that."))
    assert types(sim.feed(SpeechStarted(offset_ms=3500))) == ["turn.barge_in"]


def test_asking_for_a_human_hands_off_without_the_llm() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    decisions = sim.feed(final("can i talk to a human please"))
    assert types(decisions) == ["turn.taken", "handoff.requested", "tts.requested"]
    handoff = decisions[1]
    assert isinstance(handoff.payload, HandoffRequested)
    assert handoff.payload.target == AGENT.handoff.target  # type: ignore[union-attr]
    assert isinstance(handoff.action, Transfer)
    connected = sim.feed(HandoffCompleted(handoff_id=handoff.payload.handoff_id, target="x", outcome="connected"))
    assert types(connected)[-1] == "call.hangup_requested"
    assert isinstance(connected[-1].action, Hangup)


def test_a_transfer_that_failed_says_so_and_a_returned_caller_hears_why() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    handoff = sim.feed(final("operator"))[1].payload
    assert isinstance(handoff, HandoffRequested)
    failed = sim.feed(HandoffCompleted(handoff_id=handoff.handoff_id, target="x", outcome="failed"))
    assert [d.payload.text for d in failed] == [AGENT.handoff.unavailable]  # type: ignore[union-attr, attr-defined]

    back = CoreSim(AGENT, call_id="call-2")
    back.feed(CallStarted(channel="phone", direction="inbound", agent_id=AGENT.id, agent_version=AGENT.version,
                          routed_by="handoff_return", parameters={RETURNED_FROM_HANDOFF: "call-1"}))
    greeting = back.feed(CallAnswered(answered_by=None))[-1].payload
    assert isinstance(greeting, TtsRequested)
    assert greeting.text == f"{AGENT.consent.text} {AGENT.handoff.unavailable}"  # type: ignore[union-attr]


def test_blocked_input_is_refused_and_never_reaches_the_llm() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    decisions = sim.feed(final("here is my credit card number"))
    assert types(decisions) == ["turn.taken", "guardrail.triggered", "tts.requested"]
    assert decisions[2].payload.text == AGENT.guardrails.refusal  # type: ignore[attr-defined]


def test_blocked_output_is_rewritten() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed(final("my internet is down"))
    decisions = sim.feed(decided("call-1/llm/0", text="Your password is hunter2"))
    assert types(decisions) == ["guardrail.triggered", "tts.requested"]
    assert decisions[1].payload.text == AGENT.guardrails.refusal  # type: ignore[attr-defined]


def test_silence_reprompts_then_says_goodbye_and_hangs_up() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    timer = sim.feed(done("call-1/tts/0"))[0].payload
    assert isinstance(timer, TimerSet)
    reprompt = sim.feed(TimerFired(timer_id=timer.timer_id, name="silence", set_by_seq=0, due_us=timer.due_us))
    assert [d.payload.text for d in reprompt] == [AGENT.reprompt]  # type: ignore[attr-defined]
    second = sim.feed(done(reprompt[0].payload.request_id))[0].payload  # type: ignore[attr-defined]
    bye = sim.feed(TimerFired(timer_id=second.timer_id, name="silence", set_by_seq=0, due_us=0))  # type: ignore[attr-defined]
    assert [d.payload.text for d in bye] == [AGENT.goodbye]  # type: ignore[attr-defined]
    end = sim.feed(done(bye[0].payload.request_id))  # type: ignore[attr-defined]
    assert types(end) == ["timer.cancelled", "call.hangup_requested"]
    assert end[-1].payload == CallHangupRequested(reason="silence")


def test_a_cancelled_timer_firing_late_changes_nothing() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    timer = sim.feed(done("call-1/tts/0"))[0].payload
    sim.feed(SpeechStarted(offset_ms=1))
    assert sim.feed(TimerFired(timer_id=timer.timer_id, name="silence", set_by_seq=0, due_us=0)) == []  # type: ignore[attr-defined]


def test_the_call_ended_by_the_caller_stops_all_decisions() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed(CallEnded(reason="caller_hangup", duration_ms=1))
    assert sim.feed(final("hello")) == []


def test_the_llm_ending_the_call_says_goodbye_then_hangs_up() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed(final("thank you goodbye"))
    bye = sim.feed(decided("call-1/llm/0", text="Goodbye!", calls=(ToolCallSpec(id="x", name="end_call",
                                                                               arguments_json="{}"),)))
    assert types(bye) == ["tts.requested"]
    assert types(sim.feed(done(bye[0].payload.request_id)))[-1] == "call.hangup_requested"  # type: ignore[attr-defined]


# -- the outcome ----------------------------------------------------------------------------------

REFUNDS = AgentSpec.model_validate({
    "id": "refunds", "tenant": "shop", "name": "Refunds", "prompt_id": "refunds/main", "greeting": "Hello.",
    "prompts": {"persona": "You handle refunds.", "task": "Refund what the caller returns."},
    "tools": [{"name": "issue_refund", "description": "Refund an order.", "operation": "webhook.post",
               "webhook_url": "https://shop.example/refunds", "outcome": "refunded"},
              {"name": "look_up_order", "description": "Find an order.", "kind": "webhook",
               "webhook_url": "https://shop.example/orders"}],
})


def refund_turn(sim: CoreSim, tool: str, call_id: str, n: int) -> None:
    sim.feed(final("i want my money back", n))
    sim.feed(decided(f"call-1/llm/{n}", calls=(ToolCallSpec(id=call_id, name=tool, arguments_json="{}"),)))


def test_the_outcome_is_what_the_agent_file_declares_for_the_tool_that_succeeded() -> None:
    sim = CoreSim(REFUNDS)
    started(sim)
    assert outcome(sim.state) == "abandoned"  # the caller has not said anything yet
    refund_turn(sim, "issue_refund", "r1", 0)
    assert outcome(sim.state) == "resolved", "asked for, not done"
    sim.feed(ToolFailed(tool_call_id="r1", tool="issue_refund", error="declined", retryable=False, attempt=1,
                        dead_lettered=True, latency_ms=1))
    assert outcome(sim.state) == "resolved", "a refund that failed is no refund"
    sim.feed(decided("call-1/llm/1", text="That did not work; let me try again."))
    refund_turn(sim, "issue_refund", "r2", 2)
    sim.feed(ToolSucceeded(tool_call_id="r2", tool="issue_refund", result_json="{}", attempt=1, latency_ms=1))
    assert outcome(sim.state) == "refunded"
    sim.feed(decided("call-1/llm/3", text="Done."))
    refund_turn(sim, "look_up_order", "o1", 4)  # a tool that declares no outcome changes none
    sim.feed(ToolSucceeded(tool_call_id="o1", tool="look_up_order", result_json="{}", attempt=1, latency_ms=1))
    assert outcome(sim.state) == "refunded"


def test_a_call_handed_to_a_human_has_that_outcome_until_the_transfer_fails() -> None:
    sim = CoreSim(AGENT)
    started(sim)
    handoff = sim.feed(final("operator"))[1].payload
    assert isinstance(handoff, HandoffRequested)
    assert outcome(sim.state) == "handed_off"
    sim.feed(HandoffCompleted(handoff_id=handoff.handoff_id, target="x", outcome="no_answer"))
    assert outcome(sim.state) == "resolved"


# -- replay ---------------------------------------------------------------------------------------

def conversation() -> CoreSim:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed(done("call-1/tts/0"))
    sim.feed(SpeechStarted(offset_ms=100))
    sim.feed(SpeechStopped(offset_ms=900, duration_ms=800))
    sim.feed(final("book an appointment"))
    call = ToolCallSpec(id="tc1", name="book_appointment", arguments_json="{}")
    sim.feed(decided("call-1/llm/0", calls=(call,)))
    sim.feed(ToolSucceeded(tool_call_id="tc1", tool="book_appointment", result_json="{}", attempt=1, latency_ms=1))
    sim.feed(decided("call-1/llm/1", text="Booked."))
    sim.feed(SpeechStarted(offset_ms=2000))  # barge-in
    sim.feed(done("call-1/tts/1", interrupted=True))
    sim.feed(final("goodbye"))
    return sim


def test_a_recorded_call_replays_identically() -> None:
    sim = conversation()
    result = verify_call(sim.events, AGENT)
    assert result.identical, result.divergence
    assert result.decisions == sum(1 for e in sim.events if e.envelope.producer == "voxlog.core")


def test_a_changed_policy_diverges_at_the_first_differing_decision() -> None:
    sim = conversation()
    changed = AGENT.model_copy(update={"greeting": "Hello there."})
    result = verify_call(sim.events, changed)
    assert not result.identical
    greeting = next(e for e in sim.events if isinstance(e.payload, TtsRequested))
    assert result.divergence is not None
    assert result.divergence.seq == greeting.seq
    assert "Hello there." in result.divergence.reason


def test_a_tampered_recording_diverges_where_it_was_changed() -> None:
    sim = conversation()
    turn = next(e for e in sim.events if isinstance(e.payload, TurnTaken))
    tampered = dataclasses.replace(turn, payload=dataclasses.replace(turn.payload, caller_text="something else"))
    events = [tampered if e is turn else e for e in sim.events]
    result = verify_call(events, AGENT)
    assert result.divergence is not None
    assert result.divergence.seq == turn.seq


def test_replay_checks_the_outcome_the_call_ended_with() -> None:
    sim = conversation()  # booked (the demo's book_appointment declares it), then goodbye
    sim.feed(CallEnded(reason="caller_hangup", duration_ms=5000, outcome="booked"))
    assert verify_call(sim.events, AGENT).identical
    ended = sim.events[-1]
    assert isinstance(ended.payload, CallEnded)
    tampered = dataclasses.replace(ended, payload=dataclasses.replace(ended.payload, outcome="abandoned"))
    result = verify_call([*sim.events[:-1], tampered], AGENT)
    assert result.divergence is not None
    assert (result.divergence.seq, result.divergence.event_type) == (ended.seq, "call.ended")
    assert "booked" in result.divergence.reason


def test_a_missing_decision_is_reported() -> None:
    sim = conversation()
    request = next(e for e in sim.events if isinstance(e.payload, LlmRequested))
    events = [e for e in sim.events if e is not request]
    result = verify_call(events, AGENT)
    assert result.divergence is not None
    assert result.divergence.seq == request.seq + 1
    assert "llm.requested" in result.divergence.reason


# Input events a session can record, in any order a misbehaving world might produce.
def _inputs() -> st.SearchStrategy[EventPayload]:
    request_ids = st.sampled_from([f"call-1/llm/{i}" for i in range(4)])
    tts_ids = st.sampled_from([f"call-1/tts/{i}" for i in range(4)])
    texts = st.sampled_from(["book an appointment", "my internet is down", "human please", "goodbye",
                             "credit card number", "", "hello"])
    tool_calls = st.lists(st.builds(ToolCallSpec, id=st.sampled_from(["a", "b"]),
                                    name=st.sampled_from(["book_appointment", "create_ticket", "end_call",
                                                          "transfer_to_human", "unknown"]),
                                    arguments_json=st.just("{}")), max_size=2).map(tuple)
    return st.one_of(
        st.builds(SpeechStarted, offset_ms=st.integers(0, 10**6)),
        st.builds(SpeechStopped, offset_ms=st.integers(0, 10**6), duration_ms=st.integers(0, 10**4)),
        texts.map(final),
        st.builds(lambda r, t, c: decided(r, t, c), request_ids, texts, tool_calls),
        st.builds(lambda i, ok: ToolSucceeded(tool_call_id=i, tool="book_appointment", result_json="{}", attempt=1,
                                              latency_ms=1) if ok else
                  ToolFailed(tool_call_id=i, tool="create_ticket", error="e", retryable=False, attempt=1,
                             dead_lettered=True, latency_ms=1), st.sampled_from(["a", "b"]), st.booleans()),
        st.builds(lambda r, i: done(r, i), tts_ids, st.booleans()),
        st.builds(lambda n, i: TimerFired(timer_id=f"call-1/timer/{i}", name=n, set_by_seq=0, due_us=0),
                  st.sampled_from(["silence", "max_duration"]), st.integers(0, 5)),
        st.builds(HandoffCompleted, handoff_id=st.just("call-1/handoff"), target=st.just("x"),
                  outcome=st.sampled_from(["connected", "failed"])),
    )


@given(st.lists(_inputs(), max_size=40))
@settings(max_examples=300)
def test_any_sequence_of_inputs_replays_identically(inputs: list[EventPayload]) -> None:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed_all(inputs)
    assert verify_call(sim.events, AGENT).identical
    again = CoreSim(AGENT)
    started(again)
    again.feed_all(inputs)
    assert [e.payload for e in again.events] == [e.payload for e in sim.events]


@given(st.lists(_inputs(), min_size=1, max_size=30))
@settings(max_examples=200)
def test_another_policy_is_caught_wherever_it_first_differs(inputs: list[EventPayload]) -> None:
    sim = CoreSim(AGENT)
    started(sim)
    sim.feed_all(inputs)
    changed: AgentSpec = AGENT.model_copy(update={"fallback": "Pardon?", "reprompt": "Hello?"})
    other = CoreSim(changed)
    started(other)
    other.feed_all(inputs)
    mine = [(e.seq, e.payload) for e in sim.events]
    theirs = [(e.seq, e.payload) for e in other.events]
    result = verify_call(sim.events, changed)
    if mine == theirs:
        assert result.identical
    else:
        first = next((a[0] for a, b in zip(mine, theirs, strict=False) if a != b), min(len(mine), len(theirs)))
        assert result.divergence is not None
        assert result.divergence.seq == first, (result.divergence, json.dumps(str(mine[first:first + 2])))


# -- the caller looked up in the CRM before the greeting -----------------------------------------------------

LOOKUP_AGENT = AgentSpec.model_validate({
    **AGENT.model_dump(mode="json"),
    "tools": [*(t.model_dump(mode="json") for t in AGENT.tools),
              {"name": "find_caller", "description": "Who is calling.", "operation": "crm.find_contact",
               "timeout_s": 1.5}],
    "caller_lookup": {"tool": "find_caller", "greeting": "Hi {first_name}, welcome back to Acme. How can I help?"},
})


def answered_with_lookup(sim: CoreSim, number: str | None = "+12125550123") -> list[object]:
    sim.feed(CallStarted(channel="phone", direction="inbound", agent_id=LOOKUP_AGENT.id,
                         agent_version=LOOKUP_AGENT.version, routed_by="number", from_number=number))
    return sim.feed(CallAnswered(answered_by=None))  # type: ignore[return-value]


def looked_up(result: dict[str, object]) -> ToolSucceeded:
    return ToolSucceeded(tool_call_id="lookup", tool="find_caller", result_json=json.dumps(result), attempt=1,
                         latency_ms=80, connector="hubspot", remote_id=str(result.get("contact_id", "")))


def test_a_known_caller_is_looked_up_before_the_greeting_and_greeted_by_name() -> None:
    sim = CoreSim(LOOKUP_AGENT)
    (asked,) = answered_with_lookup(sim)
    request = asked.payload  # type: ignore[attr-defined]
    assert request.EVENT_TYPE == "tool.requested"
    assert (request.operation, request.caller_number) == ("crm.find_contact", "+12125550123")
    assert json.loads(request.arguments_json) == {"phone": "+12125550123"}
    assert request.deadline_us == sim.now_us + 1_500_000  # the tool's own timeout bounds the silence
    assert isinstance(asked.action, RunTool)  # type: ignore[attr-defined]
    assert sim.feed(final("hello?")) == []  # words into the silence before the greeting are no turn
    decisions = sim.feed(looked_up({"found": True, "contact_id": "501", "first_name": "Ada", "name": "Ada Lovelace",
                                    "company": "Analytical Engines", "details": {"lifecyclestage": "customer"}}))
    greeting = next(d.payload for d in decisions if isinstance(d.payload, TtsRequested))
    assert greeting.text.endswith("Hi Ada, welcome back to Acme. How can I help?")
    sim.feed(done(greeting.request_id))
    turn = sim.feed(final("my internet is down", 1))
    llm = next(d.action for d in turn if isinstance(d.action, CallLlm))  # type: ignore[attr-defined]
    told = " ".join(m.content for m in llm.request.messages if m.role == "system")
    assert "Ada Lovelace" in told
    assert "Analytical Engines" in told
    assert verify_call(sim.events, LOOKUP_AGENT).divergence is None


@pytest.mark.parametrize("outcome_of_lookup", ["not_found", "failed", "late"])
def test_an_unknown_or_unreachable_caller_hears_the_usual_greeting(outcome_of_lookup: str) -> None:
    sim = CoreSim(LOOKUP_AGENT)
    answered_with_lookup(sim)
    if outcome_of_lookup == "not_found":
        decisions = sim.feed(looked_up({"found": False}))
    else:
        # A retry first (ignored: only the worker's last word counts), then the last failure or the deadline.
        assert sim.feed(ToolFailed(tool_call_id="lookup", tool="find_caller", error="503", retryable=True, attempt=1,
                                   dead_lettered=False, latency_ms=5)) == []
        error = "unavailable (HTTP 503)" if outcome_of_lookup == "failed" else "no reply by the tool's deadline"
        decisions = sim.feed(ToolFailed(tool_call_id="lookup", tool="find_caller", error=error, retryable=False,
                                        attempt=2, dead_lettered=True, latency_ms=1500))
    greeting = next(d.payload for d in decisions if isinstance(d.payload, TtsRequested))
    assert greeting.text.endswith(LOOKUP_AGENT.greeting)
    assert verify_call(sim.events, LOOKUP_AGENT).divergence is None


def test_a_caller_without_a_number_is_not_looked_up() -> None:
    decisions = answered_with_lookup(CoreSim(LOOKUP_AGENT), number=None)
    assert "tool.requested" not in types(decisions)
    assert "tts.requested" in types(decisions)


def test_a_lookup_must_name_a_crm_tool() -> None:
    with pytest.raises(ValueError, match=r"crm\.find_contact"):
        AgentSpec.model_validate({**LOOKUP_AGENT.model_dump(mode="json"), "caller_lookup": {"tool": "create_ticket"}})
