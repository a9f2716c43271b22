"""Stream processors: the call registry's logic, its in-process runner on both backends (with a
restart that restores state), and the same processor as a faust-streaming worker on real Kafka."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from consumers.backends import KafkaBackend, LogBackend, ensure_topics
from consumers.processor_runner import ProcessorRunner
from producers.event_writer import CallRecorder, EventWriter
from schemas.base import Event, EventPayload
from schemas.envelope import Envelope
from schemas.topics import CALL_REGISTRY
from streams.processors.call_registry import CallEntry, CallRegistry, apply
from voxlog.sim.synthetic_calls import synthetic_call


async def record_calls(backend: LogBackend, count: int, first_index: int = 0) -> dict[str, list[Event[EventPayload]]]:
    async with backend.admin() as admin:
        await ensure_topics(admin)
    calls: dict[str, list[Event[EventPayload]]] = {}
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        for index in range(first_index, first_index + count):
            recorder = CallRecorder(
                writer,
                tenant_id=f"tenant-{index % 2}",
                call_id=f"reg-{uuid.uuid4().hex[:10]}",
                producer="test",
                producer_version="0",
            )
            calls[recorder.call_id] = [await recorder.record(p) for p in synthetic_call(index)]
        await writer.flush()
    return calls


def fold(events: list[Event[EventPayload]]) -> CallEntry:
    entry = None
    for event in events:
        if event.type.startswith("audio.") or event.type == "tool.requested":
            continue  # not on the registry's topic
        entry = apply(entry, event)
    assert entry is not None
    return entry


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def test_registry_entry_follows_the_call_and_ignores_redelivery() -> None:
    events = [_event(payload, seq) for seq, payload in enumerate(synthetic_call(4))]
    entry = fold(events)
    assert (entry.channel, entry.agent_id) == ("phone", "front-desk")
    assert not entry.live
    assert (entry.end_reason, entry.outcome) == ("caller_hangup", "resolved")
    assert entry.turns == 2
    assert entry.tool_calls == sum(1 for e in events if e.type == "tool.requested")
    again = apply(CallEntry.from_json(entry.to_json()), events[10])  # an old event delivered twice
    assert again == entry


def _event(payload: EventPayload, seq: int) -> Event[EventPayload]:
    return Event(
        Envelope(
            event_id=str(uuid.uuid4()),
            tenant_id="t",
            call_id="c",
            seq=seq,
            type=payload.EVENT_TYPE,
            schema_version=payload.EVENT_VERSION,
            event_time_us=1_000_000 + seq,
            producer="test",
            producer_version="0",
        ),
        payload,
    )


async def test_runner_builds_the_registry_and_restores_it_after_a_restart(backend: LogBackend) -> None:
    calls = await record_calls(backend, 3)
    expected = {call_id: fold(events) for call_id, events in calls.items()}

    first = CallRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(ProcessorRunner(backend, first).run(stop))
    await wait_for(lambda: all(first.entries.get(c) == e for c, e in expected.items()), 60)
    stop.set()
    await task

    # A new instance (a restarted worker) gets its state back from the output topic, then goes on.
    more = await record_calls(backend, 1, first_index=3)
    expected.update({call_id: fold(events) for call_id, events in more.items()})
    second = CallRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(ProcessorRunner(backend, second).run(stop))
    await wait_for(lambda: all(second.entries.get(c) == e for c, e in expected.items()), 60)
    stop.set()
    await task

    # What it published is what it holds: the latest registry message per call.
    async with backend.admin() as admin:
        for call_id, entry in expected.items():
            published = [r async for r in admin.read_key([CALL_REGISTRY], call_id.encode())]
            assert CallEntry.from_json(published[-1].value) == entry


@pytest.mark.kafka
@pytest.mark.slow
async def test_faust_worker_runs_the_same_processor_on_kafka(kafka_backend: KafkaBackend, tmp_path: Path) -> None:
    backend = kafka_backend
    calls = await record_calls(backend, 3)
    expected = {call_id: fold(events) for call_id, events in calls.items()}
    env = dict(os.environ, VOXLOG_KAFKA_BOOTSTRAP=backend.bootstrap)
    faust_cli = Path(sys.executable).with_name("faust")
    log_path = tmp_path / "faust.log"
    with log_path.open("wb") as log_file:
        worker = await asyncio.create_subprocess_exec(
            str(faust_cli),
            "--datadir",
            str(tmp_path / "faust-data"),
            "-A",
            "voxlog.faust_worker",
            "worker",
            "-l",
            "info",
            "--without-web",
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 120
            published: dict[str, CallEntry] = {}
            async with backend.admin() as admin:
                while published != expected:
                    assert worker.returncode is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"registry so far {published}\n{log_path.read_text()[-3000:]}"
                    for call_id in expected:
                        records = [r async for r in admin.read_key([CALL_REGISTRY], call_id.encode())]
                        if records:
                            published[call_id] = CallEntry.from_json(records[-1].value)
                    await asyncio.sleep(1.0)
        finally:
            worker.terminate()
            try:
                await asyncio.wait_for(worker.wait(), 30)
            except TimeoutError:
                worker.kill()
