"""Finding recorded calls in the log and replaying them through the core (`voxlog replay`).

Read only: QA replays a log it must not change, so nothing here opens a producer; a record that
cannot be decoded is left where it is (not dead-lettered), and its call's replay reports it."""

from __future__ import annotations

from collections.abc import Sequence

from consumers.backends import LogBackend
from consumers.event_reader import read_call, records_until_now
from schemas.codec import UndecodableMessage
from schemas.events import CallStarted
from schemas.topics import CALLS
from streams.call.replay import Divergence, ReplayResult, agent_for, verify_call
from streams.config.agents import AgentRouter, RoutingError


async def recorded_call_ids(backend: LogBackend) -> list[str]:
    """Calls with a `call.started` in the log, oldest first per partition, and those with a record
    that cannot be decoded (a call's records are keyed by its id)."""
    ids: dict[str, None] = {}
    codec = backend.codec
    async for record in records_until_now(backend, [CALLS]):
        try:
            if codec.schema_of(record.value)[0] == CallStarted.EVENT_TYPE:
                ids[codec.decode(record.value).call_id] = None
        except UndecodableMessage:
            if record.key:
                ids[record.key.decode(errors="replace")] = None
    return list(ids)


async def verify_calls(backend: LogBackend, router: AgentRouter, call_ids: Sequence[str] | None) -> list[ReplayResult]:
    ids = list(call_ids) if call_ids is not None else await recorded_call_ids(backend)
    results = []
    async with backend.admin() as admin:
        for call_id in ids:
            history = await read_call(admin, call_id)
            if history.undecodable:
                record, reason = history.undecodable[0]
                results.append(ReplayResult(call_id, 0, Divergence(
                    -1, "(undecodable)", f"{record.topic}/{record.partition}@{record.offset}: {reason}")))
                continue
            if not history.events:
                results.append(ReplayResult(call_id, 0, Divergence(0, "(none)", "no events for this call")))
                continue
            try:
                agent = agent_for(history.events, router)
            except RoutingError as exc:
                results.append(ReplayResult(call_id, 0, Divergence(0, "call.started", str(exc))))
                continue
            results.append(verify_call(history.events, agent))
    return results
