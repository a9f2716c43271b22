"""The memory projection: `caller_memory`, the summaries on the callers' memory streams
(`call.summarized`), less what an erasure removed (`caller.erased`: the caller's summaries made
before it)."""

from __future__ import annotations

import asyncio

from consumers.backends import LogBackend
from producers.log_producer import LogRecord
from projections.erasure import ErasedCallers
from projections.erasure import parameters as erasure_parameters
from projections.store import AnalyticsStore
from projections.tables import CALLER_MEMORY, ERASURES, Output, Table, at, deletion
from schemas.base import Event, EventPayload
from schemas.events import CallerErased, CallSummarized
from schemas.topics import CALLS
from streams.redaction import default_redactor


class MemoryProjection:
    name = "memory"
    topics: tuple[str, ...] = (CALLS,)
    tables: tuple[Table, ...] = (CALLER_MEMORY, ERASURES)
    event_types: frozenset[str] | None = frozenset({CallSummarized.EVENT_TYPE, CallerErased.EVENT_TYPE})

    def __init__(self) -> None:
        self.redactor = default_redactor()
        self.erasures = ErasedCallers()

    def reset(self) -> None:
        self.erasures = ErasedCallers()

    async def load(self, store: AnalyticsStore) -> None:
        await asyncio.to_thread(self.erasures.load, store)

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> list[Output]:
        p = event.payload
        if isinstance(p, CallerErased):
            return [self.erasures.fold(event, self.redactor), deletion(
                CALLER_MEMORY, "tenant_id = {tenant:String} AND caller_key = {caller:String} AND "
                "at < fromUnixTimestamp64Micro({before:Int64})", erasure_parameters(event))]
        if not isinstance(p, CallSummarized):
            return []
        made_us = event.envelope.event_time_us
        if self.erasures.erased(event.tenant_id, event.call_id, made_us):
            return []
        return [(CALLER_MEMORY, (event.tenant_id, event.call_id, p.call_id, p.agent_id,
                                 at(made_us), self.redactor.redact(p.summary), p.outcome or "",
                                 p.source, event.seq))]
