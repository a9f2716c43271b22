"""Plays input events through the core the way a session does, producing a recorded call."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from streams.call.core import CORE_PRODUCER, CallState, Decision, decide, new_state
from streams.config.agents import AgentSpec


class CoreSim:
    def __init__(self, agent: AgentSpec, call_id: str = "call-1", start_us: int = 1_800_000_000_000_000) -> None:
        self.agent = agent
        self.call_id = call_id
        self.state: CallState = new_state(agent)
        self.events: list[Event[EventPayload]] = []
        self.now_us = start_us

    def _event(self, payload: EventPayload, producer: str) -> Event[EventPayload]:
        envelope = Envelope(event_id=f"e{len(self.events)}", tenant_id=self.agent.tenant, call_id=self.call_id,
                            seq=len(self.events), type=payload.EVENT_TYPE, schema_version=payload.EVENT_VERSION,
                            event_time_us=self.now_us, producer=producer, producer_version="test")
        event = Event(envelope, payload)
        self.events.append(event)
        return event

    def feed(self, payload: EventPayload, *, after_ms: int = 20) -> list[Decision]:
        self.now_us += after_ms * 1000
        event = self._event(payload, "voxlog.session")
        self.state, decisions = decide(self.state, event)
        for decision in decisions:
            self._event(decision.payload, CORE_PRODUCER)
        return decisions

    def feed_all(self, payloads: Iterable[EventPayload]) -> list[Decision]:
        out: list[Decision] = []
        for payload in payloads:
            out += self.feed(payload)
        return out
