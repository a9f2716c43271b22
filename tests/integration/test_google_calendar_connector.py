"""The Google Calendar connector on its own wire protocol: google-api-python-client and google-auth as
shipped, against a local Calendar API and token endpoint (tests/connectors/fake_google_calendar.py).
What every calendar connector does is the contract suite's; this is what Google does its own way: the
service account's signed JWT assertion, refreshing the token, client-chosen event ids, freeBusy,
ETags, 403 rate limits, and pages of events."""

from __future__ import annotations

import json
import re
import socket
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from streams.connectors.base import BookingRequest, CalendarConnector, ConnectorError, FailureKind
from streams.connectors.calendar_google import GoogleCalendarConnector, event_id_for, event_time
from streams.connectors.slots import OpeningHours
from tests.connectors.contract_faults import fails
from tests.connectors.fake_google_calendar import (
    CALENDAR_SCOPE,
    GOOGLE_TOKEN_AUDIENCE,
    JWT_BEARER_GRANT,
    google_error,
)
from tests.connectors.harness_google import (
    CALENDAR_ID,
    CLIENT_EMAIL,
    DELEGATED_USER,
    HOURS,
    KEY_ID,
    harness,
    public_key_pem,
    service_account_key,
)
from tests.connectors.vendor_server import SeenRequest

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
DAY = datetime(2026, 6, 10, tzinfo=BERLIN)  # a Wednesday; Berlin is UTC+2, New York UTC-4
EVENTS = f"/calendar/v3/calendars/{CALENDAR_ID}/events"


def at(hour: int, minute: int = 0) -> datetime:
    return DAY.replace(hour=hour, minute=minute)


def visit(start: datetime, end: datetime | None = None, **caller: str) -> BookingRequest:
    return BookingRequest(start=start, end=end or start + timedelta(hours=1), title="Boiler service",
                          description="Annual service, side entrance.", attendee_name="Ann Lee",
                          attendee_phone="+4915112345678", **caller)


def test_the_connector_is_a_calendar_connector() -> None:
    with harness() as h:
        assert isinstance(h.connector, CalendarConnector)
        assert (h.connector.rate_limit.requests, h.connector.rate_limit.per_s) == (600, 60.0)
        assert "Usage limits" in h.connector.rate_limit.source


def test_the_token_comes_from_a_signed_jwt_assertion_with_googles_claims() -> None:
    with harness() as h:
        h.connector.free_slots(at(8), at(18), 3600)
        [claims] = h.server.token_grants
        assert claims["iss"] == CLIENT_EMAIL
        assert claims["aud"] == GOOGLE_TOKEN_AUDIENCE  # Google's endpoint, wherever token_uri points
        assert claims["scope"] == CALENDAR_SCOPE
        assert claims["sub"] == DELEGATED_USER  # domain-wide delegation: the account acts as the user
        assert claims["exp"] - claims["iat"] == 3600
        [request] = h.server.requests
        assert request.headers["authorization"] == f"Bearer {h.server.issued_tokens[0]}"


def test_an_assertion_signed_with_another_key_is_refused_as_auth() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with harness() as h:
        key = json.loads(service_account_key(h.server.token_uri)) | {"private_key": other}
        connector = GoogleCalendarConnector(calendar_id=CALENDAR_ID, service_account_key=SecretStr(json.dumps(key)),
                                            hours=HOURS, timeout_s=1.0, delegated_user=DELEGATED_USER,
                                            base_url=h.server.base_url)
        error = fails(FailureKind.AUTH, lambda: connector.free_slots(at(8), at(18), 3600))
        assert "invalid_grant" in str(error)
        assert not error.retryable
        [sign_in] = connector.check()
        assert (sign_in.what, sign_in.ok) == ("sign-in", False)
        assert "invalid_grant" in sign_in.detail
        assert h.server.requests == []
        assert h.server.token_grants == []


def test_a_user_the_account_may_not_act_for_is_refused_as_auth() -> None:
    with harness() as h:
        connector = GoogleCalendarConnector(
            calendar_id=CALENDAR_ID, service_account_key=SecretStr(service_account_key(h.server.token_uri)),
            hours=HOURS, timeout_s=1.0, delegated_user="someone@elsewhere.example", base_url=h.server.base_url)
        assert "unauthorized_client" in str(fails(FailureKind.AUTH, lambda: connector.book(visit(at(10)), "k")))
        [sign_in] = connector.check()
        assert not sign_in.ok
        assert "domain-wide delegation" in sign_in.detail


def test_a_401_refreshes_the_token_once_and_retries_the_request() -> None:
    with harness() as h:
        h.connector.free_slots(at(8), at(18), 3600)
        h.server.revoke_tokens()  # the token stops working before it expires
        slots = h.connector.free_slots(at(8), at(18), 3600)
        assert len(slots) == 10
        assert len(h.server.token_grants) == 2
        _, refused, retried = h.server.requests
        assert refused.body == retried.body
        assert retried.headers["authorization"] == f"Bearer {h.server.issued_tokens[1]}"


def test_a_second_401_after_the_refresh_is_auth() -> None:
    with harness() as h:
        h.connector.free_slots(at(8), at(18), 3600)
        h.fail_next(401, times=2)
        error = fails(FailureKind.AUTH, lambda: h.connector.free_slots(at(8), at(18), 3600))
        assert error.status == 401
        assert len(h.server.token_grants) == 2  # one refresh, not a loop
        assert h.requests_seen == 3


def test_a_token_about_to_expire_is_refreshed_before_the_request() -> None:
    # google-auth takes a token as expired some minutes before its end: one that lives 60 s never is used twice.
    with harness(token_lifetime_s=60) as h:
        for _ in range(2):
            h.connector.free_slots(at(8), at(18), 3600)
        assert len(h.server.token_grants) == 2
        tokens = [r.headers["authorization"] for r in h.server.requests]
        assert tokens == [f"Bearer {t}" for t in h.server.issued_tokens]  # no request was refused


def test_free_slots_come_from_freebusy_within_the_opening_hours() -> None:
    with harness() as h:
        h.add_busy(at(9), at(10, 30), "Dentist")
        h.add_busy(at(13), at(14), "Lunch")
        h.server.add_event(at(15), at(16), "Reminder", transparency="transparent")  # marked free: not busy
        slots = h.connector.free_slots(at(6), at(17), 3600)
        assert [s.start.hour for s in slots] == [8, 11, 12, 14, 15, 16]
        assert all(s.end - s.start == timedelta(hours=1) and s.start.tzinfo == BERLIN for s in slots)
        [request] = h.server.api_requests("POST", "/freeBusy")
        assert request.path == "/calendar/v3/freeBusy"
        assert request.json() == {"timeMin": "2026-06-10T04:00:00Z", "timeMax": "2026-06-10T15:00:00Z",
                                  "timeZone": "Europe/Berlin", "items": [{"id": CALENDAR_ID}]}
        assert request.param("alt") == "json"


def test_a_calendar_freebusy_does_not_know_is_a_configuration_error() -> None:
    with harness() as h:
        connector = GoogleCalendarConnector(
            calendar_id="nobody@group.calendar.google.com",
            service_account_key=SecretStr(service_account_key(h.server.token_uri)), hours=HOURS, timeout_s=1.0,
            delegated_user=DELEGATED_USER, base_url=h.server.base_url)
        fails(FailureKind.CONFIGURATION, lambda: connector.free_slots(at(8), at(18), 3600))


def test_a_booking_is_an_event_with_local_times_and_an_id_from_the_key() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(11), attendee_email="ann@example.org"), "call-7:book:1")
        [insert] = h.server.api_requests("POST", "/events")
        assert insert.path == EVENTS
        body = insert.json()
        assert body["id"] == event_id_for("call-7:book:1") == booking.id
        assert body["start"] == {"dateTime": "2026-06-10T11:00:00+02:00", "timeZone": "Europe/Berlin"}
        assert body["end"] == {"dateTime": "2026-06-10T12:00:00+02:00", "timeZone": "Europe/Berlin"}
        assert body["summary"] == "Boiler service"
        assert body["description"] == ("Annual service, side entrance.\n"
                                       "Caller: Ann Lee, +4915112345678, ann@example.org")
        assert "attendees" not in body  # a service account may not invite without delegation
        assert (booking.start, booking.end, booking.title) == (at(11), at(12), "Boiler service")
        assert booking.url.startswith("https://www.google.com/calendar/event?eid=")
        assert h.events() == [(at(11), at(12), "Boiler service")]


def test_a_caller_in_new_york_booking_ten_oclock_their_time_lands_at_sixteen_in_berlin() -> None:
    with harness() as h:
        their_ten = datetime(2026, 6, 10, 10, 0, tzinfo=NEW_YORK)
        booking = h.connector.book(visit(their_ten, attendee_timezone="America/New_York"), "k-ny")
        assert booking.start == at(16)
        assert booking.start.tzinfo == BERLIN
        assert h.server.api_requests("POST", "/events")[0].json()["start"]["dateTime"] == "2026-06-10T16:00:00+02:00"
        [(start, _, _)] = h.events()
        assert start.astimezone(BERLIN).hour == 16


def test_booking_twice_with_one_key_makes_one_event() -> None:
    with harness() as h:
        first = h.connector.book(visit(at(10)), "call-9:book")
        again = h.connector.book(visit(at(10)), "call-9:book")
        assert again == first
        assert len(h.events()) == 1
        assert len(h.server.api_requests("POST", "/events")) == 1
        # The repeat saw the time busy, and found its own event by the key's id.
        assert [r.path for r in h.server.requests[-2:]] == ["/calendar/v3/freeBusy", f"{EVENTS}/{first.id}"]


def test_an_insert_that_finds_the_keys_event_already_there_answers_it() -> None:
    with harness() as h:
        # As when an earlier attempt's insert lands between this attempt's freeBusy and its insert: the event
        # is there, but freeBusy did not count it.
        booking = h.connector.book(visit(at(10)), "k-race")
        h.server.event(booking.id).transparency = "transparent"
        again = h.connector.book(visit(at(10)), "k-race")
        assert again.id == booking.id
        assert [r.method for r in h.server.requests[-3:]] == ["POST", "POST", "GET"]  # freeBusy, insert 409, get
        assert len(h.events()) == 1


def test_a_busy_time_is_a_conflict_and_a_closed_one_invalid_and_neither_writes() -> None:
    with harness() as h:
        h.add_busy(at(10, 30), at(11, 30), "Other job")
        fails(FailureKind.CONFLICT, lambda: h.connector.book(visit(at(11)), "k1"))
        fails(FailureKind.INVALID, lambda: h.connector.book(visit(at(18)), "k2"))  # 18:00-19:00, after closing
        fails(FailureKind.INVALID, lambda: h.connector.book(visit(at(7, 30)), "k3"))
        assert h.server.api_requests("POST", "/events") == []


def test_reschedule_reads_every_page_of_events_and_patches_with_the_etag() -> None:
    with harness(page_size=2) as h:
        booking = h.connector.book(visit(at(10)), "k-move")
        for _ in range(4):  # events marked free around the new time: four of them, two pages
            h.server.add_event(at(13, 30), at(14, 30), "Reminder", transparency="transparent")
        moved = h.connector.reschedule(booking.id, at(14), at(15), "k-move:2")
        assert (moved.id, moved.start, moved.end) == (booking.id, at(14), at(15))
        pages = h.server.api_requests("GET", "/events")
        assert [p.param("pageToken") for p in pages] == [None, "page-2"]
        assert pages[0].param("timeMin") == "2026-06-10T12:00:00Z"
        assert pages[0].param("singleEvents") == "true"
        [patch] = h.server.api_requests("PATCH", f"/events/{booking.id}")
        assert patch.headers["if-match"] == '"1"'
        assert patch.json() == {"start": {"dateTime": "2026-06-10T14:00:00+02:00", "timeZone": "Europe/Berlin"},
                                "end": {"dateTime": "2026-06-10T15:00:00+02:00", "timeZone": "Europe/Berlin"}}
        assert h.events()[-1][:2] == (at(14), at(15))


def test_reschedule_onto_a_busy_time_on_the_last_page_is_a_conflict() -> None:
    with harness(page_size=2) as h:
        booking = h.connector.book(visit(at(10)), "k-move")
        for _ in range(4):
            h.server.add_event(at(13, 30), at(14, 30), "Reminder", transparency="transparent")
        h.add_busy(at(14, 30), at(15, 30), "Other job")  # starts last: the third page
        fails(FailureKind.CONFLICT, lambda: h.connector.reschedule(booking.id, at(14), at(15), "k-move:2"))
        assert len(h.server.api_requests("GET", "/events")) == 3
        assert h.server.api_requests("PATCH", f"/events/{booking.id}") == []


def test_reschedule_to_where_it_already_is_changes_nothing() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        moved = h.connector.reschedule(booking.id, at(12), at(13), "k:2")
        again = h.connector.reschedule(booking.id, at(12), at(13), "k:2")
        assert again == moved
        assert len(h.server.api_requests("PATCH", f"/events/{booking.id}")) == 1


def test_an_event_changed_since_it_was_read_is_a_conflict() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        h.server.fail_next(412, after=2)  # the get and the list pass; the patch finds another ETag
        error = fails(FailureKind.CONFLICT, lambda: h.connector.reschedule(booking.id, at(12), at(13), "k:2"))
        assert error.status == 412


def test_a_cancelled_event_cannot_be_rescheduled() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        h.connector.cancel(booking.id, "k:cancel")
        fails(FailureKind.CONFLICT, lambda: h.connector.reschedule(booking.id, at(12), at(13), "k:2"))


def test_cancel_deletes_the_event_and_a_second_cancel_is_no_error() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        h.connector.cancel(booking.id, "k:cancel")
        h.connector.cancel(booking.id, "k:cancel")  # 410 Gone
        assert [r.method for r in h.server.api_requests("DELETE", f"/events/{booking.id}")] == ["DELETE", "DELETE"]
        assert h.events() == []
        fails(FailureKind.NOT_FOUND, lambda: h.connector.cancel("nosuchevent00", "k2"))
        # The key's event is deleted, not gone: booking again with that key answers it, as Google keeps its id.
        assert h.connector.book(visit(at(10)), "k").id == booking.id


@pytest.mark.parametrize("reason", ["rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"])
def test_a_403_that_says_rate_limit_is_rate_limited_not_scope(reason: str) -> None:
    with harness() as h:
        h.fail_next(403, body=google_error(403, reason, "Rate Limit Exceeded"))
        error = fails(FailureKind.RATE_LIMITED, lambda: h.connector.free_slots(at(8), at(18), 3600))
        assert error.retryable
        assert error.status == 403


def test_a_403_for_a_permission_is_scope() -> None:
    with harness() as h:
        h.fail_next(403, body=google_error(403, "requiredAccessLevel", "You need to have writer access to this "
                                                                       "calendar."))
        error = fails(FailureKind.SCOPE, lambda: h.connector.book(visit(at(10)), "k"))
        assert "writer access" in str(error)


@pytest.mark.parametrize(("status", "kind"), [
    (400, FailureKind.INVALID), (404, FailureKind.NOT_FOUND), (409, FailureKind.CONFLICT),
    (429, FailureKind.RATE_LIMITED), (500, FailureKind.UNAVAILABLE), (503, FailureKind.UNAVAILABLE),
])
def test_statuses_map_to_failures(status: int, kind: FailureKind) -> None:
    with harness() as h:
        h.fail_next(status, headers={"Retry-After": "7"})
        error = fails(kind, lambda: h.connector.book(visit(at(10)), "k"))
        assert error.status == status
        if kind is FailureKind.RATE_LIMITED:
            assert error.retry_after_s == 7


def test_a_stall_is_unavailable_within_the_timeout_and_the_next_call_works() -> None:
    with harness() as h:
        h.connector.free_slots(at(8), at(18), 3600)  # the token first: the stall is the API's
        h.stall_next(10)
        started = time.monotonic()
        fails(FailureKind.UNAVAILABLE, lambda: h.connector.book(visit(at(10)), "k"))
        assert time.monotonic() - started < 1.0 + 1.5
        assert h.connector.book(visit(at(10)), "k").start == at(10)


def test_a_body_that_is_not_googles_json_is_a_bad_response() -> None:
    with harness() as h:
        h.malformed_next()
        fails(FailureKind.BAD_RESPONSE, lambda: h.connector.free_slots(at(8), at(18), 3600))


def test_an_unreachable_api_is_unavailable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}/"
    connector = GoogleCalendarConnector(calendar_id=CALENDAR_ID, service_account_key=SecretStr(
        service_account_key(f"{closed}token")), hours=HOURS, timeout_s=1.0, delegated_user=DELEGATED_USER,
        base_url=closed)
    fails(FailureKind.UNAVAILABLE, lambda: connector.free_slots(at(8), at(18), 3600))
    [reach] = connector.check()
    assert (reach.what, reach.ok) == ("reach", False)


def test_no_secret_reaches_an_error_message() -> None:
    with harness() as h:
        messages = []
        for status in (400, 401, 403, 404, 409, 429, 500):
            h.fail_next(status, times=2)
            with pytest.raises(ConnectorError) as caught:
                h.connector.book(visit(at(10)), "k")
            messages.append(str(caught.value))
        leaked = [v for v in (*h.secret_values, *h.server.issued_tokens) for m in messages if v in m]
        assert leaked == []


def test_a_key_that_is_not_a_service_account_key_is_a_configuration_error_that_does_not_quote_it() -> None:
    error = fails(FailureKind.CONFIGURATION, lambda: GoogleCalendarConnector(
        calendar_id=CALENDAR_ID, service_account_key=SecretStr('{"type": "authorized_user", "secret": "s3cr3t"}'),
        hours=HOURS, timeout_s=1.0))
    assert "s3cr3t" not in str(error)


def test_check_signs_in_and_reads_the_access_role() -> None:
    with harness() as h:
        results = h.connector.check()
        assert [(r.what, r.ok) for r in results] == [("sign-in", True), ("calendar", True), ("write access", True)]
        assert h.server.requests[0].path == f"/calendar/v3/users/me/calendarList/{CALENDAR_ID}"
    with harness(access_role="reader") as h:
        *_, write = h.connector.check()
        assert not write.ok
        assert "writer or owner" in write.detail
        assert "Make changes to events" in write.detail


def test_check_falls_back_to_the_calendar_when_it_is_not_in_the_calendar_list() -> None:
    with harness() as h:
        h.fail_next(404)  # calendarList.get: shared with the account, never added to its list
        results = h.connector.check()
        assert [(r.what, r.ok) for r in results] == [("sign-in", True), ("calendar", True)]
        assert "not in" in results[1].detail
        assert h.server.requests[-1].path == f"/calendar/v3/calendars/{CALENDAR_ID}"


@pytest.mark.parametrize(("status", "words"), [(401, "refused (401)"), (403, "may not read")])
def test_check_says_plainly_what_is_wrong(status: int, words: str) -> None:
    with harness() as h:
        h.fail_next(status, times=2)
        results = h.connector.check()
        assert [(r.what, r.ok) for r in results] == [("sign-in", True), ("calendar", False)]
        assert words in results[1].detail


@given(st.text(min_size=1, max_size=300))
def test_every_key_makes_a_valid_event_id(key: str) -> None:
    event_id = event_id_for(key)
    assert re.fullmatch(r"[a-v0-9]{5,1024}", event_id)
    assert event_id == event_id_for(key)


@given(st.lists(st.text(max_size=40), min_size=2, max_size=2, unique=True))
def test_different_keys_make_different_event_ids(keys: list[str]) -> None:
    assert event_id_for(keys[0]) != event_id_for(keys[1])


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.timezones(),
                    allow_imaginary=False))
def test_event_times_read_back_as_the_same_moment(moment: datetime) -> None:
    # In UTC: a time in a repeated hour is never equal to one in another zone (PEP 495), the same moment or not.
    read = event_time({"dateTime": moment.isoformat(), "timeZone": "Europe/Berlin"}, HOURS)
    assert read.astimezone(UTC) == moment.astimezone(UTC)


def test_an_all_day_event_starts_at_midnight_in_the_calendars_zone() -> None:
    hours = OpeningHours(timezone="Europe/Berlin")
    assert event_time({"date": "2026-06-10"}, hours) == datetime(2026, 6, 10, tzinfo=BERLIN)
    with pytest.raises(ValueError, match="offset"):
        event_time({"dateTime": "2026-06-10T10:00:00"}, hours)


def test_the_fake_verifies_what_google_verifies() -> None:
    # The local token endpoint is only as good as its checks: an assertion for another audience is refused.
    with harness() as h:
        private_key = json.loads(service_account_key(h.server.token_uri))["private_key"]
        assertion = jwt.encode({"iss": CLIENT_EMAIL, "aud": "https://example.org/token", "scope": CALENDAR_SCOPE,
                                "iat": int(time.time()), "exp": int(time.time()) + 3600}, private_key,
                               algorithm="RS256", headers={"kid": KEY_ID})
        answer = h.server.answer(_token_request(assertion))
        assert answer is not None
        assert answer.status == 400
        assert "invalid_grant" in answer.body
        assert public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")


def _token_request(assertion: str) -> SeenRequest:
    body = urlencode({"grant_type": JWT_BEARER_GRANT, "assertion": assertion}).encode()
    return SeenRequest("POST", "/token", {}, {"content-type": "application/x-www-form-urlencoded"}, body)
