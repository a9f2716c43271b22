"""Calls when the world is not kind, through the real gateway: a burst of callers past its capacity, a
gateway killed mid-call, the broker away for longer than the producer's timeouts, SIGTERM after an
overload. Each was reproduced on main before its fix (issue 11); nothing here waits on a sleep being
long enough: every wait polls for what it expects, with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from consumers.backends import LogBackend
from consumers.event_reader import read_call
from gateway.runtime import LOG_OUTAGE_END_S
from producers.log_producer import TopicPartition
from schemas.base import Event, EventPayload
from schemas.codec import EventCodec
from schemas.events import (
    CallEnded,
    CallerAudioChunk,
    CallRefused,
    CallStarted,
    CallSummarized,
    DtmfReceived,
    ErrorRaised,
)
from schemas.topics import AUDIT, CALL_TOPICS, CALLS
from streams.call.session import AUDIO_AHEAD_LIMIT_US, DTMF_BURST, DTMF_PER_S, Providers
from streams.memory import caller_key
from streams.providers.base import TtsProvider
from tests.conftest import kafka_bootstrap
from tests.integration.test_call_e2e import agent_done_speaking, say
from voxlog.settings import Settings
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.fake_twilio import FakeTwilio, new_account_sid
from voxlog.sim.stack import LocalStack, free_port, local_stack
from voxlog.sim.twilio_caller import TwilioCaller, parse_stream_twiml

pytestmark = pytest.mark.slow

AGENT_NUMBER = "+15550100"
AUTH_TOKEN = "voxlog-hardship-auth-token"
SILENCE_1S = bytes([0xFF]) * 8000
REPO = Path(__file__).resolve().parents[2]


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.2)


async def call_events(backend: LogBackend, call_id: str) -> list[Event[EventPayload]]:
    async with backend.admin() as admin:
        return (await read_call(admin, call_id)).events


async def ends(backend: LogBackend) -> dict[TopicPartition, int]:
    async with backend.admin() as admin:
        return {TopicPartition(CALLS, p): end for p, end in (await admin.end_offsets(CALLS)).items()}


async def calls_topic_since(backend: LogBackend, start: dict[TopicPartition, int]) -> list[Event[EventPayload]]:
    """The events written to voxlog.calls after `start` (end offsets taken earlier), up to its end now."""
    stop = await ends(backend)
    codec, out = backend.codec, []
    async with backend.consumer([CALLS], auto_offset_reset="earliest") as consumer:
        async def assigned() -> bool:
            return len(consumer.assignment()) == len(stop)

        await eventually(assigned, 30, "partitions assigned")
        for tp, offset in start.items():
            await consumer.seek(tp, offset)
        remaining = {tp for tp in stop if stop[tp] > start[tp]}
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            for record in await consumer.poll(timeout_s=1.0, max_records=5000):
                if record.offset < stop[record.tp]:
                    out.append(codec.decode(record.value))
                if record.offset + 1 >= stop[record.tp]:
                    remaining.discard(record.tp)
    assert not remaining, f"voxlog.calls not read to its end: {remaining}"
    return out


def assert_whole(events: list[Event[EventPayload]]) -> CallEnded:
    """A call in the log from its call.started to one call.ended, every seq once, in order."""
    assert events, "the call is not in the log at all"
    assert isinstance(events[0].payload, CallStarted), f"it starts with {events[0].type}"
    assert [e.seq for e in events] == list(range(len(events))), [(e.seq, e.type) for e in events]
    ended = [e.payload for e in events if isinstance(e.payload, CallEnded)]
    assert len(ended) == 1, [e.type for e in events[-3:]]
    assert events[-1].type == "call.ended", [e.type for e in events[-3:]]
    return ended[0]


# --------------------------------------------------------------------------- a burst past capacity


async def test_a_burst_of_80_callers_in_a_second_gets_capacity_served_and_the_rest_told_busy(
    log_bootstrap: str | None, tmp_path: Path
) -> None:
    capacity = 20
    settings = Settings(home=tmp_path, max_calls=capacity, kafka_bootstrap=log_bootstrap)
    async with local_stack(settings) as stack:
        backend = stack.gateway.backend
        before = await ends(backend)
        callers = [stack.caller(from_=f"+1555700{i:04d}", to=AGENT_NUMBER) for i in range(80)]
        started = time.monotonic()
        answers = await asyncio.gather(*(caller.ring() for caller in callers))
        burst_s = time.monotonic() - started
        assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
        admitted = [(c, parse_stream_twiml(a.text))
                    for c, a in zip(callers, answers, strict=True) if "<Stream" in a.text]
        busy = [a for a in answers if '<Reject reason="busy"' in a.text]
        assert (len(admitted), len(busy)) == (capacity, 80 - capacity), f"in {burst_s:.1f} s"

        async def talk(caller: TwilioCaller, instructions: object) -> str:
            async with caller:
                await caller.connect(instructions)  # type: ignore[arg-type]
                await caller.send_mulaw(SILENCE_1S)
                await caller.stop()
            return str(instructions.parameters["call_id"])  # type: ignore[attr-defined]

        call_ids = await asyncio.gather(*(talk(c, i) for c, i in admitted))
        await stack.gateway.wait_idle(120)
        for call_id in call_ids:
            assert assert_whole(await call_events(backend, call_id)).reason == "caller_hangup"
        refused = [e for e in await calls_topic_since(backend, before) if isinstance(e.payload, CallRefused)]
        ours = {c.call_sid for c in callers}
        refused = [e for e in refused if e.payload.provider_call_id in ours]  # type: ignore[attr-defined]
        assert len(refused) == 80 - capacity
        assert {e.payload.reason for e in refused} == {"gateway_at_capacity"}  # type: ignore[attr-defined]
        assert all(e.seq == 0 and e.payload.limit == capacity for e in refused)  # type: ignore[attr-defined]
        assert not stack.gateway.sessions
        assert stack.gateway.admission.live == 0, "every place given back"

        # After the burst the gateway serves again at once: no circuit was opened by it.
        after = stack.caller(from_="+15557009999", to=AGENT_NUMBER)
        call_id = await talk(after, await after.dial())
        await stack.gateway.wait_idle(60)
        assert assert_whole(await call_events(backend, call_id)).reason == "caller_hangup"


async def test_one_tenant_over_its_limit_is_told_busy_and_the_others_are_served(tmp_path: Path) -> None:
    agents = demo_agents_with(tmp_path / "agents", tenant={"limits": {"max_concurrent_calls": 2}})
    async with local_stack(Settings(home=tmp_path / "home", agents_dir=agents)) as stack:
        callers = [stack.caller(from_=f"+1555710{i:04d}", to=AGENT_NUMBER) for i in range(4)]
        answers = [await c.ring() for c in callers]
        assert ['<Reject reason="busy"' in a.text for a in answers] == [False, False, True, True]
        assert stack.gateway.admission.tenant_live("demo") == 2


async def test_a_widget_caller_past_capacity_is_told_busy(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path, max_calls=1)) as stack:
        url = stack.base_url.replace("http", "ws") + "/widget/ws"
        hello = json.dumps({"type": "hello", "key": "demo-widget-key"})
        async with websockets.connect(url) as first:
            await first.send(hello)
            assert json.loads(await first.recv())["type"] == "started"
            async with websockets.connect(url) as second:
                await second.send(hello)
                answer = json.loads(await second.recv())
                assert answer["type"] == "busy"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await second.recv()
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1013
        await stack.gateway.wait_idle(30)
        assert stack.gateway.metrics.refused.labels("demo", "front-desk", "gateway_at_capacity")._value.get() == 1


async def test_api_keys_are_rate_limited_and_strangers_cannot_make_the_audit_trail_grow_without_end(
    tmp_path: Path
) -> None:
    agents = demo_agents_with(tmp_path / "agents",
                              tenant={"limits": {"api_requests_per_minute": 60, "api_burst": 3}})
    async with local_stack(Settings(home=tmp_path / "home", agents_dir=agents)) as stack, \
            httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        key = {"Authorization": "Bearer demo-api-key"}
        asked = [await client.get("/v1/calls/dials/dial-000000000000aaaaaaaaaaaaaaaaaaaa", headers=key)
                 for _ in range(4)]
        assert [a.status_code for a in asked] == [404, 404, 404, 429]
        assert asked[-1].headers["Retry-After"] == "1"
        assert "over its rate" in asked[-1].json()["detail"]

        before = sum((await ends(stack.gateway.backend)).values())
        # The strangers' allowance refills (30 a minute): on a busy machine 200 requests take long enough
        # to earn more, so their clock stands still here.
        now = time.monotonic()
        stack.gateway.rate_limits.clock = lambda: now
        strangers = [(await client.get("/v1/calls/dials/dial-x", headers={"Authorization": f"Bearer guess-{i}"}))
                     for i in range(200)]
        assert Counter(r.status_code for r in strangers) == {401: 10, 429: 190}
        async with stack.gateway.backend.admin() as admin:
            audited = [r async for r in admin.read_key([AUDIT], b"-")]
        refused = [EventCodec().decode(r.value).payload for r in audited]
        assert sum(1 for p in refused if getattr(p, "action", "") == "api.unauthorized") == 10
        assert sum((await ends(stack.gateway.backend)).values()) == before, "nothing else was written"


# --------------------------------------------------------------------------- hostile media streams


async def connected_call(stack: LocalStack) -> tuple[TwilioCaller, str]:
    """A phone call the gateway answered, its media stream open, and its id."""
    caller = stack.caller(to=AGENT_NUMBER)
    instructions = await caller.dial()
    await caller.connect(instructions)
    return caller, instructions.parameters["call_id"]


async def test_a_flood_of_malformed_frames_is_counted_not_recorded_and_then_ends_the_call(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        caller, call_id = await connected_call(stack)
        async with caller:
            for i in range(30):
                await caller.send_raw(f"{{not json {i}")
            await caller.send_mulaw(SILENCE_1S)  # the call goes on
            assert not caller.closed.is_set()
            for i in range(1000):
                await caller.send_raw(f"{{still not json {i}")
            await asyncio.wait_for(caller.closed.wait(), 30)
        await stack.gateway.wait_idle(30)
        events = await call_events(stack.gateway.backend, call_id)
        errors = [e.payload for e in events if e.type == "error.raised"]
        assert len(errors) == 12, "ten recorded one by one, one saying the rest are counted, one ending the call"
        assert "counted, not recorded" in errors[10].message  # type: ignore[attr-defined]
        assert errors[11].fatal  # type: ignore[attr-defined]
        assert assert_whole(events).reason == "protocol_error"


async def test_audio_faster_than_anyone_speaks_is_dropped_and_a_flood_of_it_ends_the_call(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        caller, call_id = await connected_call(stack)
        async with caller:
            await caller.send_mulaw(SILENCE_1S, realtime=False)  # a second's backlog at once: within the limit
            await caller.send_mulaw(SILENCE_1S * 60, realtime=False)  # a minute of "audio" in a moment: a flood
            await asyncio.wait_for(caller.closed.wait(), 30)
        await stack.gateway.wait_idle(30)
        events = await call_events(stack.gateway.backend, call_id)
        end = assert_whole(events)
        assert end.reason == "protocol_error"
        errors = [e.payload for e in events if isinstance(e.payload, ErrorRaised)]
        first = re.fullmatch(r"caller audio (\d+) ms ahead of the call's clock: frame dropped", errors[0].message)
        assert first is not None, errors[0].message
        # Each frame takes the audio 20 ms further ahead and the clock only brings it back: the first frame
        # dropped is the one past the limit, so everything up to it was heard.
        assert AUDIO_AHEAD_LIMIT_US // 1000 < int(first[1]) <= AUDIO_AHEAD_LIMIT_US // 1000 + 20
        assert errors[-1].fatal
        assert len(errors) == 12, "ten recorded one by one, one saying the rest are counted, one ending the call"


async def test_a_flood_of_key_presses_is_taken_at_a_thumbs_pace_and_the_call_goes_on(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        caller, call_id = await connected_call(stack)
        async with caller:
            started = time.monotonic()
            for _ in range(200):
                await caller.send_dtmf("5")
            await caller.send_mulaw(SILENCE_1S)  # paced: the call goes on
            elapsed = time.monotonic() - started
            assert not caller.closed.is_set()
            await caller.stop()
        await stack.gateway.wait_idle(30)
        events = await call_events(stack.gateway.backend, call_id)
        pressed = [e for e in events if isinstance(e.payload, DtmfReceived)]
        assert DTMF_BURST <= len(pressed) <= DTMF_BURST + DTMF_PER_S * elapsed + 1
        errors = [e.payload for e in events if isinstance(e.payload, ErrorRaised)]
        assert "more than 10 presses a second" in errors[0].message
        assert not any(e.fatal for e in errors)
        assert assert_whole(events).reason != "protocol_error"


async def test_a_media_stream_claiming_another_call_is_refused_and_the_real_one_connects(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        caller = stack.caller(to=AGENT_NUMBER)
        instructions = await caller.dial()
        forger = TwilioCaller(stack.base_url, stack.auth_token, account_sid=caller.account_sid, to=AGENT_NUMBER)
        await forger.connect(instructions)  # the answered call's parameters, another CallSid
        await asyncio.wait_for(forger.closed.wait(), 10)
        assert forger.close_code == 1008
        assert not stack.gateway.sessions
        async with caller:
            await caller.connect(instructions)
            await caller.send_mulaw(SILENCE_1S)
            await caller.stop()
        await stack.gateway.wait_idle(30)
        call_id = instructions.parameters["call_id"]
        assert assert_whole(await call_events(stack.gateway.backend, call_id)).reason == "caller_hangup"
        async with stack.gateway.backend.admin() as admin:
            audited = [EventCodec().decode(r.value).payload async for r in admin.read_key([AUDIT], call_id.encode())]
        assert [(a.action, a.resource) for a in audited] == [  # type: ignore[attr-defined]
            ("media.call_mismatch", forger.call_sid)]


class BuggyVoice(TtsProvider):
    """A voice with a bug: not a provider failure (those are ProviderErrors the session handles) but an
    exception nobody expected, in the middle of the call's speech task."""

    name = "buggy"

    def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        raise ZeroDivisionError("a bug in the voice")


async def test_a_task_of_the_call_that_crashes_ends_the_call_with_the_error_instead_of_silence(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        registry = stack.gateway.provider_registry
        stack.gateway.providers_factory = lambda agent: Providers(
            asr=registry.asr(agent), llm=registry.llm(agent), tts=BuggyVoice())
        caller = stack.caller(to=AGENT_NUMBER)
        instructions = await caller.dial()
        async with caller:
            await caller.connect(instructions)
            await asyncio.wait_for(caller.closed.wait(), 30)  # hung up, not left in silence
        await stack.gateway.wait_idle(30)
        events = await call_events(stack.gateway.backend, instructions.parameters["call_id"])
        end = assert_whole(events)
        assert end.reason == "error"
        assert "ZeroDivisionError: a bug in the voice" in (end.detail or "")
        crashed = [e.payload for e in events if e.type == "error.raised"]
        assert [(c.kind, c.fatal) for c in crashed] == [("crashed", True)]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- a gateway killed mid-call


@dataclass
class GatewayProcess:
    """`voxlog serve` as an operator runs it: a process of its own, its settings in the environment."""

    process: subprocess.Popen[bytes]
    base_url: str
    output: Path

    @classmethod
    def start(cls, home: Path, twilio: FakeTwilio, *, kafka: str | None, **env: str) -> GatewayProcess:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        environment = {**os.environ, "VOXLOG_HOME": str(home), "VOXLOG_RUN_PROJECTIONS": "false",
                       "TWILIO_ACCOUNT_SID": twilio.account_sid, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                       "VOXLOG_TWILIO_API_BASE": twilio.base_url, "VOXLOG_PUBLIC_URL": base_url, **env}
        environment.pop("VOXLOG_KAFKA_BOOTSTRAP", None)
        if kafka:
            environment["VOXLOG_KAFKA_BOOTSTRAP"] = kafka
        output = home / f"gateway-{port}.log"
        with output.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "voxlog.cli", "serve", "--port", str(port)],
                                       env=environment, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        return cls(process, base_url, output)

    async def ready(self, timeout_s: float = 90) -> None:
        async def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited: {self.output.read_text()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{self.base_url}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, timeout_s, f"gateway at {self.base_url} ready")

    def caller(self, twilio: FakeTwilio, number: str) -> TwilioCaller:
        caller = TwilioCaller(self.base_url, AUTH_TOKEN, account_sid=twilio.account_sid, from_=number, to=AGENT_NUMBER)
        twilio.add_call(number, AGENT_NUMBER, sid=caller.call_sid)
        return caller

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio(new_account_sid(), AUTH_TOKEN) as running:
        yield running


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


async def test_a_call_whose_gateway_is_killed_is_ended_once_by_the_gateways_that_remain(
    backend: LogBackend, log_bootstrap: str | None, tmp_path: Path, twilio: FakeTwilio,
    gateways: list[GatewayProcess]
) -> None:
    kafka = log_bootstrap
    doomed = GatewayProcess.start(tmp_path, twilio, kafka=kafka)
    gateways.append(doomed)
    await doomed.ready()
    caller = doomed.caller(twilio, "+15557200001")
    instructions = await caller.dial()
    call_id = instructions.parameters["call_id"]
    await caller.connect(instructions)
    await caller.send_mulaw(SILENCE_1S * 2)

    async def under_way() -> bool:
        return len(await call_events(backend, call_id)) > 50

    await eventually(under_way, 30, "the call's events in the log")
    doomed.process.send_signal(signal.SIGKILL)  # kill -9: no drain, no last lease
    doomed.process.wait(30)
    await caller.abort()
    assert not any(isinstance(e.payload, CallEnded) for e in await call_events(backend, call_id))

    # Two gateways take over; both run a reaper, and both may end the call: it must end once.
    survivors = [GatewayProcess.start(tmp_path, twilio, kafka=kafka) for _ in range(2)]
    gateways.extend(survivors)
    await asyncio.gather(*(g.ready() for g in survivors))
    noticed = time.monotonic()

    async def ended() -> bool:
        return any(isinstance(e.payload, CallEnded) for e in await call_events(backend, call_id))

    await eventually(ended, 90, "the lost call ended by a reaper")
    took_s = time.monotonic() - noticed
    events = await call_events(backend, call_id)
    end = assert_whole(events)
    assert end.reason == "gateway_lost"
    assert "stopped renewing its lease" in (end.detail or "")
    assert events[-1].envelope.event_time_us == events[-2].envelope.event_time_us, "when it was last heard of"
    assert took_s < 60, f"ended {took_s:.0f} s after the survivors started"

    async with backend.admin() as admin:
        copies = [r.value async for r in admin.read_key(list(CALL_TOPICS), call_id.encode())
                  if backend.codec.schema_of(r.value)[0] == "call.ended"]
    assert copies
    assert len(set(copies)) == 1, "any second reaper wrote the very same event (read once)"

    # Twilio's final status callback for it reaches a survivor: answered, and nothing breaks.
    to_survivor = TwilioCaller(survivors[0].base_url, AUTH_TOKEN, account_sid=twilio.account_sid,
                               call_sid=caller.call_sid, from_=caller.from_, to=AGENT_NUMBER)
    status = await to_survivor.send_status("completed", duration_s=5)
    assert status.status_code == 204
    assert Counter(e.type for e in await call_events(backend, call_id))["call.ended"] == 1


# --------------------------------------------------------------------------- SIGTERM after an overload


async def test_sigterm_after_an_overload_ends_live_calls_with_a_reason_within_the_drain_time(
    backend: LogBackend, log_bootstrap: str | None, tmp_path: Path, twilio: FakeTwilio,
    gateways: list[GatewayProcess]
) -> None:
    kafka = log_bootstrap
    drain_s = 5
    gateway = GatewayProcess.start(tmp_path, twilio, kafka=kafka, VOXLOG_MAX_CALLS="4", VOXLOG_DRAIN_S=str(drain_s))
    gateways.append(gateway)
    await gateway.ready()
    callers = [gateway.caller(twilio, f"+1555730{i:04d}") for i in range(10)]
    answers = await asyncio.gather(*(c.ring() for c in callers))
    admitted = [(c, parse_stream_twiml(a.text)) for c, a in zip(callers, answers, strict=True) if "<Stream" in a.text]
    assert len(admitted) == 4
    for caller, instructions in admitted:
        await caller.connect(instructions)
    talking = [asyncio.create_task(c.send_mulaw(SILENCE_1S * 60)) for c, _ in admitted]
    call_ids = [i.parameters["call_id"] for _, i in admitted]

    async def all_under_way() -> bool:
        counts = [len(await call_events(backend, c)) for c in call_ids]
        return min(counts) > 20

    await eventually(all_under_way, 60, "every admitted call under way")
    signalled = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(gateway.process.wait, drain_s + 30)
    stopped_s = time.monotonic() - signalled
    for task in talking:
        task.cancel()
    await asyncio.gather(*talking, return_exceptions=True)
    for caller, _ in admitted:
        await caller.abort()
    assert stopped_s < drain_s + 10, f"stopped {stopped_s:.1f} s after SIGTERM"
    for call_id in call_ids:
        assert assert_whole(await call_events(backend, call_id)).reason == "shutdown"
    hung_up = {r.call_sid for r in twilio.requests_for("update_call") if r.params.get("Status") == "completed"}
    assert {c.call_sid for c, _ in admitted} <= hung_up, "each caller was hung up through Twilio's REST API"


# --------------------------------------------------------------------------- the broker away


@dataclass
class OwnBroker:
    """A Kafka broker of the test's own (tools/kafka/broker.sh), to stop and bring back."""

    env: dict[str, str]
    bootstrap: str

    def run(self, command: str) -> None:
        done = subprocess.run([str(REPO / "tools" / "kafka" / "broker.sh"), command], env=self.env,
                              capture_output=True, timeout=180)
        if done.returncode:
            raise AssertionError(f"broker.sh {command} exited {done.returncode}:\n"
                                 f"{(done.stdout + done.stderr).decode(errors='replace')[-3000:]}")


def broker_port() -> int:
    """A free client port whose next one, the controller's, is free too (broker.sh refuses a taken one)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    kafka_bootstrap()  # CI has a broker's jars and a JDK; without them this skips (or fails under CI)
    failures: list[str] = []
    for attempt in range(3):  # a port taken by someone else between its pick and the broker's bind: another
        port = broker_port()
        env = {**os.environ, "VOXLOG_KAFKA_PORT": str(port), "VOXLOG_KAFKA_DIR": str(tmp_path / f"broker-{attempt}"),
               "VOXLOG_KAFKA_HEAP": "-Xmx512m -Xms256m", "VOXLOG_KAFKA_START_TIMEOUT": "180"}
        broker = OwnBroker(env, f"127.0.0.1:{port}")
        try:
            broker.run("start")
            break
        except AssertionError as exc:
            failures.append(str(exc))
            broker.run("stop")
    else:
        raise AssertionError("the test's own broker did not start:\n" + "\n---\n".join(failures))
    try:
        yield broker
    finally:
        broker.run("stop")


async def health(stack: LocalStack) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"{stack.base_url}/healthz")).status_code


@pytest.mark.kafka
async def test_the_broker_away_longer_than_the_producers_timeouts_and_back(
    own_broker: OwnBroker, tmp_path: Path
) -> None:
    outage_s = 50  # aiokafka gives up a wait for the previous batch after 40 s (request_timeout_ms)
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=own_broker.bootstrap, drain_s=5)
    stopping: float | None = None
    async with local_stack(settings) as stack:
        backend = stack.gateway.backend
        caller = stack.caller(from_="+15557400001", to=AGENT_NUMBER)
        instructions = await caller.dial()
        call_id = instructions.parameters["call_id"]
        await caller.connect(instructions)
        await caller.send_mulaw(SILENCE_1S)

        own_broker.run("stop")
        away = time.monotonic()
        talking = asyncio.create_task(caller.send_mulaw(SILENCE_1S * (outage_s + 10)))

        async def not_ready() -> bool:
            return await health(stack) == 503

        await eventually(not_ready, 15, "readiness says the log cannot be written")
        busy = stack.caller(from_="+15557400002", to=AGENT_NUMBER)
        assert '<Reject reason="busy"' in (await busy.ring()).text, "new calls are refused cleanly"
        await asyncio.wait_for(caller.closed.wait(), 40)  # the live call is ended: it cannot be recorded
        assert caller.closed_by_agent
        while time.monotonic() - away < outage_s:
            assert await health(stack) == 503
            await asyncio.sleep(1)

        own_broker.run("resume")

        async def ready() -> bool:
            return await health(stack) == 200

        await eventually(ready, 60, "ready again once the broker is back")
        talking.cancel()
        await asyncio.gather(talking, return_exceptions=True)
        await caller.abort()
        await stack.gateway.wait_idle(60)
        events = await call_events(backend, call_id)
        end = assert_whole(events)
        assert end.reason == "log_unavailable"
        heard = [e.payload for e in events if isinstance(e.payload, CallerAudioChunk)]
        assert [c.chunk_index for c in heard] == list(range(len(heard))), "no chunk is missing"
        assert [c.offset_ms for c in heard] == list(itertools.accumulate([0] + [c.duration_ms for c in heard[:-1]])), \
            "every frame heard is in the log"
        # The caller talked on through the outage until the gateway ended the call, about LOG_OUTAGE_END_S
        # in: what it heard meanwhile waited in the producer's buffer. How much it heard by then depends on
        # the machine (a starved loop hears late; CI once heard 14.1 s of 15), but it is well past the
        # second before the broker stopped.
        assert sum(c.duration_ms for c in heard) > LOG_OUTAGE_END_S * 1000 / 3

        after = stack.caller(from_="+15557400003", to=AGENT_NUMBER)
        async with after:
            instructions = await after.dial()
            await after.connect(instructions)
            await after.send_mulaw(SILENCE_1S)
            await after.stop()
        await stack.gateway.wait_idle(60)
        assert assert_whole(await call_events(backend, instructions.parameters["call_id"])).reason == "caller_hangup"

        # Away again, and the gateway is asked to stop: it does, within its drain time.
        last = stack.caller(from_="+15557400004", to=AGENT_NUMBER)
        instructions = await last.dial()
        await last.connect(instructions)
        await last.send_mulaw(SILENCE_1S)
        own_broker.run("stop")
        stopping = time.monotonic()
    assert stopping is not None
    assert time.monotonic() - stopping < settings.drain_s + 10
    await last.abort()



# --------------------------------------------------------------------------- its background process


def children(pid: int) -> list[int]:
    """The processes `pid` started that still run (Linux: every thread's list)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def background_of(gateway: GatewayProcess) -> int | None:
    for pid in children(gateway.process.pid):
        with contextlib.suppress(OSError):
            if b"voxlog.background" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
async def test_the_background_process_projects_and_summarises_comes_back_when_killed_and_dies_with_its_gateway(
    tmp_path: Path, twilio: FakeTwilio, gateways: list[GatewayProcess], embedded_backend: LogBackend
) -> None:
    gateway = GatewayProcess.start(tmp_path, twilio, kafka=None, VOXLOG_RUN_PROJECTIONS="true")
    gateways.append(gateway)
    await gateway.ready()
    background = background_of(gateway)
    assert background is not None, "voxlog serve runs the projections in a process of their own"

    number = "+15557400001"
    caller = gateway.caller(twilio, number)
    instructions = await caller.dial()
    await caller.connect(instructions)
    await agent_done_speaking(caller)  # the greeting
    await say(caller, "my internet is down again")
    await caller.stop()
    call_id = instructions.parameters["call_id"]

    async def summarised() -> bool:
        async with embedded_backend.admin() as admin:
            memory = (await read_call(admin, caller_key("demo", number) or "", topics=(CALLS,))).events
        return any(isinstance(e.payload, CallSummarized) and e.payload.call_id == call_id for e in memory)

    # The summariser runs there too: the caller's memory stream gets the call's summary.
    await eventually(summarised, 60, "the call's summary, by the summariser in the background process")

    async def sql(query: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(f"{gateway.base_url}/v1/sql", json={"query": query},
                                     headers={"Authorization": "Bearer demo-api-key"})

    async def projected() -> bool:
        answer = await sql("SELECT call_id FROM calls")
        return answer.status_code == 200 and [call_id] in answer.json()["rows"]

    # Projected there, read here: the gateway's tenant SQL goes through the process that holds chDB.
    await eventually(projected, 60, "the call's row, projected by the background process")
    assert (await sql("SELECT * FROM system.tables")).status_code == 403

    os.kill(background, signal.SIGKILL)

    async def replaced() -> bool:
        now = background_of(gateway)
        return now is not None and now != background and await projected()

    await eventually(replaced, 90, "a new background process, serving the same tables")
    second = background_of(gateway)
    assert second is not None

    async def reported() -> bool:  # (its store may answer a moment before it has said it is ready)
        async with httpx.AsyncClient(timeout=10) as client:
            health = (await client.get(f"{gateway.base_url}/healthz")).json()
        assert health["status"] == "ok"
        return bool(health["background"] == {"status": "ok", "restarts": 1})

    await eventually(reported, 30, "the restart reported by /healthz")

    gateway.process.send_signal(signal.SIGKILL)
    gateway.process.wait(30)

    async def gone() -> bool:
        return not running(second)

    await eventually(gone, 30, "the background process ended with its gateway")
