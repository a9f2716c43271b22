"""The Salesforce connector (streams/connectors/crm_salesforce.py) through simple-salesforce against a
local org (tests/connectors/fake_salesforce.py): both OAuth flows and their refusals, the one token
refresh on a 401, the SOQL it sends and how values are escaped in it, query pages, the Task written
for a call and its idempotency through CallObject, Salesforce's error codes, `check()`, the settings.
What every CRM must do is tests/contract/test_crm_connector_contract.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from streams.connectors.base import CallNote, ConnectorError, ContactFields, FailureKind
from streams.connectors.crm_salesforce import SalesforceConnector, SalesforceSettings, connect
from streams.connectors.secrets import SecretRef, Secrets
from tests.connectors.fake_salesforce import JWT_BEARER, FakeSalesforce, RecordedRequest, parse_soql
from tests.connectors.harness_salesforce import CLIENT_ID, CLIENT_SECRET, USERNAME, SalesforceHarness, harness

pytestmark = pytest.mark.timeout(120)

QUERY_PATH = "/services/data/v62.0/query/"


@pytest.fixture
def sf() -> Iterator[SalesforceHarness]:
    with harness() as running:
        yield running


@pytest.fixture(scope="module")
def shared() -> Iterator[SalesforceHarness]:
    """One org for the property tests (hypothesis runs many examples in one test call)."""
    with harness() as running:
        yield running


def failure(operation: Any) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        operation()
    return caught.value


def queries(org: FakeSalesforce) -> list[str]:
    return [request.query["q"][0] for request in org.requests if request.path == QUERY_PATH]


def posts(org: FakeSalesforce, sobject: str) -> list[RecordedRequest]:
    return [request for request in org.requests
            if request.method == "POST" and request.path == f"/services/data/v62.0/sobjects/{sobject}/"]


def note(call_id: str = "call-7") -> CallNote:
    return CallNote(call_id=call_id, started_at=datetime(2026, 12, 1, 15, 0, tzinfo=UTC), duration_s=125,
                    direction="inbound", outcome="booked", summary="Booked a technician for Tuesday 10 am.",
                    recording_url="https://voxlog.example/v1/calls/call-7/recording", ticket_id="T-9")


# -- signing in ------------------------------------------------------------------------------------


def test_client_credentials_sign_in_is_lazy_and_its_token_is_sent(sf: SalesforceHarness) -> None:
    contact_id = sf.seed_contact("+15551110001", "Ada", "Lovelace", "ada@example.com")
    assert sf.org.token_requests == []  # nothing happens before the first call
    assert sf.connector.find_contact("+15551110001") is not None
    assert sf.connector.find_contact("+15551110001") is not None
    [token_request] = sf.org.token_requests
    assert token_request.form == {"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                  "client_secret": CLIENT_SECRET}
    [first, second] = sf.org.requests
    assert first.method == "GET"
    assert first.path == QUERY_PATH
    assert first.headers["authorization"] == second.headers["authorization"]
    assert first.headers["authorization"].startswith("Bearer 00D")
    assert first.query["q"] == [
        "SELECT Id, Name, FirstName, LastName, Email, Phone, MobilePhone, AccountId, Account.Name, Title, "
        "Account.Type FROM Contact WHERE Phone = '+15551110001' OR MobilePhone = '+15551110001' "
        "ORDER BY LastModifiedDate DESC LIMIT 1"]
    found = sf.connector.find_contact("+15551110001")
    assert found is not None
    assert (found.id, found.name, found.first_name, found.email) == (contact_id, "Ada Lovelace", "Ada",
                                                                     "ada@example.com")


def test_jwt_bearer_flow_signs_an_assertion_the_org_verifies() -> None:
    with harness("jwt_bearer") as sf:
        sf.seed_contact("+15551110002", "Grace", "Hopper")
        before = int(time.time())
        assert sf.connector.find_contact("+15551110002") is not None
        [token_request] = sf.org.token_requests
        assert set(token_request.form) == {"grant_type", "assertion"}
        assert token_request.form["grant_type"] == JWT_BEARER
        claims = token_request.claims  # the org checked the RS256 signature with the app's public key
        assert claims is not None
        assert (claims["iss"], claims["sub"], claims["aud"]) == (CLIENT_ID, USERNAME, sf.org.url)
        assert before + 170 <= claims["exp"] <= int(time.time()) + 180


def test_jwt_signed_by_another_key_is_refused() -> None:
    with harness("jwt_bearer") as sf:
        other = SalesforceConnector(login_url=sf.org.url, flow="jwt_bearer", client_id=CLIENT_ID, timeout_s=1.0,
                                    username=USERNAME, private_key=SecretStr(_another_private_key()),
                                    ca_file=sf.org.ca_file)
        error = failure(lambda: other.find_contact("+15551110003"))
        assert error.kind == FailureKind.AUTH
        assert "invalid_grant: invalid assertion" in str(error)
        assert sf.org.requests == []


def test_jwt_for_a_user_the_app_does_not_know() -> None:
    with harness("jwt_bearer") as sf:
        sf.org.username = "someone-else@acme.example"
        error = failure(lambda: sf.connector.find_contact("+15551110004"))
        assert error.kind == FailureKind.AUTH
        assert "user hasn't approved this consumer" in str(error)


def test_a_private_key_with_escaped_line_breaks_still_signs() -> None:
    with harness("jwt_bearer") as sf:
        escaped = sf.secret_values[0].replace("\n", "\\n")  # as one pasted into an environment variable
        connector = SalesforceConnector(login_url=sf.org.url, flow="jwt_bearer", client_id=CLIENT_ID, timeout_s=1.0,
                                        username=USERNAME, private_key=SecretStr(escaped), ca_file=sf.org.ca_file)
        assert connector.find_contact("+15551110005") is None


def test_a_private_key_that_is_no_key_is_configuration() -> None:
    with harness("jwt_bearer") as sf:
        connector = SalesforceConnector(login_url=sf.org.url, flow="jwt_bearer", client_id=CLIENT_ID, timeout_s=1.0,
                                        username=USERNAME, private_key=SecretStr("not-a-key-at-all"),
                                        ca_file=sf.org.ca_file)
        error = failure(lambda: connector.find_contact("+15551110006"))
        assert error.kind == FailureKind.CONFIGURATION
        assert "not-a-key-at-all" not in str(error)
        assert sf.org.token_requests == []


def test_refused_client_credentials_say_salesforces_words_and_no_secret(sf: SalesforceHarness) -> None:
    wrong = SalesforceConnector(login_url=sf.org.url, flow="client_credentials", client_id=CLIENT_ID, timeout_s=1.0,
                                client_secret=SecretStr("wrong-secret-value"), ca_file=sf.org.ca_file)
    error = failure(lambda: wrong.find_contact("+15551110007"))
    assert error.kind == FailureKind.AUTH
    assert error.status == 400
    assert "invalid_client: invalid client credentials" in str(error)
    assert "wrong-secret-value" not in str(error)
    assert sf.org.requests == []


# -- a token's refresh -----------------------------------------------------------------------------


def test_an_expired_token_is_refreshed_once_and_the_request_retried(sf: SalesforceHarness) -> None:
    sf.seed_contact("+15551110010", "Alan", "Turing")
    assert sf.connector.find_contact("+15551110010") is not None
    sf.expire_tokens()
    found = sf.connector.find_contact("+15551110010")
    assert found is not None
    assert len(sf.org.token_requests) == 2
    first, refused, retried = sf.org.requests
    assert refused.headers["authorization"] == first.headers["authorization"]
    assert retried.headers["authorization"] != refused.headers["authorization"]
    assert retried.query == refused.query


def test_a_refresh_the_org_refuses_is_auth(sf: SalesforceHarness) -> None:
    assert sf.connector.find_contact("+15551110011") is None
    sf.expire_tokens()
    sf.org.token_refusal = ("invalid_grant", "expired access/refresh token")
    error = failure(lambda: sf.connector.find_contact("+15551110011"))
    assert error.kind == FailureKind.AUTH
    assert "invalid_grant: expired access/refresh token" in str(error)
    assert len(sf.org.token_requests) == 2
    assert sf.org.requests_seen == 2  # the first call, and the one answered 401


def test_a_second_401_after_a_new_token_is_auth(sf: SalesforceHarness) -> None:
    assert sf.connector.find_contact("+15551110012") is None
    sf.fail_next(401, times=2)
    error = failure(lambda: sf.connector.find_contact("+15551110012"))
    assert error.kind == FailureKind.AUTH
    assert "INVALID_SESSION_ID" in str(error)
    assert "again, with a new token" in str(error)
    assert len(sf.org.token_requests) == 2  # one refresh, not a loop
    assert sf.org.requests_seen == 3


# -- SOQL and its values ---------------------------------------------------------------------------


def test_a_hostile_phone_number_is_compared_as_a_string(sf: SalesforceHarness) -> None:
    sf.seed_contact("+15551110020", "Ada", "Lovelace")
    sf.seed_contact("+15551110021", "Grace", "Hopper")
    hostile = "' OR Name LIKE '%"
    # Unescaped, the org would read it as a condition matching every contact: the test has teeth.
    unescaped = f"SELECT Id FROM Contact WHERE Phone = '{hostile}'"
    assert sf.org.run_query(unescaped)["totalSize"] == 2
    assert sf.connector.find_contact(hostile) is None
    [sent] = queries(sf.org)
    assert "WHERE Phone = '\\' OR Name LIKE \\'%' OR MobilePhone = '\\' OR Name LIKE \\'%'" in sent
    found = sf.connector.upsert_contact(ContactFields(phone=hostile, first_name="Mallory"), "upsert-hostile")
    assert len(sf.contacts_with_phone(hostile)) == 1
    assert len(sf.contacts_with_phone("+15551110020")) == 1
    assert sf.connector.find_contact(hostile) == found


def test_an_empty_phone_number_finds_nobody(sf: SalesforceHarness) -> None:
    sf.org.add("Contact", LastName="No Phone")
    assert sf.connector.find_contact("  ") is None
    assert sf.org.requests == []
    assert failure(lambda: sf.connector.upsert_contact(ContactFields(phone=""), "k")).kind == FailureKind.INVALID


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phone=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
       .filter(lambda text: bool(text.strip())))
def test_any_phone_string_reaches_the_org_as_itself(shared: SalesforceHarness, phone: str) -> None:
    decoy = "+15550000000"
    assume(phone.casefold() != decoy.casefold())
    shared.org.clear()
    shared.seed_contact(decoy, "Decoy", "Contact")
    assert shared.connector.find_contact(phone) is None
    contact_id = shared.seed_contact(phone, "Any", "Body")
    found = shared.connector.find_contact(phone)
    assert found is not None
    assert found.id == contact_id
    assert parse_soql(queries(shared.org)[-1]).where is not None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.text(st.characters(codec="utf-8"), min_size=1, max_size=300))
def test_any_idempotency_key_makes_one_task(shared: SalesforceHarness, key: str) -> None:
    shared.org.clear()
    contact_id = shared.seed_contact("+15551110030", "Key", "Holder")
    first = shared.connector.log_call(contact_id, note(), key)
    assert shared.connector.log_call(contact_id, note(), key) == first
    assert len(shared.calls_logged(contact_id)) == 1
    assert shared.connector.log_call(contact_id, note(), key + "'") != first


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=st.sampled_from([400, 403, 404, 409, 500, 503]),
       body=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                             st.sampled_from(["message", "errorCode", "fields", "x"]), inner, max_size=3),
                         max_leaves=8))
def test_any_error_body_is_a_connector_error(shared: SalesforceHarness, status: int, body: object) -> None:
    shared.fail_next(status, body=json.dumps(body))
    error = failure(lambda: shared.connector.find_contact("+15551110031"))
    assert error.status == status
    assert CLIENT_SECRET not in str(error)


# -- pages -----------------------------------------------------------------------------------------


def test_the_callobject_lookup_reads_every_page() -> None:
    # SOQL's `=` ignores case, so keys that differ only in case all match; the exact one is on page 3.
    with harness(page_size=2) as sf:
        contact_id = sf.seed_contact("+15551110040", "Edsger", "Dijkstra")
        for variant in ("CALL-KEY-A", "call-key-a", "Call-Key-A", "cALL-kEY-a"):
            sf.org.add("Task", WhoId=contact_id, Subject="other", CallObject=variant)
        exact = sf.org.add("Task", WhoId=contact_id, Subject="the one", CallObject="Call-key-A")
        assert sf.connector.log_call(contact_id, note(), "Call-key-A") == exact
        assert posts(sf.org, "Task") == []
        paths = [request.path for request in sf.org.requests]
        assert paths[0] == QUERY_PATH
        assert [path.rsplit("-", 1)[-1] for path in paths[1:]] == ["2", "4"]
        assert all(path.startswith("/services/data/v62.0/query/01g") for path in paths[1:])
        assert len({request.headers["authorization"] for request in sf.org.requests}) == 1


def test_a_key_no_page_holds_exactly_makes_a_new_task() -> None:
    with harness(page_size=1) as sf:
        contact_id = sf.seed_contact("+15551110041", "Barbara", "Liskov")
        sf.org.add("Task", WhoId=contact_id, Subject="other", CallObject="KEY-B")
        task_id = sf.connector.log_call(contact_id, note(), "key-b")
        assert task_id != ""
        assert len(posts(sf.org, "Task")) == 1
        assert sf.org.records["Task"][task_id]["CallObject"] == "key-b"


# -- the Task for a call ---------------------------------------------------------------------------


def test_a_call_is_a_completed_call_task_on_the_contact(sf: SalesforceHarness) -> None:
    contact_id = sf.seed_contact("+15551110050", "Ken", "Thompson")
    task_id = sf.connector.log_call(contact_id, note(), "log-key-50")
    assert queries(sf.org) == ["SELECT Id, CallObject FROM Task WHERE CallObject = 'log-key-50'"]
    [created] = posts(sf.org, "Task")
    sent = created.json()
    assert sent == {
        "WhoId": contact_id, "Subject": "Call (inbound): booked", "TaskSubtype": "Call", "Status": "Completed",
        "ActivityDate": "2026-12-01", "CallDurationInSeconds": 125, "CallDisposition": "booked",
        "CallObject": "log-key-50", "CallType": "Inbound",
        "Description": "Booked a technician for Tuesday 10 am.\n\nOutcome: booked\n"
                       "Recording: https://voxlog.example/v1/calls/call-7/recording\nTicket: T-9\nCall id: call-7",
    }
    assert created.headers["content-type"] == "application/json"
    assert sf.org.records["Task"][task_id]["WhoId"] == contact_id
    assert sf.connector.log_call(contact_id, note(), "log-key-50") == task_id
    assert len(posts(sf.org, "Task")) == 1  # the repeat found it by CallObject and made nothing


def test_an_outbound_call_and_a_key_longer_than_callobject(sf: SalesforceHarness) -> None:
    contact_id = sf.seed_contact("+15551110051", "Dennis", "Ritchie")
    outbound = CallNote(call_id="c-2", started_at=datetime(2026, 12, 2, 23, 30, tzinfo=UTC), duration_s=5,
                        direction="outbound", outcome="", summary="No answer.")
    long_key = "k" * 400
    task_id = sf.connector.log_call(contact_id, outbound, long_key)
    assert sf.connector.log_call(contact_id, outbound, long_key) == task_id
    task = sf.org.records["Task"][task_id]
    assert task["CallType"] == "Outbound"
    assert task["Subject"] == "Call (outbound)"
    assert task["CallObject"].startswith("sha256:")
    assert len(task["CallObject"]) <= 255


def test_a_call_on_a_contact_id_that_names_no_record_is_not_found(sf: SalesforceHarness) -> None:
    error = failure(lambda: sf.connector.log_call("003000000000000AAA", note(), "log-key-52"))
    assert error.kind == FailureKind.NOT_FOUND  # INVALID_CROSS_REFERENCE_KEY comes with 400
    assert error.status == 400
    assert "INVALID_CROSS_REFERENCE_KEY" in str(error)
    malformed = failure(lambda: sf.connector.log_call("not-an-id", note(), "log-key-53"))
    assert malformed.kind == FailureKind.INVALID
    assert "MALFORMED_ID" in str(malformed)


# -- contacts --------------------------------------------------------------------------------------


def test_a_new_contact_without_a_last_name_takes_the_phone(sf: SalesforceHarness) -> None:
    created = sf.connector.upsert_contact(ContactFields(phone="+15551110060", first_name="Linus"), "upsert-60")
    [post] = posts(sf.org, "Contact")
    assert post.json() == {"FirstName": "Linus", "LastName": "+15551110060", "Phone": "+15551110060"}
    assert created.name == "Linus +15551110060"
    assert sf.org.records["Contact"][created.id]["LastName"] == "+15551110060"


def test_an_update_sends_only_what_changed(sf: SalesforceHarness) -> None:
    contact_id = sf.seed_contact("+15551110061", "Guido", "van Rossum")
    unchanged = sf.connector.upsert_contact(ContactFields(phone="+15551110061", first_name="Guido"), "upsert-61a")
    assert unchanged.id == contact_id
    assert [request.method for request in sf.org.requests] == ["GET"]
    updated = sf.connector.upsert_contact(ContactFields(phone="+15551110061", first_name="Guido",
                                                        email="guido@example.com"), "upsert-61b")
    patch = sf.org.requests[-1]
    assert (patch.method, patch.path) == ("PATCH", f"/services/data/v62.0/sobjects/Contact/{contact_id}")
    assert patch.json() == {"Email": "guido@example.com"}
    assert updated.email == "guido@example.com"
    assert updated.name == "Guido van Rossum"


def test_a_company_is_the_contacts_account_found_or_made_once(sf: SalesforceHarness) -> None:
    existing = sf.org.add("Account", Name="Initech", Type="Customer - Direct")
    first = sf.connector.upsert_contact(ContactFields(phone="+15551110062", last_name="Lumbergh", company="initech"),
                                        "upsert-62")
    assert sf.org.records["Contact"][first.id]["AccountId"] == existing  # `=` on Name ignores case
    second = sf.connector.upsert_contact(ContactFields(phone="+15551110063", last_name="Bolton", company="Globex"),
                                         "upsert-63")
    again = sf.connector.upsert_contact(ContactFields(phone="+15551110063", last_name="Bolton", company="Globex"),
                                        "upsert-63")
    assert second.id == again.id
    assert [row["Name"] for row in sf.org.records["Account"].values()] == ["Initech", "Globex"]
    found = sf.connector.find_contact("+15551110062")
    assert found is not None
    assert found.company == "Initech"
    assert found.details == {"Account.Type": "Customer - Direct"}


def test_the_most_recently_changed_contact_wins_on_phone_or_mobile(sf: SalesforceHarness) -> None:
    older = sf.org.add("Contact", LastName="Older", Phone="+15551110064", Title="CFO")
    newer = sf.org.add("Contact", LastName="Newer", MobilePhone="+15551110064")
    found = sf.connector.find_contact("+15551110064")
    assert found is not None
    assert found.id == newer
    assert found.phone == "+15551110064"
    sf.connector.upsert_contact(ContactFields(phone="+15551110064", first_name="Changed"), "upsert-64")
    assert sf.org.records["Contact"][newer]["FirstName"] == "Changed"
    sf.org.update("Contact", older, {"Title": "CEO"})
    now_found = sf.connector.find_contact("+15551110064")
    assert now_found is not None
    assert now_found.id == older
    assert now_found.details == {"Title": "CEO"}


def test_a_duplicate_rule_is_a_conflict(sf: SalesforceHarness) -> None:
    sf.org.duplicate_rule_on_email = True
    sf.seed_contact("+15551110065", "Ada", "Lovelace", "ada@example.com")
    error = failure(lambda: sf.connector.upsert_contact(
        ContactFields(phone="+15551110066", last_name="Byron", email="ADA@example.com"), "upsert-66"))
    assert error.kind == FailureKind.CONFLICT
    assert error.status == 400
    assert "DUPLICATES_DETECTED: Use one of these records?" in str(error)


def test_detail_fields_the_org_does_not_have_are_invalid(sf: SalesforceHarness) -> None:
    connector = SalesforceConnector(login_url=sf.org.url, flow="client_credentials", client_id=CLIENT_ID,
                                    timeout_s=1.0, client_secret=SecretStr(CLIENT_SECRET), ca_file=sf.org.ca_file,
                                    detail_fields=("Title", "Account.Tier__c"))
    error = failure(lambda: connector.find_contact("+15551110067"))
    assert error.kind == FailureKind.INVALID
    assert "INVALID_FIELD: No such column 'Account.Tier__c'" in str(error)
    bad = failure(lambda: SalesforceConnector(login_url=sf.org.url, flow="client_credentials", client_id=CLIENT_ID,
                                              timeout_s=1.0, client_secret=SecretStr(CLIENT_SECRET),
                                              detail_fields=("Title FROM User --",)))
    assert bad.kind == FailureKind.CONFIGURATION


# -- Salesforce's error codes ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "kind"), [
    (403, "REQUEST_LIMIT_EXCEEDED", FailureKind.RATE_LIMITED),
    (400, "DUPLICATE_VALUE", FailureKind.CONFLICT),
    (400, "UNABLE_TO_LOCK_ROW", FailureKind.UNAVAILABLE),
    (400, "ENTITY_IS_DELETED", FailureKind.NOT_FOUND),
    (400, "INSUFFICIENT_ACCESS_OR_READONLY", FailureKind.SCOPE),
    (403, "INSUFFICIENT_ACCESS_OR_READONLY", FailureKind.SCOPE),
    (400, "MALFORMED_QUERY", FailureKind.INVALID),
    (400, "INVALID_FIELD", FailureKind.INVALID),
    (404, "NOT_FOUND", FailureKind.NOT_FOUND),
    (403, "API_DISABLED_FOR_ORG", FailureKind.SCOPE),
])
def test_an_error_code_says_what_failed(sf: SalesforceHarness, status: int, code: str, kind: FailureKind) -> None:
    sf.fail_next(status, body=json.dumps([{"message": f"what {code} says", "errorCode": code}]))
    error = failure(lambda: sf.connector.find_contact("+15551110070"))
    assert error.kind == kind
    assert error.status == status
    assert f"Salesforce: {code}: what {code} says" in str(error)


def test_the_daily_request_limit_is_a_rate_limit(sf: SalesforceHarness) -> None:
    sf.fail_next(403, body=json.dumps([{"message": "TotalRequests Limit exceeded.",
                                        "errorCode": "REQUEST_LIMIT_EXCEEDED"}]))
    error = failure(lambda: sf.connector.find_contact("+15551110071"))
    assert error.kind == FailureKind.RATE_LIMITED
    assert error.retryable
    assert error.retry_after_s is None  # Salesforce sends no Retry-After: the worker's backoff decides
    assert sf.connector.rate_limit.requests == 100_000
    assert sf.connector.rate_limit.per_s == 86_400
    assert "API Request Limits and Allocations" in sf.connector.rate_limit.source


def test_json_that_is_not_a_query_answer_is_a_bad_response(sf: SalesforceHarness) -> None:
    sf.org.malformed_next('{"unexpected": true}')
    assert failure(lambda: sf.connector.find_contact("+15551110072")).kind == FailureKind.BAD_RESPONSE
    sf.org.malformed_next('{"totalSize": 1, "done": true, "records": ["not a record"]}')
    assert failure(lambda: sf.connector.find_contact("+15551110072")).kind == FailureKind.BAD_RESPONSE


# -- check() ---------------------------------------------------------------------------------------


def test_check_on_a_healthy_org(sf: SalesforceHarness) -> None:
    results = sf.connector.check()
    assert [(result.what, result.ok) for result in results] == [
        ("sign in", True), ("read Contacts", True), ("create Tasks", True)]
    assert queries(sf.org) == ["SELECT Id FROM Contact LIMIT 1"]
    assert sf.org.requests[-1].path == "/services/data/v62.0/sobjects/Task/describe"


def test_check_says_tasks_cannot_be_made(sf: SalesforceHarness) -> None:
    sf.org.createable["Task"] = False
    [*_, tasks] = sf.connector.check()
    assert not tasks.ok
    assert "no permission to create Tasks" in tasks.detail
    sf.org.createable["Task"] = True
    sf.org.uncreateable_fields.add(("Task", "CallObject"))
    [*_, fields] = sf.connector.check()
    assert not fields.ok
    assert "CallObject" in fields.detail


def test_check_says_the_limit_is_reached(sf: SalesforceHarness) -> None:
    sf.fail_next(403, body=json.dumps([{"message": "TotalRequests Limit exceeded.",
                                        "errorCode": "REQUEST_LIMIT_EXCEEDED"}]))
    [signed_in, contacts, tasks] = sf.connector.check()
    assert signed_in.ok
    assert tasks.ok
    assert not contacts.ok
    assert "API request limit is reached" in contacts.detail


def test_check_with_refused_credentials_says_what_to_look_at(sf: SalesforceHarness) -> None:
    sf.org.token_refusal = ("invalid_client", "invalid client credentials")
    [result] = sf.connector.check()
    assert not result.ok
    assert "invalid_client: invalid client credentials" in result.detail
    assert "consumer key and secret" in result.detail
    assert CLIENT_SECRET not in result.detail


# -- settings --------------------------------------------------------------------------------------


def test_settings_want_each_flows_own_fields() -> None:
    secret, key = SecretRef(env="SF_SECRET"), SecretRef(file="salesforce-key.pem")
    my_domain = "https://acme.my.salesforce.com"
    SalesforceSettings(flow="client_credentials", login_url=my_domain, client_id="c", client_secret=secret)
    SalesforceSettings(flow="jwt_bearer", client_id="c", username="u@acme.example", private_key=key)
    for wrong in (
        {"flow": "client_credentials", "login_url": my_domain, "client_id": "c"},
        {"flow": "client_credentials", "client_id": "c", "client_secret": secret},  # login.salesforce.com
        {"flow": "client_credentials", "login_url": my_domain, "client_id": "c", "client_secret": secret,
         "private_key": key},
        {"flow": "jwt_bearer", "client_id": "c", "private_key": key},
        {"flow": "jwt_bearer", "client_id": "c", "username": "u@acme.example"},
        {"flow": "jwt_bearer", "client_id": "c", "username": "u", "private_key": key, "client_secret": secret},
        {"flow": "jwt_bearer", "client_id": "c", "username": "u", "private_key": key, "login_url": "http://x"},
        {"flow": "jwt_bearer", "client_id": "c", "username": "u", "private_key": key,
         "detail_fields": ["Title, (SELECT Id FROM Cases)"]},
        {"flow": "jwt_bearer", "client_id": "c", "username": "u", "private_key": key, "token": "t"},
    ):
        with pytest.raises(ValidationError):
            SalesforceSettings.model_validate(wrong)


def test_connect_resolves_the_secrets_and_reaches_the_org(tmp_path: Path) -> None:
    with harness("jwt_bearer") as sf:
        (tmp_path / "salesforce-key.pem").write_text(sf.secret_values[0] + "\n")
        configured = SalesforceSettings(flow="jwt_bearer", login_url=sf.org.url, client_id=CLIENT_ID,
                                        username=USERNAME, private_key=SecretRef(file="salesforce-key.pem"),
                                        detail_fields=("Title",), ca_file=sf.org.ca_file)
        connector = connect(configured, Secrets(environ={}, folder=tmp_path), timeout_s=1.0)
        assert all(result.ok for result in connector.check())
        missing = SalesforceSettings(flow="client_credentials", login_url=sf.org.url, client_id=CLIENT_ID,
                                     client_secret=SecretRef(env="SF_SECRET"))
        error = failure(lambda: connect(missing, Secrets(environ={}), timeout_s=1.0))
        assert error.kind == FailureKind.CONFIGURATION


def _another_private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
