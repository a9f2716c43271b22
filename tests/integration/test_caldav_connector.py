"""The CalDAV connector against a real Radicale server (tests/connectors/harness_caldav.py): free slots
around every kind of event another calendar app writes (UTC, TZID, Windows zone names, floating, all-day,
recurring with exceptions, transparent, cancelled), bookings (the key as the UID, If-None-Match, the
double booking refused, two keys racing for a slot), rescheduling (If-Match), cancelling, time zones
across the weeks where the US and the EU change their clocks on different days, the faults of the wire,
`check()`, the settings, and the Radicale server's own start and stop."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import icalendar
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from streams.connectors.base import Booking, BookingRequest, CalendarConnector, ConnectorError, FailureKind
from streams.connectors.calendar_caldav import CalDavCalendar, CalDavSettings, booking_uid, connect
from streams.connectors.radicale_server import RadicaleError, RadicaleServer
from streams.connectors.secrets import SecretRef, Secrets
from tests.connectors.fault_proxy import ProxiedRequest
from tests.connectors.harness_caldav import HOURS, PASSWORD, USER, CaldavHarness, harness

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")
DAY = date(2030, 3, 5)
"""A Tuesday; New York and Berlin both on standard time, six hours apart."""
US_AHEAD_IN_MARCH = date(2030, 3, 27)
"""New York on daylight time since 10 March, Berlin not until 31 March: five hours apart."""
EU_BACK_IN_OCTOBER = date(2030, 10, 29)
"""Berlin back on standard time since 27 October, New York not until 3 November: five hours apart."""
PATIENT_S = 10.0
"""The timeout of workers that a test holds up on purpose (their order is tested, not the clock)."""

NEW_YORK_VTIMEZONE = """BEGIN:VTIMEZONE
TZID:{tzid}
BEGIN:DAYLIGHT
TZOFFSETFROM:-0500
TZOFFSETTO:-0400
TZNAME:EDT
DTSTART:20070311T020000
RRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=2SU
END:DAYLIGHT
BEGIN:STANDARD
TZOFFSETFROM:-0400
TZOFFSETTO:-0500
TZNAME:EST
DTSTART:20071104T020000
RRULE:FREQ=YEARLY;BYMONTH=11;BYDAY=1SU
END:STANDARD
END:VTIMEZONE
"""


@pytest.fixture
def h() -> Iterator[CaldavHarness]:
    with harness() as started:
        yield started


def at(day: date, hour: int, minute: int = 0, zone: ZoneInfo = BERLIN) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)


def booking(start: datetime, end: datetime | None = None, title: str = "Boiler service") -> BookingRequest:
    return BookingRequest(start, end or start + timedelta(hours=1), title, attendee_name="Jo Doe",
                          attendee_phone="+4930123456")


def free_hours(connector: CalendarConnector, day: date) -> list[int]:
    """The Berlin hours at which an hour-long slot is free on `day`."""
    start = at(day, 0)
    return [s.start.astimezone(BERLIN).hour for s in connector.free_slots(start, start + timedelta(days=1), 3600)]


def vcalendar(*components: str) -> str:
    """iCalendar text as another calendar app writes it (CRLF lines)."""
    text = "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//another app//EN\n" + "".join(components) + "END:VCALENDAR\n"
    return text.replace("\n", "\r\n")


def vevent(uid: str, *lines: str) -> str:
    return "".join(f"{line}\n" for line in ("BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20300101T000000Z", *lines,
                                            "END:VEVENT"))


def before_first(method: str, action: Callable[[], object], *, header: str = "") -> Callable[[ProxiedRequest], None]:
    """A proxy hook that runs `action` once, before the first `method` request (with `header`) is
    forwarded; requests the action makes itself pass on."""
    taken = threading.Event()

    def hook(request: ProxiedRequest) -> None:
        if request.method == method and (not header or header in request.headers) and not taken.is_set():
            taken.set()
            action()

    return hook


def puts(h: CaldavHarness) -> list[ProxiedRequest]:
    return [r for r in h.proxy.requests if r.method == "PUT"]


# -- free slots -------------------------------------------------------------------------------------------


def test_free_slots_leave_out_events_in_utc_other_zones_and_floating_time(h: CaldavHarness) -> None:
    h.add_busy(at(DAY, 8), at(DAY, 9), "in UTC")  # the harness writes UTC: 07:00Z
    h.put_event(vcalendar(NEW_YORK_VTIMEZONE.format(tzid="America/New_York"),
                          vevent("ny", "DTSTART;TZID=America/New_York:20300305T040000",
                                 "DTEND;TZID=America/New_York:20300305T043000", "SUMMARY:New York")))
    h.put_event(vcalendar(NEW_YORK_VTIMEZONE.format(tzid="Eastern Standard Time"),  # as Outlook names zones
                          vevent("outlook", "DTSTART;TZID=Eastern Standard Time:20300305T050000",
                                 "DTEND;TZID=Eastern Standard Time:20300305T053000", "SUMMARY:Outlook")))
    h.put_event(vcalendar(vevent("floating", "DTSTART:20300305T133000", "DTEND:20300305T143000",
                                 "SUMMARY:floating")))
    h.put_event(vcalendar(vevent("duration", "DTSTART:20300305T150000Z", "DURATION:PT30M", "SUMMARY:duration")))

    # 08 (UTC), 10 (New York 04:00 EST), 11 (Outlook 05:00 EST), 13 and 14 (floating 13:30-14:30 Berlin),
    # 16 (15:00Z + 30 min = 16:00-16:30 Berlin)
    assert free_hours(h.connector, DAY) == [9, 12, 15, 17]


def test_a_floating_time_is_the_calendars_wall_time_where_radicales_free_busy_reads_it_as_utc(
        h: CaldavHarness) -> None:
    """Why the connector reads events rather than asking for free-busy (RFC 4791 7.10): Radicale places
    floating times (and all-day dates) in UTC there. Should a Radicale fix this, free-busy may do."""
    h.put_event(vcalendar(vevent("floating", "DTSTART:20300305T100000", "DTEND:20300305T110000")))
    assert 10 not in free_hours(h.connector, DAY)
    assert 11 in free_hours(h.connector, DAY)

    answer = h.other_client.report(h.calendar_url, (
        '<?xml version="1.0" encoding="utf-8"?><C:free-busy-query xmlns:C="urn:ietf:params:xml:ns:caldav">'
        '<C:time-range start="20300305T000000Z" end="20300306T000000Z"/></C:free-busy-query>'), depth=1)
    assert "FREEBUSY;FBTYPE=BUSY:20300305T100000Z/20300305T110000Z" in answer.raw  # 11:00 in Berlin


def test_transparent_and_cancelled_events_leave_their_time_free(h: CaldavHarness) -> None:
    h.put_event(vcalendar(vevent("transparent", "DTSTART;TZID=Europe/Berlin:20300305T090000",
                                 "DTEND;TZID=Europe/Berlin:20300305T100000", "TRANSP:TRANSPARENT")))
    h.put_event(vcalendar(vevent("cancelled", "DTSTART;TZID=Europe/Berlin:20300305T110000",
                                 "DTEND;TZID=Europe/Berlin:20300305T120000", "STATUS:CANCELLED")))
    h.put_event(vcalendar(vevent("tentative", "DTSTART;TZID=Europe/Berlin:20300305T130000",
                                 "DTEND;TZID=Europe/Berlin:20300305T140000", "STATUS:TENTATIVE")))
    assert free_hours(h.connector, DAY) == [8, 9, 10, 11, 12, 14, 15, 16, 17]


def test_a_recurring_event_is_busy_on_each_occurrence_with_its_exceptions(h: CaldavHarness) -> None:
    h.put_event(vcalendar(
        vevent("daily", "DTSTART;TZID=Europe/Berlin:20300327T170000", "DTEND;TZID=Europe/Berlin:20300327T173000",
               "RRULE:FREQ=DAILY;COUNT=10", "EXDATE;TZID=Europe/Berlin:20300328T170000", "SUMMARY:closing round"),
        vevent("daily", "RECURRENCE-ID;TZID=Europe/Berlin:20300329T170000",
               "DTSTART;TZID=Europe/Berlin:20300329T120000", "DTEND;TZID=Europe/Berlin:20300329T130000"),
        vevent("daily", "RECURRENCE-ID;TZID=Europe/Berlin:20300330T170000",
               "DTSTART;TZID=Europe/Berlin:20300330T170000", "DTEND;TZID=Europe/Berlin:20300330T173000",
               "STATUS:CANCELLED")))
    every_hour = list(range(8, 18))
    assert free_hours(h.connector, date(2030, 3, 26)) == every_hour
    assert free_hours(h.connector, date(2030, 3, 27)) == every_hour[:-1]
    assert free_hours(h.connector, date(2030, 3, 28)) == every_hour  # excluded
    assert free_hours(h.connector, date(2030, 3, 29)) == [8, 9, 10, 11, 13, 14, 15, 16, 17]  # moved to noon
    assert free_hours(h.connector, date(2030, 3, 30)) == every_hour  # cancelled
    # Berlin's clocks go forward on 31 March: the occurrence stays at 17:00 on the wall
    assert free_hours(h.connector, date(2030, 3, 31)) == every_hour[:-1]
    assert free_hours(h.connector, date(2030, 4, 5)) == every_hour[:-1]
    assert free_hours(h.connector, date(2030, 4, 6)) == every_hour  # COUNT=10 ends on the 5th


def test_an_all_day_event_takes_its_day_in_the_calendars_zone(h: CaldavHarness) -> None:
    h.put_event(vcalendar(vevent("holiday", "DTSTART;VALUE=DATE:20300306", "DTEND;VALUE=DATE:20300307",
                                 "SUMMARY:closed")))
    h.put_event(vcalendar(vevent("no-end", "DTSTART;VALUE=DATE:20300308", "SUMMARY:one day, no DTEND")))
    assert free_hours(h.connector, date(2030, 3, 5)) == list(range(8, 18))
    assert free_hours(h.connector, date(2030, 3, 6)) == []
    assert free_hours(h.connector, date(2030, 3, 7)) == list(range(8, 18))
    assert free_hours(h.connector, date(2030, 3, 8)) == []
    # from Berlin's midnight to Berlin's midnight (the opening hours hide an hour's error; the spans show it)
    spans = [(b.start, b.end) for b in h.connector._busy(at(DAY, 0), at(date(2030, 3, 9), 0))]
    assert spans == [(at(date(2030, 3, 6), 0), at(date(2030, 3, 7), 0)),
                     (at(date(2030, 3, 8), 0), at(date(2030, 3, 9), 0))]
    with pytest.raises(ConnectorError, match="taken"):
        h.connector.book(booking(at(date(2030, 3, 6), 17)), "on the holiday")
    assert h.connector.book(booking(at(date(2030, 3, 7), 8)), "after the holiday").start == at(date(2030, 3, 7), 8)


def test_free_slots_span_days_and_keep_to_the_opening_hours(h: CaldavHarness) -> None:
    h.add_busy(at(DAY, 12), at(DAY + timedelta(days=1), 10))  # from noon to the next morning
    slots = h.connector.free_slots(at(DAY, 10), at(DAY + timedelta(days=1), 12), 3600)
    assert [s.start for s in slots] == [at(DAY, 10), at(DAY, 11), at(DAY + timedelta(days=1), 10),
                                        at(DAY + timedelta(days=1), 11)]
    half_hours = h.connector.free_slots(at(DAY, 8), at(DAY, 10), 1800)
    assert [s.start for s in half_hours] == [at(DAY, 8), at(DAY, 9)]  # slots start on the hour (slot_minutes)


# -- booking ----------------------------------------------------------------------------------------------


def test_book_writes_the_key_as_uid_in_the_calendars_zone(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10), title="Boiler service"), "call-1/book-1")

    assert made.id == booking_uid("call-1/book-1")
    assert (made.start, made.end, made.title) == (at(DAY, 10), at(DAY, 11), "Boiler service")
    assert made.url.endswith(f"/alice/appointments/{made.id}.ics")
    text = h.event_text(made.id)
    assert f"UID:{made.id}" in text
    assert "DTSTART;TZID=Europe/Berlin:20300305T100000" in text
    assert "BEGIN:VTIMEZONE" in text
    assert "TZID:Europe/Berlin" in text
    assert "CONTACT:Jo Doe\\, +4930123456" in text
    assert "ATTENDEE" not in text  # no invitations sent by servers that schedule
    assert h.events() == [(at(DAY, 10), at(DAY, 11), "Boiler service")]
    [created] = puts(h)
    assert created.headers["if-none-match"] == "*"
    assert 10 not in free_hours(h.connector, DAY)


def test_a_double_booking_is_refused(h: CaldavHarness) -> None:
    h.add_busy(at(DAY, 10), at(DAY, 11), "dentist")
    for start in (at(DAY, 10), at(DAY, 9, 30), at(DAY, 10, 59)):
        with pytest.raises(ConnectorError) as refused:
            h.connector.book(booking(start), f"key at {start}")
        assert refused.value.kind is FailureKind.CONFLICT
        assert "that time is taken" in str(refused.value)
    assert puts(h) == []
    assert h.event_count() == 1
    # touching is not overlapping
    assert h.connector.book(booking(at(DAY, 11)), "right after").start == at(DAY, 11)
    assert h.connector.book(booking(at(DAY, 9)), "right before").start == at(DAY, 9)


def test_the_same_key_twice_makes_one_event(h: CaldavHarness) -> None:
    first = h.connector.book(booking(at(DAY, 10)), "redelivered")
    seen = h.requests_seen
    again = h.connector.book(booking(at(DAY, 10)), "redelivered")
    assert again == first
    assert [r.method for r in h.proxy.requests[seen:]] == ["REPORT", "GET"]  # found, nothing written
    assert h.event_count() == 1
    # the key decides, not the request: a redelivery carrying other times still answers the booking made
    assert h.connector.book(booking(at(DAY, 15)), "redelivered") == first
    assert h.event_count() == 1


def test_the_same_key_from_two_workers_at_once_makes_one_event(h: CaldavHarness) -> None:
    """Both read no event and find the slot free; the second's PUT meets the first's event: 412 with
    If-None-Match, and it answers the first's booking."""
    first_worker, second_worker = h.connector_with(timeout_s=PATIENT_S), h.connector_with(timeout_s=PATIENT_S)
    answers = []
    h.proxy.before_forward = before_first(
        "PUT", lambda: answers.append(second_worker.book(booking(at(DAY, 10)), "the same key")))
    first = first_worker.book(booking(at(DAY, 10)), "the same key")
    assert first == answers[0]
    assert len(puts(h)) == 2
    assert h.event_count() == 1


def test_a_booking_outside_the_opening_hours_is_invalid(h: CaldavHarness) -> None:
    for start, end in ((at(DAY, 7), at(DAY, 8)), (at(DAY, 17, 30), at(DAY, 18, 30)),
                       (at(DAY, 17), at(DAY + timedelta(days=1), 9)), (at(DAY, 10), at(DAY, 10)),
                       (at(DAY, 11), at(DAY, 10))):
        with pytest.raises(ConnectorError) as refused:
            h.connector.book(booking(start, end), f"key {start} {end}")
        assert refused.value.kind is FailureKind.INVALID
    with pytest.raises(ConnectorError) as naive:
        h.connector.book(booking(datetime(2030, 3, 5, 10)), "naive")
    assert naive.value.kind is FailureKind.INVALID
    assert h.event_count() == 0


# -- two keys, one slot ------------------------------------------------------------------------------------


def test_two_keys_racing_for_a_slot_the_later_writer_backs_off(h: CaldavHarness) -> None:
    """Another worker books the slot between this one's check and its write: this one writes, looks
    again, finds the other's event, deletes its own and answers CONFLICT."""
    ours, other_worker = h.connector_with(timeout_s=PATIENT_S), h.connector_with(timeout_s=PATIENT_S)
    h.proxy.before_forward = before_first("PUT", lambda: other_worker.book(booking(at(DAY, 10)), "their key"))
    with pytest.raises(ConnectorError) as lost:
        ours.book(booking(at(DAY, 10)), "our key")
    assert lost.value.kind is FailureKind.CONFLICT
    assert [(start, title) for start, _, title in h.events()] == [(at(DAY, 10), "Boiler service")]
    assert h.event_count() == 1
    [delete] = [r for r in h.proxy.requests if r.method == "DELETE"]
    assert delete.path.endswith(f"{booking_uid('our key')}.ics")
    assert delete.headers["if-match"]
    # the same key again finds the slot taken, and writes nothing
    with pytest.raises(ConnectorError, match="taken"):
        ours.book(booking(at(DAY, 10)), "our key")
    assert h.event_count() == 1


def test_two_keys_writing_at_once_never_both_keep_the_slot(h: CaldavHarness) -> None:
    """Both check, both write, then both look again: each sees the other's event and lets the slot go
    (the cost of never double booking). The proxy holds the requests in exactly that order."""
    writes, rechecks = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)
    written = threading.Event()

    def in_lockstep(request: ProxiedRequest) -> None:
        if request.method == "PUT":
            writes.wait()  # both have checked
            written.set()
        elif request.method == "REPORT" and written.is_set():
            rechecks.wait()  # both have written

    h.proxy.before_forward = in_lockstep
    workers = [h.connector_with(timeout_s=PATIENT_S), h.connector_with(timeout_s=PATIENT_S)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda worker_key: _book_or_kind(*worker_key), zip(workers, ["key A", "key B"],
                                                                                    strict=True)))
    h.proxy.before_forward = None
    assert outcomes == [FailureKind.CONFLICT, FailureKind.CONFLICT]
    assert h.event_count() == 0
    assert free_hours(h.connector, DAY) == list(range(8, 18))


def test_many_keys_racing_for_a_slot_leave_at_most_one_booking(h: CaldavHarness) -> None:
    workers = [h.connector_with(timeout_s=PATIENT_S) for _ in range(6)]
    with ThreadPoolExecutor(len(workers)) as pool:
        outcomes = list(pool.map(lambda nw: _book_or_kind(nw[1], f"key {nw[0]}"), enumerate(workers)))
    booked = [o for o in outcomes if isinstance(o, Booking)]
    assert len(booked) <= 1
    assert all(o is FailureKind.CONFLICT for o in outcomes if isinstance(o, FailureKind))
    assert [start for start, _, _ in h.events()] == [b.start for b in booked]


def _book_or_kind(connector: CalendarConnector, key: str) -> Booking | FailureKind:
    try:
        return connector.book(booking(at(DAY, 10)), key)
    except ConnectorError as exc:
        return exc.kind


# -- rescheduling -------------------------------------------------------------------------------------------


def test_reschedule_moves_the_event_with_if_match(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "book")
    moved = h.connector.reschedule(made.id, at(DAY, 14), at(DAY, 15), "move")

    assert (moved.id, moved.start, moved.end, moved.title) == (made.id, at(DAY, 14), at(DAY, 15), "Boiler service")
    assert h.events() == [(at(DAY, 14), at(DAY, 15), "Boiler service")]
    text = h.event_text(made.id)
    assert "DTSTART;TZID=Europe/Berlin:20300305T140000" in text
    assert "SEQUENCE:1" in text
    assert f"X-VOXLOG-APPLIED-KEY:{booking_uid('move')}" in text
    write = puts(h)[-1]
    assert write.headers["if-match"].startswith('"')
    assert free_hours(h.connector, DAY) == [8, 9, 10, 11, 12, 13, 15, 16, 17]
    # a move overlapping its own old time is no conflict with itself
    assert h.connector.reschedule(made.id, at(DAY, 14, 30), at(DAY, 15, 30), "half an hour later").start \
        == at(DAY, 14, 30)


def test_reschedule_with_the_same_key_twice_gives_the_same_result(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "book")
    first = h.connector.reschedule(made.id, at(DAY, 11), at(DAY, 12), "move 1")
    assert h.connector.reschedule(made.id, at(DAY, 11), at(DAY, 12), "move 1") == first
    later = h.connector.reschedule(made.id, at(DAY, 13), at(DAY, 14), "move 2")
    writes = len(puts(h))
    # "move 1" redelivered after "move 2": applied already, it changes nothing
    assert h.connector.reschedule(made.id, at(DAY, 11), at(DAY, 12), "move 1") == later
    assert len(puts(h)) == writes
    assert h.events() == [(at(DAY, 13), at(DAY, 14), "Boiler service")]


def test_reschedule_onto_a_busy_time_or_out_of_hours_is_refused(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "book")
    h.add_busy(at(DAY, 14), at(DAY, 15), "dentist")
    with pytest.raises(ConnectorError) as taken:
        h.connector.reschedule(made.id, at(DAY, 14, 30), at(DAY, 15, 30), "onto the dentist")
    assert taken.value.kind is FailureKind.CONFLICT
    with pytest.raises(ConnectorError) as closed:
        h.connector.reschedule(made.id, at(DAY, 18), at(DAY, 19), "after hours")
    assert closed.value.kind is FailureKind.INVALID
    with pytest.raises(ConnectorError) as unknown:
        h.connector.reschedule(booking_uid("never booked"), at(DAY, 12), at(DAY, 13), "unknown")
    assert unknown.value.kind is FailureKind.NOT_FOUND
    assert (at(DAY, 10), at(DAY, 11), "Boiler service") in h.events()


def test_reschedule_of_an_event_changed_meanwhile_is_a_conflict(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "book")
    staff_edit = h.event_text(made.id).replace("SUMMARY:Boiler service", "SUMMARY:Boiler service (bring ladder)")
    h.proxy.before_forward = before_first("PUT", lambda: h.put_event(staff_edit, made.id), header="if-match")
    with pytest.raises(ConnectorError) as changed:
        h.connector_with(timeout_s=PATIENT_S).reschedule(made.id, at(DAY, 14), at(DAY, 15), "move")
    assert changed.value.kind is FailureKind.CONFLICT
    assert "changed meanwhile" in str(changed.value)
    assert h.events() == [(at(DAY, 10), at(DAY, 11), "Boiler service (bring ladder)")]


def test_a_reschedule_that_loses_the_race_puts_the_event_back(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "book")
    ours, other_worker = h.connector_with(timeout_s=PATIENT_S), h.connector_with(timeout_s=PATIENT_S)
    h.proxy.before_forward = before_first(
        "PUT", lambda: other_worker.book(booking(at(DAY, 14), title="theirs"), "their key"))
    with pytest.raises(ConnectorError) as lost:
        ours.reschedule(made.id, at(DAY, 14), at(DAY, 15), "move")
    assert lost.value.kind is FailureKind.CONFLICT
    assert h.events() == [(at(DAY, 10), at(DAY, 11), "Boiler service"), (at(DAY, 14), at(DAY, 15), "theirs")]
    assert "X-VOXLOG-APPLIED-KEY" not in h.event_text(made.id)  # the key may be tried again


# -- cancelling ---------------------------------------------------------------------------------------------


def test_cancel_marks_the_event_cancelled_and_frees_its_time(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "book")
    h.connector.cancel(made.id, "cancel")

    text = h.event_text(made.id)
    assert "STATUS:CANCELLED" in text
    assert "TRANSP:TRANSPARENT" in text
    assert "SEQUENCE:1" in text
    assert h.events() == []
    assert h.event_count() == 1  # kept, for the staff to see
    assert 10 in free_hours(h.connector, DAY)
    writes = len(puts(h))
    h.connector.cancel(made.id, "cancel")  # again: not an error, nothing written
    h.connector.cancel(made.id, "another key")
    assert len(puts(h)) == writes
    with pytest.raises(ConnectorError) as cancelled:
        h.connector.reschedule(made.id, at(DAY, 12), at(DAY, 13), "move")
    assert cancelled.value.kind is FailureKind.CONFLICT
    # the booking's own key redelivered answers the booking it made, and books nothing new
    assert h.connector.book(booking(at(DAY, 10)), "book").id == made.id
    assert h.event_count() == 1
    # the slot is free for someone else
    assert h.connector.book(booking(at(DAY, 10)), "another caller").start == at(DAY, 10)


def test_cancel_of_a_booking_that_never_was_is_not_found(h: CaldavHarness) -> None:
    for unknown in (booking_uid("never booked"), "../../bob/calendar/x", "", "a b"):
        with pytest.raises(ConnectorError) as missing:
            h.connector.cancel(unknown, "cancel")
        assert missing.value.kind is FailureKind.NOT_FOUND
    assert all(".." not in r.path for r in h.proxy.requests)


# -- time zones ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tomorrow", "berlin_hour"), [
    (DAY, 16),  # both on standard time: six hours
    (US_AHEAD_IN_MARCH, 15),  # New York on daylight time, Berlin not yet: five hours
    (EU_BACK_IN_OCTOBER, 15),  # Berlin back on standard time, New York not yet: five hours
    (date(2030, 11, 5), 16),  # both on standard time again
])
def test_a_new_york_caller_booking_tomorrow_at_ten_their_time(h: CaldavHarness, tomorrow: date,
                                                              berlin_hour: int) -> None:
    their_ten = at(tomorrow, 10, zone=NEW_YORK)
    their_day = h.connector.free_slots(at(tomorrow, 0, zone=NEW_YORK), at(tomorrow, 23, zone=NEW_YORK), 3600)
    assert their_ten in [s.start for s in their_day]

    made = h.connector.book(BookingRequest(their_ten, their_ten + timedelta(hours=1), "Boiler service",
                                           attendee_timezone="America/New_York"), f"caller {tomorrow}")

    assert made.start == their_ten  # the same instant
    assert made.start.astimezone(BERLIN).hour == berlin_hour
    assert made.start.utcoffset() == at(tomorrow, berlin_hour).utcoffset()  # told in the calendar's zone
    assert f"DTSTART;TZID=Europe/Berlin:{tomorrow:%Y%m%d}T{berlin_hour}0000" in h.event_text(made.id)
    assert h.events() == [(at(tomorrow, berlin_hour), at(tomorrow, berlin_hour + 1), "Boiler service")]
    assert berlin_hour not in free_hours(h.connector, tomorrow)


def test_an_event_another_app_wrote_in_new_york_time_reads_right_across_the_dst_gap(h: CaldavHarness) -> None:
    h.put_event(vcalendar(NEW_YORK_VTIMEZONE.format(tzid="America/New_York"),
                          vevent("weekly-ny", "DTSTART;TZID=America/New_York:20300320T090000",
                                 "DTEND;TZID=America/New_York:20300320T100000", "RRULE:FREQ=WEEKLY;COUNT=3")))
    # 20 March: New York EDT, Berlin CET (5 h); 27 March: the same; 3 April: Berlin CEST too (6 h)
    assert 14 not in free_hours(h.connector, date(2030, 3, 20))
    assert 14 not in free_hours(h.connector, date(2030, 3, 27))
    assert 15 not in free_hours(h.connector, date(2030, 4, 3))
    assert 14 in free_hours(h.connector, date(2030, 4, 3))
    with pytest.raises(ConnectorError, match="taken"):
        h.connector.book(booking(at(date(2030, 4, 3), 15)), "onto the New York meeting")


def test_a_booking_in_utc_terms_lands_in_the_calendars_zone(h: CaldavHarness) -> None:
    made = h.connector.book(booking(datetime(2030, 3, 31, 7, 0, tzinfo=UTC_ZONE)), "utc caller")  # 09:00 CEST
    assert made.start == at(date(2030, 3, 31), 9)
    assert "DTSTART;TZID=Europe/Berlin:20300331T090000" in h.event_text(made.id)


# -- iCalendar text ------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]) | st.sampled_from(",;:\\\"'\n\r"), min_size=1, max_size=60)


@pytest.fixture(scope="module")
def shared() -> Iterator[CaldavHarness]:
    with harness() as started:
        yield started


SLOTS = itertools.count()


def as_ical_holds(text: str) -> str:
    """iCalendar text has newlines for line breaks and no control characters but tab (RFC 5545 3.3.11)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text.replace("\r\n", "\n").replace("\r", "\n"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(title=TEXT, description=TEXT)
def test_any_text_round_trips_through_the_server(shared: CaldavHarness, title: str, description: str) -> None:
    n = next(SLOTS)
    start = at(date(2031, 1, 1) + timedelta(days=n // 10), 8 + n % 10)
    request = BookingRequest(start, start + timedelta(hours=1), title, description, attendee_name=title)
    made = shared.connector.book(request, f"text {n}")
    assert made.title == as_ical_holds(title)
    read_back = shared.connector.book(request, f"text {n}")  # parsed from what Radicale holds
    assert read_back == made
    assert (start, start + timedelta(hours=1), made.title) in shared.events()
    [event] = icalendar.Calendar.from_ical(shared.event_text(made.id)).walk("VEVENT")
    assert str(event["DESCRIPTION"]) == as_ical_holds(description)
    assert str(event["CONTACT"]) == as_ical_holds(title)


# -- faults on the wire --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [
    (401, FailureKind.AUTH), (403, FailureKind.SCOPE), (404, FailureKind.NOT_FOUND),
    (409, FailureKind.CONFLICT), (400, FailureKind.INVALID), (500, FailureKind.UNAVAILABLE),
    (502, FailureKind.UNAVAILABLE), (503, FailureKind.UNAVAILABLE),
])
@pytest.mark.parametrize("operation", ["free_slots", "book", "cancel"])
def test_an_error_status_fails_the_operation_with_its_kind(h: CaldavHarness, status: int, kind: FailureKind,
                                                           operation: str) -> None:
    made = h.connector.book(booking(at(DAY, 9)), "booked")
    operations: dict[str, Callable[[], object]] = {
        "free_slots": lambda: h.connector.free_slots(at(DAY, 0), at(DAY, 23), 3600),
        "book": lambda: h.connector.book(booking(at(DAY, 10)), "new"),
        "cancel": lambda: h.connector.cancel(made.id, "cancel"),
    }
    h.fail_next(status)
    seen = h.requests_seen
    with pytest.raises(ConnectorError) as failed:
        operations[operation]()
    assert failed.value.kind is kind
    assert failed.value.status == status
    assert h.requests_seen - seen == 1  # no retries of its own
    assert PASSWORD not in str(failed.value)


def test_rate_limited_carries_retry_after(h: CaldavHarness) -> None:
    for status in (429, 503):
        h.fail_next(status, headers={"Retry-After": "7"})
        with pytest.raises(ConnectorError) as limited:
            h.connector.free_slots(at(DAY, 0), at(DAY, 23), 3600)
        assert limited.value.kind is (FailureKind.RATE_LIMITED if status == 429 else FailureKind.UNAVAILABLE)
        assert limited.value.retry_after_s == 7
        assert limited.value.retryable


def test_a_stall_past_the_timeout_is_unavailable_in_time(h: CaldavHarness) -> None:
    for operation in (lambda: h.connector.free_slots(at(DAY, 0), at(DAY, 23), 3600),
                      lambda: h.connector.book(booking(at(DAY, 10)), "stalled")):
        h.stall_next(5.0)
        began = time.monotonic()
        with pytest.raises(ConnectorError) as stalled:
            operation()
        assert stalled.value.kind is FailureKind.UNAVAILABLE
        assert time.monotonic() - began < 1.0 + 2.0  # timeout_s plus generous slack


@pytest.mark.parametrize("answer", [
    ("text/xml; charset=utf-8", b"<?xml version='1.0'?><multistatus><response>"),  # cut off
    ("text/html", b"<html><body>Sign in to the portal<br></body></html>"),  # a web page, 200
    ("text/xml", b""),
])
def test_a_malformed_answer_is_a_bad_response(h: CaldavHarness, answer: tuple[str, bytes]) -> None:
    made = h.connector.book(booking(at(DAY, 9)), "booked")
    h.proxy.malformed = answer
    for operation in (lambda: h.connector.free_slots(at(DAY, 0), at(DAY, 23), 3600),
                      lambda: h.connector.book(booking(at(DAY, 10)), "new"),
                      lambda: h.connector.reschedule(made.id, at(DAY, 12), at(DAY, 13), "move"),
                      lambda: h.connector.cancel(made.id, "cancel")):
        h.malformed_next()
        with pytest.raises(ConnectorError) as malformed:
            operation()
        assert malformed.value.kind is FailureKind.BAD_RESPONSE
    h.malformed_next()
    *_, speaking = h.connector.check()
    assert not speaking.ok
    assert "CalDAV" in speaking.detail


def test_an_event_that_is_not_icalendar_is_a_bad_response(h: CaldavHarness) -> None:
    made = h.connector.book(booking(at(DAY, 10)), "booked")
    for body in (b"BEGIN:VCALENDAR\r\nnot a line\r\n", b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n",
                 b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:x\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"):
        h.proxy.malformed = ("text/calendar", body)
        h.malformed_next()
        with pytest.raises(ConnectorError) as unreadable:
            h.connector.cancel(made.id, "cancel")  # its GET is answered with `body`
        assert unreadable.value.kind is FailureKind.BAD_RESPONSE


def test_a_wrong_password_is_auth_and_never_shown(h: CaldavHarness) -> None:
    wrong = "wr0ng-Pa55-c0ffee"
    connector = h.connector_with(password=wrong)
    for operation in (lambda: connector.free_slots(at(DAY, 0), at(DAY, 23), 3600),
                      lambda: connector.book(booking(at(DAY, 10)), "new"),
                      lambda: connector.cancel(booking_uid("x"), "cancel")):
        with pytest.raises(ConnectorError) as refused:
            operation()
        assert refused.value.kind is FailureKind.AUTH
        assert wrong not in str(refused.value)
        assert PASSWORD not in str(refused.value)
    [*_, signing_in] = connector.check()
    assert not signing_in.ok
    assert "401" in signing_in.detail
    assert wrong not in signing_in.detail
    assert all(r.headers["authorization"].startswith("Basic ") for r in h.proxy.requests)  # sent, not negotiated


def test_a_server_that_is_not_there_is_unavailable(h: CaldavHarness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refuses connections
        connector = h.connector_with(url=f"http://127.0.0.1:{port}/alice/appointments/")
        with pytest.raises(ConnectorError) as down:
            connector.free_slots(at(DAY, 0), at(DAY, 23), 3600)
        assert down.value.kind is FailureKind.UNAVAILABLE
        assert down.value.retryable
        [reach] = connector.check()
        assert not reach.ok
        assert f"127.0.0.1:{port}" in reach.detail


# -- check() -----------------------------------------------------------------------------------------------


def test_check_on_a_healthy_calendar(h: CaldavHarness) -> None:
    results = h.connector.check()
    assert [(r.what, r.ok) for r in results] == [("reach the CalDAV server", True), ("sign in as alice", True),
                                                 ("the calendar", True), ("write events", True)]
    [propfind] = h.proxy.requests
    assert (propfind.method, propfind.headers["depth"]) == ("PROPFIND", "0")


def test_check_says_plainly_what_is_wrong(h: CaldavHarness) -> None:
    h.fail_next(403)
    *_, refused = h.connector.check()
    assert not refused.ok
    assert "403" in refused.detail
    h.fail_next(500)
    assert not all(r.ok for r in h.connector.check())
    h.malformed_next()
    assert not all(r.ok for r in h.connector.check())

    home = h.connector_with(url=h.proxy.url_for(f"{h.server.url}alice/"))
    *_, not_calendar = home.check()
    assert not not_calendar.ok
    assert "not a calendar" in not_calendar.detail

    tasks_url = h.server.make_calendar(USER, "tasks")
    tasks = h.other_client.proppatch(tasks_url, (
        '<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" '
        'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:set><D:prop><C:supported-calendar-component-set>'
        '<C:comp name="VTODO"/></C:supported-calendar-component-set></D:prop></D:set></D:propertyupdate>'))
    assert tasks.status == 207
    *_, no_events = h.connector_with(url=h.proxy.url_for(tasks_url)).check()
    assert not no_events.ok
    assert "VTODO" in no_events.detail

    missing = h.connector_with(url=h.proxy.url_for(f"{h.server.url}alice/nothing-here/"))
    *_, not_found = missing.check()
    assert not not_found.ok
    assert "404" in not_found.detail


def test_check_finds_a_user_who_may_only_read() -> None:
    rights = "\n".join([
        "[reader-reads-alice]", "user: reader", "collection: alice(/.*)?", "permissions: rR",
        "[owners]", "user: .+", "collection: {user}(/.*)?", "permissions: RrWw",
        "[root]", "user: .+", "collection:", "permissions: R",
    ])
    with harness(users={"reader": "reader-pw"}, rights=rights) as h:
        reader = h.connector_with(user="reader", password="reader-pw")
        *_, writing = reader.check()
        assert (writing.what, writing.ok) == ("write events", False)
        assert "may read but not write" in writing.detail
        assert reader.free_slots(at(DAY, 0), at(DAY, 23), 3600)  # reading works
        with pytest.raises(ConnectorError) as refused:
            reader.book(booking(at(DAY, 10)), "key")
        assert refused.value.kind is FailureKind.SCOPE


def test_the_calendar_by_display_name_or_path_under_the_root(h: CaldavHarness) -> None:
    root = h.proxy.url_for(h.server.url)
    by_name = h.connector_with(url=root, calendar="Appointments")
    made = by_name.book(booking(at(DAY, 10)), "by name")
    assert made.url.endswith(f"/alice/appointments/{made.id}.ics")
    assert all(r.ok for r in by_name.check())
    by_path = h.connector_with(url=root, calendar="/alice/appointments/")
    assert by_path.book(booking(at(DAY, 10)), "by name") == made

    unknown = h.connector_with(url=root, calendar="Holidays")
    with pytest.raises(ConnectorError) as missing:
        unknown.free_slots(at(DAY, 0), at(DAY, 23), 3600)
    assert missing.value.kind is FailureKind.CONFIGURATION
    assert "no calendar named 'Holidays'" in str(missing.value)
    *_, finding = unknown.check()
    assert not finding.ok
    assert "Holidays" in finding.detail


# -- settings ----------------------------------------------------------------------------------------------


def test_settings_and_connect(h: CaldavHarness) -> None:
    settings_ = CalDavSettings.model_validate({
        "kind": "caldav", "url": h.proxy.url_for(h.calendar_url), "username": USER,
        "password": {"env": "CALDAV_PASSWORD"}, "hours": HOURS.model_dump()})
    connector = connect(settings_, Secrets({"CALDAV_PASSWORD": PASSWORD}), timeout_s=1.0)
    assert isinstance(connector, CalendarConnector)
    assert connector.book(booking(at(DAY, 10)), "via settings").start == at(DAY, 10)
    assert connector.rate_limit.rate_per_s == 10
    assert connector.rate_limit.source
    assert PASSWORD not in repr(settings_)

    with pytest.raises(ConnectorError) as unset:
        connect(settings_, Secrets({}), timeout_s=1.0)
    assert unset.value.kind is FailureKind.CONFIGURATION
    for bad in ({"url": "http://alice:secret@127.0.0.1/alice/"}, {"url": "ftp://host/"}, {"calendar": " "},
                {"extra": 1}):
        with pytest.raises(ValidationError):
            CalDavSettings.model_validate({"url": "http://127.0.0.1:5232/alice/appointments/", "username": USER,
                                           "password": SecretRef(env="X"), **bad})


# -- the Radicale server ----------------------------------------------------------------------------------


def test_radicale_starts_answers_and_stops(tmp_path: Path) -> None:
    server = RadicaleServer(tmp_path / "radicale", users={"bob": "bob-pw"})
    server.start()
    try:
        assert server.running
        url = server.make_calendar("bob", "work", "Work")
        assert url == f"{server.url}bob/work/"
        bob = CalDavCalendar(url, "bob", SecretStr("bob-pw"), HOURS, timeout_s=5.0)
        assert all(r.ok for r in bob.check())
        assert (tmp_path / "radicale" / "collections" / "collection-root" / "bob" / "work").is_dir()
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    server.stop()  # stopping a stopped server does nothing


def test_radicale_on_a_port_in_use_raises(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RadicaleServer(tmp_path, port=taken.getsockname()[1], users={"bob": "pw"})
        with pytest.raises(RadicaleError, match="in use"):
            server.start()
        assert not server.running


def test_radicale_that_exits_raises_with_its_log(tmp_path: Path) -> None:
    server = RadicaleServer(tmp_path, host="no-such-host.invalid", port=5232, users={"bob": "pw"})
    with pytest.raises(RadicaleError) as exited:
        server.start()
    assert "exited" in str(exited.value)
    assert "No servers started" in str(exited.value)
    assert not server.running


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead and not yet reaped by whoever adopted it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_radicale_ends_when_whoever_started_it_is_killed(tmp_path: Path) -> None:
    """A gateway killed outright (SIGKILL) runs no stop(): its Radicale must not live on, holding its port."""
    starter = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\n"
         "from streams.connectors.radicale_server import RadicaleServer\n"
         "server = RadicaleServer(Path(sys.argv[1]), users={'bob': 'pw'})\n"
         "server.start()\n"
         "assert server._process is not None\n"
         "print(server._process.pid, server.port, flush=True)\n"
         "time.sleep(600)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert starter.stdout is not None
        pid, port = (int(word) for word in starter.stdout.readline().split())
    finally:
        starter.kill()
        starter.wait()
    for _ in range(200):  # a poll of the process table, not a guess at how long it takes
        if not running(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("Radicale outlived the process that started it")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # its port is free again


def test_radicale_checks_its_users(tmp_path: Path) -> None:
    for bad in ("", "a:b", "a/b", " a"):
        with pytest.raises(ValueError, match="user names"):
            RadicaleServer(tmp_path, users={bad: "pw"})
    with RadicaleServer(tmp_path, users={"bob": "pw"}) as server:
        assert server.running
        users = tmp_path / f"users.{server.port}"  # the server's own: servers may share a storage folder
        assert users.stat().st_mode & 0o077 == 0  # the passwords' file is the owner's alone
    assert not server.running
    assert not users.exists()  # and it goes with the server
