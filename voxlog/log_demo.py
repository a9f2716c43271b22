"""The main job on the embedded default: synthetic calls written, consumed and read back.

Every call is recorded event by event as a session would record it, consumed by a consumer group
that counts what it sees, then read back from the log per call (merged across topics by seq) and
compared byte for byte with what was written.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import EventConsumer, read_call
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import TopicPartition
from schemas.topics import CALL_TOPICS
from schemas.version import __version__
from voxlog.sim.synthetic_calls import synthetic_call


@dataclass
class CallReport:
    call_id: str
    channel: str
    events: int
    audio_chunks: int
    turns: int
    tool_calls: int
    barge_ins: int
    read_back: str  # "identical" or where it first differs


@dataclass
class DemoReport:
    calls: list[CallReport]
    consumed: Counter[str] = field(default_factory=Counter)
    dead_lettered: int = 0

    @property
    def all_identical(self) -> bool:
        return all(c.read_back == "identical" for c in self.calls)


async def run_demo(backend: LogBackend, *, calls: int = 3, tenant_id: str = "demo") -> DemoReport:
    codec = backend.codec
    async with backend.admin() as admin:
        await ensure_topics(admin)
        began_ms = int(time.time() * 1000)
        # Where the log ends now: the demo's consumer group starts there, not at offset 0.
        log_end = {TopicPartition(t, p): o for t in CALL_TOPICS for p, o in (await admin.end_offsets(t)).items()}
        written: dict[str, list[bytes]] = {}
        async with backend.producer() as producer:
            writer = EventWriter(producer, codec)
            for index in range(calls):
                recorder = CallRecorder(
                    writer,
                    tenant_id=tenant_id,
                    call_id=f"call-{uuid.uuid4().hex[:12]}",
                    producer="voxlog.demo",
                    producer_version=__version__,
                )
                written[recorder.call_id] = [codec.encode(await recorder.record(p)) for p in synthetic_call(index)]
            await writer.flush()

        report = DemoReport(calls=[])
        expected = {call_id: len(events) for call_id, events in written.items()}
        seen: Counter[str] = Counter()
        async with (
            backend.producer() as dead_letters,
            backend.consumer(
                CALL_TOPICS, group_id=f"voxlog-demo-{uuid.uuid4().hex[:8]}", auto_offset_reset="latest"
            ) as consumer,
        ):
            events = EventConsumer(consumer, dead_letters, name="voxlog-demo", codec=codec)
            positioned: set[TopicPartition] = set()
            deadline = time.monotonic() + 60
            while any(seen[c] < n for c, n in expected.items()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"consumed {sum(seen.values())} of {sum(expected.values())} events")
                for tp in consumer.assignment() - positioned:  # Kafka assigns during the first polls
                    await consumer.seek(tp, log_end.get(tp, 0))
                    positioned.add(tp)
                batch = await events.poll(timeout_s=0.5)
                for item in batch:
                    if item.event.call_id in expected:
                        seen[item.event.call_id] += 1
                        report.consumed[item.event.type] += 1
                await events.commit()
            report.dead_lettered = events.dead_lettered

        for call_id, originals in written.items():
            history = await read_call(admin, call_id, codec, since_ms=began_ms)
            replayed = [codec.encode(e) for e in history.events]
            types = Counter(e.type for e in history.events)
            verdict = "identical"
            if history.undecodable:
                verdict = f"{len(history.undecodable)} undecodable"
            elif replayed != originals:
                first = next(
                    (i for i, (a, b) in enumerate(zip(originals, replayed, strict=False)) if a != b),
                    min(len(originals), len(replayed)),
                )
                verdict = f"differs at seq {first}"
            started = history.events[0].payload if history.events else None
            report.calls.append(
                CallReport(
                    call_id=call_id,
                    channel=getattr(started, "channel", "?"),
                    events=len(history.events),
                    audio_chunks=types["audio.caller_chunk"] + types["audio.agent_chunk"],
                    turns=types["turn.taken"],
                    tool_calls=types["tool.requested"],
                    barge_ins=types["turn.barge_in"],
                    read_back=verdict,
                )
            )
        return report
