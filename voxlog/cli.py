"""The `voxlog` command line."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import enum
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import quote

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend, ensure_topics
from consumers.event_reader import EventConsumer, read_call
from projections.projection import PROJECTION_NAMES
from schemas.topics import CALL_TOPICS
from schemas.version import __version__
from streams.audio.vad import VAD_KINDS, VadKind
from streams.config.agents import AgentRouter, load_agents
from streams.config.tenants import Tenants, TenantSpec, load_tenants
from streams.keystore.data_keys import DataKeyStore
from voxlog.backends import keystore_at, log_backend, recording_store
from voxlog.describe import describe
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    from projections.audit import AuditReport
    from projections.signing_keys import SigningKey
    from projections.vcon_export import CallMaterial
    from streams.call.replay import ReplayResult
    from streams.call.whatif import WhatIfResult
    from voxlog.analytics import Analytics

app = typer.Typer(help="voxlog: an AI voice agent whose system of record is an event log.", no_args_is_help=True)
events_app = typer.Typer(help="Read events from the log.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks; results go to a JSON file.", no_args_is_help=True)
replay_app = typer.Typer(help="Replay recorded calls through the core.", no_args_is_help=True)
projections_app = typer.Typer(help="The ClickHouse tables built from the log.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
compliance_app = typer.Typer(help="Callers' personal data: its keys, retention, erasures (docs/compliance.md).",
                             no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(bench_app, name="bench")
app.add_typer(replay_app, name="replay")
app.add_typer(projections_app, name="projections")
app.add_typer(audit_app, name="audit")
app.add_typer(compliance_app, name="compliance")
export_app = typer.Typer(help="A call out of voxlog, as a standard container.", no_args_is_help=True)
app.add_typer(export_app, name="export")
integrations_app = typer.Typer(help="The tenants' own systems: CRM, ticket desk, calendar, webhooks "
                               "(docs/integrations.md).", no_args_is_help=True)
app.add_typer(integrations_app, name="integrations")
console = Console(soft_wrap=True)


def agents_router(settings: Settings) -> AgentRouter:
    return AgentRouter(load_agents(settings.agents_dir or DEFAULT_AGENTS_DIR))


def _backend() -> LogBackend:
    return log_backend(Settings())


@app.command()
def version() -> None:
    """Print voxlog's version."""
    console.print(__version__)


@app.command()
def demo(
    synthetic: Annotated[
        bool, typer.Option(help="Instead of real calls, write synthetic calls to the log and read them back.")
    ] = False,
    calls: Annotated[int, typer.Option(min=1, help="With --synthetic: how many calls.")] = 3,
) -> None:
    """Run the main job end to end on the configured backend (embedded by default): complete calls
    played into the gateway as Twilio plays them, then their transcripts, latencies and replay checks."""
    if synthetic:
        _synthetic_demo(calls)
        return
    from voxlog.calls_demo import ANALYTICS_QUERY, SCRIPTS, run_calls_demo

    settings = Settings()
    console.print(f"[bold]voxlog demo[/]: {len(SCRIPTS)} calls through the gateway on "
                  f"{log_backend(settings).describe()}, offline speech (Whisper tiny.en and pocketsphinx hear, "
                  "flite speaks), the offline scripted policy; visits booked into a CalDAV calendar on a Radicale "
                  f"server voxlog runs ({settings.home / 'caldav'}), tickets into voxlog's own desk")
    results, summary = asyncio.run(run_calls_demo(settings))
    diverged = 0
    for call in results:
        console.print(f"\n[bold]{call.script.name}[/] {call.call_id}")
        for speaker, text in call.transcript:
            console.print(f"  {speaker:>6}: {text}")
        for tool in call.tools:
            console.print(f"  {'action':>6}: {tool}")
        latencies = ", ".join(f"{ms:.0f} ms" for ms in call.latencies_ms) or "-"
        console.print(f"  ended: {call.end_reason} ({call.outcome}); barge-in clears: {call.clears}; "
                      f"voice-to-voice per turn: {latencies}")
        if call.replay is None or not call.replay.identical:
            diverged += 1
            reason = call.replay.divergence if call.replay else "no events"
            console.print(f"  replay: [red]diverged[/] {reason}")
        else:
            console.print(f"  replay: identical ({call.replay.decisions} decisions)")
    if summary is not None:
        table = Table(*summary.columns, title=f'voxlog sql "{ANALYTICS_QUERY}"')
        for row in summary.rows:
            table.add_row(*(str(v) for v in row))
        console.print()
        console.print(table)
    console.print(f"\nverified {len(results)} calls, {diverged} diverged")
    if diverged:
        raise typer.Exit(1)


def _synthetic_demo(calls: int) -> None:
    from voxlog.log_demo import run_demo

    backend = _backend()
    console.print(f"[bold]voxlog demo --synthetic[/] on {backend.describe()}")
    report = asyncio.run(run_demo(backend, calls=calls))
    table = Table("call", "channel", "events", "audio chunks", "turns", "tool calls", "barge-ins", "read back")
    for c in report.calls:
        table.add_row(c.call_id, c.channel, str(c.events), str(c.audio_chunks), str(c.turns), str(c.tool_calls),
                      str(c.barge_ins), c.read_back)
    console.print(table)
    consumed = ", ".join(f"{t} {n}" for t, n in sorted(report.consumed.items()))
    console.print(
        f"consumed by a consumer group: {sum(report.consumed.values())} events ({consumed}); "
        f"dead-lettered: {report.dead_lettered}"
    )
    identical = sum(c.read_back == "identical" for c in report.calls)
    console.print(f"read back {len(report.calls)} calls from the log, {identical} identical to what was written")
    if not report.all_identical:
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Start the gateway (Twilio webhooks and media streams, the web widget) and, unless
    VOXLOG_RUN_WORKERS=false, the tool worker, on the configured backends."""
    from voxlog.serving import gateway_server

    # A native fault (PJSIP, onnxruntime, chDB run in this process) would end it without a word: this
    # writes every thread's Python stack to standard error first.
    faulthandler.enable()
    settings = Settings()
    console.print(f"voxlog gateway on http://{host}:{port} ({log_backend(settings).describe()}); "
                  f"widget at http://{host}:{port}/widget")
    gateway_server(settings, host, port).run()


async def _make_topics(backend: LogBackend) -> None:
    async with backend.admin() as admin:
        await ensure_topics(admin)  # faust ignores source topics that do not exist yet


@app.command()
def workers() -> None:
    """Run the stream processors: in-process on the embedded log, as a faust worker on Kafka."""
    settings = Settings()
    backend = log_backend(settings)
    asyncio.run(_make_topics(backend))
    if isinstance(backend, KafkaBackend):
        faust_cli = Path(sys.executable).with_name("faust")
        os.execv(faust_cli, [str(faust_cli), "-A", "voxlog.faust_worker", "worker", "-l", "info",
                             "--without-web"])

    from consumers.processor_runner import default_processors, run_processors

    stop = asyncio.Event()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        console.print(f"stream processors on {backend.describe()}; Ctrl-C stops them")  # true from here on
        await run_processors(backend, default_processors(), stop)

    asyncio.run(run())


@app.command()
def topics() -> None:
    """List the topics with their partition and message counts."""
    backend = _backend()

    async def run() -> None:
        async with backend.admin() as admin:
            infos = await admin.topics()
        table = Table("topic", "partitions", "messages", title=backend.describe())
        for info in infos:
            table.add_row(info.name, str(info.partitions), str(info.messages))
        console.print(table)

    asyncio.run(run())


@events_app.command("tail")
def events_tail(
    call: Annotated[str, typer.Option("--call", help="Call id whose events to print, in seq order.")],
    audio: Annotated[bool, typer.Option(help="Include audio chunk events.")] = True,
    since: Annotated[
        datetime.datetime | None,
        typer.Option(help="No later than the call's start (UTC): on Kafka, the scan starts there, not at offset 0."),
    ] = None,
) -> None:
    """Print one call's events in order, decoded, from either backend."""
    backend = _backend()
    since_ms = None if since is None else int(since.replace(tzinfo=since.tzinfo or datetime.UTC).timestamp() * 1000)

    async def run() -> int:
        async with backend.admin() as admin:
            history = await read_call(admin, call, since_ms=since_ms)
        for event in history.events:
            if audio or not event.type.startswith("audio."):
                typer.echo(describe(event))
        for record, reason in history.undecodable:
            typer.echo(f"undecodable {record.topic}/{record.partition}@{record.offset}: {reason}", err=True)
        if not history.events and not history.undecodable:
            typer.echo(f"no events for call {call} in {backend.describe()}", err=True)
            return 1
        return 0

    raise typer.Exit(asyncio.run(run()))


@events_app.command("follow")
def events_follow(
    group: Annotated[str | None, typer.Option(help="Consumer group; default: read everything, commit nothing.")] = None,
    audio: Annotated[bool, typer.Option(help="Include audio chunk events.")] = False,
) -> None:
    """Print events as they arrive on the call topics, until interrupted."""
    backend = _backend()

    async def run() -> None:
        async with backend.producer() as dead_letters, backend.consumer(CALL_TOPICS, group_id=group) as consumer:
            events = EventConsumer(consumer, dead_letters, name=group or "voxlog-events-follow")
            while True:
                for item in await events.poll(timeout_s=1.0):
                    if audio or not item.event.type.startswith("audio."):
                        typer.echo(f"{item.event.call_id} {describe(item.event)}")
                if group:
                    await events.commit()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@replay_app.command("verify")
def replay_verify(
    call: Annotated[str | None, typer.Argument(help="Call id to verify.")] = None,
    all_calls: Annotated[bool, typer.Option("--all", help="Verify every call in the log.")] = False,
) -> None:
    """Rebuild each call's decisions from its recorded events; print identical or the first divergence."""
    from voxlog.progress import progress
    from voxlog.replaying import recorded_call_ids, verify_calls

    if (call is None) == (not all_calls):
        raise typer.BadParameter("give a CALL_ID or --all")
    settings = Settings()
    backend, router = log_backend(settings), agents_router(settings)

    async def verify_all() -> list[ReplayResult]:  # progress on standard error; the results stay on standard output
        with progress("replay verify: finding calls", unit="records") as read:
            ids = await recorded_call_ids(backend, read.update)
        with progress("replay verify", total=len(ids), unit="calls") as verified:
            return await verify_calls(backend, router, ids, verified)

    results = asyncio.run(verify_calls(backend, router, [call]) if call is not None else verify_all())
    diverged = erased = 0
    for result in results:
        if result.identical:
            typer.echo(f"{result.call_id}: identical ({result.decisions} decisions)")
        elif result.erased:
            erased += 1
            typer.echo(f"{result.call_id}: erased (its caller's personal data was destroyed; nothing to replay)")
        else:
            diverged += 1
            d = result.divergence
            assert d is not None
            typer.echo(f"{result.call_id}: diverged at seq {d.seq} ({d.event_type}): {d.reason}")
    typer.echo(f"verified {len(results)} calls, {diverged} diverged" + (f", {erased} erased" if erased else ""))
    if diverged:
        raise typer.Exit(1)


@replay_app.command("whatif")
def replay_whatif(
    agent_file: Annotated[Path, typer.Option("--agent", exists=True, dir_okay=False,
                                             help="The agent definition to try (YAML or TOML).")],
    call: Annotated[str | None, typer.Argument(help="Call id to re-run.")] = None,
    all_calls: Annotated[bool, typer.Option("--all", help="Every recorded call of the agent's tenant taken by "
                                            "--agent-id (default: the file's agent id).")] = False,
    agent_id: Annotated[str | None, typer.Option(help="With --all: the calls this agent took.")] = None,
    since: Annotated[datetime.datetime | None, typer.Option(help="With --all: calls started since (UTC unless "
                                                                 "the time says).")] = None,
    model: Annotated[str | None, typer.Option(help="Another LLM model for the agent.")] = None,
    provider: Annotated[str | None, typer.Option(help="Another LLM provider for the agent (openai, anthropic, "
                                                      "offline-scripted).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the report: .json or .html.")] = None,
    fail_on_change: Annotated[bool, typer.Option("--fail-on-change",
                                                 help="Exit 1 when any call changed (a CI gate).")] = False,
    redact: Annotated[bool, typer.Option(help="PII-redact what is printed and written, as ClickHouse holds "
                                              "it.")] = True,
) -> None:
    """Re-run recorded calls through another agent definition: turn by turn, what the agent decided then and
    what it decides now, the first difference marked. Tools are never run; an LLM answer is reused only for
    an identical request, else the new model answers (its key set) or the offline policy does."""
    from streams.call.whatif import report_json, report_lines
    from streams.config.agents import AgentConfigError, Provider, load_agent_file
    from streams.providers.registry import ProviderRegistry
    from voxlog.progress import progress
    from voxlog.replaying import calls_taken_by, whatif_calls
    from voxlog.whatif_report import report_html

    if (call is None) == (not all_calls):
        raise typer.BadParameter("give a CALL_ID or --all")
    if out is not None and out.suffix not in (".json", ".html"):
        raise typer.BadParameter("--out must end in .json or .html")
    try:
        agent = load_agent_file(agent_file)
    except AgentConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if model is not None or provider is not None:
        llm = Provider(provider=provider or agent.llm.provider, model=model or agent.llm.model)
        agent = agent.model_copy(update={"llm": llm})
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=datetime.UTC)
    since_us = int(since.timestamp() * 1_000_000) if since is not None else None
    settings = Settings()

    backend, router = log_backend(settings), agents_router(settings)

    async def run() -> list[WhatIfResult]:  # progress on standard error; the report stays on standard output
        registry = ProviderRegistry()
        try:
            if call is not None:
                return await whatif_calls(backend, router, agent, registry, [call])
            with progress("replay whatif: finding calls", unit="records") as read:
                ids = await calls_taken_by(backend, agent.tenant, agent_id or agent.id, since_us, read.update)
            with progress("replay whatif", total=len(ids), unit="calls") as compared:
                return await whatif_calls(backend, router, agent, registry, ids, compared)
        finally:
            await registry.aclose()

    results = asyncio.run(run())
    if redact:
        results = [result.redacted() for result in results]
    for result in results:
        if call is not None or result.changed:
            for line in report_lines(result):
                typer.echo(line)
        else:
            typer.echo(f"{result.call_id}: {result.summary}")
    if out is not None:
        out.write_text(report_json(results) if out.suffix == ".json" else report_html(results))
    compared = [result for result in results if result.problem is None]
    changed = sum(1 for result in compared if result.changed)
    skipped = len(results) - len(compared)
    typer.echo(f"compared {len(compared)} calls, {changed} changed" + (f", {skipped} not compared" if skipped else ""))
    if fail_on_change and changed:
        raise typer.Exit(1)


class ScriptedFailureChoice(enum.StrEnum):
    stall = "stall"
    error = "error"


class CapabilityChoice(enum.StrEnum):
    llm = "llm"
    asr = "asr"
    tts = "tts"


def _vad_kind(value: str, param_hint: str) -> VadKind:
    """`value` as one of the VAD's judges (`--judge`, `--vad`), or a usage error that names them."""
    kind = next((k for k in VAD_KINDS if k == value), None)
    if kind is None:
        raise typer.BadParameter(f"no judge {value}; there are {', '.join(VAD_KINDS)}", param_hint=param_hint)
    return kind


def _channel(name: str) -> Literal["phone", "sip"]:
    if name not in ("phone", "sip"):
        raise typer.BadParameter(f"--channel is phone or sip, not {name!r}")
    return "sip" if name == "sip" else "phone"


@bench_app.command("calls")
def bench_calls_command(
    out: Annotated[Path, typer.Option(help="JSON file the results are written to.")],
    calls: Annotated[int, typer.Option(min=1, help="Concurrent calls.")] = 50,
    channel: Annotated[str, typer.Option(
        help="How the callers call: phone (as Twilio carries them: webhook and Media Streams) or sip (INVITE and "
        "RTP to the gateway's SIP endpoint; docs/sip.md says how many calls its PJSIP build holds).")] = "phone",
    turns: Annotated[int, typer.Option(min=1, help="Turns per call (the last a goodbye).")] = 20,
    asr_ms: Annotated[int, typer.Option(help="Scripted ASR final-result delay.")] = 150,
    llm_ms: Annotated[int, typer.Option(help="Scripted LLM delay.")] = 300,
    tts_ms: Annotated[int, typer.Option(help="Scripted TTS first-byte delay.")] = 120,
    fallback: Annotated[ScriptedFailureChoice | None, typer.Option(
        help="Fallback profile: in every --fallback-every-th call the primary of --fallback-capability stalls "
        "or errs on each turn, and a backup in the chain answers.")] = None,
    fallback_every: Annotated[int, typer.Option(min=1, help="Which calls' primary fails.")] = 2,
    fallback_capability: Annotated[CapabilityChoice, typer.Option(
        help="Whose primary fails: the LLM's, the recogniser's or the voice's.")] = CapabilityChoice.llm,
    attempt_timeout_ms: Annotated[int, typer.Option(min=10, help="The primary's attempt timeout.")] = 800,
    max_calls: Annotated[int | None, typer.Option(
        min=1, help="The gateway's capacity (VOXLOG_MAX_CALLS); --calls beyond it measures admission control: "
        "the refused calls' busy answers, and the admitted calls' latency.")] = None,
    ramp_s: Annotated[float, typer.Option(min=0, help="Spread the callers' rings over this many seconds "
                                                      "(0: all at once).")] = 0.0,
    history_events: Annotated[int, typer.Option(
        min=0, help="First write this many events of earlier calls to the log, handled long ago (the workers' "
        "groups at their end): a call's cost must not grow with the log's history.")] = 0,
    vad: Annotated[str | None, typer.Option(
        help="The demo agent's VAD judge for this run: energy, webrtc or silero (default: its file's, silero); "
        "not with VOXLOG_AGENTS_DIR.")] = None,
    analytics: Annotated[bool, typer.Option(
        help="Run the projections and the summariser as voxlog serve does (in its background process; with "
        "VOXLOG_BACKGROUND_PROCESS=false on the gateway's loop), and report their CPU and how long after the "
        "last call their tables held every event.")] = False,
    gateways: Annotated[int, typer.Option(
        min=1, help="Phone calls: this many gateway processes behind one public address, the calls spread over "
        "them in turn as a load balancer spreads Twilio's webhooks (--max-calls is shared out between them). "
        "Over SIP the gateways are as many as the calls need.")] = 1,
) -> None:
    """Concurrent calls through the real gateway with scripted-timeline providers: what voxlog adds
    to voice-to-voice latency, how evenly the agent's audio is paced, and (with --fallback) what a
    failed primary LLM, recogniser or voice costs a turn."""
    from streams.providers.timeline import Timeline
    from voxlog.bench import write_result
    from voxlog.bench_calls import FallbackProfile, bench_calls, through_fleet
    from voxlog.serving import run_on_serving_loop

    settings = Settings() if max_calls is None else Settings(max_calls=max_calls)
    if vad is not None and settings.agents_dir is not None:
        raise typer.BadParameter("--vad sets the demo agent's judge; with VOXLOG_AGENTS_DIR, set `vad:` in your "
                                 "agent's file", param_hint="--vad")
    try:  # what cannot be measured together, refused before anything starts
        through_fleet(calls, _channel(channel), gateways, fallback is not None or bool(history_events) or analytics)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    timeline = Timeline(asr_final_ms=asr_ms, llm_ms=llm_ms, tts_first_byte_ms=tts_ms, speech_ms_per_word=60)
    profile = None if fallback is None else FallbackProfile(fallback.value, fallback_every, attempt_timeout_ms,
                                                            capability=fallback_capability.value)
    result = run_on_serving_loop(bench_calls(settings, calls=calls, timeline=timeline, fallback=profile,
                                             ramp_s=ramp_s, history_events=history_events, turns=turns,
                                             vad=None if vad is None else _vad_kind(vad, "--vad"),
                                             analytics=analytics, channel=_channel(channel), replicas=gateways))
    write_result(result, out)
    added, jitter = result["added_latency_ms"], result["pacing_jitter_ms"]
    console.print(f"{calls} {channel} calls on {result['log']}: added latency p50 {added['p50']} ms, "
                  f"p99 {added['p99']} ms; "
                  f"pacing jitter p99 {jitter['p99']} ms; {result['events_per_s']:,} events/s; "
                  f"gateway CPU {result['gateway_cpu_share']:.0%} ({result['gateway_cpu_s_per_call_minute']} s a "
                  f"call-minute; its busiest event loop {result['gateway_loop_cpu_share']:.0%}, late by p99 "
                  f"{result['gateway_loop_lag_ms']['p99']} ms), callers' {result['callers_cpu_share']:.0%} (late by "
                  f"p99 {result['callers_loop_lag_ms']['p99']} ms); peak memory "
                  f"{result['gateway_peak_rss_mb']} MB ({result['gateway_peak_rss_mb_per_call']} MB a call); "
                  f"failed calls: {len(result['failed_calls'])} -> {out}")
    if result["analytics"] is not None:
        console.print(f"projections and summariser in the {result['analytics']}: background CPU "
                      f"{result['background_cpu_share']:.0%}; every event in the tables "
                      f"{result['projected_after_s']} s after the last call")
    if result["refused_calls"]:
        refusal = result["refusal_ms"]
        console.print(f"capacity {result['capacity']}: {result['admitted_calls']} admitted, "
                      f"{result['refused_calls']} told busy in p50 {refusal['p50']} ms, p99 {refusal['p99']} ms")
    if "fallback" in result:
        fb = result["fallback"]
        console.print(f"{fb['capability']} fallback ({fb['failure']}, attempt timeout {fb['attempt_timeout_ms']} ms): "
                      f"{fb['calls_fell_back']} calls fell back; cost p50 {fb['cost_ms']['p50']} ms, "
                      f"p99 {fb['cost_ms']['p99']} ms; " + (
                          "no target for a fast error" if fb["met"] is None else
                          f"target {fb['target_ms']} ms: {'met' if fb['met'] else 'missed'}"))


@bench_app.command("asr")
def bench_asr_command(
    out: Annotated[Path, typer.Option(help="JSON file the results are written to.")],
    voices: Annotated[list[str] | None, typer.Option(
        "--voice", help="A caller's voice, espeak-ng:VOICE or flite:VOICE (repeat for several).")] = None,
    capacity_calls: Annotated[list[int] | None, typer.Option(
        "--capacity-calls", min=1, help="Concurrent calls for the capacity runs (repeat for several).")] = None,
    capacity_s: Annotated[float, typer.Option(min=1, help="How long each capacity run lasts.")] = 30.0,
) -> None:
    """The offline recognisers (faster-whisper with its pocketsphinx interims, and pocketsphinx alone)
    on synthetic callers at 16 kHz and through the phone path: word accuracy, CPU per audio second,
    delay to the final text, and how many concurrent calls one Whisper worker serves."""
    from streams.providers.settings import ProviderSettings
    from voxlog.bench import write_result
    from voxlog.bench_asr import VOICES, bench_asr

    result = asyncio.run(bench_asr(voices=voices or VOICES, capacity_calls=capacity_calls or (1, 2, 4, 8, 16),
                                   capacity_s=capacity_s, model_dir=ProviderSettings().whisper_model_dir))
    write_result(result, out)
    for name, figures in result["recognisers"].items():
        delay = figures["final_delay_ms"]
        console.print(f"{name}: accuracy {figures['accuracy_16k']:.2f} at 16 kHz, {figures['accuracy_phone']:.2f} "
                      f"on the phone path; {figures['cpu_s_per_audio_s']} CPU s per audio s; final text "
                      f"p50 {delay['p50']} ms after the utterance ends")
    for run in result["capacity"]:
        console.print(f"{run['calls']} calls: Whisper gave {run['by_whisper']} of {run['finals']} finals; "
                      f"final p50 {run['final_delay_ms']['p50']} ms, p99 {run['final_delay_ms']['p99']} ms")
    console.print(f"-> {out}")


@bench_app.command("vad")
def bench_vad_command(
    out: Annotated[Path, typer.Option(help="JSON file the results are written to.")],
    judges: Annotated[list[str] | None, typer.Option(
        "--judge", help="A speech judge: energy, webrtc or silero (repeat for several; default all).")] = None,
) -> None:
    """The VAD's speech judges on a phone line with six kinds of noise at three levels: false starts
    (false barge-ins) per minute, missed and stuck turns, onset and end-of-turn delay, CPU a frame."""
    from voxlog.bench import write_result
    from voxlog.bench_vad import bench_vad

    kinds = [_vad_kind(j, "--judge") for j in judges] if judges else list(VAD_KINDS)
    result = asyncio.run(bench_vad(kinds=kinds))
    write_result(result, out)
    for kind, figures in result["judges"].items():
        noisy, clean = figures["noisy"], figures["lines"]["clean"]
        console.print(f"{kind}: noisy lines {noisy['false_starts_per_min']} false starts a minute, "
                      f"{noisy['missed']} missed, {noisy['stuck']} stuck of {noisy['utterances']}; clean line "
                      f"{clean['missed']} missed, onset p50 {clean['onset_ms']['p50']} ms, end p50 "
                      f"{clean['end_ms']['p50']} ms; {figures['all']['cpu_us_per_frame']} us a frame")
    console.print(f"-> {out}")


@bench_app.command("replay")
def bench_replay_command(
    out: Annotated[Path, typer.Option(help="JSON file the results are written to.")],
    calls: Annotated[int, typer.Option(min=1, help="Calls written and replayed.")] = 1000,
    passes: Annotated[int, typer.Option(min=1, help="Timed passes of each phase (medians); the phases take turns "
                                                    "going first.")] = 5,
) -> None:
    """Reading, replay verify and replay whatif (same agent; a reworded greeting) over the same calls."""
    from voxlog.bench import write_result
    from voxlog.bench_replay import bench_replay

    settings = Settings()
    bench_home = settings.home / "bench-replay"
    backend = log_backend(settings) if settings.kafka_bootstrap else EmbeddedBackend(
        bench_home / "log.db", keystore_at(bench_home.resolve() / "keystore"))
    router = agents_router(settings)
    agent = router.get("demo", "front-desk")
    result = asyncio.run(bench_replay(backend, router, agent, calls=calls, passes=passes))
    write_result(result, out)
    for name, phase in result["phases"].items():
        typer.echo(f"{name}: {phase['calls_per_s']} calls/s, {phase['events_per_s']} events/s, "
                   f"{phase['wall_s']} s wall, {phase['cpu_s']} s CPU, x{phase['wall_ratio_to_reading']} of reading")


@bench_app.command("projections")
def bench_projections_command(
    out: Annotated[Path, typer.Option(help="JSON file the results are written to.")],
    events: Annotated[int, typer.Option(min=1000, help="Events in the log for the rebuild phase.")] = 100_000,
    rate: Annotated[int, typer.Option(min=100, help="Events per second while lag is measured.")] = 5000,
    seconds: Annotated[float, typer.Option(min=1, help="How long lag is measured.")] = 20,
    only: Annotated[list[str] | None, typer.Option(
        help="Only this projection (repeatable); lag is measured only with calls among them.")] = None,
) -> None:
    """Rebuild speed of every projection, and lag from event to queryable row while calls flow."""
    from projections.default_projections import default_projections
    from projections.store import AnalyticsStore
    from voxlog.bench import write_result
    from voxlog.bench_projections import bench_projections

    settings = Settings()
    bench_home = settings.home / "bench"
    known = [p.name for p in default_projections(recordings=bench_home / "recordings")]
    if set(only or ()) - set(known):
        raise typer.BadParameter(f"the projections are {', '.join(known)}", param_hint="--only")
    backend = log_backend(settings) if settings.kafka_bootstrap else EmbeddedBackend(
        bench_home / "log.db", keystore_at(bench_home.resolve() / "keystore"))
    store = AnalyticsStore.open(settings.clickhouse_dsn, bench_home)
    result = asyncio.run(bench_projections(backend, store, bench_home / "recordings", events=events, rate=rate,
                                           seconds=seconds, only=only or ()))
    write_result(result, out)
    rebuilt = ", ".join(f"{name} {r['events_per_s']:,}/s ({r['of_reference']} of reading and decoding alone, "
                        f"{r['reference']['events_per_s']:,}/s)" for name, r in result["rebuild"].items())
    lag = result["lag"]
    lagged = "no lag phase (it needs the calls projection)" if lag is None else (
        f"at {lag['achieved_rate']:,} events/s lag p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms "
        f"({lag['turns_seen']}/{lag['turns']} turns)")
    console.print(f"{result['log']} -> {result['store']}: rebuild {rebuilt}; {lagged} -> {out}")


class BenchBackend(enum.StrEnum):
    embedded = "embedded"
    kafka = "kafka"


@bench_app.command("log")
def bench_log_command(
    out: Annotated[Path, typer.Option(help="JSON file the results are written to.")],
    backend: Annotated[BenchBackend, typer.Option(help="Which log to measure.")] = BenchBackend.embedded,
    events: Annotated[int, typer.Option(min=1000, help="Events for the throughput phase.")] = 200_000,
    rate: Annotated[int, typer.Option(min=100, help="Events/s for the latency phase.")] = 5000,
    seconds: Annotated[float, typer.Option(min=1.0, help="Length of the latency phase.")] = 10.0,
) -> None:
    """Append/consume throughput and produce-to-consume latency of the event log."""
    from voxlog.bench import bench_log, write_result

    settings = Settings()
    keys = keystore_at(settings.home.resolve() / "bench" / "keystore")
    if backend is BenchBackend.kafka:
        if not settings.kafka_bootstrap:
            raise typer.BadParameter("set VOXLOG_KAFKA_BOOTSTRAP to benchmark Kafka", param_hint="--backend")
        target: LogBackend = KafkaBackend(settings.kafka_bootstrap, keys)
    else:
        target = EmbeddedBackend(settings.home / "bench" / "log.db", keys)
    result = asyncio.run(bench_log(target, events=events, rate=rate, seconds=seconds))
    write_result(result, out)
    a, raw, c, lat = result["append"], result["raw_append"], result["consume"], result["latency"]
    console.print(
        f"{target.describe()}: append {a['events_per_s']:,} events/s ({raw['ours_over_raw']:.2f} of "
        f"{raw['with']}: {raw['events_per_s']:,}"
        + (f"; {java['ours_over_java']:.2f} of Kafka's Java producer: {java['events_per_s']:,}"
           if (java := result["java_producer"]) and "skipped" not in java else "")
        + f"), consume {c['events_per_s']:,} events/s; "
        f"at {lat['achieved_rate']:,} events/s produce-to-consume p50 {lat['p50_ms']} ms, "
        f"p99 {lat['p99_ms']} ms -> {out}"
    )



def _analytics() -> Analytics:
    """The analytics side, or a clear error and exit 1 when ClickHouse cannot be opened."""
    from projections.store import AnalyticsError
    from voxlog.analytics import Analytics

    try:
        return Analytics(Settings())
    except AnalyticsError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc


class SqlFormat(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A SELECT over calls, turns, transcripts, tool_calls, errors, "
                                              "prompt_versions, audit_log (see docs/analytics.md).")],
    output: Annotated[SqlFormat, typer.Option("--format", help="How to print the rows.")] = SqlFormat.table,
    catch_up: Annotated[bool, typer.Option(help="Bring the tables up to the log first.")] = True,
) -> None:
    """Query the analytics tables: read-only, 30 s and 10,000 rows at most, every table read FINAL."""
    from projections.store import AnalyticsError
    analytics = _analytics()
    if catch_up:
        asyncio.run(analytics.catch_up())
    try:
        result = analytics.sql(query)
    except AnalyticsError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    if output is SqlFormat.json:
        for row in result.rows:
            print(json.dumps(dict(zip(result.columns, row, strict=True)), default=str))
    elif output is SqlFormat.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        table = Table(*result.columns, title=analytics.store.describe())
        for row in result.rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)


@projections_app.command("rebuild")
def projections_rebuild(name: Annotated[str, typer.Argument(help=f"One of {', '.join(PROJECTION_NAMES)}.")]) -> None:
    """Drop a projection's tables and build them again from offset zero."""
    from voxlog.progress import progress

    analytics = _analytics()
    if name not in PROJECTION_NAMES:
        raise typer.BadParameter(f"no projection {name}; there are {', '.join(PROJECTION_NAMES)}", param_hint="NAME")
    with progress(f"projections rebuild {name}", unit="events") as read:
        runner = asyncio.run(analytics.rebuild(name, read.update))
        read.update(runner.events, runner.events)  # all there was: what retention trimmed was in the estimate
    console.print(f"rebuilt {name}: {runner.events:,} events, {runner.rows_written:,} rows")


@projections_app.command("run")
def projections_run(
    app_id: Annotated[str, typer.Option(
        envvar="VOXLOG_PROJECTIONS_APP_ID",
        help="On Kafka: each projection's faust app id, its consumer group, is this, a dash and its name.")
    ] = "voxlog-projection",
) -> None:
    """Keep every projection up to date with the log until Ctrl-C: in-process on the embedded log, as a
    faust worker on Kafka."""
    from projections.projection_runner import ProjectionRunner
    analytics = _analytics()
    if isinstance(analytics.backend, KafkaBackend):
        from projections.faust_projections import run_worker
        asyncio.run(_make_topics(analytics.backend))
        console.print(f"projections as faust agents on {analytics.backend.describe()} into "
                      f"{analytics.store.describe()}; Ctrl-C stops")
        run_worker(analytics.backend, analytics.store, analytics.projections(), app_id_prefix=app_id,
                   datadir=analytics.settings.home / "faust")
    console.print(f"projections from {analytics.backend.describe()} into {analytics.store.describe()}; Ctrl-C stops")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runners = [ProjectionRunner(analytics.backend, analytics.store, p) for p in analytics.projections()]
        await asyncio.gather(*(runner.run(stop) for runner in runners))

    asyncio.run(run())


@projections_app.command("status")
def projections_status() -> None:
    """How far each projection has read each partition."""
    result = _analytics().lag()
    if not result.rows:
        console.print("no projection has read the log yet (voxlog projections run, or voxlog serve, starts them)")
        return
    table = Table(*result.columns)
    for row in result.rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


@app.command("erase")
def erase_caller(
    tenant: Annotated[str, typer.Option(help="The tenant whose caller is to be forgotten.")],
    number: Annotated[str, typer.Option(help="The caller's (or called person's) number, E.164.")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
) -> None:
    """Forget a caller: their data keys destroyed, so their calls' personal data in the log (every copy)
    no longer opens, and their memory and their calls that started before now (rows in every table,
    recordings) removed, as a caller.erased event that every projection folds, through restarts and rebuilds."""
    from producers.event_writer import EventWriter
    from schemas.events import CallerErased
    from streams.keystore.shredding import request_erasure

    operator = os.environ.get("USER") or "operator"

    backend = _backend()

    async def write() -> tuple[str, CallerErased]:
        async with backend.producer() as producer:
            return await request_erasure(EventWriter(producer), backend.keys, tenant, number,
                                         requested_by=f"cli:{operator}", reason=reason, producer="voxlog.cli",
                                         producer_version=__version__)

    try:
        erasure_id, payload = asyncio.run(write())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--number") from exc
    console.print(f"{erasure_id}: caller {payload.caller_key} of {tenant} erased (calls started before now): "
                  f"{payload.keys_destroyed} data keys destroyed, so their personal data in the log no longer opens; "
                  "the projections remove their rows and recordings as they reach it")


@audit_app.command("verify")
def audit_verify(
    tenant: Annotated[str | None, typer.Option(help="The tenant whose trail to check against the log.")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", help="Instead: an export (`voxlog audit export --signed`) to check offline, by its chains, its "
                       "signature file and the signer's public key; no log, no ClickHouse.")] = None,
    signature: Annotated[Path | None, typer.Option(help="With --file: its signature file; unset: FILE.sig.")] = None,
    public_key: Annotated[Path | None, typer.Option(
        help="With --file: the signer's public key, PEM (`voxlog audit public-key` printed it).")] = None,
    anchor: Annotated[bool, typer.Option(
        help="When the trail is intact, record its chain heads in the log (an audit.verified record), so that "
             "later checks show the log itself cut short, or the table rewritten beyond the log's retention.")] = True,
) -> None:
    """Check a tenant's audit trail against the log it came from (each chain's first record changed,
    deleted or added in ClickHouse, and any chain cut short since an earlier check); or, with --file,
    a signed export offline (any record edited, added, removed or reordered, the file cut short, the
    wrong key)."""
    if file is not None and tenant is None:
        _verify_export_file(file, signature, public_key)
        return
    if tenant is None or file is not None:
        raise typer.BadParameter("give --tenant T (its trail against the log) or --file EXPORT (a signed export, "
                                 "offline)", param_hint="--tenant / --file")
    analytics = _analytics()
    report = asyncio.run(analytics.verify_audit(tenant))
    if report.problems:
        _print_tampering(tenant, report)
        raise typer.Exit(1)
    checks = f"{report.anchors} earlier check{'s' if report.anchors != 1 else ''}"
    anchors = f"the chain heads {checks} anchored are all there" if report.anchors else "no earlier check anchored it"
    console.print(f"audit trail of {tenant} intact: {report.records} records in {report.chains} chains, each as the "
                  f"log has it; {anchors}")
    if anchor and report.heads:
        actor = f"cli:{os.environ.get('USER') or 'operator'}"
        asyncio.run(analytics.anchor_audit(tenant, report.heads, actor=actor))
        console.print(f"anchored the heads of its {len(report.heads)} chains in the log")


def _print_tampering(tenant: str, report: AuditReport) -> None:
    for problem in report.problems:
        console.print(f"[red]tampered[/]: {escape(problem.source)} record {problem.chain_index}: {problem.kind}: "
                      f"{escape(problem.problem)}")
    console.print(f"[red]audit trail of {escape(tenant)} tampered[/]: {len(report.problems)} of {report.chains} "
                  f"chains ({report.records} records checked against the log, and {report.anchors} anchors)")


_SHOWN = 20
"""Problems printed: an export mangled throughout would otherwise print one per line."""


def _verify_export_file(file: Path, signature: Path | None, public_key: Path | None) -> None:
    from projections.audit_export import AuditKeyError, format_time, load_public_key, verify_export

    if public_key is None:
        raise typer.BadParameter("an export is verified with the signer's public key (`voxlog audit public-key` on "
                                 "the signing side prints it)", param_hint="--public-key")
    signature = signature or file.with_name(f"{file.name}.sig")
    data = _read_or_exit(file, "the export")
    signed = _read_or_exit(signature, "its signature file", "`voxlog audit export --signed` writes it beside the "
                                                            "export; name another with --signature")
    try:
        key = load_public_key(_read_or_exit(public_key, "the public key"))
    except AuditKeyError as exc:
        console.print(f"[red]{escape(str(public_key))}[/]: {escape(str(exc))}")
        raise typer.Exit(1) from exc
    verdict = verify_export(data, signed, key)
    statement = verdict.statement
    if not verdict.intact or statement is None:
        for problem in verdict.problems[:_SHOWN]:
            console.print(f"[red]{escape(problem.describe())}[/]")
        if len(verdict.problems) > _SHOWN:
            console.print(f"... and {len(verdict.problems) - _SHOWN} more")
        count = len(verdict.problems)
        console.print(f"[red]{escape(str(file))}: not intact[/]: {count} problem{'s' if count != 1 else ''}")
        raise typer.Exit(1)
    console.print(f"{escape(str(file))}: intact: {statement.records} records of tenant {escape(statement.tenant_id)} "
                  f"{_period(statement.since, statement.until)} in {len(statement.chains)} chains; signed by key "
                  f"{statement.key_id} at {format_time(statement.signed_at)}")
    for chain in statement.chains:
        console.print(f"  {escape(chain.describe())}, head {chain.hash}")


def _read_or_exit(path: Path, what: str, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # missing, a folder, unreadable: said plainly, not a traceback
        console.print(f"[red]{what} {escape(str(path))} cannot be read[/]: {escape(exc.strerror or str(exc))}"
                      f"{'; ' + hint if hint else ''}")
        raise typer.Exit(1) from exc


def _period(since: datetime.datetime | None, until: datetime.datetime | None) -> str:
    from projections.audit_export import format_time

    if since is None:
        return "(the whole trail)" if until is None else f"(before {format_time(until)})"
    if until is None:
        return f"(from {format_time(since)} on)"
    return f"(from {format_time(since)}, before {format_time(until)})"


def _signing_key(settings: Settings) -> tuple[Ed25519PrivateKey, bool]:
    """The audit signing key, made on first use; a clear error and exit 1 when it cannot be used."""
    from projections.audit_export import AuditKeyError, open_signing_key

    return _key_or_exit(lambda: open_signing_key(settings.audit_signing_key_path), AuditKeyError)


def _key_or_exit(open_key: Callable[[], tuple[SigningKey, bool]],
                 error: type[Exception]) -> tuple[SigningKey, bool]:
    try:
        return open_key()
    except (error, OSError) as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from exc


@audit_app.command("export")
def audit_export(
    tenant: Annotated[str | None, typer.Option(
        help="The tenant whose trail to export, each chain whole from its first record in the period to its last; "
             "checked against the log first, and refused if tampered.")] = None,
    call: Annotated[str | None, typer.Option(
        "--call", help="Instead: one call's records (a view: scattered through their chains, they cannot be "
                       "verified offline).")] = None,
    since: Annotated[str | None, typer.Option(
        help="With --tenant: records from this date or ISO 8601 time on (UTC unless it names a zone).")] = None,
    until: Annotated[str | None, typer.Option(help="With --tenant: records before this date or time.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The file to write; unset: standard output.")] = None,
    signed: Annotated[bool, typer.Option(
        "--signed", help="With --tenant and --out: sign it with the audit signing key (VOXLOG_AUDIT_SIGNING_KEY, "
                         "made on first use) into FILE.sig; see docs/compliance.md.")] = False,
) -> None:
    """An audit trail, one JSON object per line with its chain fields: a tenant's (to sign, and verify
    offline with `voxlog audit verify --file`) or a call's."""
    from projections.audit_export import (
        export_bytes,
        parse_time_bound,
        records_in_range,
        sign_export,
        signing_key_id,
    )
    from projections.tables import AUDIT_LOG

    if call is not None and tenant is None:
        if since or until or signed:
            raise typer.BadParameter("--since, --until and --signed go with --tenant: a call's records are scattered "
                                     "through its tenant's chains, so they cannot be verified offline",
                                     param_hint="--call")
        analytics = _analytics()
        asyncio.run(analytics.catch_up())
        _write_or_exit(out, export_bytes(analytics.export_audit(call).rows))
        return
    if tenant is None or call is not None:
        raise typer.BadParameter("give --tenant T or --call ID", param_hint="--tenant / --call")
    if signed and out is None:
        raise typer.BadParameter("--signed writes FILE.sig beside the export: name the file", param_hint="--out")
    bounds: list[datetime.datetime | None] = []
    for text, hint in ((since, "--since"), (until, "--until")):
        try:
            bounds.append(None if text is None else parse_time_bound(text))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=hint) from exc
    start, end = bounds
    if start is not None and end is not None and start >= end:
        raise typer.BadParameter("--since must come before --until", param_hint="--since")
    analytics = _analytics()
    key = _signing_key(analytics.settings) if signed else None  # before the long part: a bad key fails at once
    report, rows = asyncio.run(analytics.checked_audit_rows(tenant))
    if report.problems:
        _print_tampering(tenant, report)
        console.print(f"[red]not exported[/]: an export vouches for the trail; see `voxlog audit verify --tenant "
                      f"{escape(tenant)}`")
        raise typer.Exit(1)
    period = _period(start, end)
    selected = records_in_range(rows, start, end)
    if not selected:
        console.print(f"[red]nothing exported[/]: no audit records of {escape(tenant)} {period}")
        raise typer.Exit(1)
    data = export_bytes(selected)
    signature = None
    if key is not None:
        try:
            signature = sign_export(data, tenant=tenant, since=start, until=end, key=key[0],
                                    signed_at=datetime.datetime.now(datetime.UTC))
        except ValueError as exc:  # the rows do not chain as the table gave them: nothing is written
            console.print(f"[red]not exported[/]: {escape(str(exc))}")
            raise typer.Exit(1) from exc
    _write_or_exit(out, data)
    if out is None:
        return
    chains = len({row[AUDIT_LOG.column_names.index("source")] for row in selected})
    console.print(f"exported {len(selected)} records of {escape(tenant)} {period} in {chains} chains, checked against "
                  f"the log, to {escape(str(out))}")
    if key is not None and signature is not None:
        private, made = key
        signature_path = out.with_name(f"{out.name}.sig")
        _write_or_exit(signature_path, signature)
        if made:
            console.print(f"made the audit signing key {escape(str(analytics.settings.audit_signing_key_path))}: "
                          "give its public half (`voxlog audit public-key`) to whoever verifies exports")
        console.print(f"signed with key {signing_key_id(private.public_key())}: {escape(str(signature_path))}")


def _write_or_exit(path: Path | None, data: bytes) -> None:
    """`data` into `path`, or to standard output when there is none."""
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        path.write_bytes(data)
    except OSError as exc:
        console.print(f"[red]{escape(str(path))} cannot be written[/]: {escape(exc.strerror or str(exc))}")
        raise typer.Exit(1) from exc


@audit_app.command("public-key")
def audit_public_key(
    out: Annotated[Path | None, typer.Option("--out", help="The file to write; unset: standard output.")] = None,
) -> None:
    """The audit signing key's public half (PEM), the key made on first use: give it to whoever
    verifies exports (`voxlog audit verify --file`), and let them keep it apart from voxlog."""
    from projections.audit_export import signing_key_id
    from projections.signing_keys import public_key_pem

    settings = Settings()
    key, made = _signing_key(settings)
    _write_or_exit(out, public_key_pem(key).encode())
    note = Console(stderr=True, soft_wrap=True)  # standard output is the PEM alone
    note.print(f"{'made the' if made else 'the'} audit signing key {escape(str(settings.audit_signing_key_path))}: "
               f"key id {signing_key_id(key.public_key())}")



def _keyed_backend(settings: Settings) -> tuple[LogBackend, DataKeyStore]:
    backend = log_backend(settings)
    assert backend.keys is not None  # voxlog's own backends always seal
    return backend, backend.keys


def _tenant(settings: Settings, tenant_id: str) -> TenantSpec:
    return Tenants(load_tenants(settings.agents_dir or DEFAULT_AGENTS_DIR)).get(tenant_id)


@compliance_app.command("report")
def compliance_report_command(
    tenant: Annotated[str, typer.Option(help="The tenant to report on.")],
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON document.")] = False,
) -> None:
    """What is kept of the tenant's callers and for how long, and what was erased (when, by whom, why) or
    shredded by retention."""
    from voxlog.compliance import compliance_report, describe_retention

    settings = Settings()
    backend, keys = _keyed_backend(settings)
    asyncio.run(_make_topics(backend))  # a log nothing was written to yet has nothing to report, and says so
    report = asyncio.run(compliance_report(backend, keys, _tenant(settings, tenant)))
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
        return
    console.print(f"[bold]{tenant}[/]: callers' personal data is sealed in the log per call (AES-SIV); its keys are "
                  f"in {report.keystore}, wrapped by the tenant's key-encryption key")
    for line in describe_retention(report):
        console.print(f"  {line}")
    console.print(f"  the log's own events (without personal data) stay until the topics' retention removes them "
                  f"({backend.describe()})")
    console.print(f"erasures: {len(report.erasures)}")
    for erasure in report.erasures:
        console.print(f"  {erasure['at']} {erasure['erasure_id']}: caller {erasure['caller_key']}, "
                      f"{erasure['keys_destroyed']} keys destroyed, asked by {erasure['requested_by']}: "
                      f"{erasure['reason'] or '(no reason given)'}")
    console.print(f"retention runs: {len(report.retention_runs)}")
    for run in report.retention_runs:
        console.print(f"  {run['first']} .. {run['last']} {run['by']}: {run['keys_destroyed']} keys shredded")


@compliance_app.command("retention")
def compliance_retention_command(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (default: every tenant with a file).")] = None,
) -> None:
    """Enforce the tenants' retention now (the gateway's workers do it every hour): the data keys of calls
    older than it destroyed, each run an audit record."""
    from producers.event_writer import EventWriter
    from streams.keystore.retention import Shredded, enforce_retention

    settings = Settings()
    backend, keys = _keyed_backend(settings)
    tenants = load_tenants(settings.agents_dir or DEFAULT_AGENTS_DIR)
    chosen = [_tenant(settings, tenant)] if tenant else list(tenants.values())

    async def run() -> list[Shredded]:
        async with backend.producer() as producer:
            return await enforce_retention(keys, chosen, EventWriter(producer), now_ms=time.time_ns() // 1_000_000,
                                           producer="voxlog.cli", producer_version=__version__)

    done = asyncio.run(run())
    for item in done:
        console.print(f"{item.tenant_id}: {item.keys} {item.kind} keys shredded (calls older than {item.days} days)")
    console.print(f"retention enforced for {len(chosen)} tenants; {sum(d.keys for d in done)} keys shredded")


@compliance_app.command("rotate-key")
def compliance_rotate_key_command(tenant: Annotated[str, typer.Option(help="The tenant whose key to rotate.")]) -> None:
    """A new key-encryption key for the tenant: every live data key re-wrapped with it, the old one destroyed.
    The log is not rewritten (events name data keys, which do not change)."""
    _, keys = _keyed_backend(Settings())
    kek, rewrapped = keys.rotate(tenant)
    console.print(f"{tenant}: key-encryption key {kek} now wraps its {rewrapped} live data keys; the old one is gone")


class VconRecording(enum.StrEnum):
    embed = "embed"
    link = "link"


def _vcon_signing_key(settings: Settings) -> tuple[RSAPrivateKey, bool]:
    """The vCon signing key, made on first use; a clear error and exit 1 when it cannot be used."""
    from projections.vcon_export import VconKeyError, open_signing_key

    return _key_or_exit(lambda: open_signing_key(settings.vcon_signing_key_path), VconKeyError)


@export_app.command("vcon")
def export_vcon_command(
    call_id: Annotated[str | None, typer.Argument(help="The call to export (any tenant's).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The file to write; unset: standard output.")] = None,
    recording: Annotated[VconRecording, typer.Option(
        help="embed: the recording in the vCon (base64url; the file stands alone); link: its URL on the tenant API "
             "(VOXLOG_PUBLIC_URL/v1/calls/ID/recording) and its hash.")] = VconRecording.embed,
    verify: Annotated[Path | None, typer.Option(
        "--verify", help="Instead: check a signed vCon file offline: its signature, that nothing changed since, and "
                         "the vcon library's validation.")] = None,
    public_key: Annotated[Path | None, typer.Option(
        help="With --verify: the signer's public key, PEM (`voxlog export public-key`); unset: this voxlog's own "
             "signing key's.")] = None,
) -> None:
    """A call as a signed vCon (IETF draft-ietf-vcon-vcon-container, JSON): the caller and the agent, the
    recording, the transcript and summary (PII redacted as in the analyst tables), the call's events
    (redacted); see docs/compliance.md. With --verify FILE, check one offline."""
    from projections.recording_store import RecordingStoreError
    from projections.vcon_export import export_vcon, read_call_material

    if verify is not None:
        if call_id is not None:
            raise typer.BadParameter("give a CALL_ID to export, or --verify FILE to check", param_hint="--verify")
        _verify_vcon_file(verify, public_key)
        return
    if call_id is None:
        raise typer.BadParameter("which call? give its id (or --verify FILE)", param_hint="CALL_ID")
    settings = Settings()
    recording_url = None
    if recording is VconRecording.link:
        if not settings.public_url:
            raise typer.BadParameter("a linked recording needs the gateway's public URL: set VOXLOG_PUBLIC_URL, or "
                                     "embed it", param_hint="--recording")
        recording_url = f"{settings.public_url.rstrip('/')}/v1/calls/{quote(call_id, safe='')}/recording"
    key, made = _vcon_signing_key(settings)
    backend = log_backend(settings)
    store = recording_store(settings)

    async def read() -> CallMaterial | None:
        async with backend.admin() as admin:
            return await read_call_material(admin, store, call_id, tenant_id=None)

    try:
        call = asyncio.run(read())
    except RecordingStoreError as exc:
        console.print(f"[red]the recording store cannot be reached[/]: {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if call is None:
        Console(stderr=True).print(f"[red]no call {escape(call_id)}[/] in {escape(backend.describe())}")
        raise typer.Exit(1)
    data = export_vcon(call, key, created_at=datetime.datetime.now(datetime.UTC), recording=recording.value,
                       recording_url=recording_url)
    _write_or_exit(out, data)
    note = Console(stderr=True, soft_wrap=True)  # standard output may be the vCon itself
    if made:
        note.print(f"made the vCon signing key {escape(str(settings.vcon_signing_key_path))}: give its public half "
                   "(`voxlog export public-key`) to whoever verifies exports")
    where = "" if out is None else f" to {escape(str(out))}"
    recorded = "with its recording" if call.recording else "without a recording (see its voxlog.export attachment)"
    withheld = sum(e.pii_withheld for e in call.events)
    erased = f"; {withheld} events' personal data erased, left out" if withheld else ""
    note.print(f"exported call {escape(call_id)} of {escape(call.tenant_id)} as a signed vCon{where}: "
               f"{len(call.events)} events, {recorded}{erased}")


def _verify_vcon_file(file: Path, public_key: Path | None) -> None:
    from projections.vcon_export import VconKeyError, load_public_key, signing_key_id, verify_vcon

    data = _read_or_exit(file, "the vCon")
    if public_key is None:
        key = _vcon_signing_key(Settings())[0].public_key()
    else:
        try:
            key = load_public_key(_read_or_exit(public_key, "the public key"))
        except VconKeyError as exc:
            console.print(f"[red]{escape(str(public_key))}[/]: {escape(str(exc))}")
            raise typer.Exit(1) from exc
    verdict = verify_vcon(data, key)
    if not verdict.intact:
        for problem in verdict.problems:
            console.print(f"[red]{escape(problem)}[/]")
        console.print(f"[red]{escape(str(file))}: not intact[/]")
        raise typer.Exit(1)
    document = verdict.document or {}
    console.print(f"{escape(str(file))}: intact: vCon {escape(str(document.get('uuid')))}, "
                  f"{escape(str(document.get('subject')))}; signed by key {signing_key_id(key)}, valid by the vcon "
                  "library")


@export_app.command("public-key")
def export_public_key(
    out: Annotated[Path | None, typer.Option("--out", help="The file to write; unset: standard output.")] = None,
) -> None:
    """The vCon signing key's public half (PEM), the key made on first use: give it to whoever verifies
    exported vCons (`voxlog export vcon --verify FILE --public-key P`)."""
    from projections.signing_keys import public_key_pem
    from projections.vcon_export import signing_key_id

    settings = Settings()
    key, made = _vcon_signing_key(settings)
    _write_or_exit(out, public_key_pem(key).encode())
    note = Console(stderr=True, soft_wrap=True)
    note.print(f"{'made the' if made else 'the'} vCon signing key {escape(str(settings.vcon_signing_key_path))}: "
               f"key id {signing_key_id(key.public_key())}")


@integrations_app.command("check")
def integrations_check_command(
    tenant: Annotated[str, typer.Option(help="The tenant whose connections to try.")],
) -> None:
    """Try each connection the tenant's `integrations` configure (the secret is set, the vendor answers,
    the credentials and their scopes are accepted) and say plainly what is wrong. Exits 1 if anything is."""
    from streams.connectors.integrations import TenantIntegrations, check_integrations
    from streams.connectors.secrets import Secrets
    from voxlog.demo_calendar import DEMO_TENANT, demo_calendar

    settings = Settings()
    tenants = load_tenants(settings.agents_dir or DEFAULT_AGENTS_DIR)
    if tenant not in tenants:
        console.print(f"[red]no tenant {escape(tenant)}[/] in {settings.agents_dir or DEFAULT_AGENTS_DIR}")
        raise typer.Exit(2)
    spec, secrets = tenants[tenant], Secrets()
    calendar = demo_calendar(settings.home, tenants) if tenant == DEMO_TENANT else None
    with contextlib.ExitStack() as stack:
        if calendar is not None:  # the demo's calendar is voxlog's own server: tried as the gateway runs it
            calendar.start()
            stack.callback(calendar.stop)
            spec, secrets = calendar.tenant(spec), Secrets(calendar.environ)
        if spec.integrations == TenantIntegrations():
            console.print(f"{escape(tenant)} configures no integrations")
            return
        results = check_integrations(tenant, spec.integrations, secrets, settings.home)
    failed = False
    for what, checks in results.items():
        console.print(f"[bold]{escape(what)}[/]")
        for check in checks:
            failed |= not check.ok
            mark = "[green]ok[/]" if check.ok else "[red]FAILED[/]"
            console.print(f"  {mark} {escape(check.what)}" + (f": {escape(check.detail)}" if check.detail else ""))
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
