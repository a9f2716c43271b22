"""The summariser: after each call, a summary on the caller's memory stream.

It consumes `voxlog.calls` in its own group; on `call.ended` it reads the call back from the log,
summarises it (offline: `streams.memory.summarize`, extractive) and appends `call.summarized` to
the caller's memory stream (key = the caller key, seq = that caller's summaries so far). A call
summarised already (a redelivery) is not summarised twice: the stream is read first.
"""

from __future__ import annotations

import asyncio
import logging

from consumers.events import ConsumedEvent, read_call
from consumers.worker import run_in_group
from producers.base import LogProducer
from producers.events import CallRecorder, EventWriter
from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted, CallSummarized
from schemas.topics import CALLS
from streams.memory import OFFLINE_SOURCE, caller_key, person_number, summarize
from voxlog import __version__
from voxlog.backends import LogBackend

log = logging.getLogger(__name__)

WORKER = "voxlog.summariser"
GROUP = "voxlog-summariser"
LOOKBACK_MS = 3 * 3600 * 1000
"""How far before its end a call's start is looked for."""


class Summariser:
    def __init__(self, backend: LogBackend) -> None:
        self.backend = backend
        self.ready = asyncio.Event()
        self.summarised = 0

    async def run(self, stop: asyncio.Event) -> None:
        writers: list[EventWriter] = []

        async def start(producer: LogProducer) -> None:
            writers.append(EventWriter(producer))

        async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
            if isinstance(item.event.payload, CallEnded):
                try:
                    await self.summarise(writers[0], item.event)
                except Exception:  # one call's summary must not stop the others'
                    log.exception("summariser: call %s", item.event.call_id)

        await run_in_group(self.backend, [CALLS], GROUP, stop, handle, ready=self.ready, start=start)

    async def summarise(self, writer: EventWriter, ended: Event[EventPayload]) -> CallSummarized | None:
        since_ms = ended.envelope.event_time_us // 1000 - LOOKBACK_MS
        admin = self.backend.admin()
        try:
            call = await read_call(admin, ended.call_id, since_ms=since_ms)
            started = next((e for e in call.events if isinstance(e.payload, CallStarted)), None)
            if started is None or not isinstance(started.payload, CallStarted):
                return None
            key = caller_key(ended.tenant_id, person_number(started.payload))
            summary = summarize(call.events)
            if key is None or summary is None:
                return None
            memory = await read_call(admin, key, topics=(CALLS,))
        finally:
            await admin.close()
        if any(isinstance(e.payload, CallSummarized) and e.payload.call_id == ended.call_id for e in memory.events):
            return None  # summarised before (a redelivered call.ended)
        payload = CallSummarized(call_id=ended.call_id, agent_id=started.payload.agent_id, summary=summary,
                                 outcome=ended.payload.outcome if isinstance(ended.payload, CallEnded) else None,
                                 source=OFFLINE_SOURCE)
        recorder = CallRecorder(writer, tenant_id=ended.tenant_id, call_id=key, producer=WORKER,
                                producer_version=__version__, next_seq=len(memory.events))
        await recorder.record(payload, causation_id=ended.envelope.event_id, correlation_id=ended.call_id)
        await writer.flush()
        self.summarised += 1
        return payload
