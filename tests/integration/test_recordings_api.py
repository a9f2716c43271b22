"""QA fetches a call's recording through the API, and operators scrape its metrics: one real call
through the gateway, its audio assembled from the log by the recordings projection, kept in the
recordings folder or in an S3 bucket (moto's server on loopback)."""

from __future__ import annotations

import asyncio
import io
import re
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from projections.projection_runner import ProjectionRunner
from projections.recordings import RecordingsProjection
from projections.store import AnalyticsStore
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from tests.integration.test_memory import call_and_say
from tests.integration.test_outbound_calls import DEMO_KEY, OTHER_KEY, agents_with_two_tenants, api
from tests.integration.test_recording_store import MotoS3, bucket, moto_s3
from voxlog.settings import Settings
from voxlog.sim.stack import local_stack

pytestmark = pytest.mark.slow
__all__ = ["bucket", "moto_s3"]  # fixtures


@pytest.mark.parametrize("kept_in", ["folder", "s3"])
async def test_a_finished_call_has_a_stereo_recording_and_metrics(
    store: AnalyticsStore, tmp_path: Path, kept_in: str, request: pytest.FixtureRequest
) -> None:
    agents = agents_with_two_tenants(tmp_path / "agents")
    if kept_in == "s3":
        s3: MotoS3 = request.getfixturevalue("moto_s3")
        settings = s3.settings(tmp_path / "home", request.getfixturevalue("bucket")).model_copy(
            update={"agents_dir": agents})
    else:
        settings = Settings(home=tmp_path / "home", agents_dir=agents)
    async with local_stack(settings) as stack:
        call_id = await call_and_say(stack, "i have a problem with my internet", "no thank you goodbye")
        await stack.gateway.wait_idle(30)
        projection = RecordingsProjection(stack.gateway.recordings_path, stack.gateway.recordings)
        await ProjectionRunner(stack.gateway.backend, store, projection).run(asyncio.Event(), until_caught_up=True)

        got = await api(stack, "GET", f"/v1/calls/{call_id}/recording")
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == "audio/wav"
        assert int(got.headers["content-length"]) == len(got.content)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
            start = await client.get(f"/v1/calls/{call_id}/recording",
                                     headers={"Authorization": f"Bearer {DEMO_KEY}", "Range": "bytes=0-43"})
        assert start.status_code == 206
        assert start.headers["content-range"] == f"bytes 0-43/{len(got.content)}"
        assert start.content == got.content[:44]  # the WAV header
        assert (await api(stack, "GET", f"/v1/calls/{call_id}/recording", key=OTHER_KEY)).status_code == 404
        assert (await api(stack, "GET", "/v1/calls/..%2F..%2Fetc/recording")).status_code == 404
        # audit records are standalone events, not a call's seq-numbered stream: read them all
        async with stack.gateway.backend.admin() as admin:
            audited = [EventCodec().decode(r.value) async for r in admin.read_key((AUDIT,), call_id.encode())]

        scraped = await api(stack, "GET", "/metrics", key=None)
    reads = [(e.tenant_id, e.payload.outcome) for e in audited
             if isinstance(e.payload, AuditRecorded) and e.payload.action == "recording.read"]
    assert reads == [("demo", "accepted"), ("demo", "accepted"), ("other", "failed")]
    with wave.open(io.BytesIO(got.content)) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 16000, 2)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    seconds = len(frames) / 16000
    assert 5 < seconds < 60, seconds
    caller, agent = (np.abs(frames[:, i]).astype(np.int64) for i in (0, 1))
    assert caller.mean() > 50, "the caller's speech is on the left"
    assert agent.mean() > 50, "the agent's speech is on the right"
    (row,) = store.query("SELECT complete, channels, duration_ms, bytes, path FROM recordings FINAL "
                         "WHERE call_id = {c:String}", {"c": call_id}).rows
    assert row[:2] == (1, 2)
    assert abs(row[2] - seconds * 1000) < 50
    assert row[3:] == (len(got.content), stack.gateway.recordings.location("demo", call_id))
    assert row[4].startswith("s3://" if kept_in == "s3" else "demo/")

    metrics = scraped.text
    assert scraped.status_code == 200
    assert 'voxlog_calls_total{agent="front-desk",channel="phone",direction="inbound",tenant="demo"} 1.0' in metrics
    assert 'voxlog_turns_total{agent="front-desk"' in metrics
    assert 'voxlog_voice_to_voice_seconds_count{agent="front-desk"' in metrics
    # The gateway's loop, sampled all the while it served (gateway/loop_lag.py): a call's worth of samples.
    sampled = re.search(r"^voxlog_event_loop_lag_seconds_count (\S+)$", metrics, re.MULTILINE)
    assert sampled is not None, metrics
    assert float(sampled.group(1)) >= 10
    assert 'voxlog_tool_calls_total{outcome="succeeded",tool="create_ticket"} 1.0' in metrics
