"""The Freshdesk connector (httpx) against the local Freshdesk: the exact requests it makes, the
`Link` header's pages (links name https://acme.freshdesk.com; the connector asks its own base URL),
idempotency by the key's tag in the search and, while the search index lags, in the newest tickets,
the key's token in notes, Freshdesk's status numbers as words, hostile text, and Hypothesis over the
search query's quoting, error bodies and the shapes of answers."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.connectors.base import ConnectorError, FailureKind, TicketDesk, TicketRequest
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.ticket_ids import key_token
from streams.connectors.tickets_freshdesk import (
    FreshdeskSettings,
    as_html,
    connect,
    error_text,
    tag_query,
)
from tests.connectors.fake_freshdesk import _matcher, html_text
from tests.connectors.harness_freshdesk import API_KEY, DOMAIN, FreshdeskHarness, harness

HOSTILE_SUBJECT = 'Refund "now" \u2014 caf\u00e9 \U0001f4de <script>alert(1)</script> & \'single\' tag:\'x\' }]\\'
HOSTILE_DESCRIPTION = "Line one\nLine <two> & \"three\": {\"json\": [1, 2]} \u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9 &amp;"
REQUEST = TicketRequest(subject="Boiler broken", description="No hot water since Monday.",
                        requester_phone="+4915112345678", requester_name="Ann Example", priority="high")


@pytest.fixture
def freshdesk() -> Iterator[FreshdeskHarness]:
    with harness() as h:
        yield h


def api_requests(h: FreshdeskHarness) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in h.server.requests]


def test_a_ticket_is_created_as_freshdesk_documents_it(freshdesk: FreshdeskHarness) -> None:
    ticket = freshdesk.connector.create(REQUEST, "call-7/tc1")

    search, newest, post = freshdesk.server.requests
    tag = key_token("call-7/tc1")
    assert (search.method, search.path) == ("GET", "/api/v2/search/tickets")
    assert search.raw_query == f"query=%22tag%3A%27{tag}%27%22"
    assert search.param("query") == f"\"tag:'{tag}'\""
    assert (newest.method, newest.path, newest.param("order_by"), newest.param("order_type"),
            newest.param("per_page")) == ("GET", "/api/v2/tickets", "created_at", "desc", "100")
    assert (post.method, post.path) == ("POST", "/api/v2/tickets")
    expected_auth = "Basic " + base64.b64encode(f"{API_KEY}:X".encode()).decode()
    assert {r.headers["authorization"] for r in (search, newest, post)} == {expected_auth}
    assert post.json() == {"subject": "Boiler broken", "description": "<div>No hot water since Monday.</div>",
                           "priority": 3, "status": 2, "source": 3, "tags": ["voxlog", tag],
                           "phone": "+4915112345678", "name": "Ann Example"}
    assert (ticket.status, ticket.subject, ticket.url) == ("open", "Boiler broken",
                                                           f"https://{DOMAIN}/a/tickets/{ticket.id}")
    requester = freshdesk.server.contacts[freshdesk.server.tickets[int(ticket.id)]["requester_id"]]
    assert (requester["name"], requester["phone"]) == ("Ann Example", "+4915112345678")


@pytest.mark.parametrize(("priority", "number"), [("low", 1), ("normal", 2), ("high", 3), ("urgent", 4)])
def test_priorities_are_freshdesks_numbers(freshdesk: FreshdeskHarness, priority: str, number: int) -> None:
    freshdesk.connector.create(TicketRequest(subject="s", description="d", requester_phone="+1555", priority=priority),
                               f"k-{priority}")

    assert freshdesk.server.requests[-1].json()["priority"] == number


def test_an_email_makes_the_requester_and_a_phone_alone_is_named_by_itself(freshdesk: FreshdeskHarness) -> None:
    freshdesk.connector.create(TicketRequest(subject="s", description="d", requester_email="ann@example.org"), "k1")
    freshdesk.connector.create(TicketRequest(subject="s", description="d", requester_phone="+15550100"), "k2")

    by_email, by_phone = (r.json() for r in freshdesk.server.requests if r.method == "POST")
    assert (by_email.get("email"), "phone" in by_email, "name" in by_email) == ("ann@example.org", False, False)
    assert (by_phone["phone"], by_phone["name"]) == ("+15550100", "+15550100")  # Freshdesk requires a name here


def test_a_caller_with_neither_phone_nor_email_is_refused_before_any_request(freshdesk: FreshdeskHarness) -> None:
    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.create(TicketRequest(subject="s", description="d", requester_name="Ann"), "k")

    assert raised.value.kind is FailureKind.INVALID
    assert freshdesk.requests_seen == 0


def test_a_repeat_before_the_search_has_indexed_the_ticket_finds_it_among_the_newest(
        freshdesk: FreshdeskHarness) -> None:
    first = freshdesk.connector.create(REQUEST, "call-1/tc4")

    again = freshdesk.connector.create(REQUEST, "call-1/tc4")

    assert again == first
    assert len(freshdesk.server.tickets) == 1
    assert api_requests(freshdesk)[3:] == [("GET", "/api/v2/search/tickets"), ("GET", "/api/v2/tickets")]


def test_a_repeat_long_after_finds_the_ticket_by_the_search(freshdesk: FreshdeskHarness) -> None:
    first = freshdesk.connector.create(REQUEST, "call-1/tc5")
    for n in range(120):  # more tickets since than the newest page holds
        freshdesk.server.seed_ticket(f"later {n}")
    freshdesk.server.index_search()
    freshdesk.server.requests.clear()

    again = freshdesk.connector.create(REQUEST, "call-1/tc5")

    assert again == first
    assert api_requests(freshdesk) == [("GET", "/api/v2/search/tickets")]
    assert len(freshdesk.server.tickets) == 121


def test_a_key_whose_ticket_is_neither_indexed_nor_among_the_newest_is_created_again(
        freshdesk: FreshdeskHarness) -> None:
    """The limit of the mechanism, stated: more than a page of tickets created within the minutes the
    index lags. The worker's own record of the key's result covers this window."""
    first = freshdesk.connector.create(REQUEST, "call-1/tc6")
    for n in range(100):
        freshdesk.server.seed_ticket(f"later {n}")

    assert freshdesk.connector.create(REQUEST, "call-1/tc6").id != first.id


def test_a_note_carries_the_keys_token_and_is_written_once(freshdesk: FreshdeskHarness) -> None:
    ticket = freshdesk.connector.create(REQUEST, "call-3/tc1")

    note_id = freshdesk.connector.comment(ticket.id, "We called back: <ok> \u00fc", "call-3/tc2")
    again = freshdesk.connector.comment(ticket.id, "We called back: <ok> \u00fc", "call-3/tc2")

    token = key_token("call-3/tc2")
    assert again == note_id
    assert freshdesk.comments(ticket.id) == [f"We called back: <ok> \u00fc\n\n[{token}]"]
    [post] = [r for r in freshdesk.server.requests if r.path.endswith("/notes")]
    assert (post.method, post.path) == ("POST", f"/api/v2/tickets/{ticket.id}/notes")
    assert post.json() == {"body": f"<div>We called back: &lt;ok&gt; \u00fc<br><br>[{token}]</div>", "private": False}
    assert note_id == str(freshdesk.server.conversations[int(ticket.id)][0]["id"])


def test_conversations_are_read_page_after_page_through_the_link_header(freshdesk: FreshdeskHarness) -> None:
    ticket_id = freshdesk.server.seed_ticket("Long thread")
    for n in range(230):
        freshdesk.server.add_note(ticket_id, f"<div>note {n}</div>")
    marker = f"[{key_token('call-4/tc9')}]"
    earlier = freshdesk.server.add_note(ticket_id, f"<div>written before a crash<br><br>{marker}</div>")
    freshdesk.server.requests.clear()

    assert freshdesk.connector.comment(str(ticket_id), "written before a crash", "call-4/tc9") == str(earlier["id"])

    pages = freshdesk.server.requests
    assert [(r.method, r.path) for r in pages] == [("GET", f"/api/v2/tickets/{ticket_id}/conversations")] * 3
    assert [(r.param("page"), r.param("per_page")) for r in pages] == [(None, "100"), ("2", "100"), ("3", "100")]
    assert len(freshdesk.server.conversations[ticket_id]) == 231  # nothing added


@pytest.mark.parametrize("link", [
    "<https://acme.freshdesk.com/api/v2/tickets/{ticket_id}/conversations?per_page=100>; rel=\"next\"",  # a loop
    "<https://acme.freshdesk.com:notaport/x>; rel=\"next\"",
])
def test_a_next_link_that_leads_nowhere_is_a_bad_response(freshdesk: FreshdeskHarness, link: str) -> None:
    ticket_id = freshdesk.server.seed_ticket("Loop")
    freshdesk.fail_next(200, body="[]", headers={"link": link.format(ticket_id=ticket_id)})

    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.comment(str(ticket_id), "x", "k")

    assert raised.value.kind is FailureKind.BAD_RESPONSE


@pytest.mark.parametrize(("number", "word"), [(2, "open"), (3, "pending"), (4, "resolved"), (5, "closed"),
                                              (6, "status 6")])
def test_status_numbers_are_freshdesks_words(freshdesk: FreshdeskHarness, number: int, word: str) -> None:
    ticket_id = freshdesk.server.seed_ticket("s")
    freshdesk.server.tickets[ticket_id]["status"] = number

    assert freshdesk.connector.status(str(ticket_id)).status == word
    assert api_requests(freshdesk)[-1] == ("GET", f"/api/v2/tickets/{ticket_id}")


def test_hostile_text_reaches_freshdesk_whole(freshdesk: FreshdeskHarness) -> None:
    ticket = freshdesk.connector.create(
        TicketRequest(subject=HOSTILE_SUBJECT, description=HOSTILE_DESCRIPTION, requester_phone="+1 (555) 010-9999",
                      requester_name="O'Brien \"Bob\" <b>"), "call/\u00fc & #1 ?x=y %2F+ \"q\" tag:'x'")

    stored = freshdesk.server.tickets[int(ticket.id)]
    assert stored["subject"] == ticket.subject == HOSTILE_SUBJECT
    assert stored["description_text"] == HOSTILE_DESCRIPTION
    assert "<script>" not in stored["description"]
    assert "<two>" not in stored["description"]
    assert freshdesk.server.contacts[stored["requester_id"]]["name"] == "O'Brien \"Bob\" <b>"


@given(key=st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_key_makes_a_tag_whose_query_finds_it_and_only_it(key: str) -> None:
    tag = key_token(key)
    query = tag_query(tag)

    assert re.fullmatch(r"voxlog-key-[0-9a-f]{24}", tag)
    assert len(query) <= 512
    assert query.startswith('"')
    assert query.endswith('"')
    matches = _matcher(query[1:-1])
    assert matches is not None
    assert matches({"tags": ["voxlog", tag]})
    assert not matches({"tags": ["voxlog", key_token(key + "'")]})


@given(value=st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_a_tag_needing_quoting_is_refused_rather_than_guessed_at(value: str) -> None:
    try:
        query = tag_query(value)
    except ValueError:
        assert not value or re.search(r"[^A-Za-z0-9_-]", value)
    else:
        assert query == f"\"tag:'{value}'\""
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value)


def test_the_search_query_reaches_the_server_whole_for_any_key(freshdesk: FreshdeskHarness) -> None:
    @given(key=st.text(min_size=1, max_size=60))
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(key: str) -> None:
        first = freshdesk.connector.create(TicketRequest(subject="s", description="d", requester_phone="+1"), key)
        for n in range(100):  # out of the newest page: only the search can find it now
            freshdesk.server.seed_ticket(f"filler {n}")
        freshdesk.server.index_search()
        assert freshdesk.connector.create(TicketRequest(subject="s", description="d", requester_phone="+1"),
                                          key) == first

    check()


@given(text=st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_plain_text_comes_back_from_its_html_whole(text: str) -> None:
    assert html_text(as_html(text)) == text.strip()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
TICKETISH = st.fixed_dictionaries({}, optional={
    "id": st.integers(1, 10**12) | JSON, "status": st.integers(2, 7) | JSON, "subject": st.text(max_size=20) | JSON,
    "tags": st.lists(st.text(max_size=20), max_size=3) | JSON,
})
ANSWERS = st.one_of(
    JSON, TICKETISH, st.lists(TICKETISH, max_size=3),
    st.fixed_dictionaries({"results": st.lists(TICKETISH | JSON, max_size=3) | JSON, "total": JSON}),
    st.lists(st.fixed_dictionaries({}, optional={"id": JSON, "body": JSON, "body_text": JSON}), max_size=3),
    st.fixed_dictionaries({}, optional={"id": JSON, "contact": JSON}),
)


def test_whatever_a_200_carries_the_connector_answers_or_raises_bad_response(freshdesk: FreshdeskHarness) -> None:
    ticket = freshdesk.connector.create(REQUEST, "call-10/tc1")
    desk: TicketDesk = freshdesk.connector
    operations: dict[str, Callable[[], object]] = {
        "create": lambda: desk.create(REQUEST, "call-10/tc2"),
        "comment": lambda: desk.comment(ticket.id, "hello", "call-10/tc3"),
        "status": lambda: desk.status(ticket.id),
        "check": lambda: desk.check(),
    }

    @given(answer=ANSWERS, operation=st.sampled_from(sorted(operations)))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(answer: object, operation: str) -> None:
        freshdesk.fail_next(200, body=json.dumps(answer))
        failure = None
        try:
            operations[operation]()
        except ConnectorError as exc:
            failure = exc
        assert failure is None or failure.kind is FailureKind.BAD_RESPONSE, failure

    check()


ERROR_BODIES = st.one_of(
    JSON.map(json.dumps),
    st.text(max_size=60),
    st.fixed_dictionaries({"description": st.text(max_size=20) | JSON, "errors": st.lists(
        st.fixed_dictionaries({}, optional={"field": JSON, "message": JSON, "code": JSON}) | JSON, max_size=3) | JSON,
                           }).map(json.dumps),
)


@given(body=ERROR_BODIES)
@settings(max_examples=300, deadline=None)
def test_any_error_body_reads_as_some_text(body: str) -> None:
    text = error_text(body)

    assert isinstance(text, str)
    try:
        document = json.loads(body)
    except ValueError:
        return
    problems = document.get("errors") if isinstance(document, dict) else None
    if isinstance(problems, list):
        for problem in problems:
            if isinstance(problem, dict) and isinstance(problem.get("message"), str) and problem["message"]:
                assert str(problem["message"]) in text


def test_freshdesks_validation_errors_are_the_errors_text(freshdesk: FreshdeskHarness) -> None:
    freshdesk.fail_next(400, body=json.dumps({"description": "Validation failed", "errors": [
        {"field": "email", "message": "It should be a valid email address", "code": "invalid_value"}]}))

    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.create(REQUEST, "k")

    assert str(raised.value) == ("invalid (HTTP 400): freshdesk: Validation failed email: It should be a valid "
                                 "email address (invalid_value)")


def test_an_api_key_the_server_echoes_is_kept_out_of_the_error(freshdesk: FreshdeskHarness) -> None:
    freshdesk.fail_next(401, body=json.dumps({"code": "invalid_credentials", "message": f"bad key {API_KEY}"}))

    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.status("1")

    assert API_KEY not in str(raised.value)


def test_an_answer_that_does_not_come_is_unavailable_within_the_timeout(freshdesk: FreshdeskHarness) -> None:
    freshdesk.stall_next(10)
    started = time.monotonic()

    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.status("1")

    assert raised.value.kind is FailureKind.UNAVAILABLE
    assert time.monotonic() - started < 1.0 + 2.0  # the harness's timeout_s, and slack for a loaded machine


def test_a_429_is_raised_with_its_retry_after_and_not_retried(freshdesk: FreshdeskHarness) -> None:
    freshdesk.fail_next(429, headers={"Retry-After": "42"})

    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.status("1")

    assert (raised.value.kind, raised.value.retry_after_s) == (FailureKind.RATE_LIMITED, 42.0)
    assert freshdesk.requests_seen == 1


def test_a_healthy_account_passes_every_check(freshdesk: FreshdeskHarness) -> None:
    results = freshdesk.connector.check()

    assert [(r.what, r.ok) for r in results] == [("sign in", True), ("read tickets", True)]
    assert api_requests(freshdesk) == [("GET", "/api/v2/agents/me"), ("GET", "/api/v2/tickets")]


@pytest.mark.parametrize("ticket_id", ["", "12a", "-1", "\u0661\u0662", "1/../../agents/me"])
def test_an_id_that_is_not_freshdesks_is_refused_before_any_request(freshdesk: FreshdeskHarness,
                                                                     ticket_id: str) -> None:
    with pytest.raises(ConnectorError) as raised:
        freshdesk.connector.comment(ticket_id, "x", "k")

    assert raised.value.kind is FailureKind.INVALID
    assert freshdesk.requests_seen == 0


def test_settings_name_the_secret_and_the_plan_sets_the_rate() -> None:
    settings_ = FreshdeskSettings.model_validate({"kind": "freshdesk", "domain": DOMAIN, "api_key": {"env": "FD"}})
    desk = connect(settings_, Secrets(environ={"FD": API_KEY}), timeout_s=2.0)

    assert (desk.rate_limit.requests, desk.rate_limit.per_s) == (200, 60.0)
    assert "Rate Limit" in desk.rate_limit.source
    assert connect(settings_.model_copy(update={"plan": "enterprise"}), Secrets(environ={"FD": API_KEY}),
                   timeout_s=2.0).rate_limit.requests == 700
    assert isinstance(desk, TicketDesk)
    with pytest.raises(ValidationError):
        FreshdeskSettings(domain="https://acme.freshdesk.com", api_key=SecretRef(env="FD"))
    with pytest.raises(ValidationError):
        FreshdeskSettings.model_validate({"domain": DOMAIN, "api_key": API_KEY})
    with pytest.raises(ConnectorError) as raised:
        connect(settings_, Secrets(environ={}), timeout_s=2.0)
    assert raised.value.kind is FailureKind.CONFIGURATION
