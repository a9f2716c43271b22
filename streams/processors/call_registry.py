"""The call registry: one row per call, kept current from the call topic.

It is the live directory of calls (what is running now, per tenant and agent, how far each call
has got), published as a keyed topic, `voxlog.call_registry`, whose latest value per call is the
call's current entry in JSON. Other components (the dialer's per-tenant limits, the REST API's
live view) read it instead of scanning the whole log.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted, ErrorRaised, HandoffRequested, LlmDecided, TurnTaken
from schemas.topics import CALL_REGISTRY, CALLS
from streams.processors.processor import Emit, EventProcessor


@dataclass
class CallEntry:
    tenant_id: str
    call_id: str
    agent_id: str | None = None
    channel: str | None = None
    direction: str | None = None
    started_us: int | None = None
    ended_us: int | None = None
    end_reason: str | None = None
    outcome: str | None = None
    last_seq: int = -1
    last_event_type: str | None = None
    turns: int = 0
    tool_calls: int = 0
    handoffs: int = 0
    errors: int = 0
    event_types: dict[str, int] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.started_us is not None and self.ended_us is None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CallEntry:
        return cls(**json.loads(data))


def apply(entry: CallEntry | None, event: Event[EventPayload]) -> CallEntry:
    """The registry's whole logic: an entry and an event give the next entry."""
    env = event.envelope
    entry = entry or CallEntry(tenant_id=env.tenant_id, call_id=env.call_id)
    if env.seq <= entry.last_seq:
        return entry  # a redelivery (at-least-once): already counted
    entry.last_seq = env.seq
    entry.last_event_type = env.type
    entry.event_types[env.type] = entry.event_types.get(env.type, 0) + 1
    payload = event.payload
    match payload:
        case CallStarted():
            entry.agent_id, entry.channel, entry.direction = payload.agent_id, payload.channel, payload.direction
            entry.started_us = env.event_time_us
        case CallEnded():
            entry.ended_us, entry.end_reason, entry.outcome = env.event_time_us, payload.reason, payload.outcome
        case TurnTaken():
            entry.turns += 1
        case LlmDecided():
            entry.tool_calls += len(payload.tool_calls)
        case HandoffRequested():
            entry.handoffs += 1
        case ErrorRaised():
            entry.errors += 1
    return entry


class CallRegistry(EventProcessor):
    name = "voxlog-call-registry"
    # One topic, so a call's events arrive in seq order and seq can tell a redelivery apart.
    # Audio never changes an entry, and the agent's tool calls are on the calls topic already.
    topics = (CALLS,)
    output_topic = CALL_REGISTRY

    def __init__(self) -> None:
        self.entries: dict[str, CallEntry] = {}

    def process(self, event: Event[EventPayload]) -> Sequence[Emit]:
        before = self.entries.get(event.call_id)
        last_seq = before.last_seq if before else -1
        entry = self.entries[event.call_id] = apply(before, event)
        if entry.last_seq == last_seq:
            return ()
        return (Emit(CALL_REGISTRY, event.call_id.encode(), entry.to_json()),)

    def restore(self, key: bytes, value: bytes) -> None:
        self.entries[key.decode()] = CallEntry.from_json(value)

    def live_calls(self, tenant_id: str | None = None) -> list[CallEntry]:
        return [e for e in self.entries.values() if e.live and (tenant_id is None or e.tenant_id == tenant_id)]
