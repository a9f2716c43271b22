"""The HubSpot connector (streams/connectors/crm_hubspot.py): HubSpot's own SDK against FakeHubSpot, HubSpot's
CRM v3 wire protocol on 127.0.0.1. What the SDK sends, how HubSpot's answers are read, and what HubSpot does
its own way (a number in four properties, emails kept unique, a call's association in its create, the
scopes a 403 names); the contract suite covers what every CRM connector does."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from streams.connectors.base import CallNote, ConnectorError, ContactFields, CrmConnector, FailureKind
from streams.connectors.crm_hubspot import HubSpotCrm, HubSpotSettings, connect
from streams.connectors.secrets import Secrets
from tests.connectors.fake_hubspot import CONTACTS_READ
from tests.connectors.harness_hubspot import TIMEOUT_S, HubSpotHarness, harness
from tests.connectors.vendor_server import SeenRequest

NUMBER = "+14155550100"
CONTACT_PROPERTIES = ["firstname", "lastname", "email", "phone", "company", "lastmodifieddate",
                      "lifecyclestage", "hs_lead_status", "hubspot_owner_id", "jobtitle", "mobilephone"]
NOTE = CallNote(call_id="call-7f3a", started_at=datetime(2026, 3, 2, 9, 30, 5, tzinfo=UTC), duration_s=95,
                direction="inbound", outcome="technician booked", summary="Boiler leaking; booked Tuesday 10:00.",
                recording_url="https://recordings.example.com/call-7f3a.wav", ticket_id="T-4411")


@pytest.fixture
def hubspot() -> Iterator[HubSpotHarness]:
    with harness() as made:
        yield made


def sent(hubspot: HubSpotHarness) -> list[tuple[str, str]]:
    return [(request.method, request.path) for request in hubspot.server.requests]


def last(hubspot: HubSpotHarness, method: str, path: str) -> SeenRequest:
    return [r for r in hubspot.server.requests if (r.method, r.path) == (method, path)][-1]


def failure(call: Any, *args: Any) -> ConnectorError:
    with pytest.raises(ConnectorError) as raised:
        call(*args)
    return raised.value


def test_the_connector_is_a_crm_paced_for_hubspots_search_limit(hubspot: HubSpotHarness) -> None:
    assert isinstance(hubspot.connector, CrmConnector)
    assert hubspot.connector.vendor == "hubspot"
    assert hubspot.connector.rate_limit.rate_per_s == 5.0  # the search endpoints' 5 a second
    assert "API usage guidelines and limits" in hubspot.connector.rate_limit.source


def test_settings_name_the_token_and_connect_resolves_it() -> None:
    settings = HubSpotSettings.model_validate({"kind": "hubspot", "token": {"env": "HUBSPOT_TOKEN"}})
    assert settings.base_url == "https://api.hubapi.com"
    with pytest.raises(ValueError, match="Extra inputs"):
        HubSpotSettings.model_validate({"kind": "hubspot", "token": {"env": "HUBSPOT_TOKEN"}, "api_key": "x"})

    error = failure(connect, settings, Secrets(environ={}), TIMEOUT_S)

    assert error.kind is FailureKind.CONFIGURATION
    assert "HUBSPOT_TOKEN is not set" in str(error)


# -- finding a contact ---------------------------------------------------------------------------------


def test_find_contact_is_one_search_for_the_number_in_each_phone_property(hubspot: HubSpotHarness) -> None:
    contact_id = hubspot.seed_contact(NUMBER, "Ada", "Lovelace", "ada@example.com")

    found = hubspot.connector.find_contact(NUMBER)

    assert found is not None
    assert found.id == contact_id
    assert sent(hubspot) == [("POST", "/crm/v3/objects/contacts/search")]
    request = hubspot.server.requests[0]
    assert request.headers["authorization"] == f"Bearer {hubspot.server.token}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("hubspot-api-client-python")
    assert request.json() == {
        "filterGroups": [{"filters": [{"propertyName": name, "operator": "EQ", "value": NUMBER}]} for name in
                         ("phone", "mobilephone", "hs_calculated_phone_number", "hs_calculated_mobile_number")],
        "sorts": [{"propertyName": "lastmodifieddate", "direction": "DESCENDING"}],
        "properties": CONTACT_PROPERTIES,
        "limit": 1,
    }


def test_a_found_contact_carries_name_email_company_and_details(hubspot: HubSpotHarness) -> None:
    contact_id = hubspot.server.add_contact({
        "firstname": "Ada", "lastname": "Lovelace", "email": "ada@example.com", "phone": NUMBER,
        "company": "Analytical Engines", "lifecyclestage": "customer", "hubspot_owner_id": "8812",
        "hs_lead_status": "OPEN", "jobtitle": None, "mobilephone": "+14155550111", "hs_persona": "persona_1"})

    found = hubspot.connector.find_contact(NUMBER)

    assert found is not None
    assert (found.id, found.name, found.first_name, found.email, found.phone, found.company) == (
        contact_id, "Ada Lovelace", "Ada", "ada@example.com", NUMBER, "Analytical Engines")
    assert found.details == {"lifecyclestage": "customer", "hubspot_owner_id": "8812", "hs_lead_status": "OPEN",
                             "mobilephone": "+14155550111"}


def test_a_number_typed_another_way_or_held_as_the_mobile_is_found(hubspot: HubSpotHarness) -> None:
    typed = hubspot.server.add_contact({"firstname": "Typed", "phone": "(415) 555-0100"})
    mobile = hubspot.server.add_contact({"firstname": "Mobile", "mobilephone": "+14155550122"})

    by_typed, by_mobile = hubspot.connector.find_contact(NUMBER), hubspot.connector.find_contact("+14155550122")

    assert by_typed is not None
    assert by_typed.id == typed
    assert by_typed.phone == "(415) 555-0100"
    assert by_mobile is not None
    assert by_mobile.id == mobile
    assert by_mobile.phone == "+14155550122"


def test_of_more_matches_than_a_page_the_most_recently_changed_is_found_in_one_request(
        hubspot: HubSpotHarness) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [hubspot.server.add_contact({"firstname": f"Twin {i}", "phone": NUMBER},
                                      modified_at=start + timedelta(minutes=(i * 37) % 250)) for i in range(250)]
    newest = ids[max(range(250), key=lambda i: (i * 37) % 250)]  # neither the first nor the last made

    found = hubspot.connector.find_contact(NUMBER)

    assert found is not None
    assert found.id == newest
    assert newest not in (ids[0], ids[-1])
    assert sent(hubspot) == [("POST", "/crm/v3/objects/contacts/search")]


def test_the_search_pages_as_hubspots_does(hubspot: HubSpotHarness) -> None:
    """The fake's paging, through the SDK's own search client: `paging.next.after` while more follow."""
    for i in range(5):
        hubspot.server.add_contact({"firstname": f"Twin {i}", "phone": NUMBER})
    search, pages, after = hubspot.connector._contacts_search, [], None
    while True:
        body = {"filterGroups": [{"filters": [{"propertyName": "phone", "operator": "EQ", "value": NUMBER}]}],
                "limit": 2, **({"after": after} if after else {})}
        page = search.do_search(public_object_search_request=body)
        pages.append([result.properties["firstname"] for result in page.results])
        if page.paging is None:
            break
        after = page.paging.next.after

    assert pages == [["Twin 0", "Twin 1"], ["Twin 2", "Twin 3"], ["Twin 4"]]
    assert page.total == 5


def test_no_contact_with_the_number_is_none(hubspot: HubSpotHarness) -> None:
    hubspot.seed_contact("+14155550999", "Someone", "Else")
    assert hubspot.connector.find_contact(NUMBER) is None


NAMES = ("firstname", "lastname", "email", "company", "lifecyclestage", "hs_lead_status", "hubspot_owner_id",
         "jobtitle", "mobilephone")
VALUES = st.one_of(st.none(), st.text(max_size=24), st.integers(-10**12, 10**12), st.booleans())


def _read(value: Any) -> str:
    """What HubSpot's JSON value reads as: the SDK takes every property as a string."""
    return "" if value is None else str(value).strip()


def test_contact_properties_of_any_shape_hubspot_may_answer_are_read(hubspot: HubSpotHarness) -> None:
    numbers = iter(range(10**6))

    @settings(max_examples=60, deadline=None)
    @given(properties=st.dictionaries(st.sampled_from(NAMES), VALUES))
    @example(properties={})
    @example(properties={"firstname": None, "lastname": None})
    @example(properties={"firstname": "  ", "lastname": "Lovelace", "company": 0})
    def run(properties: dict[str, Any]) -> None:
        number = f"+1202{next(numbers):07d}"
        contact_id = hubspot.server.add_contact({**properties, "phone": number})

        found = hubspot.connector.find_contact(number)

        read = {name: _read(properties.get(name)) for name in NAMES}
        assert found is not None
        assert found.id == contact_id
        assert found.first_name == read["firstname"]
        assert found.name == " ".join(part for part in (read["firstname"], read["lastname"]) if part)
        assert (found.email, found.company, found.phone) == (read["email"], read["company"], number)
        assert found.details == {name: read[name] for name in
                                 ("lifecyclestage", "hs_lead_status", "hubspot_owner_id", "jobtitle", "mobilephone")
                                 if read[name]}

    run()


@pytest.mark.parametrize("body", [
    '{"total": 1, "results": [{"properties": {}, "createdAt": "2026-01-01T00:00:00Z"}]}',
    '{"total": 1, "results": [{"id": "", "properties": {}, "createdAt": "2026-01-01T00:00:00Z", '
    '"updatedAt": "2026-01-01T00:00:00Z"}]}',
    '{"total": 1, "results": "1001"}',
    '{"total": 1, "results": [{"id": "1001", "properties": ["firstname"], "createdAt": "2026-01-01T00:00:00Z"}]}',
    '{"total": 1, "results": [{"id": "1001", "properties": {}, "createdAt": "yesterday"}]}',
    '[]',
    "<html><body>upstream connect error</body></html>",
])
def test_a_search_answer_that_is_not_hubspots_is_a_bad_response(hubspot: HubSpotHarness, body: str) -> None:
    hubspot.fail_next(200, body=body)  # a 200, not a failure: what a broken proxy or API change would answer

    assert failure(hubspot.connector.find_contact, NUMBER).kind is FailureKind.BAD_RESPONSE


# -- upserting a contact -------------------------------------------------------------------------------


def test_upsert_patches_the_contact_with_the_number_with_only_the_fields_given(hubspot: HubSpotHarness) -> None:
    contact_id = hubspot.server.add_contact({"firstname": "Ada", "mobilephone": NUMBER, "email": "ada@example.com",
                                             "phone": "+14155550177"})

    contact = hubspot.connector.upsert_contact(ContactFields(phone=NUMBER, last_name="Lovelace"), "key-1")

    assert sent(hubspot) == [("POST", "/crm/v3/objects/contacts/search"),
                             ("PATCH", f"/crm/v3/objects/contacts/{contact_id}")]
    # Not the phone: the contact holds the number as its mobile, and its own phone stays.
    assert last(hubspot, "PATCH", f"/crm/v3/objects/contacts/{contact_id}").json() == {
        "properties": {"lastname": "Lovelace"}}
    assert (contact.id, contact.name, contact.email, contact.phone) == (
        contact_id, "Ada Lovelace", "ada@example.com", "+14155550177")


def test_upsert_creates_a_contact_and_a_repeat_of_it_creates_nothing(hubspot: HubSpotHarness) -> None:
    fields = ContactFields(phone=NUMBER, first_name="Grace", last_name="Hopper", email="grace@example.com",
                           company="Navy")

    created = hubspot.connector.upsert_contact(fields, "key-1")
    again = hubspot.connector.upsert_contact(fields, "key-1")

    assert last(hubspot, "POST", "/crm/v3/objects/contacts").json() == {"properties": {
        "phone": NUMBER, "firstname": "Grace", "lastname": "Hopper", "email": "grace@example.com", "company": "Navy"}}
    assert sent(hubspot)[2:] == [("POST", "/crm/v3/objects/contacts/search"),
                                 ("PATCH", f"/crm/v3/objects/contacts/{created.id}")]
    assert again == created
    assert [c["id"] for c in hubspot.contacts_with_phone(NUMBER)] == [created.id]


def test_an_email_another_contact_has_is_a_conflict_that_names_it(hubspot: HubSpotHarness) -> None:
    other = hubspot.seed_contact("+14155550999", "Ada", "Lovelace", "ada@example.com")

    error = failure(hubspot.connector.upsert_contact, ContactFields(phone=NUMBER, email="ada@example.com"), "key-1")

    assert error.kind is FailureKind.CONFLICT
    assert error.status == 409
    assert f"Contact already exists. Existing ID: {other}" in str(error)


# -- logging a call --------------------------------------------------------------------------------------


def test_log_call_creates_the_call_with_its_contact_association_in_one_request(hubspot: HubSpotHarness) -> None:
    contact_id = hubspot.seed_contact(NUMBER, "Ada", "Lovelace")

    call_id = hubspot.connector.log_call(contact_id, NOTE, "log-1")

    assert sent(hubspot) == [("POST", "/crm/v3/objects/calls/search"), ("POST", "/crm/v3/objects/calls")]
    assert last(hubspot, "POST", "/crm/v3/objects/calls/search").json() == {
        "filterGroups": [{"filters": [{"propertyName": "hs_call_external_id", "operator": "EQ",
                                       "value": "voxlog:log-1"}]}],
        "properties": ["hs_call_external_id"], "limit": 1}
    assert last(hubspot, "POST", "/crm/v3/objects/calls").json() == {
        "properties": {
            "hs_timestamp": "2026-03-02T09:30:05.000Z",
            "hs_call_title": "Inbound call with the voice agent: technician booked",
            "hs_call_body": "<p>Boiler leaking; booked Tuesday 10:00.</p><p>Outcome: technician booked</p>"
                            "<p>Ticket: T-4411</p><p>voxlog call call-7f3a</p>",
            "hs_call_duration": "95000",
            "hs_call_direction": "INBOUND",
            "hs_call_status": "COMPLETED",
            "hs_call_external_id": "voxlog:log-1",
            "hs_call_recording_url": "https://recordings.example.com/call-7f3a.wav",
        },
        "associations": [{"to": {"id": contact_id},
                          "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 194}]}],
    }
    [logged] = hubspot.calls_logged(contact_id)
    assert logged["id"] == call_id
    assert logged["summary"].splitlines() == [NOTE.summary, "Outcome: technician booked", "Ticket: T-4411",
                                              "voxlog call call-7f3a"]


def test_log_call_twice_with_one_key_makes_one_call_and_answers_its_id(hubspot: HubSpotHarness) -> None:
    contact_id = hubspot.seed_contact(NUMBER, "Ada", "Lovelace")

    first = hubspot.connector.log_call(contact_id, NOTE, "log-1")
    second = hubspot.connector.log_call(contact_id, NOTE, "log-1")
    other = hubspot.connector.log_call(contact_id, NOTE, "log-2")

    assert first == second != other
    search, create = ("POST", "/crm/v3/objects/calls/search"), ("POST", "/crm/v3/objects/calls")
    assert sent(hubspot) == [search, create, search, search, create]  # the repeat found the first's call
    assert [call["id"] for call in hubspot.calls_logged(contact_id)] == [first, other]


def test_a_summary_with_markup_is_written_as_text(hubspot: HubSpotHarness) -> None:
    contact_id = hubspot.seed_contact(NUMBER, "Ada", "Lovelace")
    note = CallNote(call_id="c-1", started_at=NOTE.started_at, duration_s=5, direction="outbound", outcome="",
                    summary='Caller said "<b>urgent</b>" & hung up.')

    hubspot.connector.log_call(contact_id, note, "log-1")

    body = last(hubspot, "POST", "/crm/v3/objects/calls").json()
    assert body["properties"]["hs_call_body"] == (
        '<p>Caller said "&lt;b&gt;urgent&lt;/b&gt;" &amp; hung up.</p><p>voxlog call c-1</p>')
    assert body["properties"]["hs_call_title"] == "Outbound call with the voice agent"
    assert "hs_call_recording_url" not in body["properties"]
    assert hubspot.calls_logged(contact_id)[0]["summary"].splitlines()[0] == note.summary


def test_a_call_direction_hubspot_does_not_know_is_refused_before_anything_is_sent(hubspot: HubSpotHarness) -> None:
    note = CallNote(call_id="c-1", started_at=NOTE.started_at, duration_s=5, direction="sideways", outcome="",
                    summary="?")

    assert failure(hubspot.connector.log_call, "1001", note, "log-1").kind is FailureKind.INVALID
    assert hubspot.requests_seen == 0


def test_a_call_on_a_contact_hubspot_does_not_have_is_invalid(hubspot: HubSpotHarness) -> None:
    error = failure(hubspot.connector.log_call, "4040", NOTE, "log-1")

    assert error.kind is FailureKind.INVALID
    assert "associations are invalid" in str(error)


# -- check -----------------------------------------------------------------------------------------------


def test_check_on_a_healthy_account_reads_and_writes_nothing_real(hubspot: HubSpotHarness) -> None:
    results = hubspot.connector.check()

    assert [(r.what, r.ok) for r in results] == [
        ("reach HubSpot", True), ("private app token", True),
        ("read contacts (crm.objects.contacts.read)", True), ("read calls (crm.objects.contacts.read)", True),
        ("write contacts (crm.objects.contacts.write)", True), ("write calls (crm.objects.contacts.write)", True)]
    assert sent(hubspot) == [("GET", "/crm/v3/objects/contacts"), ("GET", "/crm/v3/objects/calls"),
                             ("PATCH", "/crm/v3/objects/contacts/0"), ("PATCH", "/crm/v3/objects/calls/0")]
    assert hubspot.server.requests[0].query == {"limit": ["1"]}
    assert last(hubspot, "PATCH", "/crm/v3/objects/calls/0").json() == {"properties": {}}
    assert hubspot.server.records_of("contacts") == hubspot.server.records_of("calls") == []


def test_check_surfaces_the_scopes_hubspot_says_are_missing(hubspot: HubSpotHarness) -> None:
    hubspot.server.granted_scopes = {CONTACTS_READ}

    results = {r.what: r for r in hubspot.connector.check()}

    assert results["read contacts (crm.objects.contacts.read)"].ok
    refused = results["write contacts (crm.objects.contacts.write)"]
    assert not refused.ok
    assert refused.detail.startswith("scope missing (403): add it to the private app; HubSpot: required scopes "
                                     "crm.objects.contacts.write: This app hasn't been granted all required scopes")
    assert not results["write calls (crm.objects.contacts.write)"].ok


def test_check_with_a_refused_token_says_so_and_goes_no_further(hubspot: HubSpotHarness) -> None:
    wrong = HubSpotCrm(SecretStr("pat-na1-revoked"), timeout_s=TIMEOUT_S, base_url=hubspot.server.base_url)

    results = wrong.check()

    assert [(r.what, r.ok) for r in results] == [("reach HubSpot", True), ("private app token", False)]
    assert results[1].detail.startswith("token refused (401): check the private app's access token; "
                                        "HubSpot: Authentication credentials not found.")
    assert "pat-na1-revoked" not in results[1].detail
    assert hubspot.requests_seen == 1


def test_check_with_hubspot_out_of_reach_says_so() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    connector = HubSpotCrm(SecretStr("pat-na1-x"), timeout_s=TIMEOUT_S, base_url=f"http://127.0.0.1:{port}")

    [result] = connector.check()

    assert (result.what, result.ok) == ("reach HubSpot", False)
    assert "could not be reached" in result.detail


# -- failures on the wire ----------------------------------------------------------------------------------


def test_a_missing_scope_fails_an_operation_with_hubspots_words(hubspot: HubSpotHarness) -> None:
    hubspot.server.granted_scopes = {CONTACTS_READ}

    error = failure(hubspot.connector.upsert_contact, ContactFields(phone=NUMBER, first_name="Ada"), "key-1")

    assert error.kind is FailureKind.SCOPE
    assert error.status == 403
    assert "required scopes crm.objects.contacts.write" in str(error)
    assert hubspot.server.token not in str(error)


def test_hubspots_rate_limit_answer_is_rate_limited_with_its_words_and_retry_after(hubspot: HubSpotHarness) -> None:
    hubspot.fail_next(429, headers={"Retry-After": "7"})

    error = failure(hubspot.connector.find_contact, NUMBER)

    assert (error.kind, error.retry_after_s) == (FailureKind.RATE_LIMITED, 7.0)
    assert "You have reached your ten_secondly_rolling limit." in str(error)


def test_a_stalled_answer_fails_within_the_timeout_and_urllib3_does_not_retry_it(hubspot: HubSpotHarness) -> None:
    hubspot.stall_next(30)

    began = time.monotonic()
    error = failure(hubspot.connector.find_contact, NUMBER)

    assert error.kind is FailureKind.UNAVAILABLE
    assert "did not answer within 1 s" in str(error)
    assert time.monotonic() - began < TIMEOUT_S + 2.0
    assert hubspot.requests_seen == 1
    assert hubspot.connector.find_contact(NUMBER) is None  # the next request gets a fresh connection
