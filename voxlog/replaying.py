"""Finding recorded calls in the log and replaying them through the core (`voxlog replay`).

Read only: QA replays a log it must not change, so nothing here opens a producer; a record that
cannot be decoded is left where it is (not dead-lettered), and its call's replay reports it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from consumers.backends import LogBackend
from consumers.event_reader import read_call, records_until_now
from consumers.log_consumer import LogAdmin
from schemas.codec import UndecodableMessage
from schemas.events import CallStarted
from schemas.topics import CALLS
from streams.call.replay import Divergence, ReplayResult, agent_for, verify_call
from streams.config.agents import AgentRouter, RoutingError


async def recorded_call_ids(backend: LogBackend,
                            on_progress: Callable[[int, int | None], None] | None = None) -> list[str]:
    """Calls with a `call.started` in the log, oldest first per partition, and those with a record
    that cannot be decoded (a call's records are keyed by its id). `on_progress` is told the records
    read so far and about how many there are (`voxlog.progress`)."""
    ids: dict[str, None] = {}
    codec = backend.codec
    total = read = 0
    if on_progress is not None:
        async with backend.admin() as admin:
            total = sum((await admin.end_offsets(CALLS)).values())
    async for record in records_until_now(backend, [CALLS]):
        read += 1
        if on_progress is not None and read % PROGRESS_EVERY == 0:
            on_progress(read, total)
        try:
            if codec.schema_of(record.value)[0] == CallStarted.EVENT_TYPE:
                ids[codec.decode(record.value).call_id] = None
        except UndecodableMessage:
            if record.key:
                ids[record.key.decode(errors="replace")] = None
    if on_progress is not None:
        on_progress(read, read)  # the count estimated what retention had already trimmed
    return list(ids)


PROGRESS_EVERY = 1000
"""Records read between two reports of `recorded_call_ids`."""


async def verify_calls(backend: LogBackend, router: AgentRouter, call_ids: Sequence[str] | None,
                       on_progress: Callable[[int], None] | None = None) -> list[ReplayResult]:
    """Each call replayed (`call_ids`, or every call in the log); `on_progress` is advanced by one
    as each call is verified (`voxlog.progress`)."""
    ids = list(call_ids) if call_ids is not None else await recorded_call_ids(backend)
    results = []
    async with backend.admin() as admin:
        for call_id in ids:
            results.append(await _verify_one(admin, router, call_id))
            if on_progress is not None:
                on_progress(1)
    return results


async def _verify_one(admin: LogAdmin, router: AgentRouter, call_id: str) -> ReplayResult:
    history = await read_call(admin, call_id)
    if history.undecodable:
        record, reason = history.undecodable[0]
        return ReplayResult(call_id, 0, Divergence(
            -1, "(undecodable)", f"{record.topic}/{record.partition}@{record.offset}: {reason}"))
    if not history.events:
        return ReplayResult(call_id, 0, Divergence(0, "(none)", "no events for this call"))
    try:
        agent = agent_for(history.events, router)
    except RoutingError as exc:
        return ReplayResult(call_id, 0, Divergence(0, "call.started", str(exc)))
    return verify_call(history.events, agent)
