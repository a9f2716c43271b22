"""`voxlog demo`: complete calls through the real gateway, offline.

The gateway runs in-process on the configured log (embedded by default) with the offline providers
(Whisper tiny.en with pocketsphinx's interim results, the scripted policy, flite). Callers are played
exactly as Twilio plays them: a signed voice webhook, then the Media Streams WebSocket carrying flite
speech (another voice than the agent's) as 8 kHz mu-law in 20 ms frames, in real time; they say
natural sentences, with a time and a phone number in them. One call goes the other way: the agent
calls a customer, asked for with `POST /v1/calls` and placed by the dialer. Twilio's REST API
(placing calls, transfers, hang-ups) is a local stand-in. After the calls, each is read back from
the log, shown with its per-turn latencies, and replay-verified.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from functools import partial

import httpx
from websockets.exceptions import ConnectionClosed

from consumers.event_reader import read_call
from projections.default_projections import default_projections
from projections.projection_runner import projected
from projections.store import QueryResult
from schemas.events import (
    CallEnded,
    HandoffRequested,
    ToolFailed,
    ToolSucceeded,
    TtsRequested,
    TurnTaken,
)
from streams.audio.codecs import pcm16_to_mulaw
from streams.call.replay import ReplayResult, agent_for, verify_call
from streams.providers.settings import ProviderSettings
from streams.providers.tts_flite import FliteTts
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.twilio_caller import TwilioCaller

AGENT_NUMBER = "+15550100"


@dataclass(frozen=True)
class Line:
    text: str
    barge_in: bool = False
    """Speak over the agent instead of waiting for it to finish."""


@dataclass(frozen=True)
class Script:
    name: str
    caller: str
    lines: tuple[Line, ...]
    outbound: bool = False
    """The agent calls the person (POST /v1/calls), instead of the person calling in."""
    voice: str = "rms"
    """The caller's flite voice (the agent speaks with slt)."""


SCRIPTS = (
    Script("booking", "+15550001001", (
        Line("Hi, I'd like to schedule a technician visit for tomorrow at ten thirty in the morning."),
        Line("No, that's everything. Thanks, bye."),
    ), voice="rms"),
    Script("ticket, then a human", "+15550001002", (
        Line("My internet keeps dropping out. You can call me back at four one five, five five five, "
             "zero one three two."),
        Line("Actually, can I speak to a real person?"),
    ), voice="awb"),
    Script("barge-in", "+15550001003", (
        Line("Sorry to interrupt, but my internet is down again.", barge_in=True),
        Line("That's all, goodbye."),
    ), voice="rms"),
    Script("outbound: the agent calls a customer", "+15550001004", (
        Line("Yes, please book a visit for Friday at two pm."),
        Line("No, thank you. Goodbye."),
    ), outbound=True, voice="kal16"),
)
DEMO_WHISPER_WAIT_S = 6.0
DEMO_API_KEY = "demo-api-key"
"""The demo tenant's published API key (voxlog/agents/demo/tenant.yaml)."""


@dataclass
class DemoCall:
    script: Script
    call_id: str = ""
    transcript: list[tuple[str, str]] = field(default_factory=list)  # (speaker, text)
    tools: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    end_reason: str = ""
    outcome: str = ""
    clears: int = 0
    replay: ReplayResult | None = None


async def _speech(tts: FliteTts, text: str, voice: str) -> bytes:
    """The caller's words as Twilio carries them: 8 kHz mu-law."""
    pcm = b"".join([chunk async for chunk in tts.synthesize(text, voice=voice, sample_rate=8000)])
    return pcm16_to_mulaw(pcm)


async def place_call(stack: LocalStack, number: str) -> TwilioCaller:
    """Asks the gateway to call `number` and answers when Twilio rings it."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        asked = await client.post("/v1/calls", json={"agent": "front-desk", "to": number},
                                  headers={"Authorization": f"Bearer {DEMO_API_KEY}"})
    asked.raise_for_status()
    (placed,) = await stack.placed_calls(1, to=number)
    return stack.callee(placed)


def _stopped_since(caller: TwilioCaller, clears: int) -> bool:
    """The agent has stopped its speech (a `clear`) since it had sent `clears`, or the call is over."""
    return caller.clears > clears or caller.closed.is_set()


async def play_call(stack: LocalStack, script: Script, tts: FliteTts) -> DemoCall:
    result = DemoCall(script)
    caller = await place_call(stack, script.caller) if script.outbound else stack.caller(from_=script.caller,
                                                                                          to=AGENT_NUMBER)
    instructions = await caller.dial()
    result.call_id = instructions.parameters.get("call_id", "")
    async with caller:
        await caller.connect(instructions)
        answered_from = 0  # what the agent had said when the caller last spoke: its answer is beyond that
        for index, line in enumerate(script.lines):
            speech = await _speech(tts, line.text, script.voice)
            if line.barge_in and index == 0:
                await asyncio.sleep(2.5)  # into the greeting, then talk over it
            else:
                await caller.agent_quiet(1.2, 30, beyond=answered_from)
            if caller.closed.is_set():
                break
            answered_from, clears = len(caller.agent_audio), caller.clears
            try:
                await caller.send_mulaw(speech + bytes([0xFF]) * 8000)  # the words, then a second of silence
            except ConnectionClosed:
                break  # the agent ended the stream (hang-up, or transfer to a human) while we spoke
            if line.barge_in:
                # The greeting went on a moment over the words, until the agent stopped it: its answer is
                # what comes after that stop, not after the greeting's tail.
                with contextlib.suppress(TimeoutError):
                    await caller.wait_until(partial(_stopped_since, caller, clears), 30)
                answered_from = max(answered_from, caller.heard_at_clear)
        await caller.agent_quiet(1.5, 30, beyond=answered_from)
        if not caller.closed.is_set():
            with contextlib.suppress(ConnectionClosed):
                await caller.stop()
        result.clears = caller.clears
    return result


ANALYTICS_QUERY = ("SELECT outcome, count() AS calls, sum(turns) AS turns, sum(tool_calls) AS tool_calls "
                   "FROM calls FINAL GROUP BY outcome ORDER BY outcome")
"""What the demo asks ClickHouse afterwards (as `voxlog sql` would)."""


async def run_calls_demo(settings: Settings) -> tuple[list[DemoCall], QueryResult | None]:
    """The calls, and what the analytics tables say of them (None when ClickHouse is not at hand)."""
    tts = FliteTts()
    # On the embedded log the demo's own ClickHouse shows what it did; a Kafka log may hold far more
    # than the demo's calls, and its projections run as workers of their own.
    # The demo shows what Whisper hears: its four callers' turns end together, so it waits for it
    # rather than give the later ones pocketsphinx's result (a gateway's default, 1.5 s, does that).
    hearing = ProviderSettings().model_copy(update={"whisper_max_wait_s": DEMO_WHISPER_WAIT_S})
    async with local_stack(settings, analytics=settings.kafka_bootstrap is None, provider_settings=hearing) as stack:
        calls = await asyncio.gather(*(play_call(stack, script, tts) for script in SCRIPTS))
        await stack.gateway.wait_idle(30)
        reports = {r.call_id: r for r in stack.gateway.reports}
        async with stack.gateway.backend.admin() as admin:
            for call in calls:
                history = await read_call(admin, call.call_id)
                report = reports.get(call.call_id)
                if report is not None:
                    call.latencies_ms = [t.voice_to_voice_ms for t in report.turns if t.voice_to_voice_ms is not None]
                for event in history.events:
                    p = event.payload
                    if isinstance(p, TurnTaken):
                        call.transcript.append(("caller", p.caller_text))
                    elif isinstance(p, TtsRequested):
                        call.transcript.append(("agent", p.text))
                    elif isinstance(p, ToolSucceeded | ToolFailed):
                        call.tools.append(f"{p.tool}: " + (f"ok, {p.connector} {p.remote_id}".rstrip()
                                                           if isinstance(p, ToolSucceeded) else p.error))
                    elif isinstance(p, HandoffRequested):
                        call.tools.append(f"handoff to {p.target}")
                    elif isinstance(p, CallEnded):
                        call.end_reason, call.outcome = p.reason, p.outcome or ""
                if history.events:
                    call.replay = verify_call(history.events, agent_for(history.events, stack.gateway.router))
        summary = None
        store = stack.gateway.analytics
        if store is not None:  # the gateway's background process projects the calls; their rows once it has
            await projected(stack.gateway.backend, store,
                            default_projections(stack.gateway.router, recordings=stack.gateway.recordings_path,
                                                recording_store=stack.gateway.recordings), timeout_s=60)
            summary = await asyncio.to_thread(store.query, ANALYTICS_QUERY)
    return calls, summary
