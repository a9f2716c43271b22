"""The calls fold when a call's two topics are read apart: voxlog.commands (`tool.requested`) read
ahead of voxlog.calls, then a restart that resumes voxlog.calls at the call's start while the
`tool.requested` is behind the resumed voxlog.commands. However the call's events came, the tables
end up holding the same rows."""

from __future__ import annotations

from typing import Any

from projections.calls import CallsFold
from projections.runner import RowBatch
from projections.tables import Output
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import CallEnded, CallStarted, LlmDecided, ToolCallSpec, ToolRequested, ToolSucceeded
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
