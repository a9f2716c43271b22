"""Deterministic replay: run a recorded call's inputs through the core again and compare.

In a live call the session records each input event, then at once the core's decisions for it
(producer `voxlog.core`). Replay feeds the inputs, in `seq` order, to `decide` and checks that the
decisions recorded after each input are exactly the ones the core makes now, payload for payload.
`call.ended` is an input (the session knows when and why a call ends), but its outcome is the
core's (`core.outcome`): replay checks that too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted
from streams.call.core import CORE_PRODUCER, Decision, decide, new_state, outcome
from streams.config.agents import AgentRouter, AgentSpec, RoutingError


@dataclass(frozen=True)
class Divergence:
    seq: int
    event_type: str
    reason: str
    recorded: EventPayload | None = None
    decided: EventPayload | None = None
    wording: str = ""
    """`reason` with `{recorded}` and `{decided}` where the payloads go: to tell them another way (`told`)."""

    def told(self, describe: Callable[[EventPayload], str]) -> str:
        """The reason with each payload as `describe` tells it (e.g. PII redacted)."""
        if not self.wording:
            return self.reason
        return self.wording.format(recorded=describe(self.recorded) if self.recorded is not None else "",
                                   decided=describe(self.decided) if self.decided is not None else "")


@dataclass(frozen=True)
class ReplayResult:
    call_id: str
    decisions: int
    divergence: Divergence | None
    erased: bool = False
    """Its personal data was destroyed (erasure, retention): there is nothing to replay it from."""

    @property
    def identical(self) -> bool:
        return self.divergence is None and not self.erased


def _describe(payload: EventPayload) -> str:
    return f"{payload.EVENT_TYPE} {payload.to_avro()}"


def _diverged(seq: int, event_type: str, wording: str, *, recorded: EventPayload | None = None,
              decided: EventPayload | None = None) -> Divergence:
    divergence = Divergence(seq, event_type, "", recorded, decided, wording)
    return replace(divergence, reason=divergence.told(_describe))


def verify_call(events: Sequence[Event[EventPayload]], agent: AgentSpec) -> ReplayResult:
    """`events`: one call's events in seq order. `agent`: the definition to replay with."""
    call_id = events[0].call_id if events else ""
    # Audio is no input of the core's: a call whose audio alone was shredded (a refusal, retention) replays.
    if any(event.pii_withheld and not event.type.startswith("audio.") for event in events):
        return ReplayResult(call_id, 0, None, erased=True)
    state = new_state(agent)
    expected: deque[Decision] = deque()
    checked = 0
    for event in events:
        if event.type.startswith("audio."):
            continue  # no input of the core's: most of a call's events, passed over without a look
        if event.envelope.producer == CORE_PRODUCER:
            if not expected:
                return ReplayResult(
                    call_id,
                    checked,
                    _diverged(event.seq, event.type, "recorded {recorded}; the core now decides nothing here",
                              recorded=event.payload),
                )
            decision = expected.popleft()
            if decision.payload != event.payload:
                return ReplayResult(
                    call_id,
                    checked,
                    _diverged(event.seq, event.type, "recorded {recorded}; the core now decides {decided}",
                              recorded=event.payload, decided=decision.payload),
                )
            checked += 1
            continue
        if expected:
            missing = expected[0].payload
            return ReplayResult(
                call_id,
                checked,
                _diverged(event.seq, event.type, "the core now decides {decided} before this event; not recorded",
                          decided=missing),
            )
        if isinstance(event.payload, CallEnded) and event.payload.outcome != outcome(state):
            return ReplayResult(
                call_id,
                checked,
                Divergence(
                    event.seq,
                    event.type,
                    f"recorded outcome {event.payload.outcome}; the core now decides {outcome(state)}",
                ),
            )
        state, decisions = decide(state, event)
        expected.extend(decisions)
    if expected:
        last = events[-1]
        return ReplayResult(
            call_id,
            checked,
            _diverged(last.seq + 1, "(end)", "the core now decides {decided} after the last event",
                      decided=expected[0].payload
            ),
        )
    return ReplayResult(call_id, checked, None)


def agent_for(events: Sequence[Event[EventPayload]], router: AgentRouter) -> AgentSpec:
    """The agent that took the call, as defined now; refuses one whose definition has changed."""
    started = next((e for e in events if isinstance(e.payload, CallStarted)), None)
    if started is None or not isinstance(started.payload, CallStarted):
        raise RoutingError("the call has no call.started event")
    agent = router.get(started.tenant_id, started.payload.agent_id)
    if agent.version != started.payload.agent_version:
        raise RoutingError(
            f"agent {started.tenant_id}/{agent.id} has changed since the call "
            f"(recorded {started.payload.agent_version}, now {agent.version}); replay it as a what-if"
        )
    return agent
