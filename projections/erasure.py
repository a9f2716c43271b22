"""Erasure in the projections: a `caller.erased` event removes a caller's data from the tables that
hold it, and keeps it out through restarts and rebuilds.

The log is the system of record and keeps the raw events until its retention removes them, so an
erasure is itself an event, and every projection that holds a caller's data folds it: it deletes
what it wrote of that caller's calls that started before `erased_before_us` (after the rows of its
batch that came before, so nothing written earlier survives), writes a row to `erasures`, and skips
whatever of those calls it reads later. Which of the two comes first in a rebuild (a call's events
and the erasure are on different partitions) does not matter: either the call's rows are written
and then deleted, or they are never written. A restarted projection learns the erasures it has
folded from `erasures`. Each of them writes the same `erasures` rows, so a rebuild of one, which
drops the table, refills it as it reads the erasures again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from projections.store import AnalyticsStore
from projections.tables import CALLS, ERASED_CALLS, ERASURES, Row, Statement, Table, at, deletion
from schemas.base import Event, EventPayload
from schemas.events import CallerErased
from streams.redaction import Redactor

OF_THE_CALLER = ("tenant_id = {tenant:String} AND caller_key = {caller:String} AND started_at < "
                 "fromUnixTimestamp64Micro({before:Int64})")
"""The erased calls, in a table with caller_key and started_at (`calls`, `erased_calls`)."""
ERASED_CALL_IDS = (f"SELECT call_id FROM calls WHERE {OF_THE_CALLER} UNION DISTINCT "
                   f"SELECT call_id FROM erased_calls WHERE {OF_THE_CALLER}")
"""The erased calls' ids, whether the calls projection has folded the erasure yet or not."""
CALLS_ERASED = f"tenant_id = {{tenant:String}} AND call_id IN ({ERASED_CALL_IDS})"
"""A table's rows of the erased calls."""


class ErasedCallers:
    """The erasures a projection has folded: (tenant, caller key) -> (erased before (epoch us), the
    erasure that set it)."""

    def __init__(self) -> None:
        self.before: dict[tuple[str, str], tuple[int, str]] = {}

    def erasure_of(self, tenant_id: str, caller_key: str | None, started_us: int) -> str | None:
        """The erasure that erased a call of this caller that started then, if one did."""
        if not caller_key:
            return None
        found = self.before.get((tenant_id, caller_key))
        return found[1] if found is not None and started_us < found[0] else None

    def erased(self, tenant_id: str, caller_key: str | None, started_us: int) -> bool:
        """Whether a call of this caller that started then is erased."""
        return self.erasure_of(tenant_id, caller_key, started_us) is not None

    def fold(self, event: Event[EventPayload], redactor: Redactor) -> Row:
        """Remembers the erasure; returns its `erasures` row."""
        p = event.payload
        assert isinstance(p, CallerErased)
        key = (event.tenant_id, p.caller_key)
        self.before[key] = max(self.before.get(key, (0, "")), (p.erased_before_us, event.call_id))
        return ERASURES, (event.tenant_id, p.caller_key, at(p.erased_before_us), p.requested_by,
                          redactor.redact(p.reason), event.call_id, event.seq)

    def load(self, store: AnalyticsStore) -> None:
        result = store.query(f"SELECT tenant_id, caller_key, max(toUnixTimestamp64Micro(erased_before)), "
                             f"argMax(erasure_id, erased_before) FROM {ERASURES.name} FINAL "
                             "GROUP BY tenant_id, caller_key")
        self.before = {(tenant, caller): (int(before), erasure) for tenant, caller, before, erasure in result.rows}


def parameters(event: Event[EventPayload]) -> tuple[tuple[str, Any], ...]:
    p = event.payload
    assert isinstance(p, CallerErased)
    return (("tenant", event.tenant_id), ("caller", p.caller_key), ("before", p.erased_before_us))


def erasure_of_calls(event: Event[EventPayload], tables: Sequence[Table]) -> list[Statement]:
    """The calls projection's part: the erased calls copied to `erased_calls` (so that the other
    projections can still find them), their rows in `tables` deleted, then theirs in `calls`."""
    bound = parameters(event)
    copy = Statement(f"INSERT INTO {ERASED_CALLS.name} SELECT tenant_id, call_id, caller_key, started_at, "
                     f"{{erasure:String}}, 1 FROM {CALLS.name} FINAL WHERE {OF_THE_CALLER}",
                     (*bound, ("erasure", event.call_id)))
    return [copy, *(deletion(table, CALLS_ERASED, bound) for table in tables), deletion(CALLS, OF_THE_CALLER, bound)]
