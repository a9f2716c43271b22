"""Recordings: a call's audio events become one stereo WAV, each side where it was heard, the same
however the events come (replayed after a crash, picked up mid-call, the calls topic ahead of the
audio topic), without letting a crafted id or a broken chunk do harm."""

from __future__ import annotations

import dataclasses
import math
import time
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.backends import EmbeddedBackend
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogRecord
from projections import recording_buffer, recordings
from projections.recordings import RECORDINGS, RecordingsProjection, recording_path
from projections.tables import Output, Row, Statement, at
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.events import (
    AgentAudioChunk,
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
)
from schemas.topics import AUDIO, CALLS, topic_for
from streams.audio.codecs import pcm16_to_mulaw, rms_dbfs

TENANT = "t1"
FRAME_MS = 20
CALL_MS = 4000
CALLER_SPEECH = ((1000, 1600), (2800, 3400))
"""Where the caller speaks, in ms from the call's start (the rest of the caller's stream is silence)."""
AGENT_REPLIES = ((200, 600), (2500, 3500))
"""When the agent's replies are played."""
SPEECH_DBFS = -30.0
QUIET_DBFS = -60.0


def tone(hz: float, rate: int, first_sample: int, count: int) -> bytes:
    n = np.arange(first_sample, first_sample + count)
    return (np.cos(2 * math.pi * hz * n / rate) * 8000).astype("<i2").tobytes()


def call_payloads(*, call_ms: int = CALL_MS, caller_speech: Sequence[tuple[int, int]] = CALLER_SPEECH,
                  agent_replies: Sequence[tuple[int, int]] = AGENT_REPLIES) -> list[tuple[int, EventPayload]]:
    """(ms after the call's start, payload) in time order: an 8 kHz mu-law caller (a Twilio call)
    and a 16 kHz PCM agent whose frames are sent with a little jitter."""
    timed: list[tuple[float, EventPayload]] = [(0, CallStarted(channel="phone", direction="inbound", agent_id="a",
                                                               agent_version="v", routed_by="number"))]
    for index, offset in enumerate(range(0, call_ms, FRAME_MS)):
        speaking = any(start <= offset < end for start, end in caller_speech)
        pcm = tone(440, 8000, offset * 8, 160) if speaking else bytes(320)
        timed.append((offset + FRAME_MS, CallerAudioChunk(codec="mulaw", sample_rate=8000, chunk_index=index,
                                                          offset_ms=offset, duration_ms=FRAME_MS,
                                                          audio=pcm16_to_mulaw(pcm))))
    index = 0
    for start, end in agent_replies:
        for played in range(start, end, FRAME_MS):
            jitter_ms = 0 if played == start else (index * 7919 % 3000) / 1000
            timed.append((played + jitter_ms, AgentAudioChunk(
                codec="pcm_s16le", sample_rate=16000, chunk_index=index, offset_ms=index * FRAME_MS,
                duration_ms=FRAME_MS, audio=tone(1000, 16000, (played - start) * 16, 320))))
            index += 1
    timed.append((call_ms + FRAME_MS, CallEnded(reason="caller_hangup", duration_ms=call_ms + FRAME_MS)))
    timed.sort(key=lambda item: item[0])
    return [(round(ms * 1000), payload) for ms, payload in timed]


async def record_call(backend: EmbeddedBackend, call_id: str, payloads: list[tuple[int, EventPayload]],
                      start_us: int) -> list[Event[EventPayload]]:
    """Writes the call into the log as a gateway would; returns its events."""
    async with backend.producer() as producer:
        recorder = CallRecorder(EventWriter(producer), tenant_id=TENANT, call_id=call_id, producer="test",
                                producer_version="0")
        events = [await recorder.record(payload, event_time_us=start_us + us) for us, payload in payloads]
        await producer.flush()
    return events


def past_us() -> int:
    """A call's start a while ago: the log stamps records when they are appended, after their events."""
    return time.time_ns() // 1000 - 600_000_000


def record_of(event: Event[EventPayload]) -> LogRecord:
    return LogRecord(topic_for(event.type), 0, event.seq, event.call_id.encode(), b"", (), 0)


async def feed(projection: RecordingsProjection, events: Sequence[Event[EventPayload]],
               backend: EmbeddedBackend, *, settle: bool = True) -> list[Row]:
    """The rows of the events, then (with `settle`) of the calls that waited for their audio, finished
    as the runner finishes them at the end of a batch when it cannot tell how far the log is read."""
    rows: list[Row] = []
    for event in events:
        rows += as_rows(await projection.rows(record_of(event), event, backend))
    if settle:
        rows += as_rows(await projection.settle(backend, None))
    return rows


def as_rows(outputs: Sequence[Output]) -> list[Row]:
    """The rows, where no statement is expected (there are no erasures here)."""
    rows = []
    for output in outputs:
        assert not isinstance(output, Statement)
        rows.append(output)
    return rows


def value(row: Row, column: str) -> Any:
    return row[1][RECORDINGS.column_names.index(column)]


def stereo(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 16000)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)


def level(channel: np.ndarray, from_ms: int, to_ms: int) -> float:
    return rms_dbfs(channel[from_ms * 16 : to_ms * 16].tobytes())


def assert_heard(channel: np.ndarray, spans: Sequence[tuple[int, int]], *, total_ms: int = CALL_MS) -> None:
    """Speech inside each span (20 ms in from its edges), quiet everywhere else (20 ms out)."""
    edges = [0, *(edge for span in spans for edge in span), total_ms]
    for start, end in spans:
        assert level(channel, start + 20, end - 20) > SPEECH_DBFS, (start, end)
    for quiet_start, quiet_end in zip(edges[::2], edges[1::2], strict=True):
        if quiet_end - quiet_start > 40:
            assert level(channel, quiet_start + (20 if quiet_start else 0), quiet_end - 20) < QUIET_DBFS, \
                (quiet_start, quiet_end)


@pytest.fixture
async def call(embedded_backend: EmbeddedBackend) -> tuple[int, list[Event[EventPayload]]]:
    start_us = past_us()
    return start_us, await record_call(embedded_backend, "call-1", call_payloads(), start_us)


async def test_a_call_becomes_a_stereo_wav_with_each_side_where_it_was_heard(
        tmp_path: Path, embedded_backend: EmbeddedBackend, call: tuple[int, list[Event[EventPayload]]]) -> None:
    start_us, events = call
    projection = RecordingsProjection(tmp_path / "recordings")
    rows = await feed(projection, events, embedded_backend)

    wav = recording_path(tmp_path / "recordings", TENANT, "call-1")
    audio = stereo(wav)
    assert len(audio) == CALL_MS * 16  # the caller's stream is the longer
    assert_heard(audio[:, 0], CALLER_SPEECH)
    assert_heard(audio[:, 1], AGENT_REPLIES)
    assert np.flatnonzero(audio[:, 1])[0] == AGENT_REPLIES[0][0] * 16  # played when it was sent
    # Each reply is its frames end to end, whatever the jitter of their send times: no clicks.
    agent = b"".join(e.payload.audio for e in events if isinstance(e.payload, AgentAudioChunk))
    greeting_ms = AGENT_REPLIES[0][1] - AGENT_REPLIES[0][0]
    for (start, end), first_ms in zip(AGENT_REPLIES, (0, greeting_ms), strict=True):
        assert audio[start * 16 : end * 16, 1].tobytes() == agent[first_ms * 32 : (first_ms + end - start) * 32]

    ended = events[-1]
    assert rows == [
        (RECORDINGS, (TENANT, "call-1", "t1/call-1.wav", "wav/pcm_s16le/16000/stereo", 2, 16000, 0, 0, 0, 0,
                      at(start_us), None, 0, 0)),
        (RECORDINGS, (TENANT, "call-1", "t1/call-1.wav", "wav/pcm_s16le/16000/stereo", 2, 16000, CALL_MS,
                      wav.stat().st_size, CALL_MS, 1400, at(start_us), at(ended.envelope.event_time_us), 1,
                      ended.seq)),
    ]
    assert all(len(values) == len(RECORDINGS.columns) for _, values in rows)
    assert sorted(p.name for p in wav.parent.iterdir()) == [".partial", "call-1.json", "call-1.wav"]
    assert list((wav.parent / ".partial").iterdir()) == []  # the working files are gone
    assert projection.skipped_chunks == projection.rejected_events == 0


async def test_replaying_a_call_gives_the_same_wav_and_rows(
        tmp_path: Path, embedded_backend: EmbeddedBackend, call: tuple[int, list[Event[EventPayload]]]) -> None:
    _, events = call
    root = tmp_path / "recordings"
    projection = RecordingsProjection(root)
    rows = await feed(projection, events, embedded_backend)
    wav = recording_path(root, TENANT, "call-1")
    first = wav.read_bytes()

    assert await feed(projection, events, embedded_backend) == rows  # redelivered
    after_crash = RecordingsProjection(root)  # a restart: nothing in memory
    assert await feed(after_crash, events, embedded_backend) == rows
    # A crash between the WAV's rename and the clean-up leaves working files: a replay removes them.
    (wav.parent / ".partial" / "call-1.caller.pcm").write_bytes(b"\1\2")
    assert await feed(RecordingsProjection(root), events[-1:], embedded_backend) == rows[-1:]
    assert list((wav.parent / ".partial").iterdir()) == []
    assert wav.read_bytes() == first


@pytest.mark.parametrize("spill_bytes", [0, recording_buffer.SPILL_BYTES],
                         ids=["every-chunk-to-files", "held-in-memory"])
@pytest.mark.parametrize(("crashed_after", "resumed_from"), [(90, 60), (150, 150), (250, 200), (272, 268)])
async def test_a_projector_that_crashed_mid_call_goes_on_from_what_it_stored(
        tmp_path: Path, embedded_backend: EmbeddedBackend, call: tuple[int, list[Event[EventPayload]]],
        monkeypatch: pytest.MonkeyPatch, crashed_after: int, resumed_from: int, spill_bytes: int) -> None:
    monkeypatch.setattr(recording_buffer, "SPILL_BYTES", spill_bytes)
    _, events = call
    assert len(events) == 272
    assert [e.seq for e in events] == list(range(272))  # a record's offset is its event's seq (`record_of`)
    clean = await feed(RecordingsProjection(tmp_path / "clean"), events, embedded_backend)

    root = tmp_path / "crashed"
    crashed = RecordingsProjection(root)
    await feed(crashed, events[:resumed_from], embedded_backend)
    # The runner stored offsets a little before the crash, no further than the projection held them
    # back: what came after them comes again.
    held = crashed.held()
    if spill_bytes == 0:
        assert not any(tp.topic == AUDIO for tp in held)  # every chunk's audio is in the working files
    stored = {topic: min([resumed_from, *(offset for tp, offset in held.items() if tp.topic == topic)])
              for topic in (AUDIO, CALLS)}
    await feed(crashed, events[resumed_from:crashed_after], embedded_backend)
    replayed = [e for e in events if e.seq >= stored[topic_for(e.type)]]
    rows = await feed(RecordingsProjection(root), replayed, embedded_backend)

    assert rows[-1] == clean[-1]
    expected = stereo(recording_path(tmp_path / "clean", TENANT, "call-1"))
    got = stereo(recording_path(root, TENANT, "call-1"))
    assert np.array_equal(expected, got)
    assert list((root / TENANT / ".partial").iterdir()) == []


async def test_a_call_picked_up_in_the_middle_still_places_audio_where_it_was_heard(
        tmp_path: Path, embedded_backend: EmbeddedBackend, call: tuple[int, list[Event[EventPayload]]]) -> None:
    start_us, events = call
    second_half = [e for e in events if e.envelope.event_time_us >= start_us + 2_000_000]
    projection = RecordingsProjection(tmp_path / "recordings")
    rows = await feed(projection, second_half, embedded_backend)

    audio = stereo(recording_path(tmp_path / "recordings", TENANT, "call-1"))
    assert_heard(audio[:, 0], CALLER_SPEECH[1:])
    assert_heard(audio[:, 1], AGENT_REPLIES[1:])  # at 2.5 s from the call.started found in the log
    assert np.flatnonzero(audio[:, 1])[0] == AGENT_REPLIES[1][0] * 16
    (final,) = rows
    assert value(final, "started_at") == at(start_us)


async def test_without_a_call_started_the_earliest_event_is_time_zero(
        tmp_path: Path, embedded_backend: EmbeddedBackend) -> None:
    start_us = past_us()
    events = await record_call(embedded_backend, "call-2", call_payloads()[1:], start_us)
    rows = await feed(RecordingsProjection(tmp_path / "recordings"), events, embedded_backend)

    first_chunk_us = events[0].envelope.event_time_us  # the first caller chunk, 20 ms in
    audio = stereo(recording_path(tmp_path / "recordings", TENANT, "call-2"))
    assert np.flatnonzero(audio[:, 1])[0] == (AGENT_REPLIES[0][0] - FRAME_MS) * 16
    assert value(rows[-1], "started_at") == at(first_chunk_us)


async def test_the_calls_topic_read_ahead_of_the_audio_topic_loses_no_audio(
        tmp_path: Path, embedded_backend: EmbeddedBackend, call: tuple[int, list[Event[EventPayload]]]) -> None:
    _, events = call
    clean = await feed(RecordingsProjection(tmp_path / "clean"), events, embedded_backend)
    projection = RecordingsProjection(tmp_path / "reordered")
    rows = await feed(projection, [e for e in events if topic_for(e.type) == CALLS], embedded_backend)
    wav = recording_path(tmp_path / "reordered", TENANT, "call-1")
    assembled = wav.read_bytes()
    # The audio arrives after call.ended: the WAV took it from the log and is not touched again.
    assert await feed(projection, [e for e in events if topic_for(e.type) == AUDIO], embedded_backend) == []

    assert rows == clean
    assert wav.read_bytes() == assembled == recording_path(tmp_path / "clean", TENANT, "call-1").read_bytes()


async def test_malformed_chunks_are_skipped_and_counted(
        tmp_path: Path, embedded_backend: EmbeddedBackend, call: tuple[int, list[Event[EventPayload]]]) -> None:
    _, events = call

    def broken(event: Event[EventPayload]) -> Event[EventPayload]:
        payload = event.payload
        if isinstance(payload, CallerAudioChunk) and payload.offset_ms == 1200:
            # A codec no source sends: the type says it cannot be.
            return dataclasses.replace(event, payload=dataclasses.replace(payload, codec="opus"))  # type: ignore[arg-type]
        if isinstance(payload, CallerAudioChunk) and payload.offset_ms == 1400:
            return dataclasses.replace(event, payload=dataclasses.replace(
                payload, codec="pcm_s16le", sample_rate=8000, audio=bytes(321)))
        if isinstance(payload, AgentAudioChunk) and payload.chunk_index == 30:
            return dataclasses.replace(event, payload=dataclasses.replace(payload, sample_rate=0))
        return event

    projection = RecordingsProjection(tmp_path / "recordings")
    rows = await feed(projection, [broken(e) for e in events], embedded_backend)

    assert projection.skipped_chunks == 3
    audio = stereo(recording_path(tmp_path / "recordings", TENANT, "call-1"))
    caller = audio[:, 0]
    for hole in (1200, 1400):  # silence where the broken chunks were, the caller around them
        assert level(caller, hole + 5, hole + 15) < QUIET_DBFS
        assert level(caller, hole - 100, hole - 10) > SPEECH_DBFS
        assert level(caller, hole + 30, hole + 100) > SPEECH_DBFS
    assert_heard(audio[:, 1], AGENT_REPLIES)
    assert (value(rows[-1], "caller_audio_ms"), value(rows[-1], "agent_audio_ms")) == (CALL_MS - 2 * FRAME_MS,
                                                                                        1400 - FRAME_MS)


@pytest.mark.parametrize("bad", ["../evil", "..", ".", "a/b", "a\\b", "", ".partial", "x\x00y", "call\n", "/abs"])
def test_ids_that_are_not_plain_names_cannot_name_a_recording(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="cannot name a recording"):
        recording_path(tmp_path, TENANT, bad)
    with pytest.raises(ValueError, match="cannot name a recording"):
        recording_path(tmp_path, bad, "call-1")


def crafted(call_id: str, seq: int, payload: EventPayload) -> Event[EventPayload]:
    return Event(Envelope(event_id=f"e{seq}", tenant_id=TENANT, call_id=call_id, seq=seq, type=payload.EVENT_TYPE,
                          schema_version=payload.EVENT_VERSION, event_time_us=past_us() + seq * 20_000,
                          producer="test", producer_version="0"), payload)


async def test_a_crafted_call_id_writes_nothing_outside_the_folder(
        tmp_path: Path, embedded_backend: EmbeddedBackend) -> None:
    root = tmp_path / "a" / "recordings"
    payloads = [payload for _, payload in call_payloads(call_ms=100, agent_replies=())]
    projection = RecordingsProjection(root)
    rows = await feed(projection, [crafted("../../escape", seq, p) for seq, p in enumerate(payloads)], embedded_backend)

    assert rows == []
    assert projection.rejected_events == len(payloads)
    assert named(tmp_path, "escape") == []


def named(folder: Path, part: str) -> list[Path]:
    return [path for path in folder.rglob("*") if part in path.name]


async def test_state_stays_bounded_and_evicted_live_calls_resume_from_disk(
        tmp_path: Path, embedded_backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recordings, "ENDED_CALLS_KEPT", 2)
    monkeypatch.setattr(recordings, "LIVE_CALLS_KEPT", 2)
    start_us = past_us()
    speech, replies = ((200, 600),), ((700, 900),)
    calls = [await record_call(embedded_backend, f"call-{n}", call_payloads(call_ms=1000, caller_speech=speech,
                                                                    agent_replies=replies), start_us + n)
             for n in range(4)]
    interleaved = sorted((e for events in calls for e in events), key=lambda e: (e.envelope.event_time_us, e.seq))
    root = tmp_path / "recordings"
    projection = RecordingsProjection(root)
    await feed(projection, interleaved, embedded_backend)

    assert len(projection.live) == 0
    assert list(projection.ended) == ["call-2", "call-3"]
    for n in range(4):
        audio = stereo(recording_path(root, TENANT, f"call-{n}"))
        assert_heard(audio[:, 0], speech, total_ms=1000)
        assert_heard(audio[:, 1], replies, total_ms=1000)
    # call-0 is forgotten; its late audio still finds the WAV final and leaves it alone.
    wav = recording_path(root, TENANT, "call-0")
    before = wav.read_bytes()
    assert await feed(projection, [e for e in calls[0] if isinstance(e.payload, CallerAudioChunk)][-3:],
                      embedded_backend) == []
    assert wav.read_bytes() == before
    assert list((root / TENANT / ".partial").iterdir()) == []


# --- Consent: a call whose caller refused, or under opt_in never agreed, has no recording at all ----


def consent_call(mode: str, *, refused_at_ms: int | None = None,
                 given_at_ms: int | None = None) -> list[tuple[int, EventPayload]]:
    """`call_payloads()` under a consent mode, as a session records it: the refusal (or the yes) at its
    time, and no caller chunk after the refusal (opt_in: before the yes)."""
    out: list[tuple[int, EventPayload]] = []
    for us, payload in call_payloads():
        if isinstance(payload, CallStarted):
            payload = dataclasses.replace(payload, parameters={"consent_rule": "all_party", "consent_mode": mode})
        if refused_at_ms is not None and isinstance(payload, CallerAudioChunk) and us > refused_at_ms * 1000:
            continue
        if mode == "opt_in" and isinstance(payload, CallerAudioChunk) and (given_at_ms is None
                                                                          or us <= given_at_ms * 1000):
            continue
        out.append((us, payload))
    consent: list[tuple[int, EventPayload]] = []
    if refused_at_ms is not None:
        consent.append((refused_at_ms * 1000 + 1, ConsentRefused(kind="recording", method="dtmf", prompt_text="p")))
    if given_at_ms is not None:
        consent.append((given_at_ms * 1000 + 1, ConsentGiven(kind="recording", method="speech", prompt_text="p")))
    return sorted([*out, *consent], key=lambda item: item[0])


async def feed_all(projection: RecordingsProjection, events: Sequence[Event[EventPayload]],
                   backend: EmbeddedBackend) -> list[Output]:
    """Rows and statements, as `feed` gives rows."""
    out: list[Output] = []
    for event in events:
        out += await projection.rows(record_of(event), event, backend)
    return [*out, *await projection.settle(backend, None)]


def nothing_recorded(root: Path, call_id: str) -> None:
    """No WAV, no facts, no working files of the call anywhere under the folder."""
    left = [p.relative_to(root).as_posix() for p in root.rglob("*")
            if call_id in p.name and p.parent.name != ".withheld"]
    assert left == [], left
    assert (root / TENANT / ".withheld" / call_id).exists()


def withheld_row_deleted(outputs: Sequence[Output], call_id: str) -> None:
    (statement,) = [o for o in outputs if isinstance(o, Statement)]
    assert statement.sql.startswith("DELETE FROM recordings WHERE")
    assert dict(statement.parameters) == {"tenant": TENANT, "call": call_id}


@pytest.mark.parametrize("spill_bytes", [0, recording_buffer.SPILL_BYTES], ids=["on-disk", "in-memory"])
async def test_a_refusal_mid_call_leaves_no_recording_no_working_files_and_no_row(
        tmp_path: Path, embedded_backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch, spill_bytes: int) -> None:
    monkeypatch.setattr(recording_buffer, "SPILL_BYTES", spill_bytes)
    events = await record_call(embedded_backend, "call-r", consent_call("opt_out", refused_at_ms=1200), past_us())
    root = tmp_path / "recordings"
    projection = RecordingsProjection(root)
    outputs = await feed_all(projection, events, embedded_backend)

    rows = [o for o in outputs if not isinstance(o, Statement)]
    assert [value(r, "complete") for r in rows] == [0]  # the live row of its start, deleted at the refusal
    withheld_row_deleted(outputs, "call-r")
    nothing_recorded(root, "call-r")
    assert not projection.live
    assert not projection.held()
    # Read again after a restart (nothing in memory), the marker keeps it so: no row, no file.
    again = await feed_all(RecordingsProjection(root), events, embedded_backend)
    assert again == []
    nothing_recorded(root, "call-r")


async def test_opt_in_without_a_yes_has_no_recording_not_even_the_agents_side(
        tmp_path: Path, embedded_backend: EmbeddedBackend) -> None:
    events = await record_call(embedded_backend, "call-n", consent_call("opt_in"), past_us())
    assert any(isinstance(e.payload, AgentAudioChunk) for e in events)
    root = tmp_path / "recordings"
    outputs = await feed_all(RecordingsProjection(root), events, embedded_backend)
    assert [o for o in outputs if not isinstance(o, Statement)] == []  # not even a live row
    withheld_row_deleted(outputs, "call-n")
    nothing_recorded(root, "call-n")


async def test_opt_in_after_a_yes_is_recorded_from_the_yes(tmp_path: Path, embedded_backend: EmbeddedBackend) -> None:
    start_us = past_us()
    events = await record_call(embedded_backend, "call-y", consent_call("opt_in", given_at_ms=2000), start_us)
    root = tmp_path / "recordings"
    rows = await feed(RecordingsProjection(root), events, embedded_backend)
    given = next(e for e in events if isinstance(e.payload, ConsentGiven))
    assert [(value(r, "complete"), value(r, "_version")) for r in rows] == [(0, given.seq), (1, events[-1].seq)]
    assert value(rows[0], "started_at") == at(start_us)
    audio = stereo(recording_path(root, TENANT, "call-y"))
    assert_heard(audio[:, 0], CALLER_SPEECH[1:])  # the caller from their yes on
    assert_heard(audio[:, 1], AGENT_REPLIES)


async def test_a_call_whose_start_was_read_before_a_restart_learns_its_consent_from_the_log(
        tmp_path: Path, embedded_backend: EmbeddedBackend) -> None:
    """Nothing of its start or its consent is read after the restart: its end reads them from the log."""
    events = await record_call(embedded_backend, "call-l", consent_call("opt_in"), past_us())
    root = tmp_path / "recordings"
    await feed_all(RecordingsProjection(root), events[:40], embedded_backend)
    outputs = await feed_all(RecordingsProjection(root), events[40:], embedded_backend)
    assert [o for o in outputs if not isinstance(o, Statement)] == []
    withheld_row_deleted(outputs, "call-l")
    nothing_recorded(root, "call-l")


async def test_a_refusal_read_before_the_calls_audio_records_none_of_it(
        tmp_path: Path, embedded_backend: EmbeddedBackend) -> None:
    events = await record_call(embedded_backend, "call-a", consent_call("opt_out", refused_at_ms=1200), past_us())
    root = tmp_path / "recordings"
    projection = RecordingsProjection(root)
    await feed_all(projection, [e for e in events if topic_for(e.type) == CALLS], embedded_backend)
    assert await feed_all(projection, [e for e in events if topic_for(e.type) == AUDIO], embedded_backend) == []
    nothing_recorded(root, "call-a")
    assert not projection.live
