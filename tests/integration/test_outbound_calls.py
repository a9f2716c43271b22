"""Outbound calls and transfers through the real gateway and dialer, with Twilio's REST API as a
local stand-in driven by the real twilio SDK: `POST /v1/calls`, the dialer placing the call within
the tenant's rate limit, the person answering (signed voice webhook, media stream), status
callbacks, and the `<Dial>` action reporting what became of a transfer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.exceptions import ConnectionClosed

from consumers.event_reader import read_call
from schemas.base import Event, EventPayload
from schemas.events import (
    CallDialFailed,
    CallDialPlaced,
    CallDialRequested,
    CallEnded,
    CallStarted,
    CallStatus,
    HandoffOutcome,
    TtsRequested,
)
from schemas.topics import AUDIT
from streams.call.replay import agent_for, verify_call
from streams.channels.twilio_webhook_protocol import DIAL_ACTION_PATH, IDEMPOTENCY_HEADER
from tests.integration.test_call_e2e import agent_done_speaking, speech
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings
from voxlog.sim.stack import LocalStack, local_stack
from voxlog.sim.twilio_caller import TwilioCaller, parse_stream_twiml

pytestmark = pytest.mark.slow

DEMO_KEY = "demo-api-key"
OTHER_KEY = "other-tenant-key"
PERSON = "+15557770100"


def agents_with_two_tenants(folder: Path, **dialing: Any) -> Path:
    """The demo agents plus a second tenant with its own key; `dialing` overrides the demo's policy."""
    shutil.copytree(DEFAULT_AGENTS_DIR, folder)
    tenant_file = folder / "demo" / "tenant.yaml"
    demo = yaml.safe_load(tenant_file.read_text())
    demo["dialing"].update(dialing)
    tenant_file.write_text(yaml.safe_dump(demo))
    other = folder / "other"
    other.mkdir()
    agent = yaml.safe_load((folder / "demo" / "front-desk.yaml").read_text())
    agent.update(tenant="other", routing={"numbers": ["+15550200"]})
    (other / "front-desk.yaml").write_text(yaml.safe_dump(agent))
    (other / "tenant.yaml").write_text(yaml.safe_dump({
        "id": "other", "api_keys": [{"id": "other-key", "sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest()}],
        "dialing": {"caller_ids": ["+15550200"]}}))
    return folder


@pytest.fixture
async def stack(log_bootstrap: str | None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=log_bootstrap,
                        agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as running:
        yield running


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "home",
                        agents_dir=agents_with_two_tenants(tmp_path / "agents", calls_per_minute=60, burst=2))
    async with local_stack(settings) as running:
        yield running


async def api(stack: LocalStack, method: str, path: str, key: str | None = DEMO_KEY, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        return await client.request(method, path, headers=headers, **kwargs)


async def stream_of(stack: LocalStack, key: str) -> list[Event[EventPayload]]:
    async with stack.gateway.backend.admin() as admin:
        return (await read_call(admin, key)).events


async def wait_for_stream(stack: LocalStack, key: str, predicate: Any, timeout_s: float = 15) -> list[Event[Any]]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        events = await stream_of(stack, key)
        if predicate(events):
            return events
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{key}: {[e.type for e in events]}")
        await asyncio.sleep(0.1)


async def test_a_requested_call_is_placed_answered_and_talks_with_the_agent(stack: LocalStack) -> None:
    asked = await api(stack, "POST", "/v1/calls", json={
        "agent": "front-desk", "to": PERSON, "parameters": {"customer": "Ada", "reason": "follow_up"}})
    assert asked.status_code == 202, asked.text
    dial_id, call_id = asked.json()["dial_id"], asked.json()["call_id"]

    (placed,) = await stack.placed_calls(1)
    params = placed.params
    assert (params["To"], params["From"]) == (PERSON, "+15550100"), "from the tenant's caller id"
    assert params["Timeout"] == "30"
    person = stack.callee(placed)
    assert (await person.send_status("initiated", sequence=0)).status_code == 204
    ringing = {IDEMPOTENCY_HEADER: "ringing-1"}  # a retry is the same request, its token included
    assert (await person.send_status("ringing", sequence=1, headers=ringing)).status_code == 204
    assert (await person.send_status("ringing", sequence=1, headers=ringing)).status_code == 204  # Twilio retried it

    instructions = await person.dial()
    assert instructions.parameters["call_id"] == call_id
    async with person:
        await person.connect(instructions)
        await agent_done_speaking(person)
        await person.send_mulaw(speech("no thank you goodbye"))
        await asyncio.wait_for(person.closed.wait(), 30)
    await stack.gateway.wait_idle(30)
    assert (await person.send_status("completed", sequence=3, duration_s=9)).status_code == 204

    dial = await wait_for_stream(stack, dial_id, lambda es: sum(isinstance(e.payload, CallStatus) for e in es) >= 2)
    assert [e.type for e in dial] == ["call.dial_requested", "call.dial_placed", "call.status", "call.status"]
    assert [e.seq for e in dial] == [0, 1, 2, 3], "status callbacks number on after the placing; a retry is the same"
    assert isinstance(dial[0].payload, CallDialRequested)
    assert dial[0].payload.requested_by == "demo-key"
    assert isinstance(dial[1].payload, CallDialPlaced)
    assert dial[1].payload.provider_call_id == placed.call_sid

    call = await wait_for_stream(stack, call_id, lambda es: any(isinstance(e.payload, CallStatus) for e in es))
    started = call[0].payload
    assert isinstance(started, CallStarted)
    assert (started.direction, started.routed_by) == ("outbound", "outbound_request")
    assert started.parameters == {"customer": "Ada", "reason": "follow_up", "dial_id": dial_id,
                                  "consent_rule": "one_party", "consent_mode": "notice"}  # asked once answered
    assert any(isinstance(e.payload, CallEnded) for e in call)
    assert verify_call(call, agent_for(call, stack.gateway.router)).identical

    view = await api(stack, "GET", f"/v1/calls/dials/{dial_id}")
    assert view.status_code == 200
    assert view.json()["call_id"] == call_id
    assert view.json()["provider_call_id"] == placed.call_sid
    assert view.json()["status"] == "ringing"  # the dial's last word; the call's own stream has the rest


async def test_the_api_refuses_what_it_must(stack: LocalStack) -> None:
    assert (await api(stack, "POST", "/v1/calls", key=None, json={"agent": "front-desk", "to": PERSON})
            ).status_code == 401
    assert (await api(stack, "POST", "/v1/calls", key="wrong", json={"agent": "front-desk", "to": PERSON})
            ).status_code == 401
    bad_number = await api(stack, "POST", "/v1/calls", json={"agent": "front-desk", "to": "555-0100"})
    assert bad_number.status_code == 422
    assert "to" in bad_number.text
    assert (await api(stack, "POST", "/v1/calls", json={"agent": "nobody", "to": PERSON})).status_code == 404
    not_ours = await api(stack, "POST", "/v1/calls", json={"agent": "front-desk", "to": PERSON, "from": "+15550200"})
    assert not_ours.status_code == 422, "another tenant's caller id"
    too_many = await api(stack, "POST", "/v1/calls", json={
        "agent": "front-desk", "to": PERSON, "parameters": {f"p{i}": "x" for i in range(40)}})
    assert too_many.status_code == 422

    mine = (await api(stack, "POST", "/v1/calls", json={"agent": "front-desk", "to": PERSON})).json()["dial_id"]
    assert (await api(stack, "GET", f"/v1/calls/dials/{mine}")).status_code == 200
    assert (await api(stack, "GET", f"/v1/calls/dials/{mine}", key=OTHER_KEY)).status_code == 404, "tenant-scoped"

    async with stack.gateway.backend.admin() as admin:
        audit = [e async for e in admin.read_key([AUDIT], b"-")]
    assert len(audit) >= 2, "refused keys are audited"


async def test_the_tenant_rate_limit_spaces_placed_calls(embedded: LocalStack) -> None:
    for _ in range(4):
        assert (await api(embedded, "POST", "/v1/calls", json={"agent": "front-desk", "to": PERSON})).status_code == 202
    placed = await embedded.placed_calls(4, timeout_s=20)
    spacing = [later.at - placed[0].at for later in placed]
    # burst 2 at 60 a minute: two at once, then one a second
    assert spacing[2] >= 0.9, spacing
    assert spacing[3] >= 1.9, spacing


async def test_twilio_refusals_are_retried_only_when_safe(embedded: LocalStack) -> None:
    embedded.twilio.fail_next(400, 21211, "The 'To' number +15557770100 is not a valid phone number.",
                              operation="create_call")
    refused = (await api(embedded, "POST", "/v1/calls", json={"agent": "front-desk", "to": PERSON})).json()
    events = await wait_for_stream(embedded, refused["dial_id"], lambda es: len(es) >= 2)
    failed = events[1].payload
    assert isinstance(failed, CallDialFailed)
    assert (failed.code, failed.attempt, failed.final) == (21211, 1, True), "a 400 is final"

    assert embedded.gateway.dialer is not None
    embedded.gateway.dialer.backoff_s = 0.05
    embedded.twilio.fail_next(429, 20429, "Too Many Requests", operation="create_call")
    busy = (await api(embedded, "POST", "/v1/calls", json={"agent": "front-desk", "to": PERSON})).json()
    events = await wait_for_stream(embedded, busy["dial_id"], lambda es: len(es) >= 3)
    assert [type(e.payload) for e in events] == [CallDialRequested, CallDialFailed, CallDialPlaced]
    assert events[1].payload.retryable
    assert events[2].payload.attempt == 2

    view = (await api(embedded, "GET", f"/v1/calls/dials/{refused['dial_id']}")).json()
    assert view["status"] == "failed"
    assert "not a valid phone number" in view["error"]


def dial_action_url(twiml: str) -> str:
    dial = ET.fromstring(twiml).find("Dial")
    assert dial is not None, twiml
    return dial.attrib["action"]


async def transferred_call(stack: LocalStack) -> tuple[TwilioCaller, str, str]:
    """A caller asks for a human; returns (caller, call id, the <Dial> action URL Twilio got)."""
    caller = stack.caller(from_="+15557770002", to="+15550100")
    instructions = await caller.dial()
    async with caller:
        await caller.connect(instructions)
        await agent_done_speaking(caller)
        with contextlib.suppress(ConnectionClosed):  # the transfer may end the stream while we still send
            await caller.send_mulaw(speech("i want to talk to a person"))
        await asyncio.wait_for(caller.closed.wait(), 30)
    await stack.gateway.wait_idle(30)
    (transfer,) = stack.twilio.requests_for("update_call", caller.call_sid)
    return caller, instructions.parameters["call_id"], dial_action_url(transfer.params["Twiml"])


async def post_dial_action(caller: TwilioCaller, url: str, status: str, duration: int | None = None) -> httpx.Response:
    path = url[len(caller.base_url):]
    assert path.startswith(DIAL_ACTION_PATH)
    params = caller.voice_params(CallStatus="in-progress", DialCallStatus=status, DialCallSid="CA" + "d" * 32)
    if duration is not None:
        params["DialCallDuration"] = str(duration)
    return await caller.post_webhook(path, params)


async def test_a_transfer_nobody_answers_brings_the_caller_back_to_the_agent(stack: LocalStack) -> None:
    caller, call_id, action = await transferred_call(stack)
    answer = await post_dial_action(caller, action, "no-answer")
    assert answer.status_code == 200
    back = parse_stream_twiml(answer.text)
    new_call_id = back.parameters["call_id"]
    assert new_call_id != call_id

    returned = TwilioCaller(caller.base_url, caller.auth_token, account_sid=caller.account_sid,
                            call_sid=caller.call_sid, from_=caller.from_, to=caller.to)
    async with returned:
        await returned.connect(back)
        await agent_done_speaking(returned)
        await returned.send_mulaw(speech("no thank you goodbye"))
        await asyncio.wait_for(returned.closed.wait(), 30)
    await stack.gateway.wait_idle(30)

    first = await stream_of(stack, call_id)
    outcome = first[-1].payload
    assert isinstance(outcome, HandoffOutcome), [e.type for e in first]
    assert (outcome.outcome, outcome.provider_status) == ("no_answer", "no-answer")
    assert outcome.handoff_id == f"{call_id}/handoff"
    assert verify_call(first, agent_for(first, stack.gateway.router)).identical, "a late outcome changes no decision"

    second = await stream_of(stack, new_call_id)
    started = second[0].payload
    assert isinstance(started, CallStarted)
    assert started.routed_by == "handoff_return"
    assert started.parameters["returned_from"] == call_id
    said = [e.payload.text for e in second if isinstance(e.payload, TtsRequested)]
    assert "couldn't reach anyone" in said[0], said
    assert verify_call(second, agent_for(second, stack.gateway.router)).identical


async def test_a_transfer_a_human_took_ends_with_the_human(embedded: LocalStack) -> None:
    caller, call_id, action = await transferred_call(embedded)
    answer = await post_dial_action(caller, action, "completed", duration=42)
    assert answer.status_code == 200
    assert "<Hangup" in answer.text
    outcome = (await stream_of(embedded, call_id))[-1].payload
    assert isinstance(outcome, HandoffOutcome)
    assert (outcome.outcome, outcome.duration_s) == ("connected", 42)
    forged = await caller.post_webhook(action[len(caller.base_url):], {"DialCallStatus": "busy"}, signature="bad")
    assert forged.status_code == 403

