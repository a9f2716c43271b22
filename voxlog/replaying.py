"""Finding recorded calls in the log and replaying them through the core (`voxlog replay`).

Read only: QA replays a log it must not change, so nothing here opens a producer; a record that
cannot be decoded is left where it is (not dead-lettered), and its call's replay reports it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from consumers.backends import LogBackend
from consumers.event_reader import read_call, records_until_now
from consumers.log_consumer import LogAdmin
from schemas.base import Event
from schemas.codec import UndecodableMessage
from schemas.events import CallStarted
from schemas.topics import CALLS, COMMANDS
from streams.call.replay import Divergence, ReplayResult, agent_for, verify_call
from streams.call.whatif import AgentRef, WhatIfResult, whatif_call
from streams.config.agents import AgentRouter, AgentSpec, RoutingError
from streams.providers.base import LlmProvider
from streams.providers.registry import ProviderRegistry

PROGRESS_EVERY = 1000
"""Records read between two reports of `recorded_calls`."""
REPLAY_TOPICS = (CALLS, COMMANDS)
"""What a replay reads of a call: its inputs and the core's decisions. Its audio, nine tenths of its
events, is no input of the core's, and reading it (opening its sealed fields) was most of a replay's time."""


@dataclass(frozen=True)
class RecordedCall:
    call_id: str
    started: Event[CallStarted] | None
    """None where a record of the call cannot be decoded."""


async def recorded_calls(backend: LogBackend,
                         on_progress: Callable[[int, int | None], None] | None = None) -> list[RecordedCall]:
    """Calls with a `call.started` in the log, oldest first per partition, and those with a record
    that cannot be decoded (a call's records are keyed by its id). `on_progress` is told the records
    read so far and about how many there are (`voxlog.progress`)."""
    calls: dict[str, RecordedCall] = {}
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
                event = codec.decode(record.value)
                if isinstance(event.payload, CallStarted):
                    calls.setdefault(event.call_id, RecordedCall(event.call_id, cast(Event[CallStarted], event)))
        except UndecodableMessage:
            if record.key:
                call_id = record.key.decode(errors="replace")
                calls[call_id] = RecordedCall(call_id, None)
    if on_progress is not None:
        on_progress(read, read)  # the count estimated what retention had already trimmed
    return list(calls.values())


async def recorded_call_ids(backend: LogBackend,
                            on_progress: Callable[[int, int | None], None] | None = None) -> list[str]:
    return [call.call_id for call in await recorded_calls(backend, on_progress)]


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
    history = await read_call(admin, call_id, topics=REPLAY_TOPICS)
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


async def calls_taken_by(backend: LogBackend, tenant_id: str, agent_id: str, since_us: int | None = None,
                         on_progress: Callable[[int, int | None], None] | None = None) -> list[str]:
    """The recorded calls of `tenant_id` that `agent_id` took (since `since_us`), and those with a record that
    cannot be decoded (to be reported, not skipped)."""
    return [call.call_id for call in await recorded_calls(backend, on_progress)
            if call.started is None or (
                call.started.tenant_id == tenant_id and call.started.payload.agent_id == agent_id
                and (since_us is None or call.started.envelope.event_time_us >= since_us))]


async def whatif_calls(backend: LogBackend, router: AgentRouter, agent: AgentSpec, registry: ProviderRegistry,
                       call_ids: Sequence[str], on_progress: Callable[[int], None] | None = None) -> list[WhatIfResult]:
    """`agent` tried on each call; its new LLM requests answered as `registry.whatif_llm` says. `on_progress`
    is advanced by one as each call is compared (`voxlog.progress`)."""
    llm, label = registry.whatif_llm(agent)
    results = []
    async with backend.admin() as admin:
        for call_id in call_ids:
            results.append(await _whatif_one(admin, router, agent, llm, label, call_id))
            if on_progress is not None:
                on_progress(1)
    return results


async def _whatif_one(admin: LogAdmin, router: AgentRouter, agent: AgentSpec, llm: LlmProvider, label: str,
                      call_id: str) -> WhatIfResult:
    history = await read_call(admin, call_id, topics=REPLAY_TOPICS)
    if history.undecodable:
        record, reason = history.undecodable[0]
        problem = f"{record.topic}/{record.partition}@{record.offset} cannot be decoded: {reason}"
        return WhatIfResult(call_id, AgentRef("", ""), AgentRef(agent.id, agent.version), (), label, problem=problem)
    if history.events and history.events[0].tenant_id != agent.tenant:
        return WhatIfResult(call_id, AgentRef("", ""), AgentRef(agent.id, agent.version), (), label,
                            problem=f"another tenant's call (the agent file is {agent.tenant}'s)")
    try:
        recorded: AgentSpec | None = agent_for(history.events, router)
    except RoutingError:
        recorded = None  # changed since, or gone: the requests are compared by their recorded summary
    return await whatif_call(history.events, agent, llm, label, recorded_agent=recorded)
