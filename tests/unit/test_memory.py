"""What a finished call leaves in the caller's memory, and the caller's key."""

from __future__ import annotations

from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import CallStarted, HandoffRequested, ToolSucceeded, TtsRequested, TurnTaken
from streams.memory import (
    SUMMARY_INSTRUCTIONS,
    TRANSCRIPT_MAX_CHARS,
    caller_key,
    clean_summary,
    notes_of,
    person_number,
    summarize,
    summary_request,
)


def events(*payloads: EventPayload) -> list[Event[EventPayload]]:
    return [Event(Envelope(event_id=f"e{i}", tenant_id="demo", call_id="call-1", seq=i, type=p.EVENT_TYPE,
                           schema_version=p.EVENT_VERSION, event_time_us=i, producer="t", producer_version="0"), p)
            for i, p in enumerate(payloads)]


def turn(text: str) -> TurnTaken:
    return TurnTaken(turn_index=0, caller_text=text, utterance_ids=("u0",), end_of_turn_ms=0)


def test_a_summary_says_what_was_done_in_order_once_each() -> None:
    booked = ToolSucceeded(tool_call_id="t1", tool="book_appointment", attempt=1, latency_ms=1,
                           result_json='{"confirmation": "A1001", "when": "tomorrow at ten"}')
    ticket = ToolSucceeded(tool_call_id="t2", tool="create_ticket", attempt=1, latency_ms=1,
                           result_json='{"ticket_id": "T1002"}')
    handoff = HandoffRequested(handoff_id="h", reason="caller_asked", target="+15550199", summary="")
    assert summarize(notes_of(events(turn("book please"), booked, ticket, handoff, handoff))) == (
        "you booked a visit for tomorrow at ten (confirmation A1001) and we opened ticket T1002 for you "
        "and you asked to speak with a person")
    odd = ToolSucceeded(tool_call_id="t3", tool="send_sms", attempt=1, latency_ms=1, result_json="not json")
    assert summarize(notes_of(events(odd))) == "we ran send sms for you"


def test_a_call_with_words_but_no_action_remembers_the_words_and_a_silent_one_nothing() -> None:
    assert summarize(notes_of(events(turn("  what are your hours ")))) == 'you told us "what are your hours"'
    assert summarize(notes_of(events(turn("  ")))) is None
    assert summarize([]) is None


def test_the_key_is_the_tenant_and_the_number_hashed() -> None:
    key = caller_key("demo", "+15557770042")
    assert key is not None
    assert key.startswith("caller-")
    assert "5557770042" not in key
    assert key == caller_key("demo", "+15557770042")
    assert key != caller_key("other", "+15557770042")
    assert caller_key("demo", None) is None
    inbound = CallStarted(channel="phone", direction="inbound", agent_id="a", agent_version="v", routed_by="number",
                          from_number="+1555", to_number="+1666")
    outbound = CallStarted(channel="phone", direction="outbound", agent_id="a", agent_version="v",
                           routed_by="outbound_request", from_number="+1666", to_number="+1555")
    assert person_number(inbound) == person_number(outbound) == "+1555"


def test_an_llm_is_asked_for_the_summary_with_the_whole_transcript() -> None:
    booked = ToolSucceeded(tool_call_id="t1", tool="book_appointment", attempt=1, latency_ms=1,
                           result_json='{"confirmation": "A1001", "when": "tomorrow at ten"}')
    said = TtsRequested(request_id="r1", text="Booked for tomorrow at ten.", provider="espeak-ng", voice="en-us",
                        codec="pcm_s16le", sample_rate=16000)
    request = summary_request(notes_of(events(turn("book me for tomorrow at ten"), booked, said)),
                              request_id="c/summary", model="gpt-4o")
    assert request is not None
    assert (request.request_id, request.model, request.tools) == ("c/summary", "gpt-4o", ())
    system, user = request.messages
    assert (system.role, system.content) == ("system", SUMMARY_INSTRUCTIONS)
    assert user.role == "user"
    assert user.content == ("Caller: book me for tomorrow at ten\n"
                            'Tool book_appointment result: {"confirmation": "A1001", "when": "tomorrow at ten"}\n'
                            "Agent: Booked for tomorrow at ten.")
    assert summary_request(notes_of(events(turn(" "))), request_id="x", model="m") is None


def test_a_very_long_call_sends_its_newest_part() -> None:
    lines = events(*(turn(f"line {i} " + "x" * 100) for i in range(500)))
    request = summary_request(notes_of(lines), request_id="x", model="m")
    assert request is not None
    assert len(request.messages[1].content) == TRANSCRIPT_MAX_CHARS
    assert request.messages[1].content.endswith("line 499 " + "x" * 100)


def test_an_llm_answer_becomes_one_clause() -> None:
    assert clean_summary(' "Last time, you booked a visit\n for tomorrow at ten." ') == \
        "you booked a visit for tomorrow at ten"
    assert clean_summary("  \n ") is None
    assert len(clean_summary("you " + "a" * 1000) or "") == 400
