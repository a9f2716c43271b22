"""The recordings projection: every call's audio as one stereo WAV (caller left, agent right), kept
in a `RecordingStore` (the recordings folder, or an S3 bucket), and a `recordings` row that says
where it is and what it holds.

The log is the system of record and the WAV is derived from it, so it has to come out the same
however the events arrive: replayed after a crash (the runner stores offsets after the rows),
picked up in the middle of a call, or with the calls topic read ahead of the audio topic (they are
separate partitions, so `call.ended` often arrives before the call's last chunks). So:

- Audio goes straight to two working files per call (`<root>/<tenant>/.partial/<call>.caller.pcm`
  and `.agent.pcm`: 16-bit mono PCM at the rate of the direction's first chunk, 8 kHz for a phone
  call), each chunk decoded (mu-law) and written at its own byte position. Rewriting a chunk
  rewrites the same bytes, gaps stay silence, and a 10-minute call costs about a kilobyte of memory,
  not 20 MB. A live call's working files stay open (opening a file costs more than writing 20 ms).
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
  written after each chunk's audio, so replayed chunks are skipped rather than written again, and
  nothing is counted twice.
- On `call.ended` the call's audio after the last chunk written is read from the log (it may still
  be behind on its topic), the parts are resampled and interleaved into `<call>.wav.tmp` beside
  them, and that goes to the store with its facts (length, size, audio per direction) in one step:
  a recording the store has is final, and the row of a replayed `call.ended` is the same row. The
  working files go only after that. A store that cannot be reached is retried (with backoff, each
  failure logged) until it can: the projection waits on that call rather than lose its recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import struct
import wave
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from consumers.base import LogAdmin, LogRecord
from consumers.events import read_call
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
from projections.tables import ERASED_CALLS, ERASURES, RECORDINGS, Output, Row, Table, at, deletion
from schemas.base import Event, EventPayload
from schemas.events import AgentAudioChunk, CallEnded, CallerAudioChunk, CallerErased, CallStarted
from schemas.topics import AUDIO, CALLS
from streams.audio import Resampler, mulaw_to_pcm16, resample_pcm16
from streams.memory import caller_key, person_number
from streams.providers.base import PCM_RATE
from streams.redaction import default_redactor
from voxlog.backends import LogBackend

__all__ = ["RECORDINGS", "RecordingsProjection", "recording_path"]

log = logging.getLogger(__name__)

RATE = PCM_RATE
FORMAT = f"wav/pcm_s16le/{RATE}/stereo"

ENDED_CALLS_KEPT = 1000
"""Ended calls remembered, so that their late audio is dropped without asking the store."""
LIVE_CALLS_KEPT = 10_000
"""Live calls held in memory; one evicted comes back from its meta file when it speaks again."""
OPEN_CALLS_KEPT = 256
"""Live calls whose working files are held open (three files each); others reopen them when they speak."""
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


def _open(path: Path) -> io.FileIO:
    return io.FileIO(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")


@dataclass
class _Track:
    """One direction of a call: how far writing its part file has got."""

    last_seq: int = -1
    """The last chunk written: chunks up to it are replays."""
    last_us: int = 0
    """Its event time."""
    end: int = 0
    """The sample where its audio ends (at `rate`)."""
    audio_ms: int = 0
    """Audio written, by the chunks' own durations."""
    rate: int = 0
    """The part file's sample rate: its first chunk's (0 before it)."""
    part: io.FileIO | None = None
    """The part file, while held open."""


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
    meta: io.FileIO | None = None
    """The meta file, while held open (with the parts)."""

    @classmethod
    def restore(cls, event: Event[EventPayload], files: _Files) -> _Call:
        """The call as its meta file left it, or new."""
        call = cls(event.tenant_id, event.call_id, files, event.envelope.event_time_us)
        try:
            data = files.meta.read_bytes()
        except FileNotFoundError:
            files.meta.parent.mkdir(parents=True, exist_ok=True)
            return call
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

    def open(self) -> None:
        self.meta = _open(self.files.meta)
        self.caller.part = _open(self.files.caller)
        self.agent.part = _open(self.files.agent)

    def close(self) -> None:
        for file in (self.meta, self.caller.part, self.agent.part):
            if file is not None:
                file.close()
        self.meta = self.caller.part = self.agent.part = None

    def save(self) -> None:
        assert self.meta is not None
        caller, agent = self.caller, self.agent
        os.pwrite(self.meta.fileno(), _META.pack(
            -1 if self.started_us is None else self.started_us, self.first_seen_us,
            caller.last_seq, caller.last_us, caller.end, caller.audio_ms, caller.rate,
            agent.last_seq, agent.last_us, agent.end, agent.audio_ms, agent.rate), 0)


def _pcm16(chunk: CallerAudioChunk | AgentAudioChunk) -> bytes | None:
    """The chunk's audio as 16-bit PCM at its own rate; None for what cannot be audio."""
    if chunk.sample_rate not in SAMPLE_RATES or chunk.offset_ms < 0 or chunk.duration_ms < 0:
        return None
    if chunk.codec == "mulaw":
        return mulaw_to_pcm16(chunk.audio)
    if chunk.codec == "pcm_s16le" and len(chunk.audio) % 2 == 0:
        return chunk.audio
    return None


class _Direction:
    """One part file read back at RATE, in order, a block at a time (resampled as one stream)."""

    def __init__(self, path: Path, rate: int) -> None:
        self.source = path.open("rb")
        self.resampler = Resampler(rate, RATE, aligned=True) if rate not in (0, RATE) else None
        size = path.stat().st_size // 2
        self.frames = size if self.resampler is None else -(-size * RATE // rate)
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


def _assemble(call: _Call) -> int:
    """Writes the part files side by side as a stereo WAV at RATE (`call.files.wav`) as long as the
    longer (a missing part is silence); returns its frames."""
    files = call.files
    with contextlib.ExitStack() as stack:
        directions: list[_Direction | None] = []
        for path, track in ((files.caller, call.caller), (files.agent, call.agent)):
            direction = _Direction(path, track.rate) if path.exists() else None
            if direction is not None:
                stack.callback(direction.source.close)
            directions.append(direction)
        frames = max((d.frames for d in directions if d is not None), default=0)
        with wave.open(str(files.wav), "wb") as wav:
            wav.setnchannels(2)
            wav.setsampwidth(2)
            wav.setframerate(RATE)
            for first in range(0, frames, BLOCK_FRAMES):
                count = min(BLOCK_FRAMES, frames - first)
                block = np.zeros((count, 2), dtype="<i2")
                for channel, direction in enumerate(directions):
                    if direction is not None:
                        samples = direction.read(count)
                        block[: samples.size, channel] = samples
                wav.writeframes(block.tobytes())
    return frames


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
        self.open: OrderedDict[str, _Call] = OrderedDict()
        """The live calls whose working files are open, least recently written first."""
        self.ended: OrderedDict[str, RecordingFacts] = OrderedDict()
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
        for call in self.open.values():
            call.close()
        self.open.clear()
        self.live.clear()
        self.ended.clear()

    async def load(self, store: AnalyticsStore) -> None:
        """The erasures folded before (what a live call needs is in its meta file)."""
        self.analytics = store
        for table in (tables.CALLS, ERASED_CALLS):  # where an erasure's calls are found (the calls projection's)
            await asyncio.to_thread(store.create, table)
        await asyncio.to_thread(self.erasures.load, store)

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> Sequence[Output]:
        payload = event.payload
        if isinstance(payload, CallerErased):
            return await self._erase(event)
        if event.call_id in self.erased:
            return []
        if isinstance(payload, CallStarted) and self.erasures.erased(
                event.tenant_id, caller_key(event.tenant_id, person_number(payload)), event.envelope.event_time_us):
            await self._forget(event.tenant_id, event.call_id)  # its audio may have come first
            return []
        if isinstance(payload, CallerAudioChunk | AgentAudioChunk):
            call = self.live.get(event.call_id)
            if call is None:
                if event.call_id in self.ended:  # its late audio: the recording is final
                    return []
                call = await self._call(event)
                if call is None:
                    return []
            else:
                self.live.move_to_end(event.call_id)
                call.first_seen_us = min(call.first_seen_us, event.envelope.event_time_us)
            if isinstance(payload, AgentAudioChunk) and call.started_us is None:
                async with _admin(backend) as admin:
                    await self._find_start(call, event, admin)
            self._write(call, event, payload)
            return []
        if isinstance(payload, CallStarted):
            try:
                location = self.store.location(event.tenant_id, event.call_id)
            except ValueError as exc:
                return self._reject(event, exc)
            call = await self._call(event)
            if call is not None and call.started_us is None:
                call.started_us = event.envelope.event_time_us
            return [(RECORDINGS, (event.tenant_id, event.call_id, location, FORMAT, 2, RATE, 0, 0, 0, 0,
                                  at(event.envelope.event_time_us), None, 0, event.seq))]
        if isinstance(payload, CallEnded):
            try:
                location = self.store.location(event.tenant_id, event.call_id)
            except ValueError as exc:
                return self._reject(event, exc)
            call = await self._call(event)
            if call is not None:
                facts = await self._finish(call, event, backend)
            else:
                facts = self.ended[event.call_id]
                # What a crash between storing the recording and the clean-up left.
                _Files.of(self.root, event.tenant_id, event.call_id).remove()
            return [(RECORDINGS, (event.tenant_id, event.call_id, location, FORMAT, 2, RATE, facts.duration_ms,
                                  facts.bytes, facts.caller_audio_ms, facts.agent_audio_ms, at(facts.started_us),
                                  at(event.envelope.event_time_us), 1, event.seq))]
        return []

    def _reject(self, event: Event[EventPayload], exc: ValueError) -> list[Row]:
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
            while len(self.live) > LIVE_CALLS_KEPT:
                _, evicted = self.live.popitem(last=False)
                self._close(evicted)
        else:
            self.live.move_to_end(call_id)
        call.first_seen_us = min(call.first_seen_us, event.envelope.event_time_us)
        return call

    async def _stored(self, what: str, operation: Callable[..., T], *args: object) -> T:
        """`operation(*args)` on the store (in a thread if it is remote), retried with backoff while it fails."""
        delay = STORE_RETRY_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(operation, *args) if self.store.remote else operation(*args)
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
        """No recording of this call, anywhere: not in the store, not in the working files."""
        self.erased[call_id] = None
        while len(self.erased) > ENDED_CALLS_KEPT:
            self.erased.popitem(last=False)
        call = self.live.pop(call_id, None)
        if call is not None:
            self._close(call)
        self.ended.pop(call_id, None)
        _Files.of(self.root, tenant_id, call_id).remove()
        await self._stored(f"erasing call {call_id}'s recording", self.store.erase, tenant_id, call_id)

    def _remember_ended(self, call_id: str, facts: RecordingFacts) -> None:
        self.ended[call_id] = facts
        while len(self.ended) > ENDED_CALLS_KEPT:
            self.ended.popitem(last=False)

    def _opened(self, call: _Call) -> None:
        """Holds the call's working files open (closing those of the call written longest ago)."""
        if call.meta is not None:
            self.open.move_to_end(call.call_id)
            return
        call.open()
        self.open[call.call_id] = call
        while len(self.open) > OPEN_CALLS_KEPT:
            _, closed = self.open.popitem(last=False)
            closed.close()

    def _close(self, call: _Call) -> None:
        self.open.pop(call.call_id, None)
        call.close()

    async def _find_start(self, call: _Call, event: Event[EventPayload], admin: LogAdmin) -> int:
        """The call's start from the log: its call.started, or (none there) the earliest event seen."""
        history = await read_call(admin, call.call_id, topics=(CALLS,),
                                  since_ms=event.envelope.event_time_us // 1000 - CALL_LOOKBACK_MS)
        starts = [e.envelope.event_time_us for e in history.events if isinstance(e.payload, CallStarted)]
        seen = [e.envelope.event_time_us for e in history.events]
        call.started_us = starts[0] if starts else min([*seen, call.first_seen_us])
        return call.started_us

    def _write(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk, *,
               save: bool = True) -> None:
        """Writes the chunk where it goes, then (with `save`) the meta file that says so."""
        agent = isinstance(chunk, AgentAudioChunk)
        track = call.agent if agent else call.caller
        if event.seq <= track.last_seq:
            return  # written already (a replay)
        pcm = _pcm16(chunk)
        rate = track.rate or (chunk.sample_rate if chunk.sample_rate in SAMPLE_RATES else RATE)
        if agent:
            assert call.started_us is not None
            played = max(0, (event.envelope.event_time_us - call.started_us) * rate // 1_000_000)
            start = track.end if played < track.end + AGENT_JITTER_MS * rate // 1000 else played
        else:
            start = chunk.offset_ms * rate // 1000
        limit = MAX_RECORDING_MS * rate // 1000
        self._opened(call)
        if pcm is None or start > limit:
            self._skip(call, event, chunk)
            if start <= limit:  # it was heard all the same (only its record is broken): what follows keeps its time
                track.end = min(start + max(chunk.duration_ms, 0) * rate // 1000, limit)
        else:
            if chunk.sample_rate != rate:
                pcm = resample_pcm16(pcm, chunk.sample_rate, rate)
            assert track.part is not None
            os.pwrite(track.part.fileno(), pcm, 2 * start)
            track.end = start + len(pcm) // 2
            track.audio_ms += chunk.duration_ms
        track.rate = rate
        track.last_seq, track.last_us = event.seq, event.envelope.event_time_us
        if save:
            call.save()

    def _skip(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk) -> None:
        self.skipped_chunks += 1
        call.skipped += 1
        if call.skipped == 1:  # once per call: a broken source sends 50 a second
            log.warning("recordings: call %s: skipped a %s chunk (codec %r, %d bytes at %d Hz, offset %d ms), "
                        "seq %d", call.call_id, event.type, chunk.codec, len(chunk.audio), chunk.sample_rate,
                        chunk.offset_ms, event.seq)

    async def _finish(self, call: _Call, event: Event[EventPayload], backend: LogBackend) -> RecordingFacts:
        async with _admin(backend) as admin:
            started_us = call.started_us if call.started_us is not None else await self._find_start(call, event, admin)
            # The audio topic may be behind the calls topic: take the rest of the call's audio from the log.
            since_us = min(track.last_us if track.last_seq >= 0 else started_us for track in (call.caller, call.agent))
            history = await read_call(admin, call.call_id, topics=(AUDIO,),
                                      since_ms=since_us // 1000 - AUDIO_CATCH_UP_SLACK_MS)
        for earlier in history.events:
            if earlier.seq < event.seq and isinstance(earlier.payload, CallerAudioChunk | AgentAudioChunk):
                # No meta file per chunk here: a crash before the store has the recording replays this
                # call.ended, which starts from the meta file again and rewrites the same bytes.
                self._write(call, earlier, earlier.payload, save=False)
        self._close(call)
        frames = await asyncio.to_thread(_assemble, call)
        facts = RecordingFacts(started_us, frames * 1000 // RATE, call.files.wav.stat().st_size, call.caller.audio_ms,
                               call.agent.audio_ms)
        await self._stored(f"storing call {call.call_id}'s recording", self.store.put, call.tenant_id, call.call_id,
                           call.files.wav, facts)
        call.files.remove()
        del self.live[call.call_id]
        self._remember_ended(call.call_id, facts)
        return facts
