"""What-if replay (`streams.call.whatif`): recorded calls re-run through another agent definition."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.base import Event, EventPayload
from streams.call.whatif import Act, WhatIfResult, report_lines, whatif_call
from streams.config.agents import AgentSpec, load_agents
from streams.providers.llm_scripted import ScriptedLlm
from streams.providers.registry import ProviderRegistry
from streams.providers.settings import ProviderSettings
from tests.provider_server import ProviderServer
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.core_calls import CallerStep, play_call

AGENT = next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")
OFFLINE = "offline scripted policy"

BOOKING = (CallerStep("say", "i would like to book an appointment for tomorrow at 10 am"),
           CallerStep("say", "no that's all thank you"))
TICKET = (CallerStep("say", "my internet is down again"), CallerStep("say", "goodbye"))
HUMAN = (CallerStep("say", "i want to speak to a human please"),)
SILENT = (CallerStep("silence", silence_s=30),)
BARGE = (CallerStep("barge", "sorry my router is broken"), CallerStep("say", "bye"))
SCENARIOS = {"booking": BOOKING, "ticket": TICKET, "human": HUMAN, "silent": SILENT, "barge": BARGE}


def recorded(steps: Sequence[CallerStep], *, agent: AgentSpec = AGENT, call_id: str = "call-1",
             **kwargs: object) -> list[Event[EventPayload]]:
    return asyncio.run(play_call(agent, steps, call_id=call_id, **kwargs)).events  # type: ignore[arg-type]


def whatif(events: Sequence[Event[EventPayload]], agent: AgentSpec, *,
           recorded_agent: AgentSpec | None = AGENT) -> WhatIfResult:
    return asyncio.run(whatif_call(events, agent, ScriptedLlm(agent), OFFLINE, recorded_agent=recorded_agent))


def agent_with(**changes: object) -> AgentSpec:
    return AgentSpec.model_validate({**AGENT.model_dump(mode="json"), **changes})


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("knows_recorded_agent", [True, False])
def test_the_agent_that_took_the_call_changes_nothing(name: str, knows_recorded_agent: bool) -> None:
    events = recorded(SCENARIOS[name])
    result = whatif(events, AGENT, recorded_agent=AGENT if knows_recorded_agent else None)
    assert result.problem is None
    assert not result.changed, "\n".join(report_lines(result))
    assert result.turns
    assert all(turn.same and not turn.after_difference for turn in result.turns)
    # Without the definition that took the call, the offline policy's model (its script) is unknown: it answers.
    answered = "recorded answer" if knows_recorded_agent else OFFLINE
    assert all(turn.answered_by in ("-", answered) for turn in result.turns)
    assert "unchanged" in result.summary


CALLER_WORDS = ["i would like to book an appointment", "book a visit for monday at 2 pm", "my internet is down",
                "the router is broken", "can i talk to a person", "hello", "what", "no that's all thank you",
                "um", "goodbye", "yes", "credit card number", "a password please"]
STEPS = st.one_of(
    st.builds(CallerStep, st.sampled_from(["say", "barge"]), st.sampled_from(CALLER_WORDS)),
    st.builds(CallerStep, st.just("press"), st.sampled_from(list("0123456789*#"))),
    st.builds(CallerStep, st.just("silence"), st.just(""), st.floats(min_value=1, max_value=40)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEPS, max_size=8), failing=st.sets(st.sampled_from(["book_appointment", "create_ticket"])),
       handoff=st.sampled_from(["connected", "no-answer", "failed"]), knows=st.booleans())
def test_any_recorded_call_is_unchanged_under_its_own_agent(steps: list[CallerStep], failing: set[str],
                                                            handoff: str, knows: bool) -> None:
    events = recorded(steps, failing_tools=frozenset(failing), handoff_outcome=handoff)
    result = whatif(events, AGENT, recorded_agent=AGENT if knows else None)
    assert not result.changed, "\n".join(report_lines(result))


def test_a_reworded_greeting_changes_the_opening_and_marks_the_rest_counterfactual() -> None:
    result = whatif(recorded(BOOKING), agent_with(greeting="Acme here, what can we do for you?"))
    assert result.changed
    assert result.first_difference == 0
    opening = result.turns[0]
    assert any("Acme here, what can we do for you?" in act.text for act in opening.now)
    assert not any("Acme here" in act.text for act in opening.then)
    later = result.turns[1:]
    assert later
    assert all(turn.after_difference for turn in later)
    # The history the LLM sees holds the new greeting: its requests are not the recorded ones.
    assert all(turn.answered_by == OFFLINE for turn in later if turn.answered_by != "-")
    assert later[0].same  # the scripted policy books whatever the greeting was
    lines = report_lines(result)
    assert any("FIRST DIFFERENCE" in line for line in lines)


def test_a_removed_tool_changes_only_the_calls_and_turns_that_used_it() -> None:
    without_tickets = agent_with(tools=[t.model_dump(mode="json") for t in AGENT.tools if t.name != "create_ticket"],
                                 script=[i.model_dump(mode="json") for i in AGENT.script if i.name != "ticket"])
    ticket = whatif(recorded(TICKET), without_tickets)
    assert ticket.first_difference == 1
    turn = ticket.turns[1]
    assert any(act.kind == "tool" and act.tool == "create_ticket" for act in turn.then)
    assert not any(act.kind == "tool" for act in turn.now)
    booking = whatif(recorded(BOOKING), without_tickets)
    assert booking.first_difference == 0 or not booking.changed
    # The tool list is in every LLM request, so the answers are the offline policy's, but the acts are the same.
    assert all(turn.same for turn in booking.turns[1:])


def test_a_changed_guardrail_blocks_the_turn_it_matches() -> None:
    guarded = agent_with(guardrails={**AGENT.guardrails.model_dump(mode="json"),
                                     "blocked_input": [*AGENT.guardrails.blocked_input, "(?i)internet"]})
    result = whatif(recorded(TICKET), guarded)
    assert result.first_difference == 1
    now = result.turns[1].now
    assert [act.kind for act in now][:1] == ["guardrail"]
    assert any(act.kind == "say" and act.text == AGENT.guardrails.refusal for act in now)
    assert not whatif(recorded(BOOKING), guarded).changed


def test_a_tool_with_other_arguments_is_never_run_and_the_turn_says_so() -> None:
    script = [i.model_dump(mode="json") for i in AGENT.script]
    for intent in script:
        if intent["name"] == "book":
            intent["arguments"] = {"day": "{day}", "time": "{time}", "note": "booked by the new agent"}
    result = whatif(recorded(BOOKING), agent_with(script=script))
    turn = result.turns[result.first_difference or 0]
    tool = next(act for act in turn.now if act.kind == "tool")
    assert "booked by the new agent" in tool.arguments
    assert any("would have called book_appointment" in note and "never runs tools" in note for note in turn.notes)


def test_a_transfer_the_recording_never_had_stops_the_whatif() -> None:
    handoff = {**AGENT.handoff.model_dump(mode="json"), "phrases": ["internet"]} if AGENT.handoff else None
    result = whatif(recorded(TICKET), agent_with(handoff=handoff))
    turn = result.turns[1]
    assert any(act.kind == "handoff" for act in turn.now)
    assert any("what-if stops here" in note for note in turn.notes)
    assert all(not t.now for t in result.turns[2:])


def test_an_erased_or_unfinished_call_is_not_compared() -> None:
    events = recorded(BOOKING)
    unfinished = whatif(events[:-1], AGENT)
    assert unfinished.problem == "the call has not ended"
    assert not unfinished.changed
    assert whatif([], AGENT).problem == "no call.started event"


def test_the_report_is_redacted_on_request() -> None:
    steps = (CallerStep("say", "book an appointment and call me back on 212 555 0147"), CallerStep("say", "bye"))
    result = whatif(recorded(steps), agent_with(greeting="Hello!"))
    plain = json.dumps(result.as_dict(redact=False))
    redacted = json.dumps(result.as_dict(redact=True))
    assert "555 0147" in plain
    assert "555 0147" not in redacted
    assert "0147" not in redacted
    assert result.as_dict(redact=True)["changed"] is True


def test_a_model_switch_answers_every_new_request_with_that_model() -> None:
    """`--provider openai --model gpt-4o-mini` on a call the offline policy answered: the requests are not the
    recorded ones (another model), so OpenAI's real SDK answers each, here from recorded fixtures."""
    switched = agent_with(llm={"provider": "openai", "model": "gpt-4o-mini"})
    events = recorded(BOOKING)

    async def run() -> tuple[WhatIfResult, str, list[dict[str, object]]]:
        async with ProviderServer() as server:
            for name in ("chat_tool_call_stream", "chat_text_stream", "chat_text_stream", "chat_text_stream"):
                server.reply(f"openai/{name}")
            registry = ProviderRegistry(ProviderSettings(openai_api_key="sk-test-whatif",
                                                         openai_base_url=f"{server.base_url}/v1"))
            try:
                llm, label = registry.whatif_llm(switched)
                result = await whatif_call(events, switched, llm, label, recorded_agent=AGENT)
            finally:
                await registry.aclose()
            return result, label, [request.json() for request in server.requests]

    result, label, requests = asyncio.run(run())
    assert label == "live openai/gpt-4o-mini"
    assert [request["model"] for request in requests] == ["gpt-4o-mini"] * 3
    booking = result.turns[1]
    assert booking.answered_by == label
    assert Act("tool", tool="book_appointment", arguments='{"day":"Tuesday","time":"after 2 pm"}') in booking.now
    # Other arguments than the recorded booking's: the tool is not run, the model hears so and answers.
    assert any("would have called book_appointment" in note for note in booking.notes)
    assert Act("say", text="Sure, I can book a technician for Tuesday.") in booking.now
    assert result.first_difference == 1


def test_without_the_models_key_the_offline_policy_answers_and_the_report_says_why() -> None:
    switched = agent_with(llm={"provider": "anthropic", "model": "claude-sonnet-4"})
    llm, label = ProviderRegistry(ProviderSettings(anthropic_api_key=None)).whatif_llm(switched)
    assert label.startswith("offline scripted policy (not anthropic/claude-sonnet-4:")
    result = asyncio.run(whatif_call(recorded(BOOKING), switched, llm, label, recorded_agent=AGENT))
    assert not result.changed  # the same script decides; only who answered differs
    assert result.turns[1].answered_by == label
