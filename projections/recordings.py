"""The recordings projection: every call's audio as one stereo WAV (caller left, agent right) under
the recordings folder, and a `recordings` row that says where it is and what it holds.

The log is the system of record and the WAV is derived from it, so it has to come out the same
however the events arrive: replayed after a crash (the runner stores offsets after the rows),
picked up in the middle of a call, or with the calls topic read ahead of the audio topic (they are
separate partitions, so `call.ended` often arrives before the call's last chunks). So:

- Audio goes straight to two working files per call (`<root>/<tenant>/.partial/<call>.caller.pcm`
  and `.agent.pcm`: 16 kHz 16-bit mono PCM), each chunk written at its own byte position. Rewriting
  a chunk rewrites the same bytes, gaps stay silence, and a 10-minute call costs about a kilobyte
  of memory, not 20 MB.
- Chunks are decoded (mu-law) and resampled to 16 kHz by one resampler per direction that runs
  across contiguous chunks, so chunk edges leave no trace (resampling each 20 ms chunk alone would
  put a 50 Hz buzz 27 dB under the voice). It lives in memory only: after a restart the filter
  starts afresh, which changes a few milliseconds of the caller's side at that one point.
- Where a chunk goes: the caller's stream is real time from the call's start, so a caller chunk goes
  at its `offset_ms`. The agent's `offset_ms` counts agent audio only (it would squash the silences
  between replies), so an agent chunk goes where it was played: its event time minus the call's
  start, or straight after the previous agent chunk when that one was still playing (the caller's
  side plays agent audio first in, first out, and the jitter of the send times must not leave
  clicks between the frames of a reply).
- A small fixed-size meta file beside the parts keeps what a restart needs (the call's start, and
  per direction the last chunk written, where it ended, how much audio there was), so replayed
  chunks are skipped rather than written again, and nothing is counted twice.
- On `call.ended` the call's audio after the last chunk written is read from the log (it may still
  be behind on its topic), the parts are interleaved into `<call>.wav.tmp`, and that is renamed into
  place: a WAV that exists is final. Its facts (length, size, audio per direction) are written
  beside it first (`<call>.json`), so the row of a replayed `call.ended` is the same row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import struct
import wave
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from consumers.base import LogAdmin, LogRecord
from consumers.events import read_call
from projections.calls import at
from projections.store import AnalyticsStore
from projections.tables import RECORDINGS, Row, Table
from schemas.base import Event, EventPayload
from schemas.events import AgentAudioChunk, CallEnded, CallerAudioChunk, CallStarted
from schemas.topics import AUDIO, CALLS
from streams.audio import Resampler, mulaw_to_pcm16
from streams.providers.base import PCM_RATE
from voxlog.backends import LogBackend

log = logging.getLogger(__name__)

RATE = PCM_RATE
SAMPLES_PER_MS = RATE // 1000
FORMAT = f"wav/pcm_s16le/{RATE}/stereo"

ENDED_CALLS_KEPT = 1000
"""Ended calls remembered, so that their late audio is dropped without looking at the disk."""
LIVE_CALLS_KEPT = 10_000
"""Live calls held in memory; one evicted comes back from its meta file when it speaks again."""
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

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_META = struct.Struct("<10q")
"""The meta file: started_us (-1: not known yet), first_seen_us, then caller and agent tracks
(last_seq, last_us, end, audio_ms each)."""


def recording_path(root: Path, tenant_id: str, call_id: str) -> Path:
    """Where a call's recording goes: `<root>/<tenant_id>/<call_id>.wav`.

    Raises ValueError for an id that is not a plain name (a path separator, `..`, a leading dot),
    so that no event can make the projection write outside `root`.
    """
    for kind, value in (("tenant id", tenant_id), ("call id", call_id)):
        if not _ID.fullmatch(value):
            raise ValueError(f"{kind} {value!r} cannot name a recording")
    return root / tenant_id / f"{call_id}.wav"


@dataclass(frozen=True)
class _Files:
    wav: Path
    facts: Path
    caller: Path
    agent: Path
    meta: Path

    @classmethod
    def of(cls, root: Path, tenant_id: str, call_id: str) -> _Files:
        wav = recording_path(root, tenant_id, call_id)
        partial = wav.parent / ".partial"
        return cls(wav, wav.with_suffix(".json"), partial / f"{call_id}.caller.pcm",
                   partial / f"{call_id}.agent.pcm", partial / f"{call_id}.meta")

    def remove_parts(self) -> None:
        for path in (self.caller, self.agent, self.meta):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Facts:
    """What the row of a finished recording says beyond its event: kept beside the WAV."""

    started_us: int
    duration_ms: int
    bytes: int
    caller_audio_ms: int
    agent_audio_ms: int


@dataclass
class _Track:
    """One direction of a call: its part file and how far writing it has got."""

    last_seq: int = -1
    """The last chunk written: chunks up to it are replays."""
    last_us: int = 0
    """Its event time."""
    end: int = 0
    """The sample where its audio ends."""
    audio_ms: int = 0
    """Audio written, by the chunks' own durations."""
    resampler: Resampler | None = None
    """The current run's (contiguous chunks at one rate): resampling across chunk edges leaves no
    trace. Memory only: after a restart or an eviction a new run starts, which can leave a few
    milliseconds of edge at that one point."""
    written: int = 0
    """Where the current run's next output sample goes (the resampler holds a few back)."""


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

    @classmethod
    def restore(cls, event: Event[EventPayload], files: _Files) -> _Call:
        """The call as its meta file left it, or new."""
        call = cls(event.tenant_id, event.call_id, files, event.envelope.event_time_us)
        try:
            data = files.meta.read_bytes()
        except FileNotFoundError:
            files.meta.parent.mkdir(parents=True, exist_ok=True)
            return call
        if len(data) != _META.size:
            log.warning("recordings: meta file %s is torn; continuing the call as new", files.meta)
            return call
        started, first, *tracks = _META.unpack(data)
        call.started_us = None if started < 0 else started
        call.first_seen_us = min(first, call.first_seen_us)
        call.caller = _Track(*tracks[:4])
        call.agent = _Track(*tracks[4:])
        return call

    def save(self) -> None:
        values = [-1 if self.started_us is None else self.started_us, self.first_seen_us]
        for track in (self.caller, self.agent):
            values += (track.last_seq, track.last_us, track.end, track.audio_ms)
        _write_at(self.files.meta, 0, _META.pack(*values))


def _write_at(path: Path, position: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, position)
    finally:
        os.close(fd)


def _pcm16(chunk: CallerAudioChunk | AgentAudioChunk) -> bytes | None:
    """The chunk's audio as 16-bit PCM at its own rate; None for what cannot be audio."""
    if chunk.sample_rate not in SAMPLE_RATES or chunk.offset_ms < 0 or chunk.duration_ms < 0:
        return None
    if chunk.codec == "mulaw":
        return mulaw_to_pcm16(chunk.audio)
    if chunk.codec == "pcm_s16le" and len(chunk.audio) % 2 == 0:
        return chunk.audio
    return None


def _interleave(caller: Path, agent: Path, out: Path) -> int:
    """Writes the part files side by side as a stereo WAV as long as the longer (a missing part is
    silence), synced to disk; returns its frames."""
    parts = [part if part.exists() else None for part in (caller, agent)]
    frames = max((part.stat().st_size // 2 for part in parts if part is not None), default=0)
    with contextlib.ExitStack() as stack:
        sources = [None if part is None else stack.enter_context(part.open("rb")) for part in parts]
        with out.open("wb") as sink:
            with wave.open(sink, "wb") as wav:
                wav.setnchannels(2)
                wav.setsampwidth(2)
                wav.setframerate(RATE)
                for first in range(0, frames, BLOCK_FRAMES):
                    count = min(BLOCK_FRAMES, frames - first)
                    block = np.zeros((count, 2), dtype="<i2")
                    for channel, source in enumerate(sources):
                        if source is not None:
                            samples = np.frombuffer(source.read(2 * count), dtype="<i2")
                            block[: samples.size, channel] = samples
                    wav.writeframes(block.tobytes())
            sink.flush()
            os.fsync(sink.fileno())
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
    tables: tuple[Table, ...] = (RECORDINGS,)
    event_types: frozenset[str] | None = frozenset(
        t.EVENT_TYPE for t in (CallerAudioChunk, AgentAudioChunk, CallStarted, CallEnded))

    def __init__(self, root: Path) -> None:
        self.root = root
        self.live: OrderedDict[str, _Call] = OrderedDict()
        self.ended: OrderedDict[str, None] = OrderedDict()
        self.skipped_chunks = 0
        """Audio chunks that were not audio (an unknown codec, PCM cut mid-sample, an absurd position)."""
        self.rejected_events = 0
        """Events whose tenant or call id cannot name a file."""

    def reset(self) -> None:
        # The files stay: finished WAVs are final, and live calls continue from their meta files.
        self.live.clear()
        self.ended.clear()

    async def load(self, store: AnalyticsStore) -> None:
        """Nothing to restore: what a live call needs is in its meta file."""

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> list[Row]:
        payload = event.payload
        if not isinstance(payload, CallStarted | CallEnded | CallerAudioChunk | AgentAudioChunk):
            return []
        known = self.live.get(event.call_id)
        try:
            files = known.files if known is not None else _Files.of(self.root, event.tenant_id, event.call_id)
        except ValueError as exc:
            self.rejected_events += 1
            log.warning("recordings: %s; event %s ignored", exc, event.envelope.event_id)
            return []
        if isinstance(payload, CallStarted):
            call = self._call(event, files)
            if call is not None and call.started_us is None:
                call.started_us = event.envelope.event_time_us
            return [self._live_row(event, files)]
        if isinstance(payload, CallEnded):
            call = self._call(event, files)
            if call is not None:
                await self._finish(call, event, backend)
            else:
                files.remove_parts()  # what a crash between the WAV's rename and the clean-up left
            return [self._final_row(event, files)]
        call = self._call(event, files)
        if call is not None:
            if isinstance(payload, AgentAudioChunk) and call.started_us is None:
                async with _admin(backend) as admin:
                    await self._find_start(call, event, admin)
            self._write(call, event, payload)
        return []

    def _call(self, event: Event[EventPayload], files: _Files) -> _Call | None:
        """The live call's state (restored or new); None once its recording is final."""
        call_id = event.call_id
        if call_id in self.ended:
            self.ended.move_to_end(call_id)
            return None
        call = self.live.get(call_id)
        if call is None:
            if files.wav.exists():
                self._remember_ended(call_id)
                return None
            call = self.live[call_id] = _Call.restore(event, files)
            while len(self.live) > LIVE_CALLS_KEPT:
                _, evicted = self.live.popitem(last=False)
                self._end_runs(evicted)
        else:
            self.live.move_to_end(call_id)
        call.first_seen_us = min(call.first_seen_us, event.envelope.event_time_us)
        return call

    def _remember_ended(self, call_id: str) -> None:
        self.ended[call_id] = None
        while len(self.ended) > ENDED_CALLS_KEPT:
            self.ended.popitem(last=False)

    async def _find_start(self, call: _Call, event: Event[EventPayload], admin: LogAdmin) -> int:
        """The call's start from the log: its call.started, or (none there) the earliest event seen."""
        history = await read_call(admin, call.call_id, topics=(CALLS,),
                                  since_ms=event.envelope.event_time_us // 1000 - CALL_LOOKBACK_MS)
        starts = [e.envelope.event_time_us for e in history.events if isinstance(e.payload, CallStarted)]
        seen = [e.envelope.event_time_us for e in history.events]
        call.started_us = starts[0] if starts else min([*seen, call.first_seen_us])
        return call.started_us

    def _write(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk) -> None:
        agent = isinstance(chunk, AgentAudioChunk)
        track, part = (call.agent, call.files.agent) if agent else (call.caller, call.files.caller)
        if event.seq <= track.last_seq:
            return  # written already (a replay)
        pcm = _pcm16(chunk)
        if agent:
            assert call.started_us is not None
            played = max(0, (event.envelope.event_time_us - call.started_us) * SAMPLES_PER_MS // 1000)
            start = track.end if played < track.end + AGENT_JITTER_MS * SAMPLES_PER_MS else played
        else:
            start = chunk.offset_ms * SAMPLES_PER_MS
        limit = MAX_RECORDING_MS * SAMPLES_PER_MS
        if pcm is None or start > limit:
            self._skip(call, event, chunk)
            self._end_run(track, part)
            if start <= limit:  # it was heard all the same (only its record is broken): what follows keeps its time
                track.end = min(start + max(chunk.duration_ms, 0) * SAMPLES_PER_MS, limit)
        else:
            run = track.resampler
            if run is None or start != track.end or run.from_rate != chunk.sample_rate:
                self._end_run(track, part)
                run = track.resampler = Resampler(chunk.sample_rate, RATE, aligned=True)
                track.written = start
            out = run.process(pcm)
            _write_at(part, 2 * track.written, out)
            track.written += len(out) // 2
            track.end = start + len(pcm) // 2 * RATE // chunk.sample_rate
            track.audio_ms += chunk.duration_ms
        track.last_seq, track.last_us = event.seq, event.envelope.event_time_us
        call.save()

    def _skip(self, call: _Call, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk) -> None:
        self.skipped_chunks += 1
        call.skipped += 1
        if call.skipped == 1:  # once per call: a broken source sends 50 a second
            log.warning("recordings: call %s: skipped a %s chunk (codec %r, %d bytes at %d Hz, offset %d ms), "
                        "seq %d", call.call_id, event.type, chunk.codec, len(chunk.audio), chunk.sample_rate,
                        chunk.offset_ms, event.seq)

    @staticmethod
    def _end_run(track: _Track, part: Path) -> None:
        """Writes what the run's resampler holds back."""
        if track.resampler is not None:
            _write_at(part, 2 * track.written, track.resampler.flush())
            track.resampler = None

    def _end_runs(self, call: _Call) -> None:
        self._end_run(call.caller, call.files.caller)
        self._end_run(call.agent, call.files.agent)

    async def _finish(self, call: _Call, event: Event[EventPayload], backend: LogBackend) -> None:
        async with _admin(backend) as admin:
            started_us = call.started_us if call.started_us is not None else await self._find_start(call, event, admin)
            # The audio topic may be behind the calls topic: take the rest of the call's audio from the log.
            since_us = min(track.last_us if track.last_seq >= 0 else started_us for track in (call.caller, call.agent))
            history = await read_call(admin, call.call_id, topics=(AUDIO,),
                                      since_ms=since_us // 1000 - AUDIO_CATCH_UP_SLACK_MS)
        for earlier in history.events:
            if earlier.seq < event.seq and isinstance(earlier.payload, CallerAudioChunk | AgentAudioChunk):
                self._write(call, earlier, earlier.payload)
        self._end_runs(call)
        files = call.files
        tmp = files.wav.with_name(files.wav.name + ".tmp")
        frames = await asyncio.to_thread(_interleave, files.caller, files.agent, tmp)
        facts = _Facts(started_us, frames * 1000 // RATE, tmp.stat().st_size, call.caller.audio_ms,
                       call.agent.audio_ms)
        facts_tmp = files.facts.with_name(files.facts.name + ".tmp")
        facts_tmp.write_text(json.dumps(asdict(facts)))
        os.replace(facts_tmp, files.facts)
        os.replace(tmp, files.wav)
        files.remove_parts()
        del self.live[call.call_id]
        self._remember_ended(call.call_id)

    def _relative(self, files: _Files) -> str:
        return files.wav.relative_to(self.root).as_posix()

    def _live_row(self, event: Event[EventPayload], files: _Files) -> Row:
        return RECORDINGS, (event.tenant_id, event.call_id, self._relative(files), FORMAT, 2, RATE, 0, 0, 0, 0,
                            at(event.envelope.event_time_us), None, 0, event.seq)

    def _final_row(self, event: Event[EventPayload], files: _Files) -> Row:
        facts = _Facts(**json.loads(files.facts.read_text()))
        return RECORDINGS, (event.tenant_id, event.call_id, self._relative(files), FORMAT, 2, RATE,
                            facts.duration_ms, facts.bytes, facts.caller_audio_ms, facts.agent_audio_ms,
                            at(facts.started_us), at(event.envelope.event_time_us), 1, event.seq)
