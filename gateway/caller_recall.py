"""What a tenant remembers of a caller when a call starts: the newest summaries of their earlier
calls, read from the memory projection's `caller_memory` table and recorded as `memory.loaded`."""

from __future__ import annotations

import asyncio
import logging

from projections.audit import epoch_us
from projections.store import Analytics, AnalyticsError
from projections.tables import CALLER_MEMORY
from schemas.events import MemoryLoaded, MemorySummary
from streams.call.transport import InboundCall
from streams.memory import caller_key

log = logging.getLogger(__name__)

MEMORY_SUMMARIES = 3
MEMORY_TIMEOUT_S = 0.5
MEMORY_SOURCE = "clickhouse:caller_memory"


async def recall(analytics: Analytics | None, call: InboundCall) -> MemoryLoaded | None:
    """What the tenant remembers of this caller (newest first); None when the caller has no key (no
    number) or there is no ClickHouse. Bounded in time: a slow lookup costs the caller a greeting
    without memory, not a wait."""
    number = call.started.to_number if call.started.direction == "outbound" else call.started.from_number
    key = caller_key(call.tenant_id, number)
    if key is None or analytics is None:
        return None
    query = (f"SELECT call_id, summary, at FROM {CALLER_MEMORY.name} FINAL "
             "WHERE tenant_id = {t:String} AND caller_key = {k:String} ORDER BY at DESC LIMIT {n:UInt32}")
    try:
        result = await asyncio.wait_for(asyncio.to_thread(
            analytics.query, query, {"t": call.tenant_id, "k": key, "n": MEMORY_SUMMARIES}), MEMORY_TIMEOUT_S)
    except (TimeoutError, AnalyticsError) as exc:
        log.warning("caller memory for %s unavailable: %s", call.call_id, exc or "timed out")
        return MemoryLoaded(caller_key=key, summaries=(), source=f"{MEMORY_SOURCE} (unavailable)")
    return MemoryLoaded(caller_key=key, source=MEMORY_SOURCE, summaries=tuple(
        MemorySummary(call_id=str(cid), summary=str(text), created_us=epoch_us(when))
        for cid, text, when in result.rows))
