"""QA fetches a call's recording through the API, and operators scrape its metrics: one real call
through the gateway, its audio assembled from the log by the recordings projection."""

from __future__ import annotations

import asyncio
import io
import wave
from pathlib import Path

import numpy as np
import pytest

from projections.recordings import RecordingsProjection
from projections.runner import ProjectionRunner
from projections.store import AnalyticsStore
from tests.integration.test_memory import call_and_say
from tests.integration.test_outbound_calls import OTHER_KEY, agents_with_two_tenants, api
from voxlog.settings import Settings
from voxlog.sim.stack import local_stack

pytestmark = pytest.mark.slow


async def test_a_finished_call_has_a_stereo_recording_and_metrics(
    store: AnalyticsStore, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as stack:
        call_id = await call_and_say(stack, "i have a problem with my internet", "no thank you goodbye")
        await stack.gateway.wait_idle(30)
        projection = RecordingsProjection(stack.gateway.recordings_path)
        await ProjectionRunner(stack.gateway.backend, store, projection).run(asyncio.Event(), until_caught_up=True)

        got = await api(stack, "GET", f"/v1/calls/{call_id}/recording")
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == "audio/wav"
        assert (await api(stack, "GET", f"/v1/calls/{call_id}/recording", key=OTHER_KEY)).status_code == 404
        assert (await api(stack, "GET", "/v1/calls/..%2F..%2Fetc/recording")).status_code == 404

        scraped = await api(stack, "GET", "/metrics", key=None)
    with wave.open(io.BytesIO(got.content)) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 16000, 2)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    seconds = len(frames) / 16000
    assert 5 < seconds < 60, seconds
    caller, agent = (np.abs(frames[:, i]).astype(np.int64) for i in (0, 1))
    assert caller.mean() > 50, "the caller's speech is on the left"
    assert agent.mean() > 50, "the agent's speech is on the right"
    (row,) = store.query("SELECT complete, channels, duration_ms FROM recordings FINAL WHERE call_id = {c:String}",
                         {"c": call_id}).rows
    assert row[:2] == (1, 2)
    assert abs(row[2] - seconds * 1000) < 50

    metrics = scraped.text
    assert scraped.status_code == 200
    assert 'voxlog_calls_total{agent="front-desk",channel="phone",direction="inbound",tenant="demo"} 1.0' in metrics
    assert 'voxlog_turns_total{agent="front-desk"' in metrics
    assert 'voxlog_voice_to_voice_seconds_count{agent="front-desk"' in metrics
    assert 'voxlog_tool_calls_total{outcome="succeeded",tool="create_ticket"} 1.0' in metrics
