"""A call's inputs: what happened to it, in the order it happened, for the activity to record and put
to the core. Recognition, speech out and the activity's own actions submit here; only the activity
reads, so the log holds one order of the call's inputs, the one the core decided on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from schemas.base import EventPayload
from schemas.events import ErrorRaised, ProviderFallback
from streams.providers.base import ChainReport


@dataclass(frozen=True, slots=True)
class Input:
    payload: EventPayload
    causation_id: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """The call ends: its `call.ended` is made when the activity gets here, so that its outcome is the
    one the core decides from every input before it, as replay will."""

    reason: str
    detail: str | None
    at_us: int
    """When it ended (the session's clock): the call's duration ends here, not when it is recorded."""


class CallInputs:
    """`turn_index`: the core's current turn, which a provider fallback is recorded with."""

    def __init__(self, turn_index: Callable[[], int]) -> None:
        self._queue: asyncio.Queue[Input | Ending] = asyncio.Queue()
        self._turn_index = turn_index

    def submit(
        self, payload: EventPayload, *, causation_id: str | None = None, correlation_id: str | None = None
    ) -> None:
        self._queue.put_nowait(Input(payload, causation_id, correlation_id))

    def end(self, reason: str, detail: str | None, at_us: int) -> None:
        self._queue.put_nowait(Ending(reason, detail, at_us))

    async def next(self) -> Input | Ending:
        return await self._queue.get()

    def report(self, capability: str, report: ChainReport, causation_id: str | None = None) -> None:
        """What a call to a provider went through, answered or not (the answer's report, or its
        ProviderError's): an `error.raised` per failed attempt, then a `provider.fallback` per switch.
        The one place where provider failures become inputs of the call."""
        for failure in report.failures:
            self.submit(ErrorRaised(component=capability, provider=failure.provider, kind=failure.kind.value,
                                    message=failure.message[:500], retryable=failure.retryable, fatal=False),
                        causation_id=causation_id)
        for switch in report.fallbacks:
            self.submit(ProviderFallback(capability=capability, from_provider=switch.from_provider,
                                         to_provider=switch.to_provider, reason=switch.reason.value,
                                         turn_index=self._turn_index()),
                        causation_id=causation_id)
