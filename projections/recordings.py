"""The recordings projection: every call's audio as one stereo WAV (caller left, agent right), kept
in a `RecordingStore` (the recordings folder, or an S3 bucket), and a `recordings` row that says
where it is and what it holds. A call's audio is held and placed by `recording_buffer`, and its WAV
assembled by `recording_assembly`; this module decides when a call is complete, reads what it
lacks from the log, and stores the recording.

The log is the system of record and the WAV is derived from it, so it has to come out the same
however the events arrive: replayed after a crash, picked up in the middle of a call, or with the
calls topic read ahead of the audio topic (they are separate partitions, so `call.ended` often
arrives before the call's last chunks; in a rebuild, long before). So:

- Until a call's audio is in its working files, the projection holds the runner's stored offset of
  its audio partition back to the call's first chunk held (`held`,
  `projections.projection.HoldsOffsets`): a crash replays it rather than lose it.
- On `call.ended`: when the call's audio partition has been read past it (log time; on a log whose
  timestamps are the producers', `AUDIO_SETTLE_MS` past it), all its audio is here. When that
  partition is well behind (a rebuild, a backlog), the call waits for it (or for the runner to have
  read the whole log: `settle`), holding the stored offset of `call.ended` back meanwhile, so that a
  crash replays it; the row comes with a later event.
  Otherwise (live: the audio arrives with the end) the call's audio after the last chunk held is
  read from the log. Then the two sides are resampled and interleaved into `<call>.wav.tmp`, and
  that goes to the store with its facts (length, size, audio per direction) in one step: a recording
  the store has is final, and the row of a replayed `call.ended` is the same row. The working files
  go only after that. A store that cannot be reached is retried (with backoff, each failure logged)
  until it can: the projection waits on that call rather than lose its recording.
- A call whose caller refused consent (`consent.refused`), or under opt_in never agreed, has no
  recording at all, not even the agent's side (docs/compliance.md, "Consent"): at the refusal what is
  held of its audio goes, from memory and the working files, and its live row is deleted; an empty
  marker (`<tenant>/.withheld/<call>`, kept `WITHHELD_MARKERS_KEPT_S`) makes its later events, read
  again after a restart too, start nothing. Whether an opt_in call agreed is known at its end, from
  what was read of it, or from the log for a call whose start was read before a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from consumers.event_reader import call_start_bound_ms, read_call
from producers.log_producer import LogRecord, TopicPartition
from projections import tables
from projections.erasure import CALLS_ERASED, ERASED_CALL_IDS, ErasedCallers
from projections.erasure import parameters as erasure_parameters
from projections.projection import CallPartition, HasAdmin, log_admin
from projections.recording_assembly import FORMAT
from projections.recording_buffer import AudioBuffer, CallAudio, WorkingFiles
from projections.recording_store import (
    LocalRecordingStore,
    RecordingFacts,
    RecordingStore,
    RecordingStoreError,
    recording_path,
)
from projections.store import AnalyticsStore
from projections.tables import ERASED_CALLS, ERASURES, RECORDINGS, Output, Row, Table, at, deletion
from schemas.base import Event, EventPayload
from schemas.events import (
    AgentAudioChunk,
    CallEnded,
    CallerAudioChunk,
    CallerErased,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
)
from schemas.topics import AUDIO, CALLS
from streams.audio.formats import PCM_RATE
from streams.config.consent import recorded_mode
from streams.memory import key_of_call
from streams.redaction import default_redactor

__all__ = ["RECORDINGS", "RecordingsProjection", "recording_path"]

log = logging.getLogger(__name__)

ENDED_CALLS_KEPT = 1000
"""Ended calls remembered, so that their late audio is dropped without asking the store."""
LIVE_CALLS_KEPT = 10_000
"""Live calls held in memory; one evicted (its audio to its working files first) comes back from its
meta file when it speaks again."""
WAITING_CALLS_KEPT = 2000
"""Ended calls waiting for their audio partition to be read; beyond, an ending call reads its audio from the log."""
AUDIO_SETTLE_MS = 1000
"""A call's audio is all read once its audio partition is read this far (log time) past its `call.ended`,
on a log whose timestamps are the producers' (Kafka): slack for the producers' clocks and for sends to
the two topics that land out of order."""
CALLS_FINISHED_TOGETHER = 8
"""Calls finished at once (each in a thread): one's disk waits overlap the others' work."""
READY_CALLS_KEPT = 256
"""Calls ready to finish held before they are finished together: finishing calls between reading the
log's batches costs more than finishing many at once."""
UNPLACED_CHUNKS_KEPT = 500
"""Agent chunks held until the call's start is known (10 s); beyond, it is looked for in the log."""
AUDIO_CATCH_UP_SLACK_MS = 10_000
"""Read the log's audio from this long before the last chunk written (the log's own timestamps
are append times, a little after the events')."""
WITHHELD_MARKERS_KEPT_S = 7 * 24 * 3600
"""How long a withheld call's marker is kept (pruned when the projection starts): far longer than any of
its audio can be read again after a restart."""
STORE_RETRY_FIRST_S = 0.5
STORE_RETRY_MAX_S = 30.0
"""Backoff between attempts at a store that failed: doubling from the first to the most."""

T = TypeVar("T")

_CHUNKS = (CallerAudioChunk, AgentAudioChunk)


class RecordingsLog(HasAdmin, Protocol):
    """The log as this projection reads it beyond the records it is handed (both backends are one):
    point reads through its admin, and whether it stamps records in the order it appends them (then a
    call's audio is all read once its partition is read past the call's end)."""

    stamps_in_append_order: bool


@dataclass(frozen=True)
class _Ending:
    """A `call.ended` waiting for its call's audio partition to be read past it."""

    event: Event[EventPayload]
    tp: TopicPartition
    offset: int


@dataclass
class _Call(CallAudio):
    """A live call: its audio, and where the projection is with it."""

    audio_partition: int | None = None
    """Where its audio is on the audio topic, once seen."""
    ending: _Ending | None = None
    """Its `call.ended`, held from when it is read until the recording's row is given."""
    waiting: bool = False
    """Ended, waiting for its audio partition to be read past its end."""
    unplaced: list[tuple[Event[EventPayload], AgentAudioChunk, LogRecord]] = field(default_factory=list)
    """Agent chunks read before the call's start was known (where they go depends on it)."""
    consent_mode: str | None = None
    """The consent mode its `call.started` recorded ("" none); None while its start has not been read here
    (picked up mid-call, or after a restart): its end reads it from the log."""
    consent_given: bool = False
    refused: bool = False
    """A refusal found in the log at its end (one read here withholds the recording at once)."""


def withheld_marker(root: Path, tenant_id: str, call_id: str) -> Path:
    """The empty file that says a call has no recording by consent (ValueError for ids that cannot name one)."""
    return recording_path(root, tenant_id, call_id).parent / ".withheld" / call_id


class RecordingsProjection:
    name = "recordings"
    topics: tuple[str, ...] = (AUDIO, CALLS)
    tables: tuple[Table, ...] = (RECORDINGS, ERASURES)
    event_types: frozenset[str] | None = frozenset(
        t.EVENT_TYPE for t in (CallerAudioChunk, AgentAudioChunk, CallStarted, CallEnded, CallerErased, ConsentGiven,
                               ConsentRefused))

    def __init__(self, root: Path, store: RecordingStore | None = None) -> None:
        """`root`: the working folder; `store`: where finished recordings go (default: `root` itself)."""
        self.root = root
        self.store: RecordingStore = store or LocalRecordingStore(root)
        self.live: OrderedDict[str, _Call] = OrderedDict()
        """Calls being recorded, least recently written first."""
        self.ended: OrderedDict[str, RecordingFacts] = OrderedDict()
        self.buffer = AudioBuffer()
        self.audio_read: dict[int, int] = {}
        """Per audio partition, the latest log timestamp read (ms)."""
        self.waiting: dict[int, list[tuple[int, int, _Call]]] = {}
        """Per audio partition, the ended calls waiting for it: a heap of (the log time its audio
        partition must be read past, order, call)."""
        self.waiting_calls = 0
        self.ready: OrderedDict[str, tuple[_Call, bool]] = OrderedDict()
        """Ended calls to finish (with whether their audio is to be read from the log first), a few at once."""
        self._order = itertools.count()
        self._audio_partition = CallPartition(AUDIO)
        self.rejected_events = 0
        """Events whose tenant or call id cannot name a file."""
        self.store_failures = 0
        """Attempts at the store that failed (each retried)."""
        self.erasures = ErasedCallers()
        self.erased: OrderedDict[str, None] = OrderedDict()
        """Calls of erased callers seen lately: their audio is not recorded."""
        self.withheld: OrderedDict[str, None] = OrderedDict()
        """Calls seen lately whose recording is withheld by consent (older ones: their marker says)."""
        self.analytics: AnalyticsStore | None = None

    def reset(self) -> None:
        # The files stay: finished recordings are final, and live calls continue from their meta files.
        self.ready.clear()
        self.live.clear()
        self.ended.clear()
        self.waiting.clear()
        self.audio_read.clear()
        self.withheld.clear()  # their markers stay
        self.waiting_calls = 0
        self.buffer.reset()

    @property
    def skipped_chunks(self) -> int:
        """Audio chunks that were not audio (an unknown codec, PCM cut mid-sample, an absurd position)."""
        return self.buffer.skipped_chunks

    async def load(self, store: AnalyticsStore) -> None:
        """The erasures folded before (what a live call needs is in its meta file)."""
        self.analytics = store
        for table in (tables.CALLS, ERASED_CALLS):  # where an erasure's calls are found (the calls projection's)
            await asyncio.to_thread(store.create, table)
        await asyncio.to_thread(self.erasures.load, store)
        await asyncio.to_thread(self._prune_markers, time.time() - WITHHELD_MARKERS_KEPT_S)

    def _prune_markers(self, before_s: float) -> None:
        for marker in self.root.glob("*/.withheld/*"):
            with contextlib.suppress(OSError):
                if marker.stat().st_mtime < before_s:
                    marker.unlink()

    def held(self) -> Mapping[TopicPartition, int]:
        """The offsets the runner must not store past: each live call's first record whose effects are
        only in memory, and each `call.ended` waiting for its audio."""
        out: dict[TopicPartition, int] = {}
        for call in self.live.values():
            for hold in (call.held_from, call.ending and (call.ending.tp, call.ending.offset),
                         call.unplaced and (call.unplaced[0][2].tp, call.unplaced[0][2].offset)):
                if hold and hold[1] < out.get(hold[0], hold[1] + 1):
                    out[hold[0]] = hold[1]
        return out

    async def settle(self, backend: RecordingsLog, read: Mapping[TopicPartition, int] | None) -> list[Output]:
        """Finishes the calls ready, and those waiting for their audio (from what was read where all the
        log held when their `call.ended` was in it has been read, as a call's audio comes before its
        end; from the log otherwise)."""
        waiting = sorted((entry for heap in self.waiting.values() for entry in heap), key=lambda entry: entry[:2])
        self.waiting.clear()
        for _, _, call in waiting:
            if call.waiting and call.ending is not None:
                self._ready(call, catch_up=read is None or call.ending.offset >= read.get(call.ending.tp, 0))
        return await self._finish_ready(backend)

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: RecordingsLog) -> Sequence[Output]:
        payload = event.payload
        if isinstance(payload, _CHUNKS):  # most events: kept short
            partition, stamped = record.partition, record.timestamp_ms
            if stamped > self.audio_read.get(partition, -1):
                self.audio_read[partition] = stamped
                waiting = self.waiting.get(partition)
                if waiting and waiting[0][0] < stamped:
                    self._audio_read(partition, stamped)
            if event.pii_withheld:  # its key destroyed (refused consent, retention, erasure): no audio to keep
                return []
            call = self.live.get(event.call_id)
            if call is None or call.started_us is None:
                await self._chunk(record, event, payload, backend)
            else:
                self.live.move_to_end(event.call_id)
                self._write(call, event, payload, record)
                self.buffer.spill_if_due(call, event.envelope.event_time_us, self.live.values())
            return await self._finish_ready(backend) if len(self.ready) >= READY_CALLS_KEPT else []
        out = await self._other(record, event, backend)
        # Only once this event is folded: were it not, its dead letter would take the rows along.
        return [*out, *await self._finish_ready(backend)] if len(self.ready) >= READY_CALLS_KEPT else out

    async def _other(self, record: LogRecord, event: Event[EventPayload], backend: RecordingsLog) -> list[Output]:
        payload = event.payload
        if isinstance(payload, CallerErased):
            return await self._erase(event)
        if event.call_id in self.erased or event.call_id in self.withheld:
            return []
        if isinstance(payload, ConsentRefused):
            try:
                return self._withhold(event.tenant_id, event.call_id)
            except ValueError as exc:
                return self._reject(event, exc)
        if isinstance(payload, CallStarted) and self.erasures.erased(
                event.tenant_id, key_of_call(event.tenant_id, payload), event.envelope.event_time_us):
            await self._forget(event.tenant_id, event.call_id)  # its audio may have come first
            return []
        if isinstance(payload, CallStarted | CallEnded | ConsentGiven):
            try:  # ids that cannot name a recording: refused once, here, for every event that would make one
                self.store.location(event.tenant_id, event.call_id)
            except ValueError as exc:
                return self._reject(event, exc)
        if isinstance(payload, ConsentGiven):
            return await self._consent_given(event)
        if isinstance(payload, CallStarted):
            call = await self._call(event)
            if event.call_id in self.withheld:
                return []
            mode = recorded_mode(payload.parameters)
            if call is not None:
                call.consent_mode = mode or ""
                if call.started_us is None:
                    call.started_us = event.envelope.event_time_us
                    self._place(call)
            if mode == "opt_in":
                return []  # nothing is recorded before the caller's yes: its row comes with it
            return [self._live_row(event.tenant_id, event.call_id, event.envelope.event_time_us, event.seq)]
        if isinstance(payload, CallEnded):
            call = await self._call(event)
            if call is None:
                if event.call_id in self.withheld:
                    return []
                # What a crash between storing the recording and the clean-up left.
                WorkingFiles.of(self.root, event.tenant_id, event.call_id).remove()
                return self._row(event, self.ended[event.call_id])
            if call.ending is not None:
                return []  # a redelivery of the call.ended it waits with
            await self._ending(call, record, event, backend)
        return []

    def _live_row(self, tenant_id: str, call_id: str, started_us: int, seq: int) -> Row:
        location = self.store.location(tenant_id, call_id)
        return (RECORDINGS, (tenant_id, call_id, location, FORMAT, 2, PCM_RATE, 0, 0, 0, 0, at(started_us), None, 0,
                             seq))

    async def _consent_given(self, event: Event[EventPayload]) -> list[Output]:
        """An opt_in call is recorded from the caller's yes: its live row comes now."""
        call = await self._call(event)
        if call is None:
            return []
        call.consent_given = True
        if call.consent_mode != "opt_in" or call.started_us is None:
            return []
        return [self._live_row(event.tenant_id, event.call_id, call.started_us, event.seq)]

    def _withhold(self, tenant_id: str, call_id: str) -> list[Output]:
        """No recording of this call: what is held of its audio goes (memory, working files), its marker
        makes its later events start nothing, and its live row goes. ValueError for ids that cannot name
        one."""
        marker = withheld_marker(self.root, tenant_id, call_id)
        self._let_go(self.withheld, tenant_id, call_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return [deletion(RECORDINGS, "tenant_id = {tenant:String} AND call_id = {call:String}",
                         (("tenant", tenant_id), ("call", call_id)))]

    def _row(self, ended: Event[EventPayload], facts: RecordingFacts) -> list[Output]:
        location = self.store.location(ended.tenant_id, ended.call_id)
        return [(RECORDINGS, (ended.tenant_id, ended.call_id, location, FORMAT, 2, PCM_RATE, facts.duration_ms,
                              facts.bytes, facts.caller_audio_ms, facts.agent_audio_ms, at(facts.started_us),
                              at(ended.envelope.event_time_us), 1, ended.seq))]

    async def _chunk(self, record: LogRecord, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk,
                     backend: RecordingsLog) -> None:
        if event.call_id in self.erased or event.call_id in self.withheld:
            return
        call = self.live.get(event.call_id)
        if call is None:
            if event.call_id in self.ended:  # its late audio: the recording is final
                return
            call = await self._call(event)
            if call is None:
                return
        else:
            self.live.move_to_end(event.call_id)
        if isinstance(chunk, AgentAudioChunk) and call.started_us is None:
            # Placed once the call's start is known: its call.started is often just behind on its topic.
            if event.seq > call.agent.last_seq:
                call.unplaced.append((event, chunk, record))
            if len(call.unplaced) < UNPLACED_CHUNKS_KEPT:
                return
            await self._find_start(call, event, backend)
            self._place(call)
        else:
            self._write(call, event, chunk, record)
        self.buffer.spill_if_due(call, event.envelope.event_time_us, self.live.values())

    def _place(self, call: _Call) -> None:
        """Places the agent chunks that waited for the call's start."""
        unplaced, call.unplaced = call.unplaced, []
        for event, chunk, record in unplaced:
            self._write(call, event, chunk, record)

    def _audio_read(self, partition: int, stamped: int) -> None:
        """Finishes the calls that waited for their audio partition to be read this far."""
        waiting = self.waiting.get(partition)
        while waiting and waiting[0][0] < stamped:
            call = heapq.heappop(waiting)[2]
            if call.waiting:
                self._ready(call, catch_up=False)

    async def _ending(self, call: _Call, record: LogRecord, event: Event[EventPayload], backend: RecordingsLog) -> None:
        """The call's `call.ended`: the call is ready to finish if its audio partition is read past it,
        else once it is (or once the runner settles). Its `call.ended` is held until its row is given."""
        call.ending = _Ending(event, record.tp, record.offset)
        partition = call.audio_partition
        if partition is None:
            partition = await self._audio_partition.of(event.call_id, backend)
        complete_after = record.timestamp_ms + (0 if backend.stamps_in_append_order else AUDIO_SETTLE_MS)
        if partition is not None and self.audio_read.get(partition, -1) > complete_after:
            self._ready(call, catch_up=False)
        elif self.waiting_calls >= WAITING_CALLS_KEPT:
            self._ready(call, catch_up=True)
        else:
            heapq.heappush(self.waiting.setdefault(-1 if partition is None else partition, []),
                           (complete_after, next(self._order), call))
            call.waiting = True
            self.waiting_calls += 1

    def _reject(self, event: Event[EventPayload], exc: ValueError) -> list[Output]:
        self.rejected_events += 1
        log.warning("recordings: %s; event %s ignored", exc, event.envelope.event_id)
        return []

    async def _call(self, event: Event[EventPayload]) -> _Call | None:
        """The live call's state (restored or new); None once its recording is final (or its ids
        cannot name one)."""
        call_id = event.call_id
        if call_id in self.ended:
            self.ended.move_to_end(call_id)
            return None
        if call_id in self.withheld:
            return None
        call = self.live.get(call_id)
        if call is None:
            try:
                files = WorkingFiles.of(self.root, event.tenant_id, call_id)
                marker = withheld_marker(self.root, event.tenant_id, call_id)
            except ValueError as exc:
                self._reject(event, exc)
                return None
            if marker.exists():  # withheld before a restart: its events, read again, start nothing
                self.withheld[call_id] = None
                return None
            facts = await self._stored(f"looking up call {call_id}'s recording", self.store.finished,
                                       event.tenant_id, call_id)
            if facts is not None:
                self._remember_ended(call_id, facts)
                return None
            call = self.live[call_id] = _Call.restore(event, files)
            if len(self.live) > LIVE_CALLS_KEPT:
                self._evict()
        else:
            self.live.move_to_end(call_id)
        call.first_seen_us = min(call.first_seen_us, event.envelope.event_time_us)
        return call

    def _evict(self) -> None:
        """Forgets the call written longest ago (its audio to its working files first); not one waiting
        for its audio, whose `call.ended` is held, nor the one just come."""
        for call_id, call in itertools.islice(self.live.items(), len(self.live) - 1):
            if call.ending is None and not call.unplaced:  # not one whose call.ended or audio is held
                self.buffer.spill(call)
                del self.live[call_id]
                return

    async def _stored(self, what: str, operation: Callable[..., T], *args: object, waits: bool = False) -> T:
        """`operation(*args)` on the store (in a thread if it is remote, or `waits` on the disk), retried
        with backoff while it fails."""
        delay = STORE_RETRY_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(operation, *args) if self.store.remote or waits else operation(*args)
            except RecordingStoreError as exc:
                self.store_failures += 1
                log.error("recordings: %s failed (%s, %s); retrying in %.1f s, the audio is kept meanwhile",
                          what, self.store.describe(), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_MAX_S)

    async def _erase(self, event: Event[EventPayload]) -> list[Output]:
        """The erased caller's recordings (their calls found through `calls`) leave the store, their
        working files and rows go, and the erasure is remembered."""
        row = self.erasures.fold(event, default_redactor())
        if self.analytics is not None:
            found = await asyncio.to_thread(self.analytics.query, ERASED_CALL_IDS, dict(erasure_parameters(event)))
            for (call_id,) in found.rows:
                await self._forget(event.tenant_id, call_id)
        return [row, deletion(RECORDINGS, CALLS_ERASED, erasure_parameters(event))]

    async def _forget(self, tenant_id: str, call_id: str) -> None:
        """No recording of this call, anywhere: not in the store, not in the working files, not in memory."""
        self._let_go(self.erased, tenant_id, call_id)
        self.ended.pop(call_id, None)
        await self._stored(f"erasing call {call_id}'s recording", self.store.erase, tenant_id, call_id)

    def _let_go(self, calls: OrderedDict[str, None], tenant_id: str, call_id: str) -> None:
        """The call joins `calls` (erased or withheld; the latest few kept), and what is held of its audio
        goes: in memory and in its working files."""
        calls[call_id] = None
        while len(calls) > ENDED_CALLS_KEPT:
            calls.popitem(last=False)
        self.ready.pop(call_id, None)
        call = self.live.pop(call_id, None)
        if call is not None:
            self._drop(call)
        WorkingFiles.of(self.root, tenant_id, call_id).remove()

    def _drop(self, call: _Call) -> None:
        """Lets go of what a call that leaves `live` holds (its holds go with it)."""
        self.buffer.release(call)
        call.ending = None
        if call.waiting:
            call.waiting = False
            self.waiting_calls -= 1

    def _remember_ended(self, call_id: str, facts: RecordingFacts) -> None:
        self.ended[call_id] = facts
        while len(self.ended) > ENDED_CALLS_KEPT:
            self.ended.popitem(last=False)

    async def _find_start(self, call: _Call, event: Event[EventPayload], backend: RecordingsLog) -> int:
        """The call's start from the log: its call.started, or (none there) the earliest event seen; and its
        consent, where its start was not read here."""
        async with log_admin(backend) as admin:
            history = await read_call(admin, call.call_id, topics=(CALLS,),
                                      since_ms=call_start_bound_ms(event))
        starts = [e for e in history.events if isinstance(e.payload, CallStarted)]
        seen = [e.envelope.event_time_us for e in history.events]
        if call.started_us is None:
            call.started_us = starts[0].envelope.event_time_us if starts else min([*seen, call.first_seen_us])
        if call.consent_mode is None:
            started = starts[0].payload if starts else None
            call.consent_mode = (recorded_mode(started.parameters) if isinstance(started, CallStarted) else None) or ""
            call.consent_given = any(isinstance(e.payload, ConsentGiven) for e in history.events)
            call.refused = any(isinstance(e.payload, ConsentRefused) for e in history.events)
        return call.started_us

    def _write(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk,
               record: LogRecord | None) -> None:
        """Places the chunk where it goes, held in memory; `record`: where it was read (none: from the
        log, for a call being finished)."""
        if record is not None:
            call.audio_partition = record.partition
        self.buffer.write(call, event, chunk, record, end_seq=None if call.ending is None else call.ending.event.seq)

    def _ready(self, call: _Call, *, catch_up: bool) -> None:
        if call.waiting:
            call.waiting = False
            self.waiting_calls -= 1
        self.ready[call.call_id] = (call, catch_up)

    async def _finish_ready(self, backend: RecordingsLog) -> list[Output]:
        """Finishes the calls ready, a few at once (assembling a WAV is mostly numpy, storing it mostly
        waits on the disk: one call's waits overlap the others' work); gives their rows."""
        out: list[Output] = []
        while self.ready:
            together = [self.ready.popitem(last=False)[1] for _ in range(min(CALLS_FINISHED_TOGETHER, len(self.ready)))]
            finished = await asyncio.gather(*(self._finish(call, backend, catch_up=catch_up)
                                              for call, catch_up in together), return_exceptions=True)
            for (call, _), facts in zip(together, finished, strict=True):
                ending = call.ending
                assert ending is not None
                if facts is None:  # no consent to record it
                    out += self._withhold(call.tenant_id, call.call_id)
                    continue
                if isinstance(facts, BaseException):
                    if not isinstance(facts, Exception):
                        raise facts
                    # As a dead letter of its call.ended would: the call stays, its end is not held.
                    log.error("recordings: call %s could not be finished: %r", call.call_id, facts)
                    call.ending = None
                    with contextlib.suppress(OSError):
                        self.buffer.spill(call)
                    continue
                del self.live[call.call_id]
                self._drop(call)
                self._remember_ended(call.call_id, facts)
                out += self._row(ending.event, facts)
        return out

    async def _finish(self, call: _Call, backend: RecordingsLog, *, catch_up: bool) -> RecordingFacts | None:
        """Stores the call's recording (with `catch_up`, its audio after the last chunk held read from
        the log first), then lets go of its working files; None when there is no consent to record it."""
        assert call.ending is not None
        event = call.ending.event
        started_us = call.started_us
        if started_us is None or call.consent_mode is None:
            started_us = await self._find_start(call, event, backend)
        if call.refused or (call.consent_mode == "opt_in" and not call.consent_given):
            return None
        self._place(call)
        if catch_up:
            # The audio topic may be behind the calls topic: take the rest of the call's audio from the log.
            since_us = min(track.last_us if track.last_seq >= 0 else started_us for track in (call.caller, call.agent))
            async with log_admin(backend) as admin:
                history = await read_call(admin, call.call_id, topics=(AUDIO,),
                                          since_ms=since_us // 1000 - AUDIO_CATCH_UP_SLACK_MS)
            for earlier in history.events:
                if earlier.seq < event.seq and isinstance(earlier.payload, CallerAudioChunk | AgentAudioChunk):
                    self._write(call, earlier, earlier.payload, None)
        self.buffer.folder(call)
        if call.on_disk:  # the rest joins what is in its working files
            self.buffer.spill(call)
        return await self._stored(f"storing call {call.call_id}'s recording", self._store_call, call, started_us,
                                  waits=True)

    def _store_call(self, call: _Call, started_us: int) -> RecordingFacts:
        """Assembles the call's WAV, stores it with its facts, then lets go of its working files (in a
        thread: one hop for all of it)."""
        frames = call.write_wav()
        facts = RecordingFacts(started_us, frames * 1000 // PCM_RATE, call.files.wav.stat().st_size,
                               call.caller.audio_ms, call.agent.audio_ms)
        self.store.put(call.tenant_id, call.call_id, call.files.wav, facts)
        call.clean_up()
        return facts
