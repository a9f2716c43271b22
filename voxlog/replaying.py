"""Finding recorded calls in the log and replaying them through the core (`voxlog replay`)."""

from __future__ import annotations

from collections.abc import Sequence

from consumers.backends import LogBackend
from consumers.events import EventConsumer, read_call
from schemas.events import CallStarted
from schemas.topics import CALLS
from streams.call.replay import Divergence, ReplayResult, agent_for, verify_call
from streams.config.agents import AgentRouter, RoutingError


async def recorded_call_ids(backend: LogBackend) -> list[str]:
    """Calls with a `call.started` in the log, oldest first per partition."""
    ids: list[str] = []
    admin = backend.admin()
    try:
        ends = await admin.end_offsets(CALLS)
    finally:
        await admin.close()
    remaining = {p for p, end in ends.items() if end > 0}
    async with backend.producer() as dead_letters, backend.consumer([CALLS]) as consumer:
        events = EventConsumer(consumer, dead_letters, name="voxlog-replay")
        while remaining:
            batch = await events.poll(timeout_s=2.0, max_records=5000)
            if not batch:
                break
            for item in batch:
                if isinstance(item.event.payload, CallStarted):
                    ids.append(item.event.call_id)
                if item.record.offset + 1 >= ends[item.record.partition]:
                    remaining.discard(item.record.partition)
    return ids


async def verify_calls(backend: LogBackend, router: AgentRouter, call_ids: Sequence[str] | None) -> list[ReplayResult]:
    ids = list(call_ids) if call_ids is not None else await recorded_call_ids(backend)
    results = []
    admin = backend.admin()
    try:
        for call_id in ids:
            history = await read_call(admin, call_id)
            if not history.events:
                results.append(ReplayResult(call_id, 0, Divergence(0, "(none)", "no events for this call")))
                continue
            if history.undecodable:
                record, reason = history.undecodable[0]
                results.append(ReplayResult(call_id, 0, Divergence(
                    -1, "(undecodable)", f"{record.topic}/{record.partition}@{record.offset}: {reason}")))
                continue
            try:
                agent = agent_for(history.events, router)
            except RoutingError as exc:
                results.append(ReplayResult(call_id, 0, Divergence(0, "call.started", str(exc))))
                continue
            results.append(verify_call(history.events, agent))
    finally:
        await admin.close()
    return results
