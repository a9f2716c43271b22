"""`voxlog bench log`: what the event log costs, measured on a realistic mix of call events.

Two phases on one backend:
1. throughput: append N events as fast as the writer takes them (encoding included, as the hot path
   pays it), flush, then consume them all (decoding included); beside it, the same messages, already
   encoded, written with the store's own API and nothing of ours (`voxlog.bench_raw`), as a ratio;
2. latency: append at a steady rate (default 5,000 events/s: 100 calls' worth of caller audio plus
   their transcripts and decisions) while a consumer in the same process reads them, and measure
   produce-to-consume latency from each event's own timestamp.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend, ensure_topics
from consumers.event_reader import EventConsumer
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import TopicPartition
from schemas.base import Event, EventPayload
from schemas.codec import EventCodec
from schemas.topics import CALL_TOPICS, CALLS
from schemas.version import __version__
from voxlog.bench_raw import (
    PRODUCER_PERFORMANCE,
    RawMessage,
    java_producer_performance,
    kafka_tools_classpath,
    raw_aiokafka_append,
    raw_sqlite_append,
)
from voxlog.progress import progress
from voxlog.sim.synthetic_calls import concurrent_calls


@dataclass
class Phase:
    events: int
    seconds: float
    events_per_s: float


@dataclass
class Latency:
    target_rate: int
    achieved_rate: float
    seconds: float
    events: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (0..1) of `values`: the nearest rank, no interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Recorders:
    """One recorder per synthetic call, on fresh call ids for this run."""

    def __init__(self, writer: EventWriter, run: str) -> None:
        self.writer = writer
        self.run = run
        self.by_index: dict[int, CallRecorder] = {}

    def __getitem__(self, index: int) -> CallRecorder:
        found = self.by_index.get(index)
        if found is None:
            found = self.by_index[index] = CallRecorder(
                self.writer,
                tenant_id="bench",
                call_id=f"bench-{self.run}-{index}",
                producer="voxlog.bench",
                producer_version=__version__,
            )
        return found


PROGRESS_EVERY = 1000
"""Events appended between two reports of progress: a report is no cost next to a thousand appends."""
CODEC_SAMPLE = 20_000
"""Events of the mix whose encoding and decoding are timed alone (the cost of sealing)."""


def codec_costs(keyed: EventCodec, events: list[Event[EventPayload]], passes: int = 5) -> dict[str, Any]:
    """Microseconds per event to encode and to decode, sealing personal data (the backend's codec, with
    its keystore) and in the clear, for the audio chunks alone and for the whole mix; medians of
    `passes`, CPU time (the process's), so another process on the machine does not count."""
    clear = EventCodec()
    out: dict[str, Any] = {}
    audio = [e for e in events if e.type.startswith("audio.")]
    for label, subset in (("audio_chunk", audio), ("mix", events)):
        row: dict[str, Any] = {"events": len(subset)}
        for name, codec in (("sealed", keyed), ("clear", clear)):
            data = [codec.encode(e) for e in subset]  # also warms the keys' cache
            for step in ("encode", "decode"):
                times = []
                for _ in range(passes):
                    began = time.process_time()
                    if step == "encode":
                        for event in subset:
                            codec.encode(event)
                    else:
                        for message in data:
                            codec.decode(message)
                    times.append((time.process_time() - began) / len(subset) * 1e6)
                row[f"{name}_{step}_us"] = round(statistics.median(times), 2)
        for step in ("encode", "decode"):
            row[f"{step}_ratio"] = round(row[f"sealed_{step}_us"] / row[f"clear_{step}_us"], 2)
        out[label] = row
    return out


async def _end_offsets(backend: LogBackend) -> dict[TopicPartition, int]:
    async with backend.admin() as admin:
        return {TopicPartition(t, p): o for t in CALL_TOPICS for p, o in (await admin.end_offsets(t)).items()}


async def _consume(
    backend: LogBackend,
    codec: EventCodec,
    run: str,
    until: int,
    *,
    start: dict[TopicPartition, int] | None = None,
    latencies: list[float] | None = None,
    ready: asyncio.Event | None = None,
    timeout_s: float = 30.0,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """Reads this run's events until `until` of them arrived; returns (count, seconds).

    Reads from `start` (the end of the log before the run), or from the end when `start` is None,
    so earlier runs' events in a long-lived log are not read at all.
    """
    seen = 0
    prefix = f"bench-{run}-"
    async with (
        backend.producer() as dead_letters,
        backend.consumer(CALL_TOPICS, auto_offset_reset="latest" if start is None else "earliest") as consumer,
    ):
        for tp, offset in (start or {}).items():
            await consumer.seek(tp, offset)
        events = EventConsumer(consumer, dead_letters, name="voxlog-bench", codec=codec)
        if ready is not None:
            ready.set()
        began = time.perf_counter()
        last_progress = time.monotonic()
        while seen < until:
            batch = await events.poll(timeout_s=0.5, max_records=5000)
            now_us = time.time_ns() // 1000
            before = seen
            for item in batch:
                if item.event.call_id.startswith(prefix):
                    seen += 1
                    if latencies is not None:
                        latencies.append((now_us - item.event.envelope.event_time_us) / 1000)
            if on_progress is not None and seen > before:
                on_progress(seen - before)
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > timeout_s:
                raise TimeoutError(f"consumed {seen} of {until} events")
        elapsed = time.perf_counter() - began
    return seen, elapsed


async def bench_log(
    backend: LogBackend, *, events: int, rate: int = 5000, seconds: float = 10.0, concurrent: int = 100
) -> dict[str, Any]:
    codec = backend.codec
    async with backend.admin() as admin:
        await ensure_topics(admin)

    # Phase 1: throughput.
    run = uuid.uuid4().hex[:8]
    log_end = await _end_offsets(backend)
    mix: Counter[str] = Counter()
    source = concurrent_calls(concurrent)
    payloads = [next(source) for _ in range(events)]
    # The pre-made workload is not what a live session holds; keep the collector from walking it.
    gc.collect()
    gc.freeze()
    for _, payload in payloads:
        mix[payload.EVENT_TYPE] += 1
    async with backend.producer() as producer:
        writer = EventWriter(producer, codec)
        recorders = _Recorders(writer, run)
        with progress("bench log: append", total=events, unit="events") as appended:
            start = time.perf_counter()
            for count, (index, payload) in enumerate(payloads, 1):
                await recorders[index].record(payload)
                if count % PROGRESS_EVERY == 0:
                    appended(PROGRESS_EVERY)
            await writer.flush()
            append_s = time.perf_counter() - start
            appended.update(events)
        sample = _Recorders(writer, f"{run}-codec")
        codec_events = [sample[index].make(payload) for index, payload in payloads[:CODEC_SAMPLE]]
        raw = _Recorders(writer, f"{run}-raw")
        raw_messages = [(raw[index].call_id.encode(), codec.encode(raw[index].make(payload)))
                        for index, payload in payloads]
    with progress("bench log: consume", total=events, unit="events") as read:
        consumed, consume_s = await _consume(backend, codec, run, events, start=log_end, on_progress=read)
    async with backend.admin() as admin:
        partitions = len(await admin.end_offsets(CALLS))  # the scratch topics': as many as voxlog.calls
    raw_s = await _raw_append(backend, raw_messages, run, partitions)
    java = await _java_reference(backend, raw_messages, run, partitions, events / append_s) \
        if isinstance(backend, KafkaBackend) else None
    del raw_messages

    # Phase 2: produce-to-consume latency at a steady rate, consumer running alongside.
    run2 = uuid.uuid4().hex[:8]
    total = int(rate * seconds)
    latencies: list[float] = []
    ready = asyncio.Event()
    consumer_task = asyncio.create_task(_consume(backend, codec, run2, total, latencies=latencies, ready=ready))
    await asyncio.wait_for(ready.wait(), 60)  # the consumer is at the end of the log before the clock starts
    async with backend.producer() as producer:
        writer = EventWriter(producer, codec)
        recorders = _Recorders(writer, run2)
        source = concurrent_calls(concurrent)
        tick_s = 0.002
        with progress(f"bench log: latency at {rate} events/s", total=total, unit="events") as produced:
            start = time.perf_counter()
            sent = 0
            while sent < total:
                due = min(total, int((time.perf_counter() - start) * rate) + 1)
                produced(due - sent)
                while sent < due:
                    index, payload = next(source)
                    await recorders[index].record(payload)
                    sent += 1
                await asyncio.sleep(tick_s)
            produce_s = time.perf_counter() - start
            await writer.flush()
    await consumer_task
    steady = latencies[len(latencies) // 20 :]  # the first 5% include connection and fetch warm-up

    return {
        **run_facts("log"),
        "backend": backend.name,
        "target": backend.describe(),
        "mix": dict(mix.most_common()),
        "sealing": backend.keys is not None,
        "codec": codec_costs(codec, codec_events),
        "append": asdict(Phase(events, round(append_s, 3), round(events / append_s))),
        "raw_append": {**asdict(Phase(events, round(raw_s, 3), round(events / raw_s))),
                       "with": RAW_REFERENCE[backend.name], "ours_over_raw": round(raw_s / append_s, 3)},
        "java_producer": java,
        "consume": asdict(Phase(consumed, round(consume_s, 3), round(consumed / consume_s))),
        "latency": asdict(
            Latency(
                target_rate=rate,
                achieved_rate=round(total / produce_s),
                seconds=round(produce_s, 2),
                events=len(steady),
                p50_ms=round(statistics.median(steady), 2),
                p99_ms=round(percentile(steady, 0.99), 2),
                max_ms=round(max(steady), 2),
            )
        ),
    }


RAW_REFERENCE = {"embedded": "plain SQLite inserts (voxlog.bench_raw)",
                 "kafka": "aiokafka's batch API (voxlog.bench_raw)"}


async def _raw_append(backend: LogBackend, messages: list[RawMessage], run: str, partitions: int) -> float:
    """Seconds to write `messages` with the store's own API: a scratch SQLite file beside the log, or a
    scratch topic (deleted after) of `partitions`."""
    with progress("bench log: raw reference", unit="events") as wrote:
        if isinstance(backend, EmbeddedBackend):
            seconds = await asyncio.to_thread(raw_sqlite_append, backend.path.with_name(f"raw-{run}.db"), messages)
        elif isinstance(backend, KafkaBackend):
            seconds = await raw_aiokafka_append(backend.bootstrap, f"voxlog.bench.raw-{run}", partitions, messages)
        else:
            raise ValueError(f"no raw reference for the {backend.name} log")
        wrote.update(len(messages))
    return seconds


async def _java_reference(backend: KafkaBackend, messages: list[RawMessage], run: str, partitions: int,
                          ours_per_s: float) -> dict[str, Any]:
    """Kafka's own Java producer benchmark, as many records of the messages' mean size, beside ours; or
    why it could not run (no kafka-tools jar, no java)."""
    classpath = kafka_tools_classpath()
    if classpath is None:
        return {"skipped": "no kafka-tools jar: run tools/kafka/broker.sh classpath, or set "
                           "VOXLOG_KAFKA_TOOLS_CLASSPATH"}
    size = round(sum(len(value) for _, value in messages) / len(messages))
    with progress(f"bench log: {PRODUCER_PERFORMANCE}", unit="events") as wrote:
        try:
            per_s = await java_producer_performance(backend.bootstrap, f"voxlog.bench.java-{run}", partitions,
                                                    len(messages), size, classpath)
        except RuntimeError as exc:
            return {"skipped": str(exc)}
        wrote.update(len(messages))
    return {"with": PRODUCER_PERFORMANCE, "records": len(messages), "record_size": size,
            "events_per_s": round(per_s), "ours_over_java": round(ours_per_s / per_s, 3)}


def run_facts(benchmark: str) -> dict[str, Any]:
    """What every benchmark's result starts with: which one, voxlog's version and commit, when, on what machine."""
    return {"benchmark": benchmark, "version": __version__, "commit": source_commit(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                        "platform": platform.platform()}}


def source_commit() -> str | None:
    """The git commit voxlog runs from, `+modified` when tracked files differ from it; None outside a
    checkout (an installed wheel). A figure is only a result beside the code that made it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+modified" if changes else head


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The processor's name as Linux gives it in `cpuinfo` (/proc/cpuinfo's text; read when not given),
    since machines of one kind differ (EPYC against Xeon): x86's "model name"; else a board's "Model" or
    "Hardware"; else an ARM core's implementer and part numbers; else the architecture alone."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    for name in ("model name", "Model", "Hardware"):
        if fields.get(name):
            return fields[name]
    if fields.get("CPU implementer") and fields.get("CPU part"):
        return f"{platform.machine() or 'ARM'} implementer {fields['CPU implementer']} part {fields['CPU part']}"
    return platform.machine() or None


def write_result(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
