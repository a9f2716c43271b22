"""The calls fold when a call's topics are read far apart (a rebuild reads voxlog.commands ahead of
voxlog.calls): a call folded from the log's history when its `tool.requested` came, and let go
since, is not folded again from nothing when its `call.started` comes, which would write rows
without what the commands topic gave."""

from __future__ import annotations

import pytest

from projections import calls
from projections.calls import CallsFold
from projections.tables import CALLS, TOOL_CALLS, Output, Statement
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import CallEnded, CallStarted, HandoffOutcome, ToolRequested, ToolSucceeded
from streams.redaction import default_redactor


def call_events(call_id: str) -> list[Event[EventPayload]]:
    payloads: list[EventPayload] = [
        CallStarted(channel="phone", direction="inbound", agent_id="front-desk", agent_version="sha256:x",
                    from_number="+15557000001", to_number="+15550100", provider_call_id="CA1", routed_by="number"),
        ToolRequested(tool_call_id="tc1", tool="book_appointment", arguments_json='{"day": "tuesday"}',
                      idempotency_key=f"{call_id}/tc1"),
        ToolSucceeded(tool_call_id="tc1", tool="book_appointment", result_json='{"confirmation": "A1"}', attempt=1,
                      latency_ms=12),
        CallEnded(reason="caller_hangup", duration_ms=30_000, outcome="booked"),
    ]
    return [Event(Envelope(event_id=f"{call_id}/{seq}", tenant_id="demo", call_id=call_id, seq=seq,
                           type=p.EVENT_TYPE, schema_version=p.EVENT_VERSION, event_time_us=1_000_000 * (seq + 1),
                           producer="t", producer_version="0"), p) for seq, p in enumerate(payloads)]


def rows_of(outputs: list[Output], table: object) -> list[tuple[object, ...]]:
    return [row[1] for row in outputs if not isinstance(row, Statement) and row[0] is table]


def test_a_call_folded_from_its_history_and_let_go_is_not_folded_again_from_its_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "ENDED_CALLS_KEPT", 2)
    fold = CallsFold(default_redactor())
    booked = call_events("call-booked")
    # Its tool.requested came first: the runner folded the whole call from the log's history.
    assert not fold.knows("call-booked", booked[1].seq)
    written = [row for e in booked for row in fold.apply(e)]
    (tool,) = rows_of(written, TOOL_CALLS)[-1:]
    assert tool[TOOL_CALLS.column_names.index("arguments")] != ""
    for other in ("call-a", "call-b", "call-c"):  # three more calls end: its state is let go
        for e in call_events(other):
            fold.apply(e)
    assert "call-booked" not in fold.calls

    # voxlog.calls catches up: its events come again, and write nothing.
    for e in (booked[0], booked[2], booked[3]):
        assert fold.knows("call-booked", e.seq), "no history to read"
        assert fold.apply(e) == []

    # A late event (a transfer's outcome) is new: the runner folds the call from its history again.
    late = Event(Envelope(event_id="call-booked/4", tenant_id="demo", call_id="call-booked", seq=4,
                          type=HandoffOutcome.EVENT_TYPE, schema_version=HandoffOutcome.EVENT_VERSION,
                          event_time_us=6_000_000, producer="t", producer_version="0"),
                 HandoffOutcome(handoff_id="h1", outcome="connected", provider_status="completed"))
    assert not fold.knows("call-booked", late.seq)
    fold.forget("call-booked")
    refolded = [row for e in [*booked, late] for row in fold.apply(e)]
    (call_row,) = rows_of(refolded, CALLS)[-1:]
    assert call_row[CALLS.column_names.index("tool_calls")] == 1
    assert call_row[CALLS.column_names.index("handoff_outcome")] == "connected"
