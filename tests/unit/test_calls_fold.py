"""The calls fold when a call's two topics are read apart: voxlog.commands (`tool.requested`) read
ahead of voxlog.calls, then a restart that resumes voxlog.calls at the call's start while the
`tool.requested` is behind the resumed voxlog.commands. However the call's events came, the tables
end up holding the same rows, `_version` included; and the names a call was told are redacted."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from projections.audit import epoch_us
from projections.calls import CallsFold
from projections.projection_runner import RowBatch
from projections.tables import CALLS as CALLS_TABLE
from projections.tables import PROMPT_VERSIONS, TOOL_CALLS, Output, at
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import (
    CallEnded,
    CallRefused,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
    ErrorRaised,
    HandoffOutcome,
    HandoffRequested,
    LlmDecided,
    LlmRequested,
    SpeechStopped,
    ToolCallSpec,
    ToolFailed,
    ToolRequested,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
)
from schemas.topics import CALLS, COMMANDS, topic_for
from streams.redaction import default_redactor

ASKED = ToolCallSpec(id="tc1", name="book_appointment", arguments_json='{"day": "tuesday", "phone": "+15557000001"}')
PAYLOADS: list[EventPayload] = [
    CallStarted(channel="phone", direction="inbound", agent_id="front-desk", agent_version="sha256:x",
                from_number="+15557000001", to_number="+15550100", provider_call_id="CA1", routed_by="number"),
    LlmDecided(request_id="call-1/llm/0", provider="openai", model="gpt-4o", text="", tool_calls=(ASKED,),
               finish_reason="tool_calls", input_tokens=10, output_tokens=5, time_to_first_token_ms=300, total_ms=400),
    ToolRequested(tool_call_id="tc1", tool="book_appointment", arguments_json=ASKED.arguments_json,
                  idempotency_key="call-1/tc1"),
    ToolSucceeded(tool_call_id="tc1", tool="book_appointment", result_json='{"confirmation": "A1"}', attempt=1,
                  latency_ms=12),
    CallEnded(reason="caller_hangup", duration_ms=30_000, outcome="booked"),
]
EVENTS = [Event(Envelope(event_id=f"call-1/{seq}", tenant_id="demo", call_id="call-1", seq=seq, type=p.EVENT_TYPE,
                         schema_version=p.EVENT_VERSION, event_time_us=1_000_000 * (seq + 1) + 1_000 * seq,
                         producer="t", producer_version="0"), p) for seq, p in enumerate(PAYLOADS)]
REQUESTED = 2  # the one event on voxlog.commands


def tables(*writes: list[Output]) -> dict[str, list[tuple[Any, ...]]]:
    """What ReplacingMergeTree keeps of the rows written, in the order written."""
    batch = RowBatch()
    for rows in writes:
        batch.add(rows)
    return {table.name: sorted(rows, key=repr) for table, rows in batch.per_table()}


def fold(events: list[Event[EventPayload]]) -> list[Output]:
    calls = CallsFold(default_redactor())
    return [row for event in events for row in calls.apply(event)]


def test_a_call_folded_again_without_its_tool_request_writes_the_same_rows() -> None:
    in_order = tables(fold(EVENTS))
    # voxlog.commands read first: the call folded from the log's history; then a restart resumes
    # voxlog.calls at the call's start, its tool.requested already behind voxlog.commands.
    without_request = [e for e in EVENTS if e.seq != REQUESTED]
    restarted = tables(fold(EVENTS), fold(without_request))
    assert restarted == in_order
    # And a fold that never saw the request at all.
    assert tables(fold(without_request)) == in_order


def test_the_tool_row_says_when_the_model_asked_and_with_what_redacted() -> None:
    (tool,) = tables(fold(EVENTS))["tool_calls"]
    assert "2026" not in repr(tool)
    assert "+15557000001" not in repr(tool), "arguments are redacted"
    assert any(str(value).startswith("1970-01-01 00:00:02.001") for value in tool), "the llm.decided's time"


def test_the_tool_row_names_the_system_that_acted_and_what_it_made() -> None:
    done = ToolSucceeded(tool_call_id="tc1", tool="book_appointment", result_json='{"confirmation": "A1"}',
                         attempt=1, latency_ms=12, connector="caldav", remote_id="bc701bd7-3e40")
    events = [e if e.type != "tool.succeeded" else Event(e.envelope, done) for e in EVENTS]
    (tool,) = tables(fold(events))["tool_calls"]
    row = dict(zip(TOOL_CALLS.column_names, tool, strict=True))
    assert (row["connector"], row["remote_id"], row["failure"], row["outcome"]) == (
        "caldav", "bc701bd7-3e40", "", "succeeded")
    refused = ToolFailed(tool_call_id="tc1", tool="book_appointment", error="conflict: taken", retryable=False,
                         attempt=1, dead_lettered=True, latency_ms=30, connector="caldav", failure="conflict")
    events = [e if e.type != "tool.succeeded" else Event(e.envelope, refused) for e in EVENTS]
    (tool,) = tables(fold(events))["tool_calls"]
    row = dict(zip(TOOL_CALLS.column_names, tool, strict=True))
    assert (row["connector"], row["failure"], row["outcome"]) == ("caldav", "conflict", "failed")


# --- Versions: a function of the events, not of the order the two topics were read in -------------


def payloads(call: int) -> list[EventPayload]:
    """A call with two turns, three tool calls (one the model did not ask for, one retried), an
    error, a transfer and its late outcome; its caller's name comes with the call's parameters."""
    first, second, third = (f"tc{call}-{n}" for n in range(3))
    booking = ToolCallSpec(id=first, name="book_appointment",
                           arguments_json='{"day": "tuesday", "customer_name": "Ada Lovelace"}')
    ticket = ToolCallSpec(id=second, name="create_ticket", arguments_json='{"summary": "boiler"}')
    return [
        CallStarted(channel="phone", direction="outbound", agent_id="front-desk", agent_version="sha256:x",
                    from_number="+15557000001", to_number="+15550100", provider_call_id=f"CA{call}",
                    routed_by="outbound_request", parameters={"customer_name": "Ada Lovelace"}),
        ConsentGiven(kind="recording", method="implied_by_continuing", prompt_text="This call is recorded."),
        SpeechStopped(offset_ms=900, duration_ms=900),
        TranscriptFinal(utterance_id="u0", text="it's about my boiler", confidence=0.9, provider="p", model="m",
                        start_ms=0, end_ms=900, latency_ms=120),
        TurnTaken(turn_index=0, caller_text="it's about my boiler", end_of_turn_ms=900, utterance_ids=("u0",)),
        LlmRequested(request_id="llm-0", turn_index=0, agent_id="front-desk", prompt_id="main",
                     prompt_hash="sha256:p", provider="openai", model="gpt-4o", message_count=3),
        LlmDecided(request_id="llm-0", provider="openai", model="gpt-4o", text="", tool_calls=(booking, ticket),
                   finish_reason="tool_calls", input_tokens=10, output_tokens=5, time_to_first_token_ms=300,
                   total_ms=400),
        ToolRequested(tool_call_id=first, tool=booking.name, arguments_json=booking.arguments_json,
                      idempotency_key=first),
        ToolRequested(tool_call_id=second, tool=ticket.name, arguments_json=ticket.arguments_json,
                      idempotency_key=second),
        ToolFailed(tool_call_id=second, tool=ticket.name, error="timeout", retryable=True, attempt=1,
                   dead_lettered=False, latency_ms=5000),
        ToolSucceeded(tool_call_id=first, tool=booking.name, result_json='{"confirmation": "A1"}', attempt=1,
                      latency_ms=12),
        ToolSucceeded(tool_call_id=second, tool=ticket.name, result_json='{"ticket_id": "T1"}', attempt=2,
                      latency_ms=30),
        TtsRequested(request_id="tts-0", text="You're booked for Tuesday, Ada.", provider="p", voice="v",
                     codec="pcm_s16le", sample_rate=16000),
        TtsCompleted(request_id="tts-0", provider="p", voice="v", time_to_first_byte_ms=120, audio_ms=1500,
                     audio_bytes=48000, interrupted=False),
        ErrorRaised(component="tts", kind="slow", message="lovelace's audio was slow", retryable=True, fatal=False),
        TranscriptFinal(utterance_id="u1", text="is lovelace still the account holder", confidence=0.8,
                        provider="p", model="m", start_ms=3000, end_ms=4000, latency_ms=100),
        TurnTaken(turn_index=1, caller_text="is lovelace still the account holder", end_of_turn_ms=4000,
                  utterance_ids=("u1",)),
        ToolRequested(tool_call_id=third, tool="lookup", arguments_json='{"who": "the lovelace account"}',
                      idempotency_key=third),
        ToolSucceeded(tool_call_id=third, tool="lookup", result_json='{"holder": true}', attempt=1, latency_ms=3),
        HandoffRequested(handoff_id="h1", reason="asked", target="+15550199", summary="wants a person"),
        CallEnded(reason="transferred", duration_ms=60_000, outcome="transferred"),
        HandoffOutcome(handoff_id="h1", outcome="answered", provider_status="completed"),
    ]


def events_of(call: int) -> list[Event[EventPayload]]:
    return [Event(Envelope(event_id=f"call-{call}/{seq}", tenant_id="demo", call_id=f"call-{call}", seq=seq,
                           type=p.EVENT_TYPE, schema_version=p.EVENT_VERSION,
                           event_time_us=1_000_000 * (10 * call + seq + 1), producer="t", producer_version="0"), p)
            for seq, p in enumerate(payloads(call))]


TWO_CALLS = [events_of(0), events_of(1)]
"""Two calls using the same prompt: its `prompt_versions` row takes from both."""


Log = list[list[Event[EventPayload]]]
"""Calls, each its events in seq order."""


def interleaving(rng: random.Random, calls: Log = TWO_CALLS) -> list[Event[EventPayload]]:
    """The topics' partitions read apart, as a consumer does: each call's voxlog.calls events and its
    voxlog.commands ones, each in its order, merged at random."""
    streams = [[e for e in call if topic_for(e.type) == topic] for call in calls for topic in (CALLS, COMMANDS)]
    merged: list[Event[EventPayload]] = []
    while any(streams):
        merged.append(rng.choice([s for s in streams if s]).pop(0))
    return merged


def project(reads: list[Event[EventPayload]], restarts: Collection[int] = (), back: int = 0,
            calls: Log = TWO_CALLS) -> list[list[Output]]:
    """What `CallsProjection` writes reading `reads`, killed before each index in `restarts` and
    started again `back` records earlier (offsets are stored behind what was read): a fresh fold,
    prompts seeded from the table, and a call picked up mid-way folded from its history first."""
    writes: list[list[Output]] = []
    fold = CallsFold(default_redactor())
    position = 0
    pending = sorted(restarts)
    while position < len(reads):
        if pending and position == pending[0]:
            pending.pop(0)
            fold = CallsFold(default_redactor())
            for tenant, agent, prompt, digest, _, first, last, _ in tables(*writes).get(PROMPT_VERSIONS.name, []):
                fold.seed_prompt(tenant, agent, prompt, digest, epoch_us(first), epoch_us(last))
            position = max(0, position - back)
        event = reads[position]
        if not fold.knows(event.call_id) and not isinstance(event.payload, CallStarted):
            history = next(call for call in calls if call[0].call_id == event.call_id)
            writes.append([row for earlier in history for row in fold.apply(earlier)])
        writes.append(fold.apply(event))
        position += 1
    return writes


def rebuild() -> dict[str, list[tuple[Any, ...]]]:
    return tables(*project([e for call in TWO_CALLS for e in call]))


def test_every_read_order_gives_the_rebuilds_rows_versions_included() -> None:
    expected = rebuild()
    assert set(expected) == {"calls", "turns", "transcripts", "tool_calls", "errors", "prompt_versions"}
    commands_last = [e for e in interleaving(random.Random(0)) if topic_for(e.type) != COMMANDS] + [
        e for call in TWO_CALLS for e in call if topic_for(e.type) == COMMANDS]
    assert tables(*project(commands_last)) == expected, "voxlog.commands read behind voxlog.calls"
    rng = random.Random(11)
    for attempt in range(40):
        assert tables(*project(interleaving(rng))) == expected, attempt


def test_restarts_anywhere_give_the_rebuilds_rows_versions_included() -> None:
    """Killed before random reads and started again a few records back, any number of times: a
    call first seen mid-way is folded from its history, one first seen at its call.started (its
    tool.requested perhaps read before the kill) from there. Every tool call here was asked for
    by an llm.decided (see projections.calls on one that was not)."""
    asked_only = [[e for e in call if getattr(e.payload, "tool_call_id", "").split("-")[-1] != "2"]
                  for call in TWO_CALLS]
    expected = tables(*project([e for call in asked_only for e in call], calls=asked_only))
    rng = random.Random(5)
    for attempt in range(60):
        reads = interleaving(rng, asked_only)
        restarts = set(rng.sample(range(1, len(reads)), k=1 + attempt % 4))
        written = project(reads, restarts, back=rng.randrange(4), calls=asked_only)
        assert tables(*written) == expected, (attempt, sorted(restarts))


def test_a_rows_version_is_the_newest_seq_that_changed_it() -> None:
    """So a row updated by later events of its call gets a higher version, and FINAL picks it."""
    table = rebuild()
    assert {row[1]: row[-1] for row in table["calls"]} == {"call-0": 21, "call-1": 21}, "the late transfer outcome"
    tools = {row[2]: row[-1] for row in table["tool_calls"] if row[1] == "call-0"}
    assert tools == {"tc0-0": 10, "tc0-1": 11, "tc0-2": 18}, "each tool call's last result"
    turns = {row[3]: row[-1] for row in table["turns"] if row[1] == "call-0"}
    assert turns == {0: 13, 1: 16}, "turn 0's speech completed, turn 1 taken"
    (prompt,) = table["prompt_versions"]
    assert prompt[-1] == epoch_us(prompt[6]) == 1_000_000 * (10 + 5 + 1), "the last use, in call-1"
    written = [row[1] for rows in project(TWO_CALLS[0]) for row in rows
               if isinstance(row, tuple) and row[0] is TOOL_CALLS]
    assert [v[-1] for v in written if v[2] == "tc0-1"] == [8, 9, 11], "requested, failed, succeeded"


def test_names_the_call_was_told_are_redacted_wherever_said_after() -> None:
    table = rebuild()
    transcripts = sorted((row[2], row[5]) for row in table["transcripts"] if row[1] == "call-0")
    assert transcripts == [(3, "it's about my boiler"), (12, "You're booked for Tuesday, <PERSON>."),
                           (15, "is <PERSON> still the account holder")]
    assert [row[5] for row in table["turns"] if row[1] == "call-0"] == [
        "it's about my boiler", "is <PERSON> still the account holder"]
    assert [row[7] for row in table["errors"] if row[1] == "call-0"] == ["<PERSON>'s audio was slow"]
    arguments = {row[2]: row[5] for row in table["tool_calls"] if row[1] == "call-0"}
    assert arguments["tc0-0"] == '{"customer_name":"<PERSON>","day":"tuesday"}'
    # Asked for by no llm.decided: redacted without the call's names, which depend on the read order.
    assert arguments["tc0-2"] == '{"who":"the lovelace account"}'
    (call,) = (row for row in table["calls"] if row[1] == "call-0")
    assert "Lovelace" not in repr(call)


def test_a_refused_call_is_a_row_of_refused_calls_and_nothing_else() -> None:
    refused = CallRefused(reason="gateway_at_capacity", detail="this gateway serves 20 calls at once",
                          channel="phone", direction="inbound", agent_id="front-desk", live_calls=20, limit=20,
                          from_number="+15557000009", to_number="+15550100", provider_call_id="CA9")
    event = Event(Envelope(event_id="call-9/0", tenant_id="demo", call_id="call-9", seq=0, type=refused.EVENT_TYPE,
                           schema_version=refused.EVENT_VERSION, event_time_us=5_000_000, producer="t",
                           producer_version="0"), refused)
    written = tables(fold([event]))
    assert list(written) == ["refused_calls"], "no row in calls: the call never was"
    (row,) = written["refused_calls"]
    assert row[1:] == ("call-9", at(5_000_000), "front-desk", "phone", "inbound", "gateway_at_capacity",
                       "this gateway serves 20 calls at once", 20, 20, 0)


# --- Consent: how the caller was asked, and why a call has no recording --------------------------


def consent_row(*payloads: EventPayload) -> dict[str, Any]:
    """The `calls` row's consent columns after the call's events."""
    events = [Event(Envelope(event_id=f"c/{seq}", tenant_id="demo", call_id="call-c", seq=seq, type=p.EVENT_TYPE,
                             schema_version=p.EVENT_VERSION, event_time_us=1_000_000 * (seq + 1), producer="t",
                             producer_version="0"), p) for seq, p in enumerate(payloads)]
    (row,) = tables(fold(events))["calls"]
    return {name: row[CALLS_TABLE.column_names.index(name)]
            for name in ("consent", "consent_mode", "consent_method", "recording_withheld")}


def started_under(mode: str | None) -> CallStarted:
    parameters = {} if mode is None else {"consent_rule": "all_party", "consent_mode": mode}
    return CallStarted(channel="phone", direction="inbound", agent_id="front-desk", agent_version="sha256:x",
                       routed_by="number", parameters=parameters)


def test_the_calls_row_says_how_consent_was_asked_answered_and_why_there_is_no_recording() -> None:
    given = ConsentGiven(kind="recording", method="speech", prompt_text="May we record?")
    refused = ConsentRefused(kind="recording", method="dtmf", prompt_text="May we record?")
    assert consent_row(started_under(None)) == {
        "consent": "", "consent_mode": "", "consent_method": "", "recording_withheld": ""}
    assert consent_row(started_under("opt_in")) == {
        "consent": "", "consent_mode": "opt_in", "consent_method": "", "recording_withheld": "consent_not_given"}
    assert consent_row(started_under("opt_in"), given) == {
        "consent": "given", "consent_mode": "opt_in", "consent_method": "speech", "recording_withheld": ""}
    assert consent_row(started_under("opt_out"), refused) == {
        "consent": "refused", "consent_mode": "opt_out", "consent_method": "dtmf",
        "recording_withheld": "consent_refused"}
    # A refusal after consent was given (a key later in the call) stands.
    assert consent_row(started_under("opt_in"), given, refused)["recording_withheld"] == "consent_refused"
    assert consent_row(started_under("opt_in"), refused, given)["consent"] == "refused"
