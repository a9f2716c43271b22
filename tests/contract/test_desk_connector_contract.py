"""What every ticket desk (`TicketDesk`, streams/connectors/base.py) must do, whatever its vendor: each
real connector against a local server speaking that vendor's API (tests/connectors/fake_*.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from streams.connectors.base import FailureKind, TicketDesk, TicketRequest
from tests.connectors.contract_faults import check_auth, check_faults, check_health, check_stall, failure, harness_of

pytestmark = pytest.mark.timeout(120)

WIRED = ("zendesk", "freshdesk")
"""The desks reached over HTTP: the faults on the wire are theirs."""
VENDORS = (*WIRED, "builtin")


@pytest.fixture(params=VENDORS)
def desk(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from harness_of(request.param)


@pytest.fixture(params=WIRED)
def wired_desk(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from harness_of(request.param)


REQUEST = TicketRequest(
    subject="Internet down since Tuesday", description="Router blinks red; caller said \"it's dead\"",
    requester_phone="+15551230010", requester_name="Ada Lovelace", priority="high")


def test_is_a_desk(desk: Any) -> None:
    assert isinstance(desk.connector, TicketDesk)
    assert desk.connector.rate_limit.rate_per_s > 0
    assert desk.connector.rate_limit.source


def test_opens_one_ticket_per_key(desk: Any) -> None:
    connector: TicketDesk = desk.connector
    ticket = connector.create(REQUEST, "ticket-key-1")
    again = connector.create(REQUEST, "ticket-key-1")
    assert ticket.id
    assert ticket.id == again.id
    assert ticket.status
    assert [t["subject"] for t in desk.tickets()] == [REQUEST.subject]
    other = connector.create(REQUEST, "ticket-key-2")
    assert other.id != ticket.id
    assert len(desk.tickets()) == 2


def test_comments_once_per_key(desk: Any) -> None:
    ticket = desk.connector.create(REQUEST, "ticket-key-3")
    first = desk.connector.comment(ticket.id, "Called back: the technician comes Tuesday.", "comment-1")
    second = desk.connector.comment(ticket.id, "Called back: the technician comes Tuesday.", "comment-1")
    assert first == second
    bodies = desk.comments(ticket.id)
    assert len([b for b in bodies if "technician comes Tuesday" in b]) == 1


def test_status(desk: Any) -> None:
    ticket = desk.connector.create(REQUEST, "ticket-key-4")
    assert desk.connector.status(ticket.id).id == ticket.id
    assert failure(lambda: desk.connector.status("999999999")).kind == FailureKind.NOT_FOUND


def test_faults_on_the_wire(wired_desk: Any) -> None:
    ticket = wired_desk.connector.create(REQUEST, "ticket-key-5")
    check_faults(wired_desk, lambda: wired_desk.connector.status(ticket.id))


def test_a_stalled_desk_times_out(wired_desk: Any) -> None:
    check_stall(wired_desk, lambda: wired_desk.connector.create(REQUEST, "ticket-key-6"))


def test_refused_credentials(wired_desk: Any) -> None:
    check_auth(wired_desk, lambda: wired_desk.connector.create(REQUEST, "ticket-key-7"))


def test_check_says_what_is_wrong(wired_desk: Any) -> None:
    check_health(wired_desk, wired_desk.connector.check)


def test_check_passes_where_all_is_well(desk: Any) -> None:
    results = desk.connector.check()
    assert results
    assert all(r.ok for r in results), results
