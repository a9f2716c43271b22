"""What every CRM (`CrmConnector`, streams/connectors/base.py) must do, whatever its vendor: each real
connector, through its vendor's SDK, against a local server speaking that vendor's API
(tests/connectors/fake_*.py); the wire details of each are in tests/integration/test_*_connector.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from streams.connectors.base import CallNote, ContactFields, CrmConnector, FailureKind
from tests.connectors.contract_faults import check_auth, check_faults, check_health, check_stall, failure, harness_of

pytestmark = pytest.mark.timeout(120)

VENDORS = ("hubspot", "salesforce")


@pytest.fixture(params=VENDORS)
def crm(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from harness_of(request.param)


def note(call_id: str = "call-1") -> CallNote:
    return CallNote(call_id=call_id, started_at=datetime(2026, 12, 1, 15, 0, tzinfo=UTC), duration_s=125,
                    direction="inbound", outcome="booked", summary="Booked a technician for Tuesday 10 am.",
                    recording_url="https://voxlog.example/v1/calls/call-1/recording", ticket_id="T-9")


def test_is_a_crm(crm: Any) -> None:
    assert isinstance(crm.connector, CrmConnector)
    assert crm.connector.rate_limit.rate_per_s > 0
    assert crm.connector.rate_limit.source


def test_finds_a_contact_by_phone(crm: Any) -> None:
    contact_id = crm.seed_contact("+15551230001", "Ada", "Lovelace", "ada@example.com")
    crm.seed_contact("+15551230002", "Grace", "Hopper")
    found = crm.connector.find_contact("+15551230001")
    assert found is not None
    assert found.id == contact_id
    assert found.first_name == "Ada"
    assert "Lovelace" in found.name
    assert found.email == "ada@example.com"
    assert crm.connector.find_contact("+15559990000") is None


def test_upsert_creates_once_then_updates(crm: Any) -> None:
    connector: CrmConnector = crm.connector
    created = connector.upsert_contact(ContactFields(phone="+15551230003", first_name="Alan", last_name="Turing"),
                                       "upsert-1")
    again = connector.upsert_contact(ContactFields(phone="+15551230003", first_name="Alan", last_name="Turing"),
                                     "upsert-1")
    updated = connector.upsert_contact(ContactFields(phone="+15551230003", email="alan@example.com"), "upsert-2")
    assert created.id == again.id == updated.id
    assert len(crm.contacts_with_phone("+15551230003")) == 1
    assert connector.find_contact("+15551230003") is not None


def test_logs_a_call_once_per_key(crm: Any) -> None:
    contact_id = crm.seed_contact("+15551230004", "Edsger", "Dijkstra")
    first = crm.connector.log_call(contact_id, note(), "log-call-1")
    second = crm.connector.log_call(contact_id, note(), "log-call-1")
    assert first
    assert first == second
    logged = crm.calls_logged(contact_id)
    assert len(logged) == 1
    assert "Tuesday 10 am" in logged[0]["summary"]
    other = crm.connector.log_call(contact_id, note("call-2"), "log-call-2")
    assert other != first
    assert len(crm.calls_logged(contact_id)) == 2


def test_a_call_on_a_contact_that_is_not_there(crm: Any) -> None:
    error = failure(lambda: crm.connector.log_call("0030000000MISSING", note(), "log-call-missing"))
    assert error.kind in (FailureKind.NOT_FOUND, FailureKind.INVALID)


def test_faults_on_the_wire(crm: Any) -> None:
    crm.seed_contact("+15551230005", "Barbara", "Liskov")
    check_faults(crm, lambda: crm.connector.find_contact("+15551230005"))


def test_a_stalled_crm_times_out(crm: Any) -> None:
    check_stall(crm, lambda: crm.connector.find_contact("+15551230006"))


def test_refused_credentials(crm: Any) -> None:
    check_auth(crm, lambda: crm.connector.find_contact("+15551230007"))


def test_check_says_what_is_wrong(crm: Any) -> None:
    check_health(crm, crm.connector.check)
