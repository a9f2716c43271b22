"""A caller through the gateway, exactly as Twilio plays one, acting in a tenant's own systems, on both
log backends: looked up in HubSpot and greeted by name, a visit booked in a real CalDAV server (Radicale)
at the caller's ten o'clock in New York on a calendar kept in Berlin, a problem reported that becomes a
Zendesk ticket; after the call, the call logged on the contact and the summary on the ticket. Replay of
the recorded call is identical, and never asks the CRM."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
import yaml
from caldav.davclient import DAVClient

from schemas.events import AuditRecorded, ToolRequested, ToolSucceeded, TtsRequested
from schemas.topics import AUDIT
from streams.call.replay import agent_for, verify_call
from streams.connectors.radicale_server import RadicaleServer
from tests.connectors.fake_hubspot import FakeHubSpot
from tests.connectors.fake_zendesk import FakeZendesk
from tests.integration.test_call_e2e import agent_done_speaking, events_of, say, speech
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow

CALLER = "+12125550123"  # New York
AGENT_NUMBER = "+15550142"
NEW_YORK, BERLIN = ZoneInfo("America/New_York"), ZoneInfo("Europe/Berlin")


@dataclass
class Systems:
    hubspot: FakeHubSpot
    zendesk: FakeZendesk
    calendar: DAVClient
    calendar_url: str
    contact_id: str
    environ: dict[str, str]

    def events(self) -> list[icalendar.Event]:
        query = ('<?xml version="1.0" encoding="utf-8"?><C:calendar-query xmlns:D="DAV:" '
                 'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><C:calendar-data/></D:prop><C:filter>'
                 '<C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter>'
                 '</C:calendar-query>')
        answer = self.calendar.report(self.calendar_url, query, depth=1)
        assert answer.tree is not None
        return [event for data in answer.tree.iter("{urn:ietf:params:xml:ns:caldav}calendar-data")
                for event in icalendar.Calendar.from_ical(str(data.text)).walk("VEVENT")]


@pytest.fixture
def systems(tmp_path: Path) -> Iterator[Systems]:
    hubspot_token, zendesk_token, dav_password = (secrets.token_hex(12) for _ in range(3))
    with FakeHubSpot(hubspot_token) as hubspot, \
            FakeZendesk(subdomain="acme", email="ops@acme.example", token=zendesk_token) as zendesk, \
            RadicaleServer(tmp_path / "dav", users={"bot": dav_password}) as dav:
        calendar_url = dav.make_calendar("bot", "visits", "Technician visits")
        contact_id = hubspot.add_contact({"phone": CALLER, "firstname": "Ada", "lastname": "Lovelace",
                                          "company": "Analytical Engines", "lifecyclestage": "customer"})
        client = DAVClient(url=dav.url, username="bot", password=dav_password, auth_type="basic", timeout=10)
        yield Systems(hubspot, zendesk, client, calendar_url, contact_id,
                      {"ACME_HUBSPOT_TOKEN": hubspot_token, "ACME_ZENDESK_TOKEN": zendesk_token,
                       "ACME_CALDAV_PASSWORD": dav_password})


def write_tenant(folder: Path, systems: Systems) -> None:
    """The acme tenant: the demo's front desk, acting in acme's HubSpot, Zendesk and CalDAV calendar."""
    folder.mkdir(parents=True)
    (folder / "tenant.yaml").write_text(yaml.safe_dump({"id": "acme", "integrations": {
        "crm": {"kind": "hubspot", "token": {"env": "ACME_HUBSPOT_TOKEN"}, "base_url": systems.hubspot.base_url},
        "tickets": {"kind": "zendesk", "subdomain": "acme", "email": "ops@acme.example",
                    "token": {"env": "ACME_ZENDESK_TOKEN"}, "base_url": systems.zendesk.base_url},
        "calendar": {"kind": "caldav", "url": systems.calendar_url, "username": "bot",
                     "password": {"env": "ACME_CALDAV_PASSWORD"},
                     "hours": {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                               "opens": "08:00", "closes": "23:00"}},
    }}))
    agent: dict[str, Any] = yaml.safe_load((DEFAULT_AGENTS_DIR / "demo" / "front-desk.yaml").read_text())
    agent.update(tenant="acme", routing={"numbers": [AGENT_NUMBER]})
    agent["tools"] += [
        {"name": "find_caller", "operation": "crm.find_contact", "description": "Who is calling.", "timeout_s": 5},
        {"name": "log_call", "operation": "crm.log_call", "description": "The call on the contact."},
        {"name": "comment_ticket", "operation": "tickets.comment", "description": "A comment on a ticket."},
    ]
    agent["caller_lookup"] = {"tool": "find_caller", "greeting": "Hi {first_name}, welcome back to Acme. "
                              "How can I help you today?"}
    agent["after_call"] = {"log_call_tool": "log_call", "comment_tool": "comment_ticket"}
    (folder / "front-desk.yaml").write_text(yaml.safe_dump(agent))


@pytest.fixture
async def stack(log_bootstrap: str | None, tmp_path: Path, systems: Systems,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalStack]:
    for name, value in systems.environ.items():
        monkeypatch.setenv(name, value)  # the tool worker's environment: the secrets by reference
    write_tenant(tmp_path / "agents" / "acme", systems)
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=log_bootstrap, agents_dir=tmp_path / "agents")
    async with local_stack(settings) as running:
        yield running


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.2)


async def test_a_known_caller_books_reports_and_is_logged_in_the_crm(stack: LocalStack, systems: Systems) -> None:
    caller = stack.caller(from_=CALLER, to=AGENT_NUMBER)
    instructions = await caller.dial()
    call_id = instructions.parameters["call_id"]
    asked_at = datetime.now(NEW_YORK)
    async with caller:
        await caller.connect(instructions)
        await agent_done_speaking(caller)
        await say(caller, "i would like to book an appointment for tomorrow at ten")
        await say(caller, "also my internet is down")
        await caller.send_mulaw(speech("no thank you goodbye"))
        await asyncio.wait_for(caller.closed.wait(), 30)

    events = await events_of(stack, call_id)
    said = [e.payload.text for e in events if isinstance(e.payload, TtsRequested)]
    assert "Hi Ada, welcome back to Acme" in said[0], said[0]
    lookup = next(e.payload for e in events if isinstance(e.payload, ToolSucceeded) and e.payload.tool == "find_caller")
    assert (lookup.connector, lookup.remote_id) == ("hubspot", systems.contact_id)
    first_greeting = next(i for i, e in enumerate(events) if isinstance(e.payload, TtsRequested))
    assert events.index(next(e for e in events if e.payload is lookup)) < first_greeting, "looked up before greeting"

    # The visit: at ten the next morning in New York, which is 16:00 in Berlin, in the calendar.
    booked = next(e.payload for e in events if isinstance(e.payload, ToolSucceeded)
                  and e.payload.tool == "book_appointment")
    assert booked.connector == "caldav"
    (visit,) = systems.events()
    start = visit.decoded("DTSTART")
    assert start.astimezone(NEW_YORK).date() == (asked_at + timedelta(days=1)).date()
    assert start.astimezone(NEW_YORK).hour == 10
    assert start.astimezone(BERLIN).hour == 16
    assert str(visit["UID"]) == booked.remote_id
    assert any("You're booked for" in text for text in said), said

    # The problem: a Zendesk ticket, opened once.
    ticketed = next(e.payload for e in events if isinstance(e.payload, ToolSucceeded)
                    and e.payload.tool == "create_ticket")
    assert ticketed.connector == "zendesk"
    assert [str(t["id"]) for t in systems.zendesk.tickets.values()] == [ticketed.remote_id]

    # After the call: the call on the HubSpot contact, the summary on the ticket.
    await eventually(lambda: len(systems.hubspot.calls_of(systems.contact_id)) == 1, "the call logged in HubSpot")
    (logged,) = systems.hubspot.calls_of(systems.contact_id)
    body = str(logged.properties.get("hs_call_body", ""))
    assert "you booked a visit for" in body
    assert "find caller" not in body  # the lookup is no deed of the call's
    assert f"Ticket: {ticketed.remote_id}" in body
    assert logged.properties.get("hs_call_recording_url", "").endswith(f"/v1/calls/{call_id}/recording")
    ticket_id = int(ticketed.remote_id)
    await eventually(lambda: len(systems.zendesk.comments[ticket_id]) == 2, "the summary on the ticket")
    assert call_id in systems.zendesk.comments[ticket_id][1]["body"]

    # Audit records name the connector and the remote object of every side effect.
    async with stack.gateway.backend.admin() as admin:
        records = [stack.gateway.backend.codec.decode(r.value) async for r in admin.read_key([AUDIT], call_id.encode())]
    resources = {e.payload.resource for e in records if isinstance(e.payload, AuditRecorded)}
    assert {f"caldav:{booked.remote_id}", f"zendesk:{ticketed.remote_id}"} <= resources
    assert any(r.startswith("hubspot:") for r in resources)

    # The after-call commands are the call's next events; replay is identical and asks nobody.
    events = await events_of(stack, call_id)
    after = [e for e in events if isinstance(e.payload, ToolRequested) and e.payload.tool_call_id.startswith("after/")]
    assert [e.payload.tool for e in after] == ["log_call", "comment_ticket"]  # type: ignore[attr-defined]
    asked = systems.hubspot.requests_seen
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical
    assert systems.hubspot.requests_seen == asked
