"""The Cal.com connector on its own wire protocol: httpx against a local Cal.com API v2
(tests/connectors/fake_calcom.py). What every calendar connector does is the contract suite's; this is
what Cal.com does its own way: versioned endpoints, slots grouped by day, a booking's start in UTC with
the caller's own zone, the key in the booking's metadata found again by a paged search, rescheduling
that makes a new booking, and availability that Cal.com, not the connector, decides."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from streams.connectors.base import BookingRequest, CalendarConnector, ConnectorError, FailureKind, Slot
from streams.connectors.calendar_calcom import CalComConnector, slots_from
from tests.connectors.contract_faults import fails
from tests.connectors.fake_calcom import SLOT_TAKEN, calcom_error
from tests.connectors.harness_calcom import API_KEY, EVENT_TYPE_ID, harness

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
DAY = datetime(2026, 6, 10, tzinfo=BERLIN)  # a Wednesday; Berlin is UTC+2, New York UTC-4


def at(hour: int, minute: int = 0, *, day: datetime = DAY) -> datetime:
    return day.replace(hour=hour, minute=minute)


def visit(start: datetime, end: datetime | None = None, **overrides: str) -> BookingRequest:
    fields = {"attendee_name": "Ann Lee", "attendee_phone": "+4915112345678", "attendee_timezone": "Europe/Berlin",
              **overrides}
    return BookingRequest(start=start, end=end or start + timedelta(hours=1), title="Boiler service",
                          description="Side entrance.", **fields)


def test_the_connector_is_a_calendar_connector() -> None:
    with harness() as h:
        assert isinstance(h.connector, CalendarConnector)
        assert (h.connector.rate_limit.requests, h.connector.rate_limit.per_s) == (120, 60.0)
        assert "Rate limits" in h.connector.rate_limit.source


def test_free_slots_ask_for_the_event_types_slots_in_the_calendars_zone() -> None:
    with harness() as h:
        h.add_busy(at(9), at(10), "Dentist")
        slots = h.connector.free_slots(at(6), at(13), 3600)
        assert [s.start for s in slots] == [at(8), at(10), at(11), at(12)]
        assert all(s.end - s.start == timedelta(hours=1) and s.start.tzinfo == BERLIN for s in slots)
        [request] = h.server.seen("GET", "/v2/slots")
        assert dict(request.query) == {"eventTypeId": [str(EVENT_TYPE_ID)], "start": ["2026-06-10T04:00:00Z"],
                                       "end": ["2026-06-10T11:00:00Z"], "timeZone": ["Europe/Berlin"],
                                       "format": ["range"]}
        assert request.headers["cal-api-version"] == "2024-09-04"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"


def test_free_slots_span_days_and_keep_to_the_window_and_the_length() -> None:
    with harness() as h:
        slots = h.connector.free_slots(at(16, 30), at(9, 30, day=DAY + timedelta(days=1)), 3600)
        assert [s.start for s in slots] == [at(17), at(8, day=DAY + timedelta(days=1))]
        assert h.connector.free_slots(at(8), at(18), 1800) == []  # the event type is 60 minutes long


def test_a_booking_goes_in_as_utc_with_the_callers_zone_and_the_key_in_its_metadata() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(11), attendee_email="ann@example.org"), "call-7:book:1")
        [create] = h.server.seen("POST", "/v2/bookings")
        assert create.headers["cal-api-version"] == "2024-08-13"
        assert create.json() == {
            "start": "2026-06-10T09:00:00Z", "eventTypeId": EVENT_TYPE_ID,
            "attendee": {"name": "Ann Lee", "timeZone": "Europe/Berlin", "email": "ann@example.org",
                         "phoneNumber": "+4915112345678"},
            "metadata": {"voxlog_key": "call-7:book:1"},
            "bookingFieldsResponses": {"notes": "Boiler service\n\nSide entrance."},
        }
        assert (booking.start, booking.end) == (at(11), at(12))
        assert booking.id == h.server.bookings()[0].uid
        assert booking.title == "Service visit between Front Desk and Ann Lee"  # the event type names it


def test_a_caller_in_new_york_booking_ten_oclock_their_time_lands_at_sixteen_in_berlin() -> None:
    with harness() as h:
        their_ten = datetime(2026, 6, 10, 10, 0, tzinfo=NEW_YORK)
        booking = h.connector.book(visit(their_ten, attendee_timezone="America/New_York"), "k-ny")
        assert booking.start == at(16)
        assert booking.start.tzinfo == BERLIN
        body = h.server.seen("POST", "/v2/bookings")[0].json()
        assert body["start"] == "2026-06-10T14:00:00Z"
        assert body["attendee"]["timeZone"] == "America/New_York"  # Cal.com writes to the caller in their time
        [(start, _, _)] = h.events()
        assert start.astimezone(BERLIN) == at(16)


def test_booking_twice_with_one_key_makes_one_booking_found_through_every_page() -> None:
    with harness() as h:
        # 120 bookings of another event type the day before, within the search: its first page is all theirs.
        for minute in range(120):
            start = at(12, day=DAY - timedelta(days=1)) + timedelta(minutes=minute)
            h.server.add_booking(start, start + timedelta(minutes=1), "Walk-in", event_type_id=99)
        first = h.connector.book(visit(at(10)), "call-9:book")
        again = h.connector.book(visit(at(10)), "call-9:book")
        assert again == first
        assert len(h.server.seen("POST", "/v2/bookings")) == 1
        searches = h.server.seen("GET", "/v2/bookings")
        assert [s.param("skip") for s in searches] == ["0", "100", "0", "100"]
        assert searches[0].param("take") == "100"
        assert searches[0].param("afterStart") == "2026-06-09T08:00:00Z"
        assert searches[0].param("beforeEnd") == "2026-06-11T09:00:00Z"
        assert searches[0].headers["cal-api-version"] == "2024-08-13"
        assert [b.uid for b in h.server.bookings() if b.event_type_id == EVENT_TYPE_ID] == [first.id]


def test_a_taken_slot_is_a_conflict_and_an_unavailable_one_invalid_and_neither_books() -> None:
    with harness() as h:
        h.add_busy(at(10, 30), at(11, 30), "Other job")
        assert "taken" in str(fails(FailureKind.CONFLICT, lambda: h.connector.book(visit(at(11)), "k1")))
        fails(FailureKind.INVALID, lambda: h.connector.book(visit(at(18)), "k2"))  # after the availability
        fails(FailureKind.INVALID, lambda: h.connector.book(visit(at(9), at(9, 30)), "k3"))  # not its length
        assert h.server.seen("POST", "/v2/bookings") == []


def test_a_slot_taken_between_the_check_and_the_create_is_a_conflict() -> None:
    with harness() as h:
        h.server.fail_next(400, body=calcom_error(400, SLOT_TAKEN, "/v2/bookings"), after=2)  # search, slots pass
        error = fails(FailureKind.CONFLICT, lambda: h.connector.book(visit(at(10)), "k"))
        assert error.status == 400


def test_a_booking_needs_the_callers_email_or_phone() -> None:
    with harness() as h:
        fails(FailureKind.INVALID, lambda: h.connector.book(visit(at(10), attendee_phone=""), "k"))
        assert h.server.seen("POST", "/v2/bookings") == []


def test_reschedule_makes_a_new_booking_and_answers_its_uid() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        moved = h.connector.reschedule(booking.id, at(14), at(15), "k:move")
        assert moved.id != booking.id
        assert (moved.start, moved.end) == (at(14), at(15))
        [request] = h.server.seen("POST", f"/v2/bookings/{booking.id}/reschedule")
        assert request.json()["start"] == "2026-06-10T12:00:00Z"
        assert request.headers["cal-api-version"] == "2024-08-13"
        [slots] = h.server.seen("GET", "/v2/slots")[-1:]
        assert slots.param("bookingUidToReschedule") == booking.id
        old = h.server.booking(booking.id)
        assert (old.status, old.rescheduled_to_uid) == ("cancelled", moved.id)
        assert h.events() == [(at(14), at(15), moved.title)]


def test_a_repeated_reschedule_follows_the_booking_to_its_new_uid() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        moved = h.connector.reschedule(booking.id, at(14), at(15), "k:move")
        again = h.connector.reschedule(booking.id, at(14), at(15), "k:move")
        assert again == moved
        assert len(h.server.seen("POST", f"/v2/bookings/{booking.id}/reschedule")) == 1
        # And a later move of the first uid moves the booking that holds the appointment now.
        later = h.connector.reschedule(booking.id, at(16), at(17), "k:move-2")
        assert len(h.server.seen("POST", f"/v2/bookings/{moved.id}/reschedule")) == 1
        assert h.events() == [(at(16), at(17), later.title)]


def test_reschedule_onto_a_taken_time_is_a_conflict_and_a_cancelled_booking_cannot_move() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        h.add_busy(at(14), at(15), "Other job")
        fails(FailureKind.CONFLICT, lambda: h.connector.reschedule(booking.id, at(14), at(15), "k:move"))
        h.connector.reschedule(booking.id, at(10, 0), at(11), "k:stay")  # where it is: nothing to do
        h.connector.cancel(booking.id, "k:cancel")
        fails(FailureKind.CONFLICT, lambda: h.connector.reschedule(booking.id, at(12), at(13), "k:move-2"))
        assert [r.path for r in h.server.requests if r.path.endswith("/reschedule")] == []


def test_cancel_cancels_once_and_a_second_cancel_is_no_error() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        h.connector.cancel(booking.id, "k:cancel")
        h.connector.cancel(booking.id, "k:cancel")
        [request] = h.server.seen("POST", f"/v2/bookings/{booking.id}/cancel")
        assert request.json() == {"cancellationReason": "Cancelled by the caller on a phone call"}
        assert request.headers["cal-api-version"] == "2024-08-13"
        assert h.events() == []
        fails(FailureKind.NOT_FOUND, lambda: h.connector.cancel("no-such-uid", "k2"))


def test_cancelling_a_rescheduled_booking_cancels_where_it_went() -> None:
    with harness() as h:
        booking = h.connector.book(visit(at(10)), "k")
        moved = h.connector.reschedule(booking.id, at(14), at(15), "k:move")
        h.connector.cancel(booking.id, "k:cancel")
        assert h.server.booking(moved.id).status == "cancelled"
        assert h.events() == []


@pytest.mark.parametrize(("status", "kind"), [
    (400, FailureKind.INVALID), (401, FailureKind.AUTH), (403, FailureKind.SCOPE), (404, FailureKind.NOT_FOUND),
    (409, FailureKind.CONFLICT), (422, FailureKind.INVALID), (429, FailureKind.RATE_LIMITED),
    (500, FailureKind.UNAVAILABLE), (502, FailureKind.UNAVAILABLE), (503, FailureKind.UNAVAILABLE),
])
def test_statuses_map_to_failures(status: int, kind: FailureKind) -> None:
    with harness() as h:
        h.fail_next(status, headers={"Retry-After": "7"})
        error = fails(kind, lambda: h.connector.book(visit(at(10)), "k"))
        assert error.status == status
        if kind is FailureKind.RATE_LIMITED:
            assert error.retry_after_s == 7
        assert h.server.bookings() == []


def test_a_stall_is_unavailable_within_the_timeout_and_the_next_call_works() -> None:
    with harness() as h:
        h.stall_next(10)
        started = time.monotonic()
        fails(FailureKind.UNAVAILABLE, lambda: h.connector.free_slots(at(8), at(18), 3600))
        assert time.monotonic() - started < 1.0 + 1.5
        assert len(h.connector.free_slots(at(8), at(18), 3600)) == 10


@pytest.mark.parametrize("body", ["<!DOCTYPE html><html>502</html>", '{"status": "success"}', '{"data": []}',
                                  '{"status": "success", "data": {"2026-06-10": [{"start": "10:00"}]}}'])
def test_what_is_not_calcoms_answer_is_a_bad_response(body: str) -> None:
    with harness() as h:
        h.fail_next(200, body=body)
        fails(FailureKind.BAD_RESPONSE, lambda: h.connector.free_slots(at(8), at(18), 3600))
        h.malformed_next()
        fails(FailureKind.BAD_RESPONSE, lambda: h.connector.book(visit(at(10)), "k"))


def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}/v2"
    connector = CalComConnector(api_key=SecretStr(API_KEY), event_type_id=EVENT_TYPE_ID, timezone="Europe/Berlin",
                                timeout_s=1.0, base_url=closed)
    fails(FailureKind.UNAVAILABLE, lambda: connector.free_slots(at(8), at(18), 3600))
    [reach] = connector.check()
    assert (reach.what, reach.ok) == ("reach", False)


def test_no_secret_reaches_an_error_message() -> None:
    with harness() as h:
        messages = []
        for status in (400, 401, 403, 404, 409, 429, 500):
            h.fail_next(status)
            with pytest.raises(ConnectorError) as caught:
                h.connector.book(visit(at(10)), "k")
            messages.append(str(caught.value))
        assert [m for m in messages for secret in h.secret_values if secret in m] == []


def test_check_reads_the_account_and_the_event_type() -> None:
    with harness() as h:
        results = h.connector.check()
        assert [(r.what, r.ok) for r in results] == [("sign-in", True), ("event type", True)]
        assert results[1].detail == "Service visit (60 minutes)"
        me, event_type = h.server.requests
        assert me.path == "/v2/me"
        assert (event_type.path, event_type.headers["cal-api-version"]) == (f"/v2/event-types/{EVENT_TYPE_ID}",
                                                                            "2024-06-14")
        other = CalComConnector(api_key=SecretStr(API_KEY), event_type_id=7, timezone="Europe/Berlin",
                                timeout_s=1.0, base_url=h.server.base_url)
        [_, missing] = other.check()
        assert not missing.ok
        assert "event_type_id" in missing.detail


@pytest.mark.parametrize(("status", "words"), [(401, "refused (401)"), (403, "may not read")])
def test_check_says_plainly_what_is_wrong(status: int, words: str) -> None:
    with harness() as h:
        h.fail_next(status)
        [sign_in] = h.connector.check()
        assert not sign_in.ok
        assert words in sign_in.detail


@given(st.lists(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                             timezones=st.timezones(), allow_imaginary=False), max_size=20),
       st.timezones())
def test_slots_grouped_by_day_read_back_in_order(starts: list[datetime], zone: ZoneInfo) -> None:
    grouped: dict[str, list[dict[str, str]]] = {}
    for start in starts:
        local = start.astimezone(zone)
        grouped.setdefault(local.date().isoformat(), []).append(
            {"start": local.isoformat(timespec="milliseconds"),
             # an hour later in elapsed time (wall-clock arithmetic is not, across a change of the clocks)
             "end": (local.astimezone(UTC) + timedelta(hours=1)).astimezone(zone).isoformat(timespec="milliseconds")})
    slots = slots_from(grouped)
    # In UTC: a time in a repeated hour is never equal to one in another zone (PEP 495), the same moment or not.
    truncated = (s.replace(microsecond=s.microsecond // 1000 * 1000) for s in starts)  # Cal.com sends milliseconds
    assert [s.start.astimezone(UTC) for s in slots] == sorted(s.astimezone(UTC) for s in truncated)
    assert all(s.end - s.start == timedelta(hours=1) for s in slots)


def test_slots_without_an_offset_are_refused() -> None:
    with pytest.raises(ValueError, match="offset"):
        slots_from({"2026-06-10": [{"start": "2026-06-10T08:00:00.000", "end": "2026-06-10T09:00:00.000"}]})
    assert slots_from({}) == []
    assert slots_from({"2026-06-10": [{"start": "2026-06-10T06:00:00.000Z", "end": "2026-06-10T07:00:00.000Z"}]}) == [
        Slot(datetime(2026, 6, 10, 6, tzinfo=UTC), datetime(2026, 6, 10, 7, tzinfo=UTC))]
