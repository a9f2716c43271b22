"""Buffering a recording: a call's audio on its way to its WAV, each chunk placed where it was heard,
held in memory, spilled to working files, and picked up from them after a restart.

- A call's audio is held in memory as it arrives (each chunk as it came: mu-law codes are decoded
  a run of chunks at a time, later), with where it goes. It goes to working files
  (`<root>/<tenant>/.partial/<call>.caller.pcm` and `.agent.pcm`: 16-bit mono PCM at the rate of the
  direction's first chunk, 8 kHz for a phone call, each chunk at its own byte position, so rewriting
  a chunk rewrites the same bytes and gaps stay silence) only when the call holds more than
  `SPILL_BYTES`, has held audio for `SPILL_AFTER_MS`, or all calls together hold more than
  `BUFFERED_BYTES`: a call of a few minutes never touches a working file, and memory stays bounded.
  Until its audio is in the files, a call says which record its audio in memory starts at
  (`held_from`): the recordings projection holds the runner's stored offset back to it.
- A chunk at another rate than its direction's first (no source sends one) is resampled to that
  rate alone; the rest are resampled once, when the WAV is assembled (`recording_assembly`).
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
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from producers.log_producer import LogRecord, TopicPartition
from projections.recording_assembly import wav_from_files, wav_from_memory
from projections.recording_store import recording_path
from schemas.base import Event, EventPayload
from schemas.events import AgentAudioChunk, CallerAudioChunk
from streams.audio.codecs import mulaw_to_pcm16, resample_pcm16
from streams.audio.formats import PCM_RATE

log = logging.getLogger(__name__)

SPILL_BYTES = 1 << 20
"""Audio a call holds in memory before it goes to its working files (a minute of both sides of a phone call)."""
SPILL_AFTER_MS = 30_000
"""How long (event time) a call holds audio in memory at most: what a crash makes the runner replay."""
BUFFERED_BYTES = 64 << 20
"""Audio all calls hold in memory at most: beyond, the calls written longest ago go to their working files."""
AGENT_JITTER_MS = 60
"""An agent chunk sent within this long after the previous one stopped playing follows it seamlessly."""
MAX_RECORDING_MS = 4 * 3600 * 1000
"""Audio placed later than this in a call is refused (a crafted offset must not make a huge file)."""
SAMPLE_RATES = range(8000, 48001)
"""Sample rates accepted in chunks."""

_META = struct.Struct("<12q")
"""The meta file: started_us (-1: not known yet), first_seen_us, then caller and agent tracks
(last_seq, last_us, end, audio_ms, rate each)."""
_META_16K = struct.Struct("<10q")
"""The meta file of working files written before they kept each direction's own rate: the same
without the rates, parts at 16 kHz."""


@dataclass(frozen=True)
class WorkingFiles:
    caller: Path
    agent: Path
    meta: Path
    wav: Path
    """Where the WAV is assembled before it goes to the store."""

    @classmethod
    def of(cls, root: Path, tenant_id: str, call_id: str) -> WorkingFiles:
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
class Track:
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


@dataclass
class CallAudio:
    """A call's audio on its way to its recording: where it is (memory, working files) and what of it
    has been written."""

    tenant_id: str
    call_id: str
    files: WorkingFiles
    first_seen_us: int
    started_us: int | None = None
    caller: Track = field(default_factory=Track)
    agent: Track = field(default_factory=Track)
    skipped: int = 0
    on_disk: bool = False
    """Its working files exist (with a meta file)."""
    held_bytes: int = 0
    """Audio held in memory."""
    held_from: tuple[TopicPartition, int] | None = None
    """The first record whose effects are only in memory (not in the working files)."""
    held_since_us: int = 0
    """Its event time."""

    @classmethod
    def restore(cls, event: Event[EventPayload], files: WorkingFiles) -> Self:
        """The call as its meta file left it, or new."""
        call = cls(event.tenant_id, event.call_id, files, event.envelope.event_time_us)
        try:
            data = files.meta.read_bytes()
        except FileNotFoundError:
            return call
        call.on_disk = True
        if len(data) == _META_16K.size:
            started, first, *tracks = _META_16K.unpack(data)
            tracks = [*tracks[:4], PCM_RATE if tracks[0] >= 0 else 0, *tracks[4:], PCM_RATE if tracks[4] >= 0 else 0]
        elif len(data) == _META.size:
            started, first, *tracks = _META.unpack(data)
        else:
            log.warning("recordings: meta file %s is torn; continuing the call as new", files.meta)
            return call
        call.started_us = None if started < 0 else started
        call.first_seen_us = min(first, call.first_seen_us)
        call.caller = Track(*tracks[:5])
        call.agent = Track(*tracks[5:])
        return call

    def meta(self) -> bytes:
        caller, agent = self.caller, self.agent
        return _META.pack(
            -1 if self.started_us is None else self.started_us, self.first_seen_us,
            caller.last_seq, caller.last_us, caller.end, caller.audio_ms, caller.rate,
            agent.last_seq, agent.last_us, agent.end, agent.audio_ms, agent.rate)

    def write_wav(self) -> int:
        """Assembles the call's WAV (`files.wav`) from where its audio is (its working files, with all
        of it spilled there, or memory); returns its frames."""
        if self.on_disk:
            return wav_from_files(self.files.wav, [(self.files.caller, self.caller.rate),
                                                   (self.files.agent, self.agent.rate)])
        return wav_from_memory(self.files.wav, [(self.caller.runs(), self.caller.rate),
                                                (self.agent.runs(), self.agent.rate)])

    def clean_up(self) -> None:
        """What is left of a stored call's working files (only once stored: a crash before leaves them to
        replay the call from)."""
        if self.on_disk:
            self.files.remove()
        else:
            self.files.wav.unlink(missing_ok=True)  # a store may copy it rather than move it


def _audio(chunk: CallerAudioChunk | AgentAudioChunk) -> tuple[bytes, bool] | None:
    """The chunk's audio as it came (data, whether mu-law), at its own rate; None for what cannot be audio."""
    if chunk.sample_rate not in SAMPLE_RATES or chunk.offset_ms < 0 or chunk.duration_ms < 0:
        return None
    if chunk.codec == "mulaw":
        return chunk.audio, True
    if chunk.codec == "pcm_s16le" and len(chunk.audio) % 2 == 0:
        return chunk.audio, False
    return None


class AudioBuffer:
    """Places the live calls' chunks, holds their audio in memory within bounds, and spills it to
    their working files."""

    def __init__(self) -> None:
        self.held_bytes = 0
        """Audio all live calls hold in memory."""
        self._folders: set[Path] = set()
        """Working folders known to exist."""
        self.skipped_chunks = 0
        """Audio chunks that were not audio (an unknown codec, PCM cut mid-sample, an absurd position)."""

    def reset(self) -> None:
        self.held_bytes = 0
        self._folders.clear()

    def write(self, call: CallAudio, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk,
              record: LogRecord | None, *, end_seq: int | None) -> None:
        """Places the chunk where it goes, held in memory; `record`: where it was read (none: from the
        log, for a call being finished); `end_seq`: the seq of the call's end, once known (what comes
        after it is not the call's)."""
        agent = isinstance(chunk, AgentAudioChunk)
        track = call.agent if agent else call.caller
        time_us = event.envelope.event_time_us
        if time_us < call.first_seen_us:
            call.first_seen_us = time_us
        if event.seq <= track.last_seq:
            return  # written already (a replay)
        if end_seq is not None and event.seq >= end_seq:
            return  # after the call's end
        audio = _audio(chunk)
        rate = track.rate or (chunk.sample_rate if chunk.sample_rate in SAMPLE_RATES else PCM_RATE)
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

    def _skip(self, call: CallAudio, event: Event[EventPayload], chunk: CallerAudioChunk | AgentAudioChunk) -> None:
        self.skipped_chunks += 1
        call.skipped += 1
        if call.skipped == 1:  # once per call: a broken source sends 50 a second
            log.warning("recordings: call %s: skipped a %s chunk (codec %r, %d bytes at %d Hz, offset %d ms), "
                        "seq %d", call.call_id, event.type, chunk.codec, len(chunk.audio), chunk.sample_rate,
                        chunk.offset_ms, event.seq)

    def spill_if_due(self, call: CallAudio, event_time_us: int, calls: Iterable[CallAudio]) -> None:
        """To the working files with the audio of a call that holds too much, or too long; of the `calls`
        (live, written longest ago first) while all hold too much."""
        if call.held_from is not None and (call.held_bytes >= SPILL_BYTES
                                           or event_time_us - call.held_since_us >= SPILL_AFTER_MS * 1000):
            self.spill(call)
        if self.held_bytes > BUFFERED_BYTES:
            for other in calls:
                if self.held_bytes <= BUFFERED_BYTES // 2:
                    break
                self.spill(other)

    def spill(self, call: CallAudio) -> None:
        """Writes the audio the call holds to its working files, then the meta file that says so."""
        if call.held_from is None and call.on_disk:
            return
        self.folder(call)
        for path, track in ((call.files.caller, call.caller), (call.files.agent, call.agent)):
            if track.held:
                _pwrite_all(path, ((2 * start, pcm) for start, pcm in track.runs()))
                track.held = []
        _pwrite_all(call.files.meta, iter([(0, call.meta())]))
        call.on_disk = True
        self.release(call)
        call.held_from = None

    def release(self, call: CallAudio) -> None:
        """Stops counting the audio the call holds in memory (spilled, or let go of)."""
        self.held_bytes -= call.held_bytes
        call.held_bytes = 0

    def folder(self, call: CallAudio) -> None:
        """Makes the call's working folder, once."""
        partial = call.files.meta.parent
        if partial not in self._folders:
            partial.mkdir(parents=True, exist_ok=True)
            self._folders.add(partial)
