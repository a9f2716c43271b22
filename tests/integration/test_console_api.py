"""The QA console's API: `GET /v1/console/calls` lists a tenant's calls (filtered by agent, version, outcome,
dates, errors and fallbacks; paged) and `GET /v1/console/calls/{id}` gives one call (rows of the redacted
tables, the event timeline from the log, the replay check), each for the key's tenant only, audited;
`GET /console` is served with a strict Content-Security-Policy. Against the local stack on the
embedded log and this process's chDB, with calls written into the log as a gateway writes them, and
one played through the gateway for real."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from consumers.backends import LogBackend
from producers.event_writer import CallRecorder, EventWriter
from projections.default_projections import default_projections
from projections.projection_runner import catch_up
from projections.store import AnalyticsStore
from schemas.base import EventPayload
from schemas.codec import EventCodec
from schemas.events import (
    AuditRecorded,
    CallEnded,
    CallStarted,
    ErrorRaised,
    ProviderFallback,
    TranscriptFinal,
    TurnTaken,
)
from schemas.sealing import PERSONAL_DATA
from schemas.topics import AUDIT
from tests.integration.test_call_e2e import agent_done_speaking, speech
from tests.integration.test_outbound_calls import DEMO_KEY, OTHER_KEY, agents_with_two_tenants, api
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.synthetic_calls import synthetic_call
from voxlog.sim.twilio_caller import MULAW_SILENCE, TwilioCaller

pytestmark = pytest.mark.slow

DAY_US = 86_400_000_000
GREETING = "Thanks for calling Acme. How can I help you today?"  # voxlog/agents/demo/front-desk.yaml
REWORDED = "Hello from Acme Home Services, what can we do for you?"


def seeded_call(*, agent_id: str = "front-desk", agent_version: str = "sha256:demo", outcome: str = "resolved",
                caller_says: Sequence[str] = (), error: bool = False, fallback: bool = False,
                index: int = 0) -> Iterator[EventPayload]:
    """A synthetic call (`voxlog.sim.synthetic_calls`) as asked: its agent and outcome, what the caller
    says in its turns (transcript and turn alike), an error and a provider's fallback before its end."""
    said = iter(caller_says)
    text: str | None = None
    for payload in synthetic_call(index, turns=max(2, len(caller_says)), frames_per_utterance=5):
        if isinstance(payload, CallStarted):
            payload = replace(payload, agent_id=agent_id, agent_version=agent_version)
        elif isinstance(payload, TranscriptFinal):
            text = next(said, None)
            if text is not None:
                payload = replace(payload, text=text, words=())
        elif isinstance(payload, TurnTaken) and text is not None:
            payload = replace(payload, caller_text=text)
        elif isinstance(payload, CallEnded):
            if fallback:
                yield ProviderFallback(capability="tts", from_provider="flite", to_provider="espeak-ng",
                                       reason="timeout", turn_index=0)
            if error:
                yield ErrorRaised(component="llm", kind="timeout", message="the model took too long",
                                  retryable=True, fatal=False, provider="offline-scripted")
            payload = replace(payload, outcome=outcome)
        yield payload


async def seed(backend: LogBackend, tenant: str, started_us: int, payloads: Iterator[EventPayload]) -> str:
    """One call's events into the log, 10 ms apart from `started_us`; returns its id."""
    call_id = f"call-seeded-{time.time_ns():x}"
    async with backend.producer() as producer:
        recorder = CallRecorder(EventWriter(producer), tenant_id=tenant, call_id=call_id, producer="test",
                                producer_version="0")
        for i, payload in enumerate(payloads):
            await recorder.record(payload, event_time_us=started_us + i * 10_000)
        await producer.flush()
    return call_id


@contextlib.asynccontextmanager
async def quiet_line(caller: TwilioCaller) -> AsyncIterator[None]:
    """The caller's line carries silence meanwhile, 200 ms at a time, as Twilio streams a quiet line."""

    async def hiss() -> None:
        with contextlib.suppress(ConnectionClosed):
            while not caller.closed.is_set():
                await caller.send_mulaw(bytes([MULAW_SILENCE]) * 1600)

    task = asyncio.create_task(hiss())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def call_continuously(stack: LocalStack, *lines: str, number: str) -> str:
    """A phone call whose caller says `lines`, each once the agent is quiet, with audio on the line all
    along (`TwilioCaller.send_mulaw` alone sends only the words): its recording puts each side's words
    where they were said, as a real call's does. Returns the call's id."""
    caller = stack.caller(from_=number, to="+15550100")
    instructions = await caller.dial()
    async with caller:
        await caller.connect(instructions)
        before = 0
        for line in lines:
            async with quiet_line(caller):
                await agent_done_speaking(caller, beyond=before)
            if caller.closed.is_set():
                break
            before = len(caller.agent_audio)
            await caller.send_mulaw(speech(line))
        async with quiet_line(caller):
            await asyncio.wait_for(caller.closed.wait(), 30)
    return instructions.parameters["call_id"]


async def project(stack: LocalStack, store: AnalyticsStore) -> None:
    await catch_up(stack.gateway.backend, store, default_projections(
        stack.gateway.router, recordings=stack.gateway.recordings_path, recording_store=stack.gateway.recordings))


@pytest.fixture
async def stack(store: AnalyticsStore, tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as running:
        running.gateway.analytics = store  # this process's ClickHouse, the test's own database
        yield running


async def audited(stack: LocalStack, key: str) -> list[tuple[str, str, str, str]]:
    """(tenant, action, resource, outcome) of the audit records of stream `key`."""
    async with stack.gateway.backend.admin() as admin:
        events = [EventCodec().decode(r.value) async for r in admin.read_key([AUDIT], key.encode())]
    return [(e.tenant_id, e.payload.action, e.payload.resource, e.payload.outcome) for e in events
            if isinstance(e.payload, AuditRecorded) and e.payload.action in ("calls.listed", "call.read")]


async def listed(stack: LocalStack, key: str = DEMO_KEY, **query: Any) -> dict[str, Any]:
    got = await api(stack, "GET", "/v1/console/calls", key=key, params=query)
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


async def test_a_tenant_lists_filters_and_pages_its_own_calls_only(stack: LocalStack, store: AnalyticsStore) -> None:
    backend = stack.gateway.backend
    now_us = time.time_ns() // 1000

    def day(n: int) -> int:  # n days ago
        return now_us - n * DAY_US

    booked = [await seed(backend, "demo", day(n), seeded_call(outcome="booked", index=n)) for n in (1, 2, 3)]
    errored = await seed(backend, "demo", day(4), seeded_call(outcome="ticket_created", error=True, index=4))
    fell_back = await seed(backend, "demo", day(5), seeded_call(outcome="ticket_created", fallback=True, index=5))
    other_agent = await seed(backend, "demo", day(6), seeded_call(agent_id="night-desk", agent_version="sha256:v2",
                                                                   outcome="handed_off", index=6))
    theirs = [await seed(backend, "other", day(n), seeded_call(outcome="booked", index=n)) for n in (1, 2)]
    await project(stack, store)
    ours = [*booked, errored, fell_back, other_agent]

    everything = await listed(stack)
    assert [c["call_id"] for c in everything["calls"]] == ours, "newest first, the tenant's only"
    assert everything["total"] == 6
    assert everything["choices"] == {"agents": ["front-desk", "night-desk"],
                                     "agent_versions": ["sha256:demo", "sha256:v2"],
                                     "outcomes": ["booked", "handed_off", "ticket_created"]}
    first = everything["calls"][0]
    assert (first["agent_id"], first["outcome"], first["turns"], first["errors"], first["fallbacks"]) == (
        "front-desk", "booked", 2, 0, 0)
    assert first["ended_at"] is not None
    assert first["duration_ms"] > 0

    pages = [await listed(stack, limit=4, offset=0), await listed(stack, limit=4, offset=4)]
    assert [c["call_id"] for p in pages for c in p["calls"]] == ours
    assert [(p["total"], p["limit"], p["offset"], len(p["calls"])) for p in pages] == [(6, 4, 0, 4), (6, 4, 4, 2)]
    assert (await listed(stack, offset=100))["calls"] == []

    async def ids(**query: Any) -> list[str]:
        return [c["call_id"] for c in (await listed(stack, **query))["calls"]]

    assert await ids(agent="night-desk") == [other_agent]
    assert await ids(agent_version="sha256:demo", outcome="ticket_created") == [errored, fell_back]
    assert await ids(outcome="booked") == booked
    assert await ids(errors="true") == [errored]
    assert await ids(fallbacks="true") == [fell_back]
    assert await ids(errors="false", fallbacks="false") == [*booked, other_agent]

    def iso(us: int) -> str:
        return datetime.fromtimestamp(us / 1e6, UTC).isoformat()

    assert await ids(since=iso(day(3) - 60_000_000), until=iso(day(1) - 60_000_000)) == booked[1:]
    assert await ids(since=(datetime.now(UTC) + timedelta(days=1)).isoformat()) == []
    assert await ids(agent="nobody") == []
    fallbacks = (await listed(stack, fallbacks="true"))["calls"][0]
    assert fallbacks["fallbacks"] == 1

    other = await listed(stack, key=OTHER_KEY)
    assert [c["call_id"] for c in other["calls"]] == theirs
    assert other["choices"]["agents"] == ["front-desk"]
    for call_id in ours:  # another tenant's call is as unknown as none, whatever the route
        for path in (f"/v1/console/calls/{call_id}", f"/v1/calls/{call_id}/recording"):
            assert (await api(stack, "GET", path, key=OTHER_KEY)).status_code == 404, path
    assert (await api(stack, "GET", f"/v1/console/calls/{theirs[0]}")).status_code == 404
    assert (await api(stack, "GET", "/v1/console/calls/call-nobody")).status_code == 404
    for path in ("/v1/console/calls", f"/v1/console/calls/{ours[0]}"):
        refused = await api(stack, "GET", path, key=None)
        assert refused.status_code == 401, path
        assert (await api(stack, "GET", path, key="not-a-key")).status_code == 401
    for query in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"since": "yesterday"}, {"errors": "maybe"},
                  {"until": "0.5"}, {"since": "2025-01-31"}, {"since": "2025-01-31T00:00:00"}):
        assert (await api(stack, "GET", "/v1/console/calls", params=query)).status_code == 422, query

    detail = (await api(stack, "GET", f"/v1/console/calls/{errored}")).json()
    assert detail["call"]["outcome"] == "ticket_created"
    assert [e["kind"] for e in detail["errors"]] == ["timeout"]
    assert detail["replay"]["status"] == "unavailable"  # its agent version is not the demo agent's as it is now
    assert "has changed since the call" in detail["replay"]["detail"]
    fell = (await api(stack, "GET", f"/v1/console/calls/{fell_back}")).json()
    assert [(e["kind"], e["provider"], e["fallback_to"]) for e in fell["errors"]] == [
        ("fallback", "flite", "espeak-ng")]

    reads = await audited(stack, "-") + await audited(stack, errored)
    assert ("demo", "calls.listed", "calls", "accepted") in reads
    assert ("other", "calls.listed", "calls", "accepted") in reads
    assert ("demo", "call.read", errored, "accepted") in reads
    assert ("other", "call.read", errored, "failed") in reads


async def test_a_played_call_in_detail(stack: LocalStack, store: AnalyticsStore) -> None:
    """A call through the gateway (its caller reports a problem; the agent opens a ticket): its turns with
    latencies, the transcript placed in its recording, the ticket's tool call, the timeline without
    personal data, and the replay: identical."""
    call_id = await call_continuously(stack, "i have a problem with my internet", "no thank you goodbye",
                                      number="+15557770177")
    await stack.gateway.wait_idle(30)
    await project(stack, store)

    got = await api(stack, "GET", f"/v1/console/calls/{call_id}")
    assert got.status_code == 200, got.text
    detail = got.json()
    call = detail["call"]
    assert (call["agent_id"], call["channel"], call["outcome"]) == ("front-desk", "phone", "ticket_created")
    assert call["from_number"] == "+*********77", "masked"
    assert detail["replay"]["status"] == "identical", detail["replay"]
    assert detail["replay"]["decisions"] > 3
    assert detail["recording"]["complete"] == 1
    recording_ms = detail["recording"]["duration_ms"]

    turns = detail["turns"]
    assert turns
    assert "internet" in turns[0]["caller_text"]
    assert all(t["voice_to_voice_ms"] is None or t["voice_to_voice_ms"] > 0 for t in turns)
    assert any(t["asr_latency_ms"] > 0 and t["tts_first_byte_ms"] > 0 for t in turns)

    lines = detail["transcript"]
    assert lines[0]["speaker"] == "agent", lines
    positions = [line["position_ms"] for line in lines]
    assert all(p is not None and 0 <= p <= recording_ms for p in positions), (positions, recording_ms)
    said = next(line for line in lines if line["speaker"] == "caller" and "internet" in line["text"])
    greeting = next(line for line in lines if line["speaker"] == "agent" and "Thanks for calling" in line["text"])
    assert greeting["position_ms"] < said["position_ms"], (
        "the greeting comes before the caller speaks", lines)

    (tool,) = detail["tool_calls"]
    assert (tool["tool"], tool["outcome"]) == ("create_ticket", "succeeded")
    assert "internet" in tool["arguments"]

    timeline = detail["timeline"]
    assert [e["seq"] for e in timeline] == sorted(e["seq"] for e in timeline)
    types = [e["type"] for e in timeline]
    assert types[0] == "call.started"
    assert types[-1] == "call.ended"
    assert not any(t.startswith("audio.") for t in types)
    assert {"turn.taken", "llm.decided", "tool.requested", "tool.succeeded", "tts.requested"} <= set(types)
    started = timeline[0]["fields"]
    assert started == {"channel": "phone", "direction": "inbound", "agent_id": "front-desk", "routed_by": "number"}
    shown = str(timeline)
    for personal in ("internet", "+1555", "7770177"):
        assert personal not in shown, "nothing personal in the timeline"

    # What if the agent greeted otherwise: the opening differs, and what follows is counterfactual.
    assert stack.settings.agents_dir is not None
    agent_file = (stack.settings.agents_dir / "demo" / "front-desk.yaml").read_text()
    unchanged = await api(stack, "POST", f"/v1/calls/{call_id}/whatif", json={"agent": agent_file})
    assert unchanged.status_code == 200, unchanged.text
    assert (unchanged.json()["changed"], unchanged.json()["first_difference"]) == (False, None)
    reworded = agent_file.replace(GREETING, REWORDED)
    assert reworded != agent_file
    got = await api(stack, "POST", f"/v1/calls/{call_id}/whatif", json={"agent": reworded})
    assert got.status_code == 200, got.text
    whatif = got.json()
    assert whatif["changed"] is True
    assert whatif["first_difference"] == 0
    assert whatif["agent_then"]["version"] == call["agent_version"]
    assert whatif["agent_now"]["version"] != call["agent_version"]
    opening = whatif["turns"][0]
    assert any(GREETING in act["text"] for act in opening["then"] if act["kind"] == "say"), opening
    assert any(REWORDED in act["text"] for act in opening["now"] if act["kind"] == "say"), opening
    assert all(turn["after_difference"] for turn in whatif["turns"][1:])
    assert "internet" in whatif["turns"][1]["caller"]
    refusals = {
        "not YAML": ("greeting: [unclosed", 422),
        "not an agent": ("id: front-desk\n", 422),
        "another tenant's agent": (reworded.replace("tenant: demo", "tenant: other"), 422),
        "aliases": ("a: &x [1]\nb: *x\n", 422),
    }
    for what, (text, status) in refusals.items():
        refused = await api(stack, "POST", f"/v1/calls/{call_id}/whatif", json={"agent": text})
        assert refused.status_code == status, (what, refused.text)
        assert isinstance(refused.json()["detail"], str), what
    theirs = await api(stack, "POST", f"/v1/calls/{call_id}/whatif", key=OTHER_KEY,
                       json={"agent": reworded.replace("tenant: demo", "tenant: other")})
    assert theirs.status_code == 404
    assert (await api(stack, "POST", "/v1/calls/call-nobody/whatif", json={"agent": reworded})).status_code == 404

    # The recording the page plays is the one the API serves.
    wav = await api(stack, "GET", f"/v1/calls/{call_id}/recording")
    assert wav.status_code == 200
    assert wav.headers["content-type"] == "audio/wav"
    assert (await api(stack, "GET", f"/v1/console/calls/{call_id}", key=OTHER_KEY)).status_code == 404

    # Past its retention (its personal data key destroyed) the call is still listed, its rows redacted as
    # ever, but there is nothing to replay it from.
    keys = stack.gateway.backend.keys
    assert keys is not None
    assert keys.destroy_call("demo", call_id, PERSONAL_DATA, by="test") == 1
    shredded = (await api(stack, "GET", f"/v1/console/calls/{call_id}")).json()
    assert shredded["replay"]["status"] == "erased", shredded["replay"]
    assert any(e["pii_withheld"] for e in shredded["timeline"])
    assert shredded["turns"] == detail["turns"]


async def test_the_console_page_is_served_with_a_strict_policy(stack: LocalStack) -> None:
    page = await api(stack, "GET", "/console", key=None)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert '<script src="/console/console.js"' in html
    assert "<script>" not in html, "no inline script"
    assert not re.search(r"\son[a-z]+=", html), "no inline handler"
    for path, kind in (("/console/console.js", "text/javascript"), ("/console/console.css", "text/css")):
        asset = await api(stack, "GET", path, key=None)
        assert asset.status_code == 200, path
        assert asset.headers["content-type"].startswith(kind), path
    script = (await api(stack, "GET", "/console/console.js", key=None)).text
    assert "innerHTML" not in script
    assert "insertAdjacentHTML" not in script
    assert "eval(" not in script
    for external in ("http://", "https://", "//cdn"):
        assert external not in html + script, external

