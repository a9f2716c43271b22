"""Recording stores: one contract, run against the local folder and against S3 (the real boto3
talking to moto's server on loopback, which speaks S3's wire protocol); then the recordings
projection with S3: the same WAV as the local store, the same row and object on a replay, and a
store that goes away holding the recording back until it returns, never losing it; and working
files left by the version whose parts were all 16 kHz are continued."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from moto.server import ThreadedMotoServer

from consumers.backends import EmbeddedBackend
from projections import recordings
from projections.projection_runner import ProjectionRunner
from projections.recording_store import (
    LocalRecordingStore,
    RangeNotSatisfiable,
    RecordingFacts,
    RecordingStore,
    RecordingStoreError,
    RecordingStream,
)
from projections.recording_store_s3 import S3RecordingStore
from projections.recordings import RECORDINGS, RecordingsProjection
from projections.store import AnalyticsStore
from schemas.events import CallerAudioChunk
from streams.audio.codecs import mulaw_to_pcm16, resample_pcm16
from tests.unit.test_recordings import TENANT, assert_heard, call_payloads, feed, past_us, record_call, stereo
from voxlog.backends import recording_store
from voxlog.settings import Settings
from voxlog.sim.stack import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

FACTS = RecordingFacts(started_us=1_700_000_000_000_000, duration_ms=4000, bytes=44, caller_audio_ms=3960,
                       agent_audio_ms=1400)


class MotoS3:
    """moto's S3 server on 127.0.0.1, which can be stopped and started again on its port (its
    buckets live in this process, so they outlast a stop)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def settings(self, home: Path, bucket: str) -> Settings:
        return Settings(home=home, recordings_s3_url=f"s3://{bucket}/calls/recordings",
                        recordings_s3_endpoint_url=self.endpoint, recordings_s3_region="us-east-1",
                        recordings_s3_access_key_id="test-key-id", recordings_s3_secret_access_key="test-secret")

    def client(self) -> S3Client:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test-key-id", aws_secret_access_key="test-secret")


@pytest.fixture
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    name = f"voxlog-test-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(moto_s3: MotoS3, bucket: str, tmp_path: Path) -> S3RecordingStore:
    store = recording_store(moto_s3.settings(tmp_path / "home", bucket))
    assert isinstance(store, S3RecordingStore)
    return store


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> RecordingStore:
    if request.param == "local":
        return LocalRecordingStore(tmp_path / "recordings")
    store: S3RecordingStore = request.getfixturevalue("s3_store")
    return store


def wav_file(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.wav.tmp"
    path.write_bytes(content)
    return path


def read_all(found: Path | RecordingStream | None) -> bytes:
    assert found is not None
    if isinstance(found, Path):
        return found.read_bytes()
    try:
        return b"".join(found.chunks)
    finally:
        found.close()


# --- the contract, on both stores ------------------------------------------------------------------


def test_a_recording_is_stored_read_back_and_erased(any_store: RecordingStore, tmp_path: Path) -> None:
    content = b"RIFF" + bytes(range(40))
    assert any_store.finished(TENANT, "call-1") is None
    assert any_store.read(TENANT, "call-1") is None

    any_store.put(TENANT, "call-1", wav_file(tmp_path / "recordings" / TENANT / ".partial", content), FACTS)

    assert any_store.finished(TENANT, "call-1") == FACTS
    assert read_all(any_store.read(TENANT, "call-1")) == content
    assert any_store.finished(TENANT, "call-2") is None  # another call is not this one
    any_store.erase(TENANT, "call-1")
    assert any_store.finished(TENANT, "call-1") is None
    assert any_store.read(TENANT, "call-1") is None
    any_store.erase(TENANT, "call-1")  # erasing what is not there is no error


def test_putting_a_recording_again_replaces_it_with_itself(any_store: RecordingStore, tmp_path: Path) -> None:
    partial = tmp_path / "recordings" / TENANT / ".partial"
    any_store.put(TENANT, "call-1", wav_file(partial, b"RIFF-same"), FACTS)
    any_store.put(TENANT, "call-1", wav_file(partial, b"RIFF-same"), FACTS)
    assert read_all(any_store.read(TENANT, "call-1")) == b"RIFF-same"
    assert any_store.finished(TENANT, "call-1") == FACTS


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", ""])
def test_ids_that_are_not_plain_names_name_no_recording(any_store: RecordingStore, tmp_path: Path, bad: str) -> None:
    wav = wav_file(tmp_path / "x", b"RIFF")
    for operation in (lambda: any_store.location(TENANT, bad), lambda: any_store.finished(bad, "call-1"),
                      lambda: any_store.put(TENANT, bad, wav, FACTS), lambda: any_store.read(bad, "c"),
                      lambda: any_store.erase(TENANT, bad)):
        with pytest.raises(ValueError, match="cannot name a recording"):
            operation()


# --- S3 specifics ------------------------------------------------------------------------------------


def test_s3_keeps_one_object_with_its_facts_and_reads_byte_ranges(
        s3_store: S3RecordingStore, moto_s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    content = b"RIFF" + bytes(range(200))
    s3_store.put(TENANT, "call-1", wav_file(tmp_path, content), FACTS)

    assert s3_store.location(TENANT, "call-1") == f"s3://{bucket}/calls/recordings/{TENANT}/call-1.wav"
    (only,) = moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert only.get("Key") == f"calls/recordings/{TENANT}/call-1.wav"
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"calls/recordings/{TENANT}/call-1.wav")
    assert head["ContentType"] == "audio/wav"
    assert head["Metadata"]["voxlog-caller-audio-ms"] == "3960"
    ranged = s3_store.read(TENANT, "call-1", "bytes=0-3")
    assert isinstance(ranged, RecordingStream)
    assert (ranged.length, ranged.content_range) == (4, f"bytes 0-3/{len(content)}")
    assert read_all(ranged) == b"RIFF"
    with pytest.raises(RangeNotSatisfiable):
        s3_store.read(TENANT, "call-1", "bytes=5000-6000")


def test_an_unreachable_or_missing_bucket_is_a_store_error(s3_store: S3RecordingStore, moto_s3: MotoS3,
                                                            tmp_path: Path) -> None:
    missing = S3RecordingStore(s3_store.client, "no-such-bucket-here", "")
    with pytest.raises(RecordingStoreError, match="no-such-bucket-here"):
        missing.put(TENANT, "call-1", wav_file(tmp_path, b"RIFF"), FACTS)
    moto_s3.stop()
    with pytest.raises(RecordingStoreError, match="cannot look up"):
        s3_store.finished(TENANT, "call-1")


def test_credentials_are_never_shown(moto_s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    settings = moto_s3.settings(tmp_path, bucket)
    store = recording_store(settings)
    for shown in (repr(settings), str(settings.model_dump()), store.describe()):
        assert "test-secret" not in shown
        assert "test-key-id" not in shown


def test_an_s3_url_that_is_not_one_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="is not an S3 URL"):
        Settings(recordings_s3_url="https://bucket.example.com/x")


# --- the projection on S3 ----------------------------------------------------------------------------


async def test_calls_projected_with_s3_are_the_same_wavs_in_the_bucket(
        s3_store: S3RecordingStore, moto_s3: MotoS3, bucket: str, embedded_backend: EmbeddedBackend,
        tmp_path: Path) -> None:
    start_us = past_us()
    events = await record_call(embedded_backend, "call-1", call_payloads(), start_us)
    events += await record_call(embedded_backend, "call-2", call_payloads(call_ms=1500, agent_replies=((100, 700),)),
                                start_us + 1000)
    local_rows = await feed(RecordingsProjection(tmp_path / "local"), events, embedded_backend)
    root = tmp_path / "work"
    rows = await feed(RecordingsProjection(root, s3_store), events, embedded_backend)

    client = moto_s3.client()
    for call_id in ("call-1", "call-2"):
        local = (tmp_path / "local" / TENANT / f"{call_id}.wav").read_bytes()
        stored = client.get_object(Bucket=bucket, Key=f"calls/recordings/{TENANT}/{call_id}.wav")["Body"].read()
        assert stored == local
    path = RECORDINGS.column_names.index("path")
    # Both calls end before the end of the feed, so their final rows come together when it settles.
    assert [values[path] for _, values in rows] == [
        f"s3://{bucket}/calls/recordings/{TENANT}/{c}.wav" for c in ("call-1", "call-2", "call-1", "call-2")]
    assert [values[:path] + values[path + 1:] for _, values in rows] == [
        values[:path] + values[path + 1:] for _, values in local_rows]
    assert sorted(p.name for p in (root / TENANT).iterdir()) == [".partial"]  # no WAV kept here
    assert list((root / TENANT / ".partial").iterdir()) == []


async def test_a_replayed_call_ended_gives_the_same_row_and_object(
        s3_store: S3RecordingStore, moto_s3: MotoS3, bucket: str, embedded_backend: EmbeddedBackend,
        tmp_path: Path) -> None:
    events = await record_call(embedded_backend, "call-1", call_payloads(), past_us())
    root = tmp_path / "work"
    rows = await feed(RecordingsProjection(root, s3_store), events, embedded_backend)
    key = f"calls/recordings/{TENANT}/call-1.wav"
    first = moto_s3.client().head_object(Bucket=bucket, Key=key)

    # A restart replays the call; a crash between the upload and the clean-up left a working file.
    (root / TENANT / ".partial" / "call-1.caller.pcm").write_bytes(b"\1\2")
    assert await feed(RecordingsProjection(root, s3_store), events, embedded_backend) == rows
    assert await feed(RecordingsProjection(root, s3_store), events[-1:], embedded_backend) == rows[-1:]

    again = moto_s3.client().head_object(Bucket=bucket, Key=key)
    assert (again["ETag"], again["LastModified"]) == (first["ETag"], first["LastModified"])  # not written again
    assert len(moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]) == 1
    assert list((root / TENANT / ".partial").iterdir()) == []


async def test_a_store_that_went_away_holds_the_recording_back_until_it_returns(
        s3_store: S3RecordingStore, moto_s3: MotoS3, bucket: str, embedded_backend: EmbeddedBackend, tmp_path: Path,
        store: AnalyticsStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(recordings, "STORE_RETRY_MAX_S", 1.0)
    events = await record_call(embedded_backend, "call-1", call_payloads(), past_us())
    await feed(RecordingsProjection(tmp_path / "local"), events, embedded_backend)
    projection = RecordingsProjection(tmp_path / "work", s3_store)
    runner = ProjectionRunner(embedded_backend, store, projection)

    moto_s3.stop()
    with caplog.at_level(logging.ERROR, logger="projections.recordings"):
        running = asyncio.create_task(runner.run(asyncio.Event(), until_caught_up=True))
        try:
            for _ in range(200):
                if projection.store_failures >= 3:
                    break
                await asyncio.sleep(0.05)
            assert projection.store_failures >= 3
            assert not running.done()  # waiting on the store, not past the call
            moto_s3.start()
            await asyncio.wait_for(running, 30)
        finally:
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for said in ("call-1", "retrying", moto_s3.endpoint):
        assert said in failures[0]
    assert "test-secret" not in "\n".join(failures)

    assert runner.dead_lettered == 0
    stored = moto_s3.client().get_object(Bucket=bucket, Key=f"calls/recordings/{TENANT}/call-1.wav")["Body"].read()
    assert stored == (tmp_path / "local" / TENANT / "call-1.wav").read_bytes()
    (row,) = store.query("SELECT complete, path FROM recordings FINAL WHERE call_id = 'call-1'").rows
    assert row == (1, f"s3://{bucket}/calls/recordings/{TENANT}/call-1.wav")


async def test_working_files_from_before_parts_kept_their_own_rate_are_continued(
        embedded_backend: EmbeddedBackend, tmp_path: Path) -> None:
    """A call live across the upgrade: its caller part is 16 kHz and its meta has no rates."""
    start_us = past_us()
    speech = ((200, 800), (1200, 1800))
    events = await record_call(embedded_backend, "call-1",
                               call_payloads(call_ms=2000, caller_speech=speech, agent_replies=()), start_us)
    split = next(i for i, e in enumerate(events) if isinstance(e.payload, CallerAudioChunk)
                 and e.payload.offset_ms >= 1000)
    before = [e for e in events[:split] if isinstance(e.payload, CallerAudioChunk)]
    partial = tmp_path / "recordings" / TENANT / ".partial"
    partial.mkdir(parents=True)
    decoded = b"".join(mulaw_to_pcm16(e.payload.audio) for e in before if isinstance(e.payload, CallerAudioChunk))
    (partial / "call-1.caller.pcm").write_bytes(resample_pcm16(decoded, 8000, 16000))
    (partial / "call-1.meta").write_bytes(struct.pack(
        "<10q", start_us, start_us, before[-1].seq, before[-1].envelope.event_time_us, 16000, 1000, -1, 0, 0, 0))

    rows = await feed(RecordingsProjection(tmp_path / "recordings"), events[split:], embedded_backend)

    audio = stereo(tmp_path / "recordings" / TENANT / "call-1.wav")
    assert len(audio) == 2000 * 16
    assert_heard(audio[:, 0], speech, total_ms=2000)
    assert rows[-1][1][RECORDINGS.column_names.index("caller_audio_ms")] == 2000
