"""The summariser: after each call, a summary on the caller's memory stream.

It consumes `voxlog.calls` in its own group; on `call.ended` it reads the call back from the log,
summarises it and appends `call.summarized` to the caller's memory stream (key = the caller key,
seq = that caller's summaries so far). A call summarised already (a redelivery) is not summarised
twice: the stream is read first.

The summary is the agent's LLM's where the agent has a cloud LLM (its chain, without the offline
scripted policy, which cannot summarise: `llm_for`), and the extractive one of
`streams.memory.summarize` otherwise, or when every LLM of the chain failed: a caller is remembered
either way. `source` says which (`llm:openai/gpt-4o-...` or `offline-extractive`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent, call_start_bound_ms, read_call
from consumers.group_loop import run_in_group
from consumers.log_consumer import LogAdmin
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogProducer
from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted, CallSummarized
from schemas.topics import CALLS
from schemas.version import __version__
from streams.memory import OFFLINE_SOURCE, clean_summary, key_of_call, summarize, summary_request
from streams.providers.base import LlmProvider, ProviderError

log = logging.getLogger(__name__)

WORKER = "voxlog.summariser"
GROUP = "voxlog-summariser"
LLM_SUMMARY_TIMEOUT_S = 30.0

SummaryLlm = Callable[[str, str], LlmProvider | None]
"""(tenant, agent id) -> the LLM that summarises that agent's calls, or None: extractive."""


class Summariser:
    def __init__(self, backend: LogBackend, llm_for: SummaryLlm | None = None) -> None:
        self.backend = backend
        self.llm_for = llm_for
        self.ready = asyncio.Event()
        self.summarised = 0

    async def run(self, stop: asyncio.Event) -> None:
        writers: list[EventWriter] = []

        async def start(producer: LogProducer) -> None:
            writers.append(EventWriter(producer))

        # One admin for the worker's life: opening one per call (a Kafka client's bootstrap) stalled the
        # event loop, and with it every live call of the gateway, about 100 ms per ended call.
        async with self.backend.admin() as admin:

            async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
                if isinstance(item.event.payload, CallEnded):
                    try:
                        await self.summarise(writers[0], admin, item.event)
                    except Exception:  # one call's summary must not stop the others'
                        log.exception("summariser: call %s", item.event.call_id)

            await run_in_group(self.backend, [CALLS], GROUP, stop, handle, ready=self.ready, start=start)

    async def summarise(self, writer: EventWriter, admin: LogAdmin,
                        ended: Event[EventPayload]) -> CallSummarized | None:
        # What a summary reads is on the calls topic: the call's audio (most of its events) is not
        # decoded, which cost every live call of the process a stall of about 100 ms per ended call.
        call = await read_call(admin, ended.call_id, topics=(CALLS,), since_ms=call_start_bound_ms(ended))
        started = next((e for e in call.events if isinstance(e.payload, CallStarted)), None)
        if started is None or not isinstance(started.payload, CallStarted):
            return None
        key = key_of_call(ended.tenant_id, started.payload)
        extractive = summarize(call.events)
        if key is None or extractive is None:
            return None
        memory = await read_call(admin, key, topics=(CALLS,))
        if any(isinstance(e.payload, CallSummarized) and e.payload.call_id == ended.call_id for e in memory.events):
            return None  # summarised before (a redelivered call.ended)
        summary, source = await self._llm_summary(ended, started.payload, call.events) or (extractive, OFFLINE_SOURCE)
        payload = CallSummarized(call_id=ended.call_id, agent_id=started.payload.agent_id, summary=summary,
                                 outcome=ended.payload.outcome if isinstance(ended.payload, CallEnded) else None,
                                 source=source)
        recorder = CallRecorder(writer, tenant_id=ended.tenant_id, call_id=key, producer=WORKER,
                                producer_version=__version__, next_seq=len(memory.events))
        await recorder.record(payload, causation_id=ended.envelope.event_id, correlation_id=ended.call_id)
        await writer.flush()
        self.summarised += 1
        return payload

    async def _llm_summary(self, ended: Event[EventPayload], started: CallStarted,
                           events: list[Event[EventPayload]]) -> tuple[str, str] | None:
        """(summary, source) from the agent's LLM, or None: no LLM for it, or none answered."""
        llm = self.llm_for(ended.tenant_id, started.agent_id) if self.llm_for else None
        request = summary_request(events, request_id=f"{ended.call_id}/summary", model="")
        if llm is None or request is None:
            return None
        try:
            result = await asyncio.wait_for(llm.complete(request), LLM_SUMMARY_TIMEOUT_S)
        except (TimeoutError, ProviderError) as exc:
            log.warning("summariser: call %s: no LLM summary (%s); the extractive one is kept", ended.call_id, exc)
            return None
        summary = clean_summary(result.text)
        if summary is None:
            return None
        return summary, f"llm:{result.provider or llm.name}/{result.model}"
