"""The recordings projection: every call's audio as one stereo WAV (caller left, agent right), kept
in a `RecordingStore` (the recordings folder, or an S3 bucket), and a `recordings` row that says
where it is and what it holds.

The log is the system of record and the WAV is derived from it, so it has to come out the same
however the events arrive: replayed after a crash, picked up in the middle of a call, or with the
calls topic read ahead of the audio topic (they are separate partitions, so `call.ended` often
arrives before the call's last chunks; in a rebuild, long before). So:

- A call's audio is held in memory as it arrives (each chunk as it came: mu-law codes are decoded
  a run of chunks at a time, later), with where it goes. It goes to working files
  (`<root>/<tenant>/.partial/<call>.caller.pcm` and `.agent.pcm`: 16-bit mono PCM at the rate of the
  direction's first chunk, 8 kHz for a phone call, each chunk at its own byte position, so rewriting
  a chunk rewrites the same bytes and gaps stay silence) only when the call holds more than
  `SPILL_BYTES`, has held audio for `SPILL_AFTER_MS`, or all calls together hold more than
  `BUFFERED_BYTES`: a call of a few minutes never touches a working file, and memory stays bounded.
  Until its audio is in the files, the projection holds the runner's stored offset of its audio
  partition back to the call's first chunk held (`held`, `projections.runner.HoldsOffsets`): a crash
  replays it rather than lose it.
- Resampling to 16 kHz happens once, over each whole direction, when the WAV is assembled: so chunk
  edges leave no trace (resampling each 20 ms chunk alone would put a 50 Hz buzz 27 dB under the
  voice), and a restart changes nothing. A chunk at another rate than its direction's first (no
  source sends one) is resampled to that rate alone.
- Where a chunk goes: the caller's stream is real time from the call's start, so a caller chunk goes
  at its `offset_ms`. The agent's `offset_ms` counts agent audio only (it would squash the silences
  between replies), so an agent chunk goes where it was played: its event time minus the call's
  start, or straight after the previous agent chunk when that one was still playing (the caller's
  side plays agent audio first in, first out, and the jitter of the send times must not leave
  clicks between the frames of a reply).
- A small fixed-size meta file beside the parts keeps what a restart needs (the call's start, and
  per direction the last chunk written, where it ended, how much audio there was, its rate),
  written with the parts, so replayed chunks are skipped rather than written again, and nothing is
  counted twice.
- On `call.ended`: when the call's audio partition has been read past it (log time; on Kafka,
  `AUDIO_SETTLE_MS` past it), all its audio is here. When that partition is well behind (a rebuild, a backlog), the call
  waits for it (or for the runner to have read the whole log: `settle`), holding the stored offset
  of `call.ended` back meanwhile, so that a crash replays it; the row comes with a later event.
  Otherwise (live: the audio arrives with the end) the call's audio after the last chunk held is
  read from the log. Then the two sides are resampled and interleaved into `<call>.wav.tmp`, and
  that goes to the store with its facts (length, size, audio per direction) in one step: a recording
  the store has is final, and the row of a replayed `call.ended` is the same row. The working files
  go only after that. A store that cannot be reached is retried (with backoff, each failure logged)
  until it can: the projection waits on that call rather than lose its recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import struct
import wave
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from consumers.backends import EmbeddedBackend, LogBackend
from consumers.base import LogAdmin
from consumers.events import read_call
from producers.base import LogRecord, TopicPartition
from producers.partitioning import partition_for
from projections import tables
from projections.erasure import CALLS_ERASED, ERASED_CALL_IDS, ErasedCallers
from projections.erasure import parameters as erasure_parameters
from projections.recording_store import (
    LocalRecordingStore,
    RecordingFacts,
    RecordingStore,
    RecordingStoreError,
    recording_path,
)
from projections.store import AnalyticsStore
from projections.tables import ERASED_CALLS, ERASURES, RECORDINGS, Output, Table, at, deletion
from schemas.base import Event, EventPayload
from schemas.events import AgentAudioChunk, CallEnded, CallerAudioChunk, CallerErased, CallStarted
from schemas.topics import AUDIO, CALLS
from streams.audio.codecs import Resampler, mulaw_to_pcm16, resample_pcm16
from streams.memory import caller_key, person_number
from streams.providers.base import PCM_RATE
from streams.redaction import default_redactor

__all__ = ["RECORDINGS", "RecordingsProjection", "recording_path"]

log = logging.getLogger(__name__)

RATE = PCM_RATE
FORMAT = f"wav/pcm_s16le/{RATE}/stereo"

ENDED_CALLS_KEPT = 1000
"""Ended calls remembered, so that their late audio is dropped without asking the store."""
LIVE_CALLS_KEPT = 10_000
"""Live calls held in memory; one evicted (its audio to its working files first) comes back from its
meta file when it speaks again."""
WAITING_CALLS_KEPT = 2000
"""Ended calls waiting for their audio partition to be read; beyond, an ending call reads its audio from the log."""
SPILL_BYTES = 1 << 20
"""Audio a call holds in memory before it goes to its working files (a minute of both sides of a phone call)."""
SPILL_AFTER_MS = 30_000
"""How long (event time) a call holds audio in memory at most: what a crash makes the runner replay."""
BUFFERED_BYTES = 64 << 20
"""Audio all calls hold in memory at most: beyond, the calls written longest ago go to their working files."""
AUDIO_SETTLE_MS = 1000
"""On Kafka, a call's audio is all read once its audio partition is read this far (log time) past its
`call.ended`: slack for the producers' clocks and for sends to the two topics that land out of order.
The embedded log stamps records under its write lock, so there a record stamped later was appended later."""
CALLS_FINISHED_TOGETHER = 8
"""Calls finished at once (each in a thread): one's disk waits overlap the others' work."""
READY_CALLS_KEPT = 256
"""Calls ready to finish held before they are finished together: finishing calls between reading the
log's batches costs more than finishing many at once."""
UNPLACED_CHUNKS_KEPT = 500
"""Agent chunks held until the call's start is known (10 s); beyond, it is looked for in the log."""
CALL_LOOKBACK_MS = 3 * 3600 * 1000
"""How far back a call picked up in the middle is looked for in the log (longer than any call)."""
AUDIO_CATCH_UP_SLACK_MS = 10_000
"""Read the log's audio from this long before the last chunk written (the log's own timestamps
are append times, a little after the events')."""
AGENT_JITTER_MS = 60
"""An agent chunk sent within this long after the previous one stopped playing follows it seamlessly."""
MAX_RECORDING_MS = 4 * 3600 * 1000
"""Audio placed later than this in a call is refused (a crafted offset must not make a huge file)."""
SAMPLE_RATES = range(8000, 48001)
"""Sample rates accepted in chunks."""
BLOCK_FRAMES = RATE * 10
"""Frames interleaved at a time when the WAV is assembled (10 s: 640 KB)."""
STORE_RETRY_FIRST_S = 0.5
STORE_RETRY_MAX_S = 30.0
"""Backoff between attempts at a store that failed: doubling from the first to the most."""

_META = struct.Struct("<12q")
"""The meta file: started_us (-1: not known yet), first_seen_us, then caller and agent tracks
(last_seq, last_us, end, audio_ms, rate each)."""
_META_16K = struct.Struct("<10q")
"""The meta file of working files written before they kept each direction's own rate: the same
without the rates, parts at 16 kHz."""

T = TypeVar("T")

_CHUNKS = (CallerAudioChunk, AgentAudioChunk)


@dataclass(frozen=True)
class _Files:
    caller: Path
    agent: Path
    meta: Path
    wav: Path
    """Where the WAV is assembled before it goes to the store."""

    @classmethod
    def of(cls, root: Path, tenant_id: str, call_id: str) -> _Files:
        partial = recording_path(root, tenant_id, call_id).parent / ".partial"
        return cls(partial / f"{call_id}.caller.pcm", partial / f"{call_id}.agent.pcm", partial / f"{call_id}.meta",
                   partial / f"{call_id}.wav.tmp")

    def remove(self) -> None:
        for path in (self.caller, self.agent, self.meta, self.wav):
            path.unlink(missing_ok=True)


def _pwrite_all(path: Path, pieces: Iterator[tuple[int, bytes]]) -> None:
    """Writes each (byte position, data) into the file (made if need be)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for position, data in pieces:
            os.pwrite(fd, data, position)
    finally:
        os.close(fd)


@dataclass
class _Track:
    """One direction of a call: what has been written of it, and the audio held in memory."""

    last_seq: int = -1
    """The last chunk written: chunks up to it are replays."""
    last_us: int = 0
    """Its event time."""
    end: int = 0
    """The sample where its audio ends (at `rate`)."""
    audio_ms: int = 0
    """Audio written, by the chunks' own durations."""
    rate: int = 0
    """The part's sample rate: its first chunk's (0 before it)."""
    held: list[tuple[int, bytes, bool]] = field(default_factory=list)
    """Audio not in the part file yet, in the order written: (first sample, data, whether the data are
    mu-law codes rather than 16-bit PCM)."""

    def runs(self) -> Iterator[tuple[int, bytes]]:
        """The held audio as 16-bit PCM, (first sample, PCM) a run of adjoining chunks at a time, in
        order (a later run overwrites an earlier one where they overlap)."""
        held = self.held
        i = 0
        while i < len(held):
            start, data, mulaw = held[i]
            parts, end = [data], start + (len(data) if mulaw else len(data) // 2)
            i += 1
            while i < len(held) and held[i][0] == end and held[i][2] == mulaw:
                parts.append(held[i][1])
                end += len(held[i][1]) if mulaw else len(held[i][1]) // 2
                i += 1
            joined = b"".join(parts)
            yield start, mulaw_to_pcm16(joined) if mulaw else joined


@dataclass(frozen=True)
class _Ending:
    """A `call.ended` waiting for its call's audio partition to be read past it."""

    event: Event[EventPayload]
    tp: TopicPartition
    offset: int


@dataclass
class _Call:
    tenant_id: str
    call_id: str
    files: _Files
    first_seen_us: int
    started_us: int | None = None
    caller: _Track = field(default_factory=_Track)
    agent: _Track = field(default_factory=_Track)
    skipped: int = 0
    on_disk: bool = False
    """Its working files exist (with a meta file)."""
    held_bytes: int = 0
    """Audio held in memory."""
    held_from: tuple[TopicPartition, int] | None = None
    """The first record whose effects are only in memory (not in the working files)."""
    held_since_us: int = 0
    """Its event time."""
    audio_partition: int | None = None
    """Where its audio is on the audio topic, once seen."""
    ending: _Ending | None = None
    """Its `call.ended`, held from when it is read until the recording's row is given."""
    waiting: bool = False
    """Ended, waiting for its audio partition to be read past its end."""
    unplaced: list[tuple[Event[EventPayload], AgentAudioChunk, LogRecord]] = field(default_factory=list)
    """Agent chunks read before the call's start was known (where they go depends on it)."""

    @classmethod
    def restore(cls, event: Event[EventPayload], files: _Files) -> _Call:
        """The call as its meta file left it, or new."""
        call = cls(event.tenant_id, event.call_id, files, event.envelope.event_time_us)
        try:
            data = files.meta.read_bytes()
        except FileNotFoundError:
            return call
        call.on_disk = True
        if len(data) == _META_16K.size:
            started, first, *tracks = _META_16K.unpack(data)
            tracks = [*tracks[:4], RATE if tracks[0] >= 0 else 0, *tracks[4:], RATE if tracks[4] >= 0 else 0]
        elif len(data) == _META.size:
            started, first, *tracks = _META.unpack(data)
        else:
            log.warning("recordings: meta file %s is torn; continuing the call as new", files.meta)
            return call
        call.started_us = None if started < 0 else started
        call.first_seen_us = min(first, call.first_seen_us)
        call.caller = _Track(*tracks[:5])
        call.agent = _Track(*tracks[5:])
        return call

    def meta(self) -> bytes:
        caller, agent = self.caller, self.agent
        return _META.pack(
            -1 if self.started_us is None else self.started_us, self.first_seen_us,
            caller.last_seq, caller.last_us, caller.end, caller.audio_ms, caller.rate,
            agent.last_seq, agent.last_us, agent.end, agent.audio_ms, agent.rate)


def _audio(chunk: CallerAudioChunk | AgentAudioChunk) -> tuple[bytes, bool] | None:
    """The chunk's audio as it came (data, whether mu-law), at its own rate; None for what cannot be audio."""
    if chunk.sample_rate not in SAMPLE_RATES or chunk.offset_ms < 0 or chunk.duration_ms < 0:
        return None
    if chunk.codec == "mulaw":
        return chunk.audio, True
    if chunk.codec == "pcm_s16le" and len(chunk.audio) % 2 == 0:
        return chunk.audio, False
    return None


class _Direction:
    """One side read back at RATE, in order, a block at a time (resampled as one stream)."""

    def __init__(self, source: BinaryIO, samples: int, rate: int) -> None:
        self.source = source
        self.resampler = Resampler(rate, RATE, aligned=True) if rate not in (0, RATE) else None
        self.frames = samples if self.resampler is None else -(-samples * RATE // rate)
        self.held = np.zeros(0, dtype="<i2")

    def read(self, count: int) -> np.ndarray:
        """The next `count` samples (fewer at the end)."""
        while self.held.size < count:
            data = self.source.read(2 * BLOCK_FRAMES)
            at_end = not data
            if self.resampler is not None:
                data = self.resampler.flush() if at_end else self.resampler.process(data)
            self.held = np.concatenate([self.held, np.frombuffer(data, dtype="<i2")])
            if at_end:
                break
        taken, self.held = self.held[:count], self.held[count:]
        return taken


def _in_memory(track: _Track) -> np.ndarray | None:
    """The side at RATE from the audio held (the call never went to its working files): resampled in
    one go, which is what `_Direction` gives a block at a time."""
    runs = list(track.runs())
    if not runs:
        return None
    if len(runs) == 1 and runs[0][0] == 0:
        data = runs[0][1]
    else:
        buffer = bytearray(2 * max(start + len(pcm) // 2 for start, pcm in runs))
        for start, pcm in runs:
            buffer[2 * start : 2 * start + len(pcm)] = pcm
        data = bytes(buffer)
    if track.rate not in (0, RATE):
        data = resample_pcm16(data, track.rate, RATE)
    return np.frombuffer(data, dtype="<i2")


def _assemble(call: _Call) -> int:
    """Writes the two sides (from the working files, or from memory) side by side as a stereo WAV at
    RATE (`call.files.wav`) as long as the longer (a missing side is silence); returns its frames."""
    files = call.files
    with contextlib.ExitStack() as stack:
        wav = stack.enter_context(wave.open(str(files.wav), "wb"))
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        if not call.on_disk:  # short: in one block
            sides = [_in_memory(call.caller), _in_memory(call.agent)]
            frames = max((side.size for side in sides if side is not None), default=0)
            stereo = np.zeros((frames, 2), dtype="<i2")
            for channel, side in enumerate(sides):
                if side is not None:
                    stereo[: side.size, channel] = side
            wav.writeframes(stereo.tobytes())
            return frames
        directions: list[_Direction | None] = []
        for path, track in ((files.caller, call.caller), (files.agent, call.agent)):
            if path.exists():
                source = stack.enter_context(path.open("rb"))
                directions.append(_Direction(source, path.stat().st_size // 2, track.rate))
            else:
                directions.append(None)
        frames = max((d.frames for d in directions if d is not None), default=0)
        for first in range(0, frames, BLOCK_FRAMES):
            count = min(BLOCK_FRAMES, frames - first)
            block = np.zeros((count, 2), dtype="<i2")
            for channel, direction in enumerate(directions):
                if direction is not None:
                    samples = direction.read(count)
                    block[: samples.size, channel] = samples
            wav.writeframes(block.tobytes())
    return frames


def _clean_up(call: _Call) -> None:
    """What is left of a stored call's working files (only once stored: a crash before leaves them to
    replay the call from)."""
    if call.on_disk:
        call.files.remove()
    else:
        call.files.wav.unlink(missing_ok=True)  # a store may copy it rather than move it


@contextlib.asynccontextmanager
async def _admin(backend: LogBackend) -> AsyncIterator[LogAdmin]:
    admin = backend.admin()
    try:
        yield admin
    finally:
        await admin.close()


class RecordingsProjection:
    name = "recordings"
    topics: tuple[str, ...] = (AUDIO, CALLS)
    tables: tuple[Table, ...] = (RECORDINGS, ERASURES)
    event_types: frozenset[str] | None = frozenset(
        t.EVENT_TYPE for t in (CallerAudioChunk, AgentAudioChunk, CallStarted, CallEnded, CallerErased))

    def __init__(self, root: Path, store: RecordingStore | None = None) -> None:
        """`root`: the working folder; `store`: where finished recordings go (default: `root` itself)."""
        self.root = root
        self.store: RecordingStore = store or LocalRecordingStore(root)
        self.live: OrderedDict[str, _Call] = OrderedDict()
        """Calls being recorded, least recently written first."""
        self.ended: OrderedDict[str, RecordingFacts] = OrderedDict()
        self.held_bytes = 0
        """Audio all live calls hold in memory."""
        self.audio_read: dict[int, int] = {}
        """Per audio partition, the latest log timestamp read (ms)."""
        self.waiting: dict[int, list[tuple[int, int, _Call]]] = {}
        """Per audio partition, the ended calls waiting for it: a heap of (the log time its audio
        partition must be read past, order, call)."""
        self.waiting_calls = 0
        self.ready: OrderedDict[str, tuple[_Call, bool]] = OrderedDict()
        """Ended calls to finish (with whether their audio is to be read from the log first), a few at once."""
        self._order = itertools.count()
        self._audio_partitions: int | None = None
        self._folders: set[Path] = set()
        """Working folders known to exist."""
        self.skipped_chunks = 0
        """Audio chunks that were not audio (an unknown codec, PCM cut mid-sample, an absurd position)."""
        self.rejected_events = 0
        """Events whose tenant or call id cannot name a file."""
        self.store_failures = 0
        """Attempts at the store that failed (each retried)."""
        self.erasures = ErasedCallers()
        self.erased: OrderedDict[str, None] = OrderedDict()
        """Calls of erased callers seen lately: their audio is not recorded."""
        self.analytics: AnalyticsStore | None = None

    def reset(self) -> None:
        # The files stay: finished recordings are final, and live calls continue from their meta files.
        self.ready.clear()
        self.live.clear()
        self.ended.clear()
        self.waiting.clear()
        self.audio_read.clear()
        self.held_bytes = self.waiting_calls = 0
        self._folders.clear()

    async def load(self, store: AnalyticsStore) -> None:
        """The erasures folded before (what a live call needs is in its meta file)."""
        self.analytics = store
        for table in (tables.CALLS, ERASED_CALLS):  # where an erasure's calls are found (the calls projection's)
            await asyncio.to_thread(store.create, table)
        await asyncio.to_thread(self.erasures.load, store)

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

    async def settle(self, backend: LogBackend, read: Mapping[TopicPartition, int] | None) -> list[Output]:
        """Finishes the calls ready, and those waiting for their audio (from what was read where all the
        log held when their `call.ended` was in it has been read, as a call's audio comes before its
        end; from the log otherwise)."""
        waiting = sorted((entry for heap in self.waiting.values() for entry in heap), key=lambda entry: entry[:2])
        self.waiting.clear()
        for _, _, call in waiting:
            if call.waiting and call.ending is not None:
                self._ready(call, catch_up=read is None or call.ending.offset >= read.get(call.ending.tp, 0))
        return await self._finish_ready(backend)

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> Sequence[Output]:
        payload = event.payload
        if isinstance(payload, _CHUNKS):  # most events: kept short
            partition, stamped = record.partition, record.timestamp_ms
            if stamped > self.audio_read.get(partition, -1):
                self.audio_read[partition] = stamped
                waiting = self.waiting.get(partition)
                if waiting and waiting[0][0] < stamped:
                    self._audio_read(partition, stamped)
            call = self.live.get(event.call_id)
            if call is None or call.started_us is None:
                await self._chunk(record, event, payload, backend)
            else:
                self.live.move_to_end(event.call_id)
                self._write(call, event, payload, record)
                self._spill_if_due(call, event.envelope.event_time_us)
            return await self._finish_ready(backend) if len(self.ready) >= READY_CALLS_KEPT else []
        out = await self._other(record, event, backend)
        # Only once this event is folded: were it not, its dead letter would take the rows along.
        return [*out, *await self._finish_ready(backend)] if len(self.ready) >= READY_CALLS_KEPT else out

    async def _other(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> list[Output]:
        payload = event.payload
        if isinstance(payload, CallerErased):
            return await self._erase(event)
        if event.call_id in self.erased:
            return []
        if isinstance(payload, CallStarted) and self.erasures.erased(
                event.tenant_id, caller_key(event.tenant_id, person_number(payload)), event.envelope.event_time_us):
            await self._forget(event.tenant_id, event.call_id)  # its audio may have come first
            return []
        if isinstance(payload, CallStarted):
            try:
                location = self.store.location(event.tenant_id, event.call_id)
            except ValueError as exc:
                return self._reject(event, exc)
            call = await self._call(event)
            if call is not None and call.started_us is None:
                call.started_us = event.envelope.event_time_us
                self._place(call)
            return [(RECORDINGS, (event.tenant_id, event.call_id, location, FORMAT, 2, RATE, 0, 0, 0, 0,
                                  at(event.envelope.event_time_us), None, 0, event.seq))]
        if isinstance(payload, CallEnded):
            try:
                self.store.location(event.tenant_id, event.call_id)
            except ValueError as exc:
                return self._reject(event, exc)
            call = await self._call(event)
            if call is None:
                # What a crash between storing the recording and the clean-up left.
                _Files.of(self.root, event.tenant_id, event.call_id).remove()
                return self._row(event, self.ended[event.call_id])
            if call.ending is not None:
                return []  # a redelivery of the call.ended it waits with
            await self._ending(call, record, event, backend)
        return []

    def _row(self, ended: Event[EventPayload], facts: RecordingFacts) -> list[Output]:
        location = self.store.location(ended.tenant_id, ended.call_id)
        return [(RECORDINGS, (ended.tenant_id, ended.call_id, location, FORMAT, 2, RATE, facts.duration_ms,
                              facts.bytes, facts.caller_audio_ms, facts.agent_audio_ms, at(facts.started_us),
                              at(ended.envelope.event_time_us), 1, ended.seq))]

    async def _chunk(self, record: LogRecord, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk,
                     backend: LogBackend) -> None:
        if event.call_id in self.erased:
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
            async with _admin(backend) as admin:
                await self._find_start(call, event, admin)
            self._place(call)
        else:
            self._write(call, event, chunk, record)
        self._spill_if_due(call, event.envelope.event_time_us)

    def _place(self, call: _Call) -> None:
        """Places the agent chunks that waited for the call's start."""
        unplaced, call.unplaced = call.unplaced, []
        for event, chunk, record in unplaced:
            self._write(call, event, chunk, record)

    def _spill_if_due(self, call: _Call, event_time_us: int) -> None:
        """To the working files with the audio of a call that holds too much, or too long; of the calls
        written longest ago while all hold too much."""
        if call.held_from is not None and (call.held_bytes >= SPILL_BYTES
                                           or event_time_us - call.held_since_us >= SPILL_AFTER_MS * 1000):
            self._spill(call)
        if self.held_bytes > BUFFERED_BYTES:
            for other in list(self.live.values()):
                if self.held_bytes <= BUFFERED_BYTES // 2:
                    break
                self._spill(other)

    def _audio_read(self, partition: int, stamped: int) -> None:
        """Finishes the calls that waited for their audio partition to be read this far."""
        waiting = self.waiting.get(partition)
        while waiting and waiting[0][0] < stamped:
            call = heapq.heappop(waiting)[2]
            if call.waiting:
                self._ready(call, catch_up=False)

    async def _ending(self, call: _Call, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> None:
        """The call's `call.ended`: the call is ready to finish if its audio partition is read past it,
        else once it is (or once the runner settles). Its `call.ended` is held until its row is given."""
        call.ending = _Ending(event, record.tp, record.offset)
        partition = call.audio_partition
        if partition is None:
            partition = await self._audio_partition_of(event.call_id, backend)
        complete_after = record.timestamp_ms + (0 if isinstance(backend, EmbeddedBackend) else AUDIO_SETTLE_MS)
        if partition is not None and self.audio_read.get(partition, -1) > complete_after:
            self._ready(call, catch_up=False)
        elif self.waiting_calls >= WAITING_CALLS_KEPT:
            self._ready(call, catch_up=True)
        else:
            heapq.heappush(self.waiting.setdefault(-1 if partition is None else partition, []),
                           (complete_after, next(self._order), call))
            call.waiting = True
            self.waiting_calls += 1

    async def _audio_partition_of(self, call_id: str, backend: LogBackend) -> int | None:
        if self._audio_partitions is None:
            async with _admin(backend) as admin:
                self._audio_partitions = len(await admin.end_offsets(AUDIO))
        return partition_for(call_id.encode(), self._audio_partitions) if self._audio_partitions else None

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
        call = self.live.get(call_id)
        if call is None:
            try:
                files = _Files.of(self.root, event.tenant_id, call_id)
            except ValueError as exc:
                self._reject(event, exc)
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
                self._spill(call)
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
        self.erased[call_id] = None
        while len(self.erased) > ENDED_CALLS_KEPT:
            self.erased.popitem(last=False)
        self.ready.pop(call_id, None)
        call = self.live.pop(call_id, None)
        if call is not None:
            self._drop(call)
        self.ended.pop(call_id, None)
        _Files.of(self.root, tenant_id, call_id).remove()
        await self._stored(f"erasing call {call_id}'s recording", self.store.erase, tenant_id, call_id)

    def _drop(self, call: _Call) -> None:
        """Lets go of what a call that leaves `live` holds (its holds go with it)."""
        self.held_bytes -= call.held_bytes
        call.held_bytes = 0
        call.ending = None
        if call.waiting:
            call.waiting = False
            self.waiting_calls -= 1

    def _remember_ended(self, call_id: str, facts: RecordingFacts) -> None:
        self.ended[call_id] = facts
        while len(self.ended) > ENDED_CALLS_KEPT:
            self.ended.popitem(last=False)

    def _folder(self, call: _Call) -> None:
        partial = call.files.meta.parent
        if partial not in self._folders:
            partial.mkdir(parents=True, exist_ok=True)
            self._folders.add(partial)

    def _spill(self, call: _Call) -> None:
        """Writes the audio the call holds to its working files, then the meta file that says so."""
        if call.held_from is None and call.on_disk:
            return
        self._folder(call)
        for path, track in ((call.files.caller, call.caller), (call.files.agent, call.agent)):
            if track.held:
                _pwrite_all(path, ((2 * start, pcm) for start, pcm in track.runs()))
                track.held = []
        _pwrite_all(call.files.meta, iter([(0, call.meta())]))
        call.on_disk = True
        self.held_bytes -= call.held_bytes
        call.held_bytes, call.held_from = 0, None

    async def _find_start(self, call: _Call, event: Event[EventPayload], admin: LogAdmin) -> int:
        """The call's start from the log: its call.started, or (none there) the earliest event seen."""
        history = await read_call(admin, call.call_id, topics=(CALLS,),
                                  since_ms=event.envelope.event_time_us // 1000 - CALL_LOOKBACK_MS)
        starts = [e.envelope.event_time_us for e in history.events if isinstance(e.payload, CallStarted)]
        seen = [e.envelope.event_time_us for e in history.events]
        call.started_us = starts[0] if starts else min([*seen, call.first_seen_us])
        return call.started_us

    def _write(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk,
               record: LogRecord | None) -> None:
        """Places the chunk where it goes, held in memory; `record`: where it was read (none: from the
        log, for a call being finished)."""
        agent = isinstance(chunk, AgentAudioChunk)
        track = call.agent if agent else call.caller
        time_us = event.envelope.event_time_us
        if time_us < call.first_seen_us:
            call.first_seen_us = time_us
        if record is not None:
            call.audio_partition = record.partition
        if event.seq <= track.last_seq:
            return  # written already (a replay)
        if call.ending is not None and event.seq >= call.ending.event.seq:
            return  # after the call's end
        audio = _audio(chunk)
        rate = track.rate or (chunk.sample_rate if chunk.sample_rate in SAMPLE_RATES else RATE)
        if agent:
            assert call.started_us is not None
            played = max(0, (event.envelope.event_time_us - call.started_us) * rate // 1_000_000)
            start = track.end if played < track.end + AGENT_JITTER_MS * rate // 1000 else played
        else:
            start = chunk.offset_ms * rate // 1000
        limit = MAX_RECORDING_MS * rate // 1000
        if audio is None or start > limit:
            self._skip(call, event, chunk)
            if start <= limit:  # it was heard all the same (only its record is broken): what follows keeps its time
                track.end = min(start + max(chunk.duration_ms, 0) * rate // 1000, limit)
        else:
            data, mulaw = audio
            if chunk.sample_rate != rate:
                data, mulaw = resample_pcm16(mulaw_to_pcm16(data) if mulaw else data, chunk.sample_rate, rate), False
            track.held.append((start, data, mulaw))
            call.held_bytes += len(data)
            self.held_bytes += len(data)
            track.end = start + (len(data) if mulaw else len(data) // 2)
            track.audio_ms += chunk.duration_ms
        track.rate = rate
        track.last_seq, track.last_us = event.seq, event.envelope.event_time_us
        if record is not None and call.held_from is None:
            call.held_from, call.held_since_us = (record.tp, record.offset), event.envelope.event_time_us

    def _skip(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk) -> None:
        self.skipped_chunks += 1
        call.skipped += 1
        if call.skipped == 1:  # once per call: a broken source sends 50 a second
            log.warning("recordings: call %s: skipped a %s chunk (codec %r, %d bytes at %d Hz, offset %d ms), "
                        "seq %d", call.call_id, event.type, chunk.codec, len(chunk.audio), chunk.sample_rate,
                        chunk.offset_ms, event.seq)

    def _ready(self, call: _Call, *, catch_up: bool) -> None:
        if call.waiting:
            call.waiting = False
            self.waiting_calls -= 1
        self.ready[call.call_id] = (call, catch_up)

    async def _finish_ready(self, backend: LogBackend) -> list[Output]:
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
                if isinstance(facts, BaseException):
                    if not isinstance(facts, Exception):
                        raise facts
                    # As a dead letter of its call.ended would: the call stays, its end is not held.
                    log.error("recordings: call %s could not be finished: %r", call.call_id, facts)
                    call.ending = None
                    with contextlib.suppress(OSError):
                        self._spill(call)
                    continue
                del self.live[call.call_id]
                self._drop(call)
                self._remember_ended(call.call_id, facts)
                out += self._row(ending.event, facts)
        return out

    async def _finish(self, call: _Call, backend: LogBackend, *, catch_up: bool) -> RecordingFacts:
        """Stores the call's recording (with `catch_up`, its audio after the last chunk held read from
        the log first), then lets go of its working files."""
        assert call.ending is not None
        event = call.ending.event
        started_us = call.started_us
        if started_us is None:
            async with _admin(backend) as admin:
                started_us = await self._find_start(call, event, admin)
        self._place(call)
        if catch_up:
            # The audio topic may be behind the calls topic: take the rest of the call's audio from the log.
            since_us = min(track.last_us if track.last_seq >= 0 else started_us for track in (call.caller, call.agent))
            async with _admin(backend) as admin:
                history = await read_call(admin, call.call_id, topics=(AUDIO,),
                                          since_ms=since_us // 1000 - AUDIO_CATCH_UP_SLACK_MS)
            for earlier in history.events:
                if earlier.seq < event.seq and isinstance(earlier.payload, CallerAudioChunk | AgentAudioChunk):
                    self._write(call, earlier, earlier.payload, None)
        self._folder(call)
        if call.on_disk:  # the rest joins what is in its working files
            self._spill(call)
        return await self._stored(f"storing call {call.call_id}'s recording", self._store_call, call, started_us,
                                  waits=True)

    def _store_call(self, call: _Call, started_us: int) -> RecordingFacts:
        """Assembles the call's WAV, stores it with its facts, then lets go of its working files (in a
        thread: one hop for all of it)."""
        frames = _assemble(call)
        facts = RecordingFacts(started_us, frames * 1000 // RATE, call.files.wav.stat().st_size, call.caller.audio_ms,
                               call.agent.audio_ms)
        self.store.put(call.tenant_id, call.call_id, call.files.wav, facts)
        _clean_up(call)
        return facts
