"""The calls fold and an erasure read in either order (a rebuild reads a call's partition and its
erasure's apart): either way the erased call is listed in `erased_calls` and none of its rows
survive, so the recordings projection can find it."""

from __future__ import annotations

from projections.calls import CallsFold
from projections.tables import CALLS, ERASED_CALLS, ERASURES, Statement
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import CallerErased, CallStarted
from streams.memory import caller_key
from streams.redaction import default_redactor

NUMBER = "+15557000001"


def event(call_id: str, payload: EventPayload, at_us: int) -> Event[EventPayload]:
    return Event(Envelope(event_id=f"{call_id}/0", tenant_id="demo", call_id=call_id, seq=0, type=payload.EVENT_TYPE,
                          schema_version=payload.EVENT_VERSION, event_time_us=at_us, producer="t",
                          producer_version="0"), payload)


STARTED = event("call-1", CallStarted(channel="phone", direction="inbound", agent_id="front-desk",
                                      agent_version="sha256:x", from_number=NUMBER, to_number="+15550100",
                                      provider_call_id="CA1", routed_by="number"), 1_000)
KEY = caller_key("demo", NUMBER)
assert KEY is not None
ERASED = event("erasure-1", CallerErased(caller_key=KEY, erased_before_us=2_000, requested_by="cli:dpo"), 2_000)


def test_a_call_read_after_its_erasure_is_listed_as_erased_and_writes_no_row() -> None:
    fold = CallsFold(default_redactor())
    assert [row[0] for row in fold.apply(ERASED) if not isinstance(row, Statement)] == [ERASURES]
    (listed,) = fold.apply(STARTED)
    assert not isinstance(listed, Statement)
    assert listed[0] == ERASED_CALLS
    assert listed[1][:3] == ("demo", "call-1", KEY)
    assert listed[1][4] == "erasure-1"


def test_a_call_read_before_its_erasure_is_copied_to_erased_calls_then_deleted() -> None:
    fold = CallsFold(default_redactor())
    assert [row[0] for row in fold.apply(STARTED) if not isinstance(row, Statement)] == [CALLS]
    statements = [row for row in fold.apply(ERASED) if isinstance(row, Statement)]
    assert statements[0].sql.startswith(f"INSERT INTO {ERASED_CALLS.name} ")
    assert statements[-1].sql.startswith(f"DELETE FROM {CALLS.name} ")
