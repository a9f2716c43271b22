"""What every calendar (`CalendarConnector`, streams/connectors/base.py) must do, whatever its vendor:
CalDAV against a real Radicale server, Google Calendar and Cal.com against local servers speaking their
APIs. Each harness's calendar is in Europe/Berlin, open every day 08:00-18:00 in 60-minute slots."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from streams.connectors.base import BookingRequest, CalendarConnector, FailureKind
from tests.connectors.contract_faults import check_auth, check_faults, check_health, check_stall, failure, harness_of

pytestmark = pytest.mark.timeout(120)

VENDORS = ("caldav", "google", "calcom")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = 3600


@pytest.fixture(params=VENDORS)
def calendar(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from harness_of(request.param)


def day(offset: int) -> date:
    """A day some weeks ahead (bookings are in the future), in the middle of a month: no DST change near."""
    base = date.today() + timedelta(days=21 + offset)
    return base.replace(day=min(base.day, 20)) if base.day > 20 else base


def at(d: date, hour: int, zone: ZoneInfo = BERLIN) -> datetime:
    return datetime.combine(d, time(hour), tzinfo=zone)


def booking(start: datetime, hours: int = 1, title: str = "Technician visit") -> BookingRequest:
    return BookingRequest(start=start, end=start + timedelta(hours=hours), title=title,
                          description="Router replacement", attendee_name="Ada Lovelace",
                          attendee_phone="+12125550123", attendee_email="ada@example.com",
                          attendee_timezone="America/New_York")


def test_is_a_calendar(calendar: Any) -> None:
    assert isinstance(calendar.connector, CalendarConnector)
    assert calendar.connector.rate_limit.rate_per_s > 0
    assert calendar.connector.rate_limit.source
    assert calendar.timezone == "Europe/Berlin"


def test_free_slots_avoid_busy_times_and_closed_hours(calendar: Any) -> None:
    d = day(0)
    calendar.add_busy(at(d, 10), at(d, 12), "another visit")
    slots = calendar.connector.free_slots(at(d, 0), at(d + timedelta(days=1), 0), HOUR)
    starts = [s.start.astimezone(BERLIN).hour for s in slots]
    assert starts == [8, 9, 12, 13, 14, 15, 16, 17]
    assert all(s.end - s.start == timedelta(hours=1) for s in slots)


def test_books_once_per_key_and_refuses_a_double_booking(calendar: Any) -> None:
    d = day(1)
    connector: CalendarConnector = calendar.connector
    made = connector.book(booking(at(d, 9)), "book-key-1")
    again = connector.book(booking(at(d, 9)), "book-key-1")
    assert made.id
    assert made.id == again.id
    assert made.start == at(d, 9)
    assert made.end == at(d, 10)
    assert failure(lambda: connector.book(booking(at(d, 9)), "book-key-2")).kind == FailureKind.CONFLICT
    overlapping = booking(at(d, 8), hours=2)
    assert failure(lambda: connector.book(overlapping, "book-key-3")).kind == FailureKind.CONFLICT
    assert [(s, e) for s, e, _ in calendar.events()] == [(at(d, 9), at(d, 10))]
    assert at(d, 9) not in [s.start for s in connector.free_slots(at(d, 0), at(d, 23), HOUR)]


def test_a_caller_in_new_york_books_ten_oclock_their_time(calendar: Any) -> None:
    d = day(2)
    made = calendar.connector.book(booking(at(d, 10, NEW_YORK)), "book-key-ny")
    assert made.start == at(d, 16)  # the same instant: 10:00 in New York is 16:00 in Berlin
    (start, end, _), = calendar.events()
    assert start == at(d, 16)
    assert end == at(d, 17)


def test_reschedules_and_cancels(calendar: Any) -> None:
    d = day(3)
    connector: CalendarConnector = calendar.connector
    made = connector.book(booking(at(d, 9)), "book-key-4")
    moved = connector.reschedule(made.id, at(d, 14), at(d, 15), "move-key-1")
    assert moved.start == at(d, 14)
    assert connector.reschedule(made.id, at(d, 14), at(d, 15), "move-key-1").start == at(d, 14)
    assert [s for s, _, _ in calendar.events()] == [at(d, 14)]
    free = [s.start for s in connector.free_slots(at(d, 0), at(d, 23), HOUR)]
    assert at(d, 9) in free
    assert at(d, 14) not in free
    connector.cancel(moved.id, "cancel-key-1")
    connector.cancel(moved.id, "cancel-key-1")  # cancelled twice: not an error
    assert calendar.events() == []
    assert at(d, 14) in [s.start for s in connector.free_slots(at(d, 0), at(d, 23), HOUR)]


def test_a_reschedule_onto_a_taken_slot_is_refused(calendar: Any) -> None:
    d = day(4)
    first = calendar.connector.book(booking(at(d, 9)), "book-key-5")
    calendar.connector.book(booking(at(d, 11)), "book-key-6")
    error = failure(lambda: calendar.connector.reschedule(first.id, at(d, 11), at(d, 12), "move-key-2"))
    assert error.kind == FailureKind.CONFLICT
    assert sorted(s for s, _, _ in calendar.events()) == [at(d, 9), at(d, 11)]


def test_faults_on_the_wire(calendar: Any) -> None:
    d = day(5)
    check_faults(calendar, lambda: calendar.connector.free_slots(at(d, 0), at(d, 23), HOUR))


def test_a_stalled_calendar_times_out(calendar: Any) -> None:
    d = day(6)
    check_stall(calendar, lambda: calendar.connector.free_slots(at(d, 0), at(d, 23), HOUR))


def test_refused_credentials(calendar: Any) -> None:
    d = day(7)
    check_auth(calendar, lambda: calendar.connector.free_slots(at(d, 0), at(d, 23), HOUR))


def test_check_says_what_is_wrong(calendar: Any) -> None:
    check_health(calendar, calendar.connector.check)
