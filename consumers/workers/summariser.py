"""The summariser: after each call, a summary on the caller's memory stream.

It consumes `voxlog.calls` in its own group and folds, as the events pass, what a summary reads of
each call (`streams.memory.CallNote`: the caller's and the agent's words, the tools' results, a
handoff) into its own SQLite file; on `call.ended` it summarises those notes and appends
`call.summarized` to the caller's memory stream (key = the caller key). Nothing is read back from the
log by key, so a summary's cost does not grow with the log's history (on Kafka, a read by key is a
scan). Only a call whose start this worker never saw (its partition was another gateway's until a
rebalance, or the worker's file is new) is read back, from its start on.

A summary's `seq` on the memory stream is the time of the call's `call.ended` in microseconds: unique
per caller, in the order the calls ended, and the same for a redelivered `call.ended`, so that whoever
reads the stream (`read_call`, the `caller_memory` table) keeps one summary per call even where one
was written twice. A call summarised already is not summarised again (its row says so).

The summary is the agent's LLM's where the agent has a cloud LLM (its chain, without the offline
scripted policy, which cannot summarise: `llm_for`), and the extractive one of
`streams.memory.summarize` otherwise, or when every LLM of the chain failed: a caller is remembered
either way. `source` says which (`llm:openai/gpt-4o-...` or `offline-extractive`).

The notes (the call's words) are kept only until the summary is written; a call that never ends is
forgotten after a day.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent, call_start_bound_ms, read_call
from consumers.group_loop import run_in_group
from consumers.log_consumer import LogAdmin
from consumers.workers.state_file import FORGET_UNFINISHED_AFTER_S, open_state_db
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogProducer
from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted, CallSummarized
from schemas.topics import CALLS
from schemas.version import __version__
from streams.memory import (
    NOTED_TYPES,
    OFFLINE_SOURCE,
    CallNote,
    clean_summary,
    key_of_call,
    note_of,
    notes_of,
    summarize,
    summary_request,
)
from streams.providers.base import LlmProvider, ProviderError

log = logging.getLogger(__name__)

WORKER = "voxlog.summariser"
GROUP = "voxlog-summariser"
LLM_SUMMARY_TIMEOUT_S = 30.0

FOLDED_TYPES = NOTED_TYPES | {CallStarted.EVENT_TYPE, CallEnded.EVENT_TYPE}
"""What the worker decodes of the calls topic: the rest (a call's interim transcripts, LLM requests, speech
reports...) is passed over undecoded."""

SummaryLlm = Callable[[str, str], LlmProvider | None]
"""(tenant, agent id) -> the LLM that summarises that agent's calls, or None: extractive."""


@dataclass(frozen=True)
class FoldedCall:
    tenant_id: str
    agent_id: str
    caller_key: str
    """"" for a call with no person's number (a widget visitor): nothing to remember it by."""
    summarised: bool


class SummaryStore:
    """Each call's notes until it is summarised, in the worker's own SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = open_state_db(path)
        # A crash of the process loses nothing in WAL mode; only a power loss could undo the last notes.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("""CREATE TABLE IF NOT EXISTS summary_calls (
                call_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, agent_id TEXT NOT NULL,
                caller_key TEXT NOT NULL, summarised INTEGER NOT NULL DEFAULT 0, seen_at REAL NOT NULL)""")
            self._db.execute("""CREATE TABLE IF NOT EXISTS summary_notes (
                call_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, tool TEXT NOT NULL,
                text TEXT NOT NULL, PRIMARY KEY (call_id, seq)) WITHOUT ROWID""")
            # Each call's start forgets what is a day old: by index, not a scan of a day of calls.
            self._db.execute("CREATE INDEX IF NOT EXISTS summary_calls_by_age ON summary_calls (seen_at)")

    def started(self, call_id: str, tenant_id: str, agent_id: str, caller_key: str) -> None:
        with self._lock:
            forgotten = time.time() - FORGET_UNFINISHED_AFTER_S
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM summary_notes WHERE call_id IN "
                             "(SELECT call_id FROM summary_calls WHERE seen_at < ?)", (forgotten,))
            self._db.execute("DELETE FROM summary_calls WHERE seen_at < ?", (forgotten,))
            self._db.execute("INSERT OR IGNORE INTO summary_calls (call_id, tenant_id, agent_id, caller_key, seen_at) "
                             "VALUES (?, ?, ?, ?, ?)", (call_id, tenant_id, agent_id, caller_key, time.time()))
            self._db.execute("COMMIT")

    def note(self, call_id: str, seq: int, note: CallNote) -> None:
        """Kept for a call this worker saw start, with someone to remember; a redelivery changes nothing."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO summary_notes (call_id, seq, kind, tool, text) SELECT ?, ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM summary_calls WHERE call_id = ? AND caller_key != '' AND "
                "summarised = 0)", (call_id, seq, note.kind, note.tool, note.text, call_id))

    def call(self, call_id: str) -> FoldedCall | None:
        with self._lock:
            row = self._db.execute("SELECT tenant_id, agent_id, caller_key, summarised FROM summary_calls "
                                   "WHERE call_id = ?", (call_id,)).fetchone()
        return None if row is None else FoldedCall(row[0], row[1], row[2], bool(row[3]))

    def notes(self, call_id: str) -> list[CallNote]:
        with self._lock:
            rows = self._db.execute("SELECT kind, text, tool FROM summary_notes WHERE call_id = ? ORDER BY seq",
                                    (call_id,)).fetchall()
        return [CallNote(kind, text, tool) for kind, text, tool in rows]

    def summarised(self, call_id: str) -> None:
        """The summary is on the log (or there is none to make): the call's words are not kept beyond it."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM summary_notes WHERE call_id = ?", (call_id,))
            self._db.execute("UPDATE summary_calls SET summarised = 1 WHERE call_id = ?", (call_id,))
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Summariser:
    def __init__(self, backend: LogBackend, store: SummaryStore, llm_for: SummaryLlm | None = None) -> None:
        self.backend = backend
        self.store = store
        self.llm_for = llm_for
        self.ready = asyncio.Event()
        self.summarised = 0
        self.read_back = 0
        """Calls read back from the log because their start was not seen here (a rebalance, a new file)."""

    async def run(self, stop: asyncio.Event) -> None:
        writers: list[EventWriter] = []

        async def start(producer: LogProducer) -> None:
            writers.append(EventWriter(producer))

        # One admin for the worker's life, for the rare call read back: opening one per call (a Kafka
        # client's bootstrap) stalled the event loop, and with it every live call of the gateway.
        async with self.backend.admin() as admin:

            async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
                try:
                    await self.fold(writers[0], admin, item.event)
                except Exception:  # one call's summary must not stop the others'
                    log.exception("summariser: call %s", item.event.call_id)

            await run_in_group(self.backend, [CALLS], GROUP, stop, handle, ready=self.ready, start=start,
                               types=FOLDED_TYPES)

    async def fold(self, writer: EventWriter, admin: LogAdmin, event: Event[EventPayload]) -> None:
        p = event.payload
        if isinstance(p, CallStarted):
            await asyncio.to_thread(self.store.started, event.call_id, event.tenant_id, p.agent_id,
                                    key_of_call(event.tenant_id, p) or "")
        elif isinstance(p, CallEnded):
            await self.summarise(writer, admin, event)
        elif (note := note_of(p)) is not None:
            await asyncio.to_thread(self.store.note, event.call_id, event.seq, note)

    async def summarise(self, writer: EventWriter, admin: LogAdmin,
                        ended: Event[EventPayload]) -> CallSummarized | None:
        folded = await asyncio.to_thread(self.store.call, ended.call_id)
        if folded is None:
            folded, notes = await self._read_back(admin, ended)
        else:
            notes = await asyncio.to_thread(self.store.notes, ended.call_id)
        if folded is None or folded.summarised:
            return None  # not a call (no start on the log), or summarised before (a redelivered call.ended)
        payload = None
        extractive = summarize(notes)
        if folded.caller_key and extractive is not None:
            summary, source = await self._llm_summary(ended, folded.agent_id, notes) or (extractive, OFFLINE_SOURCE)
            payload = CallSummarized(call_id=ended.call_id, agent_id=folded.agent_id, summary=summary,
                                     outcome=ended.payload.outcome if isinstance(ended.payload, CallEnded) else None,
                                     source=source)
            recorder = CallRecorder(writer, tenant_id=ended.tenant_id, call_id=folded.caller_key, producer=WORKER,
                                    producer_version=__version__, next_seq=ended.envelope.event_time_us)
            await recorder.record(payload, causation_id=ended.envelope.event_id, correlation_id=ended.call_id)
            await writer.flush()
            self.summarised += 1
        await asyncio.to_thread(self.store.summarised, ended.call_id)
        return payload

    async def _read_back(self, admin: LogAdmin,
                         ended: Event[EventPayload]) -> tuple[FoldedCall | None, list[CallNote]]:
        """A call whose start passed another worker: its notes from the log, from its start on (the calls
        topic alone: its audio, most of its events, is not decoded)."""
        self.read_back += 1
        call = await read_call(admin, ended.call_id, topics=(CALLS,), since_ms=call_start_bound_ms(ended))
        started = next((e for e in call.events if isinstance(e.payload, CallStarted)), None)
        if started is None or not isinstance(started.payload, CallStarted):
            return None, []
        key = key_of_call(ended.tenant_id, started.payload) or ""
        await asyncio.to_thread(self.store.started, ended.call_id, ended.tenant_id, started.payload.agent_id, key)
        return FoldedCall(ended.tenant_id, started.payload.agent_id, key, False), notes_of(call.events)

    async def _llm_summary(self, ended: Event[EventPayload], agent_id: str,
                           notes: Sequence[CallNote]) -> tuple[str, str] | None:
        """(summary, source) from the agent's LLM, or None: no LLM for it, or none answered."""
        llm = self.llm_for(ended.tenant_id, agent_id) if self.llm_for else None
        request = summary_request(notes, request_id=f"{ended.call_id}/summary", model="")
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
