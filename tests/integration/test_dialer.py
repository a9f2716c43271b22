"""The dialer on its own, on both log backends, against Twilio's REST API as a local stand-in driven by
the real twilio SDK: a request is placed once; an expired one never is; after a crash, a placing
that may have reached Twilio is given up rather than repeated, an unsent outcome is sent, and what
was queued is placed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import read_call
from consumers.workers.dialer import DialStore, DialWorker, TwilioPlacer
from gateway.api import new_dial_id
from gateway.runtime import new_call_id
from producers.event_writer import CallRecorder, EventWriter
from schemas.base import Event, EventPayload
from schemas.events import CallDialFailed, CallDialPlaced, CallDialRequested
from streams.channels.twilio_rest import TwilioRest
from streams.config.tenants import Tenants, load_tenants
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.fake_twilio import FakeTwilio, new_account_sid

TOKEN = "dialer-test-token"
PUBLIC = "https://voice.example.com"


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio(new_account_sid(), TOKEN) as fake:
        yield fake


@pytest.fixture
async def log(backend: LogBackend) -> LogBackend:
    async with backend.admin() as admin:
        await ensure_topics(admin)
    return backend


def request(expires_in_s: float = 600) -> tuple[str, CallDialRequested]:
    return new_dial_id(), CallDialRequested(
        agent_id="front-desk", to_number="+15557770100", from_number="+15550100", call_id=new_call_id(),
        parameters={"customer": "Ada"}, requested_by="demo-key",
        expires_at_us=int((time.time() + expires_in_s) * 1e6), ring_timeout_s=20)


async def ask(backend: LogBackend, dial_id: str, payload: CallDialRequested) -> Event[EventPayload]:
    async with backend.producer() as producer:
        recorder = CallRecorder(EventWriter(producer), tenant_id="demo", call_id=dial_id, producer="test",
                                producer_version="0")
        event = await recorder.record(payload)
        await producer.flush()
    return event


async def dial_events(backend: LogBackend, dial_id: str, count: int) -> list[Event[EventPayload]]:
    for _ in range(150):
        async with backend.admin() as admin:
            events = (await read_call(admin, dial_id)).events
        if len(events) >= count:
            return events
        await asyncio.sleep(0.1)
    raise AssertionError(f"{dial_id}: {[e.type for e in events]}")


async def running(worker: DialWorker) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 60)
    return stop, task


def worker(backend: LogBackend, twilio: FakeTwilio, store: DialStore) -> DialWorker:
    rest = TwilioRest(twilio.account_sid, TOKEN, base_url=twilio.base_url)
    placer = TwilioPlacer(rest, PUBLIC)
    return DialWorker(backend, lambda tenant: placer, Tenants(load_tenants(DEFAULT_AGENTS_DIR)), store, backoff_s=0.05)


async def test_a_request_is_placed_once_and_an_expired_one_never(
    log: LogBackend, twilio: FakeTwilio, tmp_path: Path
) -> None:
    store = DialStore(tmp_path / "dials.db")
    dialer = worker(log, twilio, store)
    stop, task = await running(dialer)
    dial_id, payload = request()
    asked = await ask(log, dial_id, payload)
    await ask(log, dial_id, payload)  # a duplicate of the request (a client retry through the log)
    late_id, late = request(expires_in_s=-1)
    await ask(log, late_id, late)
    events = await dial_events(log, dial_id, 2)
    late_events = await dial_events(log, late_id, 2)
    stop.set()
    await task
    store.close()

    (placed,) = twilio.requests_for("create_call")
    params = placed.params
    assert params["Url"].startswith(f"{PUBLIC}/twilio/voice?dial_id={dial_id}&call_id={payload.call_id}")
    assert "p.customer=Ada" in params["Url"]
    assert params["StatusCallback"] == f"{PUBLIC}/twilio/status?dial_id={dial_id}&tenant=demo&seq=2"
    assert placed.getlist("StatusCallbackEvent") == ["initiated", "ringing", "answered", "completed"]
    outcome = events[1]
    assert isinstance(outcome.payload, CallDialPlaced)
    assert outcome.payload.provider_call_id == placed.call_sid
    assert outcome.envelope.causation_id == asked.envelope.event_id
    assert outcome.envelope.correlation_id == payload.call_id
    expired = late_events[1].payload
    assert isinstance(expired, CallDialFailed)
    assert (expired.attempt, expired.final) == (0, True)
    assert "expired" in expired.error


async def test_after_a_crash_nothing_is_dialled_twice_and_nothing_is_lost(
    log: LogBackend, twilio: FakeTwilio, tmp_path: Path
) -> None:
    store = DialStore(tmp_path / "dials.db")
    interrupted_id, interrupted = request()
    queued_id, queued = request()
    for dial_id, payload in ((interrupted_id, interrupted), (queued_id, queued)):
        event = await ask(log, dial_id, payload)
        assert store.enqueue(event.envelope, payload)
        assert not store.enqueue(event.envelope, payload), "a redelivered request is known"
    # The crash: the first was being placed (Twilio may have it), the second still waited its turn.
    store.update(interrupted_id, state="placing", next_seq=1, attempts=1)

    stop, task = await running(worker(log, twilio, store))
    given_up = await dial_events(log, interrupted_id, 2)
    placed = await dial_events(log, queued_id, 2)
    stop.set()
    await task

    failed = given_up[1].payload
    assert isinstance(failed, CallDialFailed)
    assert failed.final
    assert "not placed again" in failed.error
    assert isinstance(placed[1].payload, CallDialPlaced)
    (only,) = twilio.requests_for("create_call")
    assert only.params["Url"].split("dial_id=")[1].startswith(queued_id), "the interrupted one was not redialled"
    assert (store.state(interrupted_id), store.state(queued_id)) == ("failed", "placed")
    assert store.outbox() == [], "every outcome reached the log"
    store.close()
