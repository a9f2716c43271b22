"""Finding recorded calls in the log and replaying them through the core (`voxlog replay`).

Read only: QA replays a log it must not change, so nothing here opens a producer; a record that
cannot be decoded is left where it is (not dead-lettered), and its call's replay reports it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from consumers.backends import LogBackend
from consumers.event_reader import read_call, records_until_now
from schemas.base import Event
from schemas.codec import UndecodableMessage
from schemas.events import CallStarted
from schemas.topics import CALLS
from streams.call.replay import Divergence, ReplayResult, agent_for, verify_call
from streams.call.whatif import AgentRef, WhatIfResult, whatif_call
from streams.config.agents import AgentRouter, AgentSpec, RoutingError
from streams.providers.registry import ProviderRegistry


@dataclass(frozen=True)
class RecordedCall:
    call_id: str
    started: Event[CallStarted] | None
    """None where a record of the call cannot be decoded."""


async def recorded_calls(backend: LogBackend) -> list[RecordedCall]:
    """Calls with a `call.started` in the log, oldest first per partition, and those with a record
    that cannot be decoded (a call's records are keyed by its id)."""
    calls: dict[str, RecordedCall] = {}
    codec = backend.codec
    async for record in records_until_now(backend, [CALLS]):
        try:
            if codec.schema_of(record.value)[0] == CallStarted.EVENT_TYPE:
                event = codec.decode(record.value)
                if isinstance(event.payload, CallStarted):
                    calls.setdefault(event.call_id, RecordedCall(event.call_id, cast(Event[CallStarted], event)))
        except UndecodableMessage:
            if record.key:
                call_id = record.key.decode(errors="replace")
                calls[call_id] = RecordedCall(call_id, None)
    return list(calls.values())


async def recorded_call_ids(backend: LogBackend) -> list[str]:
    return [call.call_id for call in await recorded_calls(backend)]


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


async def whatif_calls(backend: LogBackend, router: AgentRouter, agent: AgentSpec, registry: ProviderRegistry,
                       call_ids: Sequence[str] | None, *, agent_id: str | None = None,
                       since_us: int | None = None) -> list[WhatIfResult]:
    """`agent` tried on the given calls, or on every recorded call of its tenant taken by `agent_id` (else
    its own id) since `since_us`. Its new LLM requests are answered as `registry.whatif_llm` says."""
    if call_ids is None:
        wanted = agent_id or agent.id
        ids = [call.call_id for call in await recorded_calls(backend)
               if call.started is None or (
                   call.started.tenant_id == agent.tenant and call.started.payload.agent_id == wanted
                   and (since_us is None or call.started.envelope.event_time_us >= since_us))]
    else:
        ids = list(call_ids)
    llm, label = registry.whatif_llm(agent)
    results = []
    async with backend.admin() as admin:
        for call_id in ids:
            history = await read_call(admin, call_id)
            if history.undecodable:
                record, reason = history.undecodable[0]
                problem = f"{record.topic}/{record.partition}@{record.offset} cannot be decoded: {reason}"
                results.append(WhatIfResult(call_id, AgentRef("", ""), AgentRef(agent.id, agent.version), (), label,
                                            problem=problem))
                continue
            if history.events and history.events[0].tenant_id != agent.tenant:
                results.append(WhatIfResult(call_id, AgentRef("", ""), AgentRef(agent.id, agent.version), (), label,
                                            problem=f"another tenant's call (the agent file is {agent.tenant}'s)"))
                continue
            try:
                recorded: AgentSpec | None = agent_for(history.events, router)
            except RoutingError:
                recorded = None  # changed since, or gone: the requests are compared by their recorded summary
            results.append(await whatif_call(history.events, agent, llm, label, recorded_agent=recorded))
    return results
