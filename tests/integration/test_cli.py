"""The `voxlog` command line, run as a user runs it: a subprocess with settings in the environment."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from consumers.backends import EmbeddedBackend, KafkaBackend
from producers.event_writer import CallRecorder, EventWriter
from tests.speech import require_espeak
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.synthetic_calls import synthetic_call


def voxlog(*args: str, home: Path, kafka: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOG_") or k == "VOXLOG_KEYSTORE"}
    env.update(VOXLOG_HOME=str(home), COLUMNS="200")
    if kafka:
        env["VOXLOG_KAFKA_BOOTSTRAP"] = kafka
    return subprocess.run(
        [sys.executable, "-m", "voxlog.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def bench(*args: str, home: Path) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`voxlog bench ARGS --out FILE`, which must succeed: the figures it wrote, and what it printed."""
    out = home / "bench-figures.json"
    result = voxlog("bench", *args, "--out", str(out), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result


def test_demo_runs_end_to_end_on_the_embedded_log(tmp_path: Path) -> None:
    result = voxlog("demo", "--synthetic", "--calls", "2", home=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded log" in result.stdout
    assert "read back 2 calls from the log, 2 identical to what was written" in result.stdout
    assert "dead-lettered: 0" in result.stdout
    assert (tmp_path / "log.db").exists()

    topics = voxlog("topics", home=tmp_path)
    assert topics.returncode == 0, topics.stderr
    rows = {}
    for line in topics.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if cells[0].startswith("voxlog."):
            rows[cells[0]] = (int(cells[1]), int(cells[2]))
    assert rows["voxlog.calls"][0] == 12
    assert rows["voxlog.audio"][1] > rows["voxlog.calls"][1] > 0  # audio is most of a call


@pytest.mark.slow
def test_the_main_job_plays_every_call_and_each_replays_identically(log_bootstrap: str | None,
                                                                    tmp_path: Path) -> None:
    """The README's `voxlog demo`: real speech through the gateway, inbound and outbound, then replay."""
    kafka = log_bootstrap
    result = voxlog("demo", home=tmp_path, kafka=kafka)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "verified 4 calls, 0 diverged" in out, out
    if kafka is None:  # the calls as the gateway's background process projected them, asked through the gateway
        for outcome, calls in (("booked", 2), ("handed_off", 1), ("ticket_created", 1)):
            assert re.search(rf"{outcome}\s+│\s+{calls}\s+│", out), out
    for expected in ("book_appointment: ok", "create_ticket: ok", "handoff to +15550199", "barge-in clears: 1",
                     "calling about your recent request"):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out}"
    # What Whisper heard of the callers' natural sentences, as the session writes it (a time, a phone
    # number); the agent's answers show the scripted policy read the time from it.
    for expected in ("caller: Hi, I'd like to schedule a technician visit for tomorrow at 10:30 in the morning.",
                     "caller: My internet keeps dropping out. You can call me back at 415 555 0132.",
                     "caller: Sorry to interrupt, but my internet is down again.",
                     "caller: Yes, please book a visit for Friday at 2 pm.",
                     "at 10:30 AM. Your confirmation is", "agent: You're booked for Friday, ",
                     "at 2:00 PM. Your confirmation is"):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out}"
    # The two visits are in the demo's CalDAV calendar: Radicale's own files, one event each.
    visits = sorted((tmp_path / "caldav" / "collections" / "collection-root" / "demo" / "visits").glob("*.ics"))
    assert len(visits) == 2, visits
    assert all("SUMMARY:Visit booked by phone" in visit.read_text() for visit in visits)
    # Replay is the log's, not the demo's: the command finds the calls on its own (on the shared
    # broker, which holds other tests' calls too, each of the demo's by its id).
    if kafka is None:
        replay = voxlog("replay", "verify", "--all", home=tmp_path)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "verified 4 calls, 0 diverged" in replay.stdout, replay.stdout
        # Under the agent file that took them, QA's what-if changes none of the demo's calls.
        agent_file = DEFAULT_AGENTS_DIR / "demo" / "front-desk.yaml"
        whatif = voxlog("replay", "whatif", "--all", "--agent", str(agent_file), "--fail-on-change", home=tmp_path)
        assert whatif.returncode == 0, whatif.stdout + whatif.stderr
        assert whatif.stdout.strip().endswith("compared 4 calls, 0 changed"), whatif.stdout
    else:
        call_ids = re.findall(r"\b(call-[0-9a-f-]{36})\b", out)
        assert len(set(call_ids)) == 4, out
        for call_id in set(call_ids):
            replay = voxlog("replay", "verify", call_id, home=tmp_path, kafka=kafka)
            assert replay.returncode == 0, replay.stdout + replay.stderr
            assert "verified 1 calls, 0 diverged" in replay.stdout, replay.stdout


@pytest.mark.kafka
@pytest.mark.slow
def test_demo_runs_end_to_end_on_kafka(kafka_backend: KafkaBackend, tmp_path: Path) -> None:
    result = voxlog("demo", "--synthetic", "--calls", "2", home=tmp_path, kafka=kafka_backend.bootstrap)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kafka" in result.stdout
    assert "2 identical" in result.stdout


def test_events_tail_prints_a_call_in_seq_order(embedded_backend: EmbeddedBackend, tmp_path: Path) -> None:
    call_id = f"tail-{uuid.uuid4().hex[:8]}"

    async def record() -> int:
        async with embedded_backend.producer() as producer:
            recorder = CallRecorder(
                EventWriter(producer), tenant_id="t", call_id=call_id, producer="test", producer_version="0"
            )
            for payload in synthetic_call(1):
                await recorder.record(payload)
        return recorder.next_seq

    count = asyncio.run(record())
    result = voxlog("events", "tail", "--call", call_id, home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == count
    assert [int(line.split()[0]) for line in lines] == list(range(count))
    assert lines[0].split()[2] == "call.started"
    assert lines[-1].split()[2] == "call.ended"
    assert "audio=<160 bytes>" in result.stdout

    quiet = voxlog("events", "tail", "--call", call_id, "--no-audio", home=tmp_path)
    assert "audio." not in quiet.stdout
    assert len(quiet.stdout.splitlines()) < count


def test_events_tail_of_an_unknown_call_says_so(tmp_path: Path) -> None:
    voxlog("demo", "--synthetic", "--calls", "1", home=tmp_path)
    result = voxlog("events", "tail", "--call", "no-such-call", home=tmp_path)
    assert result.returncode == 1
    assert "no events for call no-such-call" in result.stderr


@pytest.mark.slow
def test_bench_log_writes_its_figures(tmp_path: Path) -> None:
    figures, _ = bench("log", "--events", "3000", "--rate", "1000", "--seconds", "2", home=tmp_path)
    assert figures["backend"] == "embedded"
    assert figures["append"]["events"] == figures["consume"]["events"] == 3000
    assert figures["latency"]["events"] > 1000
    assert 0 < figures["latency"]["p50_ms"] <= figures["latency"]["p99_ms"] <= figures["latency"]["max_ms"]
    assert figures["mix"]["audio.caller_chunk"] > figures["mix"]["call.started"] > 0
    raw = figures["raw_append"]
    assert raw["events"] == 3000
    assert raw["with"].startswith("plain SQLite inserts")
    ratio = figures["append"]["events_per_s"] / raw["events_per_s"]
    assert raw["ours_over_raw"] == pytest.approx(ratio, rel=0.05, abs=0.001)  # stored to 3 places
    assert not list((tmp_path / "bench").glob("raw-*")), "the scratch file is gone"


@pytest.mark.slow
def test_bench_projections_puts_each_rebuild_beside_reading_and_decoding_alone(tmp_path: Path) -> None:
    figures, result = bench("projections", "--events", "3000", "--seconds", "1", "--only", "calls", "--only", "audit",
                            home=tmp_path)
    rebuild = figures["rebuild"]
    assert list(rebuild) == ["calls", "audit"]
    for rebuilt in rebuild.values():
        reference = rebuilt["reference"]
        assert reference["events"] == rebuilt["events"] > 0  # the same records, read again
        assert 0 < reference["decoded"] < reference["events"]  # of the types it folds only (no audio, no partials)
        ratio = rebuilt["events_per_s"] / reference["events_per_s"]
        assert rebuilt["of_reference"] == pytest.approx(ratio, rel=0.05, abs=0.001)  # stored to 3 places
        assert rebuilt["rows"] > 0
    assert "of reading and decoding alone" in " ".join(result.stdout.split())  # however the console wrapped it


def test_bench_vad_compares_the_judges_on_the_noisy_line(tmp_path: Path) -> None:
    require_espeak()
    figures, _ = bench("vad", "--judge", "energy", "--judge", "silero", home=tmp_path)
    assert list(figures["judges"]) == ["energy", "silero"]
    for judge in figures["judges"].values():
        clean = judge["lines"]["clean"]
        assert (clean["utterances"], clean["missed"], clean["stuck"], clean["false_starts"]) == (24, 0, 0, 0)
        assert len(judge["lines"]) == 1 + 6 * 3
        assert judge["all"]["cpu_us_per_frame"] > 0
    energy, silero = (figures["judges"][k]["noisy"] for k in ("energy", "silero"))
    assert silero["missed"] + silero["stuck"] < (energy["missed"] + energy["stuck"]) / 4  # why Silero is the default
    refused = voxlog("bench", "vad", "--judge", "loud", "--out", str(tmp_path / "vad.json"), home=tmp_path)
    assert refused.returncode == 2
    assert "no judge loud; there are energy, webrtc, silero" in refused.stderr


def test_bench_on_kafka_needs_a_bootstrap(tmp_path: Path) -> None:
    result = voxlog("bench", "log", "--backend", "kafka", "--out", str(tmp_path / "x.json"), home=tmp_path)
    assert result.returncode == 2
    assert "VOXLOG_KAFKA_BOOTSTRAP" in result.stderr


def test_replay_verify_reports_identical_calls_and_the_first_divergence(embedded_backend: EmbeddedBackend,
                                                                       tmp_path: Path) -> None:
    from dataclasses import replace

    from schemas.events import CallAnswered, CallStarted, TranscriptFinal, TtsRequested
    from streams.config.agents import load_agents
    from voxlog.sim.core_calls import CoreSim

    agent = load_agents(DEFAULT_AGENTS_DIR)[0]

    def recorded_call(call_id: str) -> CoreSim:
        sim = CoreSim(agent, call_id=call_id)
        sim.feed(CallStarted(channel="phone", direction="inbound", agent_id=agent.id, agent_version=agent.version,
                             routed_by="number"))
        sim.feed(CallAnswered(answered_by=None))
        sim.feed(TranscriptFinal(utterance_id="u0", text="my internet is down", confidence=0.9, provider="p",
                                 model="m", start_ms=0, end_ms=1, latency_ms=1))
        return sim

    good = recorded_call("call-good")
    bad = recorded_call("call-bad")
    greeting = next(i for i, e in enumerate(bad.events) if isinstance(e.payload, TtsRequested))
    bad.events[greeting] = replace(bad.events[greeting], payload=replace(bad.events[greeting].payload, text="Hi."))

    async def write() -> None:
        async with embedded_backend.producer() as producer:
            writer = EventWriter(producer)
            for event in [*good.events, *bad.events]:
                await writer.append(event)

    asyncio.run(write())
    one = voxlog("replay", "verify", "call-good", home=tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "call-good: identical (" in one.stdout
    assert one.stdout.strip().endswith("verified 1 calls, 0 diverged")

    everything = voxlog("replay", "verify", "--all", home=tmp_path)
    assert everything.returncode == 1
    assert f"call-bad: diverged at seq {greeting} (tts.requested)" in everything.stdout
    assert everything.stdout.strip().endswith("verified 2 calls, 1 diverged")
    # Piped, its progress is plain lines on standard error (voxlog.progress), its result alone on standard output.
    progress = everything.stderr.splitlines()
    assert any(re.fullmatch(r"replay verify: finding calls: (\d+)/\1 records \(100%\) in [\d.]+ s(, [\d.]+ records/s)?",
                            line) for line in progress), everything.stderr
    assert any(re.fullmatch(r"replay verify: 2/2 calls \(100%\) in [\d.]+ s(, [\d.]+ calls/s)?", line)
               for line in progress), everything.stderr
    assert "replay verify:" not in everything.stdout
    assert "replay verify:" not in one.stderr  # one call: nothing to wait for


@pytest.mark.slow
def test_bench_calls_measures_what_voxlog_adds(tmp_path: Path) -> None:
    figures, _ = bench("calls", "--calls", "3", "--turns", "2", "--history-events", "2000", "--vad", "energy",
                       home=tmp_path)
    assert figures["vad"] == ["energy"]
    assert figures["failed_calls"] == []
    assert figures["turns_measured"] == 6  # two turns per call
    assert figures["history_events"] == 2000
    assert figures["callers_cpu_s"] > 0  # the load generator's own cost, reported beside the gateway's
    assert figures["gateway_cpu_s_per_call_minute"] > 0
    # The event loop's thread is part of the gateway's process: its share is some of the process's.
    assert 0 < figures["gateway_loop_cpu_share"] <= figures["gateway_cpu_share"]
    for lag in (figures["gateway_loop_lag_ms"], figures["callers_loop_lag_ms"]):  # both loops sampled all run long
        assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert figures["commit"], "the result names the code that made it"
    assert figures["gateway_peak_rss_mb"] > 50  # the interpreter and its libraries at least
    # The started gateway took its heap out of the collector's full passes (streams/startup_heap.py).
    assert figures["gateway_collector"]["frozen_objects_least"] > 10_000
    assert figures["scripted_ms"]["total"] == 700 + 150 + 300 + 120
    # What voxlog adds cannot be negative beyond a frame's worth of measuring granularity.
    assert -25 < figures["added_latency_ms"]["p50"] <= figures["added_latency_ms"]["p99"]
    assert figures["pacing_jitter_ms"]["frames"] > 50
    assert figures["events_per_s"] > 0


@pytest.mark.slow
def test_bench_calls_past_capacity_measures_the_refusals_and_the_admitted_calls(tmp_path: Path) -> None:
    figures, result = bench("calls", "--calls", "6", "--max-calls", "3", "--turns", "2", home=tmp_path)
    assert (figures["capacity"], figures["admitted_calls"], figures["refused_calls"]) == (3, 3, 3)
    assert figures["failed_calls"] == []
    assert figures["turns_measured"] == 6, "the admitted calls' turns"
    assert 0 < figures["refusal_ms"]["p50"] <= figures["refusal_ms"]["p99"]
    assert "told busy" in result.stdout


@pytest.mark.slow
def test_bench_calls_spreads_phone_calls_over_replicas(tmp_path: Path) -> None:
    """`--gateways 2`: two gateway processes behind one public address, each call's webhook signed over that
    address and sent to the next replica in turn, its stream to the replica that answered; the capacity
    asked for is shared out between them."""
    figures, _ = bench("calls", "--calls", "4", "--gateways", "2", "--max-calls", "6", "--turns", "2",
                       "--vad", "energy", home=tmp_path)
    assert (figures["gateways"], figures["capacity"], figures["admitted_calls"]) == (2, 6, 4)
    assert figures["calls_by_gateway"] == [2, 2], "each replica ran the calls the balancer gave it"
    assert figures["failed_calls"] == []
    assert figures["turns_measured"] == 8
    assert figures["vad"] == ["energy"], "the replicas run the benchmark's agents"
    assert -25 < figures["added_latency_ms"]["p50"] <= figures["added_latency_ms"]["p99"]
    # The busiest replica's loop: part of one replica's CPU, so under the replicas' sum.
    assert 0 < figures["gateway_loop_cpu_share"] < figures["gateway_cpu_share"]
    assert 0 <= figures["gateway_loop_lag_ms"]["p50"] <= figures["gateway_loop_lag_ms"]["max"], "each replica sampled"
    assert figures["front_cpu_s"] is None, "by phone the callers play the balancer"
    assert figures["gateway_collector"]["frozen_objects_least"] > 10_000, "each replica froze its startup heap"
    assert figures["events"] > 4 * 50, "each replica's log counted"
    refused = voxlog("bench", "calls", "--channel", "sip", "--gateways", "2", "--out", str(tmp_path / "calls.json"),
                     home=tmp_path)
    assert refused.returncode != 0
    assert "--gateways" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_analysts_query_the_tables_and_compliance_checks_the_trail(tmp_path: Path) -> None:
    assert voxlog("demo", "--synthetic", "--calls", "3", home=tmp_path).returncode == 0
    totals = "SELECT count() AS calls, sum(turns) AS turns FROM calls"
    counted = voxlog("sql", "--format", "json", totals, home=tmp_path)
    assert counted.returncode == 0, counted.stdout + counted.stderr
    assert json.loads(counted.stdout) == {"calls": 3, "turns": 6}, counted.stdout
    p95 = voxlog("sql", "SELECT agent_id, quantile(0.95)(voice_to_voice_ms) FROM turns GROUP BY agent_id",
                 home=tmp_path)
    assert p95.returncode == 0, p95.stdout + p95.stderr
    assert "front-desk" in p95.stdout

    for forbidden in ("DROP TABLE calls", "INSERT INTO calls (call_id) VALUES ('x')"):
        refused = voxlog("sql", forbidden, home=tmp_path)
        assert refused.returncode == 1, refused.stdout
        assert "readonly" in refused.stdout.lower() or "read-only" in refused.stdout.lower(), refused.stdout
    bad = voxlog("sql", "SELECT nonsense FROM nowhere", home=tmp_path)
    assert bad.returncode == 1
    assert "nowhere" in bad.stdout

    verified = voxlog("audit", "verify", "--tenant", "demo", home=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    tools = json.loads(voxlog("sql", "--format", "json", "SELECT count() AS n FROM tool_calls", home=tmp_path).stdout)
    # the three consents and every tool call with a side effect
    assert f"intact: {3 + tools['n']} records" in verified.stdout, verified.stdout
    call_id = json.loads(voxlog("sql", "--format", "json", "SELECT call_id FROM calls WHERE tool_calls > 0 LIMIT 1",
                                home=tmp_path).stdout)["call_id"]
    exported = voxlog("audit", "export", "--call", call_id, home=tmp_path)
    actions = [json.loads(line)["action"] for line in exported.stdout.splitlines()]
    assert actions[0] == "consent.given"
    assert "tool.requested" in actions

    rebuilt = voxlog("projections", "rebuild", "calls", home=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    again = voxlog("sql", "--format", "json", totals, home=tmp_path)
    assert json.loads(again.stdout) == {"calls": 3, "turns": 6}
    unknown = voxlog("projections", "rebuild", "nothing", home=tmp_path)
    assert unknown.returncode != 0
    assert "no projection nothing" in unknown.stdout + unknown.stderr


def test_projections_status_on_a_fresh_home_says_nothing_has_been_read(tmp_path: Path) -> None:
    """It failed with ClickHouse's UNKNOWN_TABLE before any projection had run."""
    done = voxlog("projections", "status", home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no projection has read the log yet" in done.stdout
