"""The Zendesk connector (zenpy) against the local Zendesk: the exact requests it makes, cursor
pagination through `links.next` (which names https://acme.zendesk.com and reaches the local server),
idempotency by the external-id lookup and by the Idempotency-Key header, the key's marker in comments,
Zendesk's anonymous user, a 429 raised rather than slept through, hostile text, and Hypothesis over
keys, error bodies and the shapes of answers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import closing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from streams.connectors.base import ConnectorError, FailureKind, TicketDesk, TicketRequest
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.ticket_ids import key_token
from streams.connectors.tickets_zendesk import (
    ZendeskDesk,
    ZendeskSettings,
    comment_marker,
    connect,
    error_text,
)
from tests.connectors.fake_zendesk import FakeZendesk
from tests.connectors.harness_zendesk import EMAIL, SUBDOMAIN, TOKEN, ZendeskHarness, harness

HOSTILE_SUBJECT = 'Refund "now" \u2014 caf\u00e9 \U0001f4de\n<b>bold</b> & "quotes" \'single\' }]\\'
HOSTILE_DESCRIPTION = "Line one\nLine two: {\"json\": [1, 2]} %s %d \u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9 \u202eRTL\x00"
REQUEST = TicketRequest(subject="Boiler broken", description="No hot water since Monday.",
                        requester_phone="+4915112345678", requester_name="Ann Example", priority="high")


@pytest.fixture
def zendesk() -> Iterator[ZendeskHarness]:
    with harness() as h:
        yield h


def api_requests(h: ZendeskHarness) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in h.server.requests]


def test_a_ticket_is_created_as_zendesk_documents_it(zendesk: ZendeskHarness) -> None:
    ticket = zendesk.connector.create(
        TicketRequest(subject="Boiler broken", description="No hot water.", requester_phone="+4915112345678",
                      requester_name="Ann Example", requester_email="ann@example.org", priority="urgent"),
        "call-7/tc1")

    lookup, post = zendesk.server.requests
    assert (lookup.method, lookup.path) == ("GET", "/api/v2/tickets.json")
    assert lookup.param("external_id") == "call-7/tc1"
    assert lookup.param("page[size]") == "100"
    assert (post.method, post.path) == ("POST", "/api/v2/tickets.json")
    expected_auth = "Basic " + base64.b64encode(f"{EMAIL}/token:{TOKEN}".encode()).decode()
    assert post.headers["authorization"] == lookup.headers["authorization"] == expected_auth
    assert post.headers["idempotency-key"] == key_token("call-7/tc1")
    assert post.json() == {"ticket": {
        "subject": "Boiler broken",
        "comment": {"body": "No hot water.\n\nCaller: Ann Example, +4915112345678", "public": True},
        "priority": "urgent", "tags": ["voxlog"], "external_id": "call-7/tc1",
        "requester": {"name": "Ann Example", "email": "ann@example.org"},
    }}
    stored = zendesk.server.tickets[int(ticket.id)]
    assert (ticket.status, ticket.subject) == ("new", "Boiler broken")
    assert ticket.url == f"https://{SUBDOMAIN}.zendesk.com/agent/tickets/{ticket.id}"
    assert zendesk.server.users[stored["requester_id"]]["email"] == "ann@example.org"


def test_a_caller_without_email_is_named_in_the_description_and_the_api_user_requests_it(
        zendesk: ZendeskHarness) -> None:
    zendesk.connector.create(REQUEST, "call-8/tc1")

    body = zendesk.server.requests[-1].json()["ticket"]
    assert "requester" not in body  # Zendesk's default: the API user
    assert body["comment"]["body"].endswith("Caller: Ann Example, +4915112345678")
    assert body["priority"] == "high"


def test_a_configured_default_requester_requests_tickets_of_callers_without_email() -> None:
    with FakeZendesk(email=EMAIL, token=TOKEN) as server, closing(ZendeskDesk(
            SUBDOMAIN, EMAIL, SecretStr(TOKEN), timeout_s=1.0, base_url=server.base_url,
            default_requester_email="phone-callers@acme.example")) as desk:
        desk.create(REQUEST, "call-9/tc1")

        assert server.requests[-1].json()["ticket"]["requester"] == {"name": "Ann Example",
                                                                       "email": "phone-callers@acme.example"}


def test_the_same_key_again_finds_the_ticket_by_its_external_id(zendesk: ZendeskHarness) -> None:
    first = zendesk.connector.create(REQUEST, "call-1/tc4")
    again = zendesk.connector.create(REQUEST, "call-1/tc4")

    assert again == first
    assert len(zendesk.server.tickets) == 1
    assert api_requests(zendesk) == [("GET", "/api/v2/tickets.json"), ("POST", "/api/v2/tickets.json"),
                                     ("GET", "/api/v2/tickets.json")]


def test_after_two_hours_the_lookup_alone_keeps_it_one_ticket(zendesk: ZendeskHarness) -> None:
    first = zendesk.connector.create(REQUEST, "call-1/tc5")
    zendesk.server.expire_idempotency_keys()

    assert zendesk.connector.create(REQUEST, "call-1/tc5") == first
    assert len(zendesk.server.tickets) == 1


def test_a_create_the_lookup_misses_is_answered_by_zendesk_from_its_idempotency_key(
        zendesk: ZendeskHarness) -> None:
    """Two creates that race past the lookup: the second is Zendesk's repeat of the first (here the
    lookup misses because the first ticket lost its external id, as a trigger or an agent can do)."""
    first = zendesk.connector.create(REQUEST, "call-2/tc1")
    zendesk.server.tickets[int(first.id)]["external_id"] = None

    again = zendesk.connector.create(REQUEST, "call-2/tc1")

    assert again.id == first.id
    assert len(zendesk.server.tickets) == 1
    repeat = zendesk.server.requests[-1]
    assert (repeat.method, repeat.headers["idempotency-key"]) == ("POST", key_token("call-2/tc1"))


def test_a_comment_carries_its_keys_marker_and_is_written_once(zendesk: ZendeskHarness) -> None:
    ticket = zendesk.connector.create(REQUEST, "call-3/tc1")

    comment_id = zendesk.connector.comment(ticket.id, "We called back: \u00fc \"ok\"", "call-3/tc2")
    again = zendesk.connector.comment(ticket.id, "We called back: \u00fc \"ok\"", "call-3/tc2")

    assert again == comment_id
    assert zendesk.comments(ticket.id) == [f"We called back: \u00fc \"ok\"\n\n{comment_marker('call-3/tc2')}"]
    put = next(r for r in zendesk.server.requests if r.method == "PUT")
    assert put.path == f"/api/v2/tickets/{ticket.id}.json"
    assert put.json()["ticket"]["comment"] == {"body": f"We called back: \u00fc \"ok\"\n\n"
                                                       f"{comment_marker('call-3/tc2')}", "public": True}
    assert comment_id == str(zendesk.server.comments[int(ticket.id)][-1]["id"])
    assert [r.method for r in zendesk.server.requests].count("PUT") == 1


def test_comments_are_read_page_after_page_through_zendesks_links(zendesk: ZendeskHarness) -> None:
    ticket_id = zendesk.server.seed_ticket("Long thread")
    for n in range(240):
        zendesk.server.add_comment(ticket_id, f"comment {n}")
    earlier = zendesk.server.add_comment(ticket_id, f"written before a crash\n\n{comment_marker('call-4/tc9')}")
    zendesk.server.requests.clear()

    assert zendesk.connector.comment(str(ticket_id), "written before a crash", "call-4/tc9") == str(earlier["id"])

    pages = zendesk.server.requests
    assert [(r.method, r.path) for r in pages] == [("GET", f"/api/v2/tickets/{ticket_id}/comments.json")] * 3
    assert [r.param("page[after]") is not None for r in pages] == [False, True, True]
    assert {r.param("page[size]") for r in pages} == {"100"}
    assert len(zendesk.server.comments[ticket_id]) == 242  # nothing added


def test_status_asks_zendesk_each_time(zendesk: ZendeskHarness) -> None:
    ticket = zendesk.connector.create(REQUEST, "call-5/tc1")
    assert zendesk.connector.status(ticket.id).status == "new"

    zendesk.server.tickets[int(ticket.id)]["status"] = "solved"

    assert zendesk.connector.status(ticket.id).status == "solved"
    assert api_requests(zendesk)[-1] == ("GET", f"/api/v2/tickets/{ticket.id}.json")


def test_hostile_text_and_keys_reach_zendesk_whole(zendesk: ZendeskHarness) -> None:
    key = "call/\u00fc & #1 ?x=y %2F+ \"q\""
    ticket = zendesk.connector.create(
        TicketRequest(subject=HOSTILE_SUBJECT, description=HOSTILE_DESCRIPTION, requester_phone="+1 (555) 010-9999"),
        key)

    stored = zendesk.server.tickets[int(ticket.id)]
    assert (stored["subject"], stored["external_id"]) == (HOSTILE_SUBJECT, key)
    assert stored["description"] == f"{HOSTILE_DESCRIPTION}\n\nCaller: +1 (555) 010-9999"
    assert ticket.subject == HOSTILE_SUBJECT
    assert zendesk.connector.create(TicketRequest(subject="other", description="x"), key) == ticket


def test_any_key_finds_its_own_ticket_and_no_other(zendesk: ZendeskHarness) -> None:
    @given(key=st.text(min_size=1, max_size=80))
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(key: str) -> None:
        before = len(zendesk.server.tickets)
        first = zendesk.connector.create(TicketRequest(subject="s", description="d"), key)
        assert zendesk.server.tickets[int(first.id)]["external_id"] == key
        assert zendesk.connector.create(TicketRequest(subject="s", description="d"), key) == first
        assert len(zendesk.server.tickets) in (before, before + 1)  # before: an example Hypothesis repeats

    check()
    external_ids = [t["external_id"] for t in zendesk.server.tickets.values()]
    assert len(external_ids) == len(set(external_ids))


def test_the_anonymous_user_zendesk_answers_is_no_sign_in() -> None:
    with FakeZendesk(email=EMAIL, token=TOKEN) as server, closing(ZendeskDesk(
            SUBDOMAIN, EMAIL, SecretStr("a-revoked-token"), timeout_s=1.0, base_url=server.base_url)) as desk:
        server.anonymous_for_bad_credentials = True

        [result] = desk.check()

        assert not result.ok
        assert "anonymous user" in result.detail
        assert "a-revoked-token" not in result.detail


def test_an_end_user_is_refused_by_the_check(zendesk: ZendeskHarness) -> None:
    zendesk.server.me["role"] = "end-user"

    results = zendesk.connector.check()

    assert [(r.what, r.ok) for r in results] == [("sign in", True), ("agent role", False)]
    assert "agent or an admin" in results[1].detail


def test_a_healthy_account_passes_every_check(zendesk: ZendeskHarness) -> None:
    assert [(r.what, r.ok) for r in zendesk.connector.check()] == [
        ("sign in", True), ("agent role", True), ("read tickets", True)]
    assert api_requests(zendesk) == [("GET", "/api/v2/users/me.json"), ("GET", "/api/v2/tickets.json")]
    assert zendesk.server.requests[-1].param("page[size]") == "1"


def test_an_answer_that_does_not_come_is_unavailable_within_the_timeout(zendesk: ZendeskHarness) -> None:
    zendesk.stall_next(10)
    started = time.monotonic()

    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.status("101")

    assert raised.value.kind is FailureKind.UNAVAILABLE
    assert time.monotonic() - started < 1.0 + 2.0  # the harness's timeout_s, and slack for a loaded machine


def test_a_429_is_raised_at_once_with_its_retry_after_not_slept_through(zendesk: ZendeskHarness) -> None:
    zendesk.fail_next(429, headers={"Retry-After": "30"})
    started = time.monotonic()

    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.status("101")

    assert time.monotonic() - started < 5  # zenpy alone would sleep 30 s and ask again
    assert (raised.value.kind, raised.value.retry_after_s) == (FailureKind.RATE_LIMITED, 30.0)
    assert zendesk.requests_seen == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_server_error_is_not_retried_by_the_connector(zendesk: ZendeskHarness, status: int) -> None:
    zendesk.fail_next(status)

    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.status("101")

    assert raised.value.kind is FailureKind.UNAVAILABLE
    assert zendesk.requests_seen == 1


def test_zendesks_validation_details_are_the_errors_text(zendesk: ZendeskHarness) -> None:
    zendesk.fail_next(422, body=json.dumps({"error": "RecordInvalid", "description": "Record validation errors",
                                            "details": {"requester": [{"description": "Requester: Email is invalid",
                                                                       "error": "InvalidValue"}]}}))

    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.create(REQUEST, "call-6/tc1")

    assert raised.value.kind is FailureKind.INVALID
    assert str(raised.value) == ("invalid (HTTP 422): zendesk: RecordInvalid: Record validation errors: "
                                 "Requester: Email is invalid")


def test_a_token_the_server_echoes_is_kept_out_of_the_error(zendesk: ZendeskHarness) -> None:
    zendesk.fail_next(401, body=json.dumps({"error": f"Couldn't authenticate {EMAIL}/token:{TOKEN}"}))

    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.status("101")

    assert TOKEN not in str(raised.value)


@pytest.mark.parametrize("ticket_id", ["", "12a", "-1", "\u0661\u0662", "1 OR 1=1"])
def test_an_id_that_is_not_zendesks_is_refused_before_any_request(zendesk: ZendeskHarness, ticket_id: str) -> None:
    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.status(ticket_id)

    assert raised.value.kind is FailureKind.INVALID
    assert zendesk.requests_seen == 0


def test_a_priority_zendesk_has_not_is_refused_before_any_request(zendesk: ZendeskHarness) -> None:
    with pytest.raises(ConnectorError) as raised:
        zendesk.connector.create(TicketRequest(subject="s", description="d", priority="critical"), "k")

    assert raised.value.kind is FailureKind.INVALID
    assert zendesk.requests_seen == 0


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
TICKETISH = st.fixed_dictionaries({}, optional={
    "id": st.integers(1, 10**12) | st.text(max_size=5) | st.none(), "status": st.sampled_from(["open", "new"]) | JSON,
    "subject": st.text(max_size=20) | JSON, "external_id": st.text(max_size=8) | st.none(),
})
ANSWERS = st.one_of(
    JSON,
    st.fixed_dictionaries({"ticket": TICKETISH | JSON}),
    st.fixed_dictionaries({"tickets": st.lists(TICKETISH | JSON, max_size=3), "meta": JSON, "links": JSON}),
    st.fixed_dictionaries({"comments": st.lists(JSON, max_size=3),
                           "meta": st.fixed_dictionaries({"has_more": st.booleans()}), "links": JSON}),
    st.fixed_dictionaries({"ticket": TICKETISH,
                           "audit": st.fixed_dictionaries({"events": st.lists(JSON, max_size=3)})}),
    st.fixed_dictionaries({"user": st.fixed_dictionaries({}, optional={"id": JSON, "role": JSON, "email": JSON})}),
)


def test_whatever_a_200_carries_the_connector_answers_or_raises_bad_response(zendesk: ZendeskHarness) -> None:
    ticket = zendesk.connector.create(REQUEST, "call-10/tc1")
    desk: TicketDesk = zendesk.connector
    operations: dict[str, Callable[[], object]] = {
        "create": lambda: desk.create(REQUEST, "call-10/tc2"),
        "comment": lambda: desk.comment(ticket.id, "hello", "call-10/tc3"),
        "status": lambda: desk.status(ticket.id),
        "check": lambda: desk.check(),
    }

    @given(answer=ANSWERS, operation=st.sampled_from(sorted(operations)))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(answer: object, operation: str) -> None:
        zendesk.fail_next(200, body=json.dumps(answer))
        failure = None
        try:
            operations[operation]()
        except ConnectorError as exc:
            failure = exc
        finally:
            with zendesk.server._lock:
                zendesk.server._faults.clear()  # an operation that failed before its request leaves the fault
        assert failure is None or failure.kind is FailureKind.BAD_RESPONSE, failure

    check()


ERROR_BODIES = st.one_of(
    JSON.map(json.dumps),
    st.text(max_size=60),
    st.fixed_dictionaries({"error": st.text(max_size=20) | JSON, "description": st.text(max_size=20) | JSON,
                           "details": st.dictionaries(st.text(max_size=8), st.lists(
                               st.fixed_dictionaries({"description": st.text(max_size=20) | JSON}), max_size=2)
                                                      | JSON, max_size=3)}).map(json.dumps),
)


@given(body=ERROR_BODIES)
@settings(max_examples=300, deadline=None)
def test_any_error_body_reads_as_some_text(body: str) -> None:
    text = error_text(body)

    assert isinstance(text, str)
    document = json.loads(body) if body.strip().startswith("{") and _is_json(body) else None
    if isinstance(document, dict) and isinstance(document.get("description"), str):
        assert document["description"] in text


def _is_json(body: str) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def test_settings_name_the_secret_and_the_plan_sets_the_rate() -> None:
    settings_ = ZendeskSettings.model_validate({"kind": "zendesk", "subdomain": "acme", "email": EMAIL,
                                                "token": {"env": "ZD"}, "plan": "enterprise"})
    desk = connect(settings_, Secrets(environ={"ZD": TOKEN}), timeout_s=2.0)

    assert (desk.rate_limit.requests, desk.rate_limit.per_s) == (700, 60.0)
    assert "Rate limits" in desk.rate_limit.source
    assert connect(settings_.model_copy(update={"plan": "team"}), Secrets(environ={"ZD": TOKEN}),
                   timeout_s=2.0).rate_limit.requests == 200
    assert isinstance(desk, TicketDesk)
    with pytest.raises(ValidationError):
        ZendeskSettings.model_validate({"subdomain": "acme", "email": EMAIL, "token": {"env": "ZD"}, "api_key": "x"})
    with pytest.raises(ValidationError):
        ZendeskSettings(subdomain="acme.evil.example/", email=EMAIL, token=SecretRef(env="ZD"))
    with pytest.raises(ConnectorError) as raised:
        connect(settings_, Secrets(environ={}), timeout_s=2.0)
    assert raised.value.kind is FailureKind.CONFIGURATION
