"""Consent to record: the modes an agent asks in, the tenant's jurisdiction rule, and the core deciding
from the caller's words and keys what the call may keep of their audio, replayed identically."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.base import EventPayload
from schemas.events import (
    CallAnswered,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
    DtmfReceived,
    LlmRequested,
    SpeechStarted,
    SpeechStopped,
    TimerFired,
    TimerSet,
    TtsRequested,
    TurnTaken,
)
from streams.call.core import Decision, keeps_caller_audio, new_state
from streams.call.replay import verify_call
from streams.config.agents import AgentSpec, Consent
from streams.config.consent import (
    CONSENT_MODES,
    CONSENT_RULES,
    ConsentMode,
    ConsentRule,
    answer_of,
    consent_parameters,
    effective_mode,
    request_after,
)
from streams.config.tenants import TenantSpec
from tests.unit.test_core import AGENT, done, final
from voxlog.sim.core_calls import CoreSim

NOTICE = AGENT.consent.text
OPT_OUT_NOTICE = f"{NOTICE} {AGENT.consent.refuse_prompt}"


def agent(mode: ConsentMode, **consent: Any) -> AgentSpec:
    return AGENT.model_copy(update={"consent": Consent.model_validate({**AGENT.consent.model_dump(), "mode": mode,
                                                                        **consent})})


def start(sim: CoreSim, rule: ConsentRule | None = "one_party", *, channel: Literal["phone", "widget"] = "phone",
          direction: Literal["inbound", "outbound"] = "inbound") -> list[Decision]:
    """The call's start as a gateway records it (the mode the tenant's rule gives in its parameters;
    `rule` None: as a session made outside a gateway, with none), then the answer."""
    parameters = {} if rule is None else consent_parameters(sim.agent.consent.mode, rule)
    sim.feed(CallStarted(channel=channel, direction=direction, agent_id=sim.agent.id,
                         agent_version=sim.agent.version, routed_by="number", parameters=parameters))
    return sim.feed(CallAnswered(answered_by=None))


def of_type(decisions: list[Decision], kind: type[EventPayload]) -> list[Any]:
    return [d.payload for d in decisions if isinstance(d.payload, kind)]


def types(decisions: list[Decision]) -> list[str]:
    return [d.payload.EVENT_TYPE for d in decisions]


def said(decisions: list[Decision]) -> str:
    (tts,) = of_type(decisions, TtsRequested)
    return str(tts.text)


def keeps(sim: CoreSim) -> bool:
    return keeps_caller_audio(sim.state)


def replays(sim: CoreSim) -> None:
    result = verify_call(sim.events, sim.agent)
    assert result.identical, result.divergence


# -- the rule table and the words --------------------------------------------------------------


@pytest.mark.parametrize(("mode", "rule", "expected"), [
    ("notice", "one_party", "notice"), ("opt_out", "one_party", "opt_out"), ("opt_in", "one_party", "opt_in"),
    ("notice", "all_party", "opt_out"), ("opt_out", "all_party", "opt_out"), ("opt_in", "all_party", "opt_in"),
    ("notice", "explicit", "opt_in"), ("opt_out", "explicit", "opt_in"), ("opt_in", "explicit", "opt_in"),
])
def test_a_call_runs_under_the_stricter_of_the_agents_mode_and_the_tenants_rule(
        mode: ConsentMode, rule: ConsentRule, expected: ConsentMode) -> None:
    assert effective_mode(mode, rule) == expected
    assert consent_parameters(mode, rule) == {"consent_rule": rule, "consent_mode": expected}
    assert {effective_mode(m, r) for m in CONSENT_MODES for r in CONSENT_RULES} == set(CONSENT_MODES)


@pytest.mark.parametrize(("words", "answer"), [
    ("no", "no"), ("No.", "no"), ("Nope", "no"), ("no, I'd like to book a visit", "no"),
    ("please do not record this call", "no"), ("I'd rather not", "no"), ("I would rather not be recorded", "no"),
    ("yes but don't record it", "no"), ("okay, no thanks", "no"),
    ("yes", "yes"), ("Yes please.", "yes"), ("sure, no problem", "yes"), ("that's fine", "yes"),
    ("I have no internet", None), ("I want to book an appointment", None), ("pressed 5", None), ("", None),
])
def test_an_answer_opens_with_its_words_or_holds_a_phrase_and_a_no_wins(
        words: str, answer: Literal["yes", "no"] | None) -> None:
    consent = Consent()
    assert answer_of(words, consent.accept_words, consent.refuse_words) == answer


@pytest.mark.parametrize(("words", "asks"), [
    ("Yes, please book a visit for Friday at two pm.", True), ("no, I'd like to report an outage", True),
    ("yes that's fine", False), ("No, thank you. Goodbye.", False), ("no please do not record this call", False),
    ("no I don't want to be recorded", False), ("yes please", False), ("I want to book a visit", False),
])
def test_an_answer_that_goes_on_to_ask_for_something_is_also_a_turn(words: str, asks: bool) -> None:
    consent = Consent()
    assert request_after(words, consent.accept_words, consent.refuse_words) is asks


def test_agent_and_tenant_files_say_consent_in_words_an_operator_can_check() -> None:
    assert AGENT.consent.mode == "notice"  # existing files keep their behaviour
    assert TenantSpec(id="t").consent.rule == "one_party"
    assert TenantSpec.model_validate({"id": "t", "consent": {"rule": "all_party"}}).consent.rule == "all_party"
    with pytest.raises(ValueError, match="not a telephone key"):
        Consent(refuse_digits=("22",))
    with pytest.raises(ValueError, match="both agree and refuse"):
        Consent(accept_digits=("1", "2"))
    with pytest.raises(ValueError, match="both agree and refuse"):
        Consent(accept_words=("yes", "No"))
    with pytest.raises(ValueError, match="Input should be"):
        Consent.model_validate({"mode": "maybe"})
    with pytest.raises(ValueError, match="Input should be"):
        TenantSpec.model_validate({"id": "t", "consent": {"rule": "some_party"}})


# -- notice ---------------------------------------------------------------------------------------


def test_notice_under_a_one_party_rule_is_todays_notice_and_keeps_the_audio() -> None:
    sim = CoreSim(AGENT)
    decisions = start(sim)
    assert types(decisions) == ["consent.given", "timer.set", "tts.requested"]
    assert of_type(decisions, ConsentGiven) == [ConsentGiven(kind="recording", method="implied_by_continuing",
                                                             prompt_text=NOTICE)]
    assert keeps(sim)
    # A 2 is just a key here: there is nothing to refuse but by hanging up.
    assert types(sim.feed(DtmfReceived(digit="2", offset_ms=0))) == ["turn.taken", "llm.requested"]
    assert keeps(sim)


@pytest.mark.parametrize("text", [NOTICE, ""])
def test_an_all_party_rule_makes_a_notice_agent_ask_and_never_record_silently(text: str) -> None:
    quiet = AGENT.model_copy(update={"consent": AGENT.consent.model_copy(update={"text": text})})
    sim = CoreSim(quiet)
    decisions = start(sim, "all_party")
    assert types(decisions) == ["timer.set", "tts.requested"]  # no consent taken for granted
    assert said(decisions) == f"{OPT_OUT_NOTICE} {AGENT.greeting}"
    assert sim.state.consent == "pending"
    assert not of_type(sim.feed(DtmfReceived(digit="2", offset_ms=0)), TurnTaken)
    assert sim.state.consent == "refused"
    replays(sim)


def test_the_mode_recorded_with_the_start_is_the_one_replay_uses() -> None:
    """A session made outside a gateway records no mode: the agent's own applies; a recorded one wins
    over the agent's file (it was the tenant's rule that asked for it)."""
    sim = CoreSim(agent("opt_out"))
    start(sim, None)
    assert sim.state.consent_mode == "opt_out"
    strict = CoreSim(AGENT)
    start(strict, "explicit")
    assert strict.state.consent_mode == "opt_in"
    replays(strict)
    started = strict.events[0].payload
    assert isinstance(started, CallStarted)
    assert not keeps_caller_audio(new_state(AGENT, started))  # what the session keeps before any decision


# -- opt_out --------------------------------------------------------------------------------------


def test_opt_out_refused_by_a_key_during_the_notice_keeps_nothing_after_and_the_call_goes_on() -> None:
    sim = CoreSim(agent("opt_out"))
    greeting = start(sim)
    assert said(greeting) == f"{OPT_OUT_NOTICE} {AGENT.greeting}"
    assert keeps(sim)  # opt_out: kept until a refusal
    refusal = sim.feed(DtmfReceived(digit="2", offset_ms=1200))
    assert of_type(refusal, ConsentRefused) == [ConsentRefused(kind="recording", method="dtmf",
                                                               prompt_text=OPT_OUT_NOTICE)]
    assert said(refusal) == AGENT.consent.refused
    assert not keeps(sim)
    assert sim.feed(DtmfReceived(digit="2", offset_ms=1500)) == []  # said again: nothing more
    sim.feed(done("call-1/tts/1"))
    turn = sim.feed(final("i would like to book an appointment"))
    assert types(turn) == ["turn.taken", "llm.requested"]  # served all the same
    assert not keeps(sim)
    replays(sim)


def test_opt_out_refused_in_the_callers_first_words() -> None:
    sim = CoreSim(agent("opt_out"))
    start(sim)
    sim.feed(done("call-1/tts/0"))
    refusal = sim.feed(final("no please don't record me"))
    assert of_type(refusal, ConsentRefused)[0].method == "speech"
    assert not of_type(refusal, TurnTaken)  # the answer is not a turn
    assert not keeps(sim)
    sim.feed(done("call-1/tts/1"))
    assert types(sim.feed(final("my internet is down", 1))) == ["turn.taken", "llm.requested"]
    replays(sim)


def test_an_answer_with_a_request_answers_and_is_served() -> None:
    sim = opt_in_asked()
    agreed = sim.feed(final("yes please book a visit for friday at two pm"))
    assert types(agreed) == ["timer.cancelled", "consent.given", "tts.requested", "turn.taken", "llm.requested"]
    assert said(agreed) == AGENT.consent.accepted  # not the greeting: the caller has asked already
    assert keeps(sim)
    refusing = CoreSim(agent("opt_out"))
    start(refusing)
    refused = refusing.feed(final("no, i would like to book an appointment"))
    assert types(refused) == ["consent.refused", "tts.requested", "turn.taken", "llm.requested"]
    assert of_type(refused, TurnTaken)[0].caller_text == "no, i would like to book an appointment"
    assert not keeps(refusing)
    replays(sim)
    replays(refusing)


def test_opt_out_continuing_is_consent_and_a_later_no_is_just_words_but_a_key_still_refuses() -> None:
    sim = CoreSim(agent("opt_out"))
    start(sim)
    sim.feed(done("call-1/tts/0"))
    first = sim.feed(final("i would like to book an appointment"))
    assert types(first) == ["consent.given", "turn.taken", "llm.requested"]
    assert of_type(first, ConsentGiven)[0].method == "implied_by_continuing"
    assert of_type(first, TurnTaken)[0].caller_text == "i would like to book an appointment"
    later = sim.feed(final("no thank you", 1))  # consent is not asked any more
    assert not of_type(later, ConsentRefused)
    revoked = sim.feed(DtmfReceived(digit="2", offset_ms=9000))
    assert of_type(revoked, ConsentRefused)[0].method == "dtmf"
    assert not keeps(sim)
    replays(sim)


def test_opt_out_another_key_first_is_continuing() -> None:
    sim = CoreSim(agent("opt_out"))
    start(sim)
    decisions = sim.feed(DtmfReceived(digit="5", offset_ms=0))
    assert types(decisions)[:2] == ["consent.given", "turn.taken"]
    assert of_type(decisions, TurnTaken)[0].caller_text == "pressed 5"


# -- opt_in ---------------------------------------------------------------------------------------


def opt_in_asked(**consent: Any) -> CoreSim:
    """An opt_in call with its question said: the time to answer runs."""
    sim = CoreSim(agent("opt_in", **consent))
    greeting = start(sim)
    assert types(greeting) == ["timer.set", "tts.requested"]
    assert said(greeting) == sim.agent.consent.question
    assert not keeps(sim)
    waiting = sim.feed(done("call-1/tts/0"))
    (timer,) = of_type(waiting, TimerSet)
    assert timer.name == "consent"
    assert timer.due_us == sim.now_us + sim.agent.consent.answer_timeout_s * 1_000_000
    return sim


@pytest.mark.parametrize(("answer", "method"), [(final("yes that's fine"), "speech"),
                                                (DtmfReceived(digit="1", offset_ms=3000), "dtmf")])
def test_opt_in_a_yes_by_words_or_key_keeps_the_audio_from_then_and_greets(
        answer: EventPayload, method: str) -> None:
    sim = opt_in_asked()
    agreed = sim.feed(answer)
    assert types(agreed) == ["timer.cancelled", "consent.given", "tts.requested"]
    assert of_type(agreed, ConsentGiven) == [ConsentGiven(kind="recording", method=method,
                                                          prompt_text=AGENT.consent.question)]
    assert said(agreed) == f"{AGENT.consent.accepted} {AGENT.greeting}"
    assert keeps(sim)
    assert sim.feed(DtmfReceived(digit="1", offset_ms=4000)) == []  # pressed again: nothing
    revoked = sim.feed(DtmfReceived(digit="2", offset_ms=5000))
    assert of_type(revoked, ConsentRefused)[0].method == "dtmf"
    assert not keeps(sim)
    replays(sim)


@pytest.mark.parametrize(("answer", "method"), [(final("no"), "speech"),
                                                (DtmfReceived(digit="2", offset_ms=3000), "dtmf")])
def test_opt_in_a_no_keeps_nothing_and_the_agent_greets_and_serves(answer: EventPayload, method: str) -> None:
    sim = opt_in_asked()
    refused = sim.feed(answer)
    assert of_type(refused, ConsentRefused) == [ConsentRefused(kind="recording", method=method,
                                                               prompt_text=AGENT.consent.question)]
    assert said(refused) == f"{AGENT.consent.refused} {AGENT.greeting}"
    assert not keeps(sim)
    assert sim.feed(DtmfReceived(digit="1", offset_ms=4000)) == []  # a refusal stands
    sim.feed(done("call-1/tts/1"))
    assert types(sim.feed(final("i would like to book an appointment", 1))) == ["turn.taken", "llm.requested"]
    assert not keeps(sim)
    replays(sim)


def test_opt_in_silence_is_a_refusal() -> None:
    sim = opt_in_asked()
    timer = sim.state.timers["consent"]
    refused = sim.feed(TimerFired(timer_id=timer, name="consent", set_by_seq=0, due_us=0), after_ms=8000)
    assert of_type(refused, ConsentRefused)[0].method == "silence"
    assert said(refused) == f"{AGENT.consent.refused} {AGENT.greeting}"
    assert not keeps(sim)
    replays(sim)


def test_opt_in_the_time_to_answer_waits_while_the_caller_speaks() -> None:
    sim = opt_in_asked()
    assert types(sim.feed(SpeechStarted(offset_ms=100))) == ["timer.cancelled"]
    rearmed = sim.feed(SpeechStopped(offset_ms=600, duration_ms=500))  # noise: no words came
    assert [t.name for t in of_type(rearmed, TimerSet)] == ["consent"]
    assert sim.feed(final("")) == []
    assert sim.state.consent == "pending"
    replays(sim)


def test_opt_in_an_answer_that_is_no_yes_keeps_nothing_and_is_served_as_a_turn() -> None:
    sim = opt_in_asked()
    decisions = sim.feed(final("i would like to book an appointment"))
    assert types(decisions) == ["timer.cancelled", "consent.refused", "tts.requested", "turn.taken", "llm.requested"]
    assert of_type(decisions, ConsentRefused)[0].method == "unclear"
    assert said(decisions) == AGENT.consent.refused  # the caller already said what they want
    assert of_type(decisions, LlmRequested)
    assert not keeps(sim)
    replays(sim)


@pytest.mark.parametrize("mode", ["opt_out", "opt_in"])
def test_the_widget_is_asked_in_words_only(mode: ConsentMode) -> None:
    sim = CoreSim(agent(mode))
    greeting = start(sim, channel="widget")
    consent = sim.agent.consent
    expected = consent.widget_question if mode == "opt_in" else f"{NOTICE} {consent.widget_refuse_prompt}"
    assert said(greeting).startswith(expected)
    answer = sim.feed(final("no"))
    assert of_type(answer, ConsentRefused)[0] == ConsentRefused(kind="recording", method="speech",
                                                                prompt_text=expected)


def test_an_outbound_call_asks_the_same_once_answered_then_opens_with_its_own_greeting() -> None:
    sim = CoreSim(agent("opt_in"))
    greeting = start(sim, direction="outbound")
    assert said(greeting) == AGENT.consent.question
    sim.feed(done("call-1/tts/0"))
    agreed = sim.feed(final("yes"))
    assert said(agreed) == f"{AGENT.consent.accepted} {AGENT.outbound_greeting}"
    opt_out = CoreSim(AGENT)
    assert said(start(opt_out, "all_party", direction="outbound")) == f"{OPT_OUT_NOTICE} {AGENT.outbound_greeting}"


# -- any order of the world's inputs --------------------------------------------------------------


def _consent_inputs() -> st.SearchStrategy[EventPayload]:
    timer_ids = st.integers(0, 6).map(lambda i: f"call-1/timer/{i}")
    return st.one_of(
        st.sampled_from(["yes", "no", "i want to book an appointment", "", "no thank you", "okay",
                         "yes please book a visit for friday", "no i would like to report an outage"]).map(final),
        st.builds(DtmfReceived, digit=st.sampled_from(["1", "2", "5", "#"]), offset_ms=st.integers(0, 10**5)),
        st.builds(SpeechStarted, offset_ms=st.integers(0, 10**5)),
        st.builds(SpeechStopped, offset_ms=st.integers(0, 10**5), duration_ms=st.integers(0, 10**4)),
        st.builds(lambda r, i: done(r, i), st.sampled_from([f"call-1/tts/{i}" for i in range(4)]), st.booleans()),
        st.builds(lambda n, i: TimerFired(timer_id=i, name=n, set_by_seq=0, due_us=0),
                  st.sampled_from(["consent", "silence"]), timer_ids),
    )


@given(mode=st.sampled_from(CONSENT_MODES), rule=st.sampled_from(CONSENT_RULES),
       inputs=st.lists(_consent_inputs(), max_size=25))
@settings(max_examples=300, deadline=None)
def test_consent_is_replayed_identically_and_nothing_is_kept_without_it(
        mode: ConsentMode, rule: ConsentRule, inputs: list[EventPayload]) -> None:
    sim = CoreSim(agent(mode))
    start(sim, rule)
    refused = False
    for payload in inputs:
        decisions = sim.feed(payload)
        refused = refused or bool(of_type(decisions, ConsentRefused))
        if refused:
            assert not keeps(sim), "a refusal stands"
        given_yet = any(isinstance(e.payload, ConsentGiven) for e in sim.events)
        if sim.state.consent_mode == "opt_in" and not given_yet:
            assert not keeps(sim), "opt_in keeps nothing before a yes"
    assert sum(isinstance(e.payload, ConsentRefused) for e in sim.events) <= 1
    replays(sim)
