"""A CalDAV calendar (RFC 4791: Nextcloud, Fastmail, iCloud, Radicale, SOGo...) as a `CalendarConnector`,
through the `caldav` client library with `icalendar` for the events' data.

Reading: `free_slots` and every busy check send one time-range calendar-query REPORT (RFC 4791 7.8,
`Calendar.search(start, end, event=True, expand=True)`) and expand recurrences on the client. Not a
free-busy-query REPORT (7.10): the server places floating times and all-day dates in some zone of its
own there (Radicale reads them as UTC), so a floating 10:00 or an all-day event written by a phone's
calendar app would be busy an hour or two off in Berlin. The library widens the range by a day and
matches those in the zone the range is given in, the calendar's (`hours.timezone`); this module reads
each occurrence's start and end the same way (a date is midnight there, a floating time is wall time
there, a UTC or TZID time is that instant) and keeps only those overlapping. Events marked
TRANSP:TRANSPARENT or STATUS:CANCELLED are not busy.

Writing: events are written with TZID of the calendar's zone and its VTIMEZONE, not in UTC: the event
says 16:00 Europe/Berlin, as the business means it, and should someone make it recurring in their
calendar app it stays 16:00 across daylight saving time (a UTC time would move an hour). The caller's
details go into CONTACT and DESCRIPTION, not ATTENDEE, so that servers that implement scheduling (RFC
6638) send no invitations on the business's behalf.

Idempotency: the key becomes the event's UID (a UUID5 of the key) and its resource name (`<uid>.ics`),
so a repeated `book` finds the event with a GET and returns it (after the slot's check: a 404 to the
check is the calendar's, to the GET only the key's), and the create is a PUT with
`If-None-Match: *` (RFC 4791 5.3.2, RFC 9110 13.1.2): two workers creating with the same key at once
get one event, the second a 412, after which it reads and returns the first's. Two different keys
booking the same slot at once both pass the busy check; so after writing, `book` looks again, and if
another busy event overlaps its own it deletes its own and answers CONFLICT. Whichever of two racers
checks last sees the other's event, so they never both keep the slot (both may let it go, in the rare
case that both write before either looks again). A worker killed between writing and looking again
leaves its event unchecked; the same key run again returns it as it is. `reschedule` records each key
it applied on the event (`X-VOXLOG-APPLIED-KEY`, a UUID5 of it), so a key redelivered after a later
reschedule changes nothing; it writes with `If-Match` of the ETag it read (412: the event changed
meanwhile -> CONFLICT), and looks again after writing too, putting the event back where it was on an
overlap. `cancel` sets STATUS:CANCELLED (and TRANSP:TRANSPARENT, for servers and apps that only read
that), rather than deleting the event: a second cancel finds it cancelled and is not an error, an id
that never was answers NOT_FOUND instead of silently succeeding, and staff see what was cancelled.

Requests go through `DAVClient.request` (GET, PUT, DELETE, PROPFIND) and the library's search, each
one HTTP request: the library's higher-level `save()`/`load()` retry a failed PUT and turn a
404 into a multiget and a UID search, which would multiply the worker's own retries. Basic auth is
sent with every request (`auth_type="basic"`, as Nextcloud, iCloud, Fastmail and Radicale take it),
rather than negotiated after a first 401, which costs a request and a 401 that means nothing.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit
from zoneinfo import ZoneInfo

import icalendar
from caldav.calendarobjectresource import CalendarObjectResource
from caldav.collection import Calendar
from caldav.davclient import DAVClient
from caldav.lib import error as caldav_error
from caldav.response import DAVResponse
from pydantic import SecretStr

from streams.connectors.base import Booking, BookingRequest, CheckResult, ConnectorError, FailureKind, RateLimit, Slot
from streams.connectors.http_status import failure_for_status
from streams.connectors.secrets import Secrets
from streams.connectors.slots import OpeningHours, free_slots, overlaps
from streams.connectors.vendor_settings import CalDavSettings as CalDavSettings

VENDOR = "caldav"
PRODID = "-//voxlog//CalDAV connector//EN"
KEY_NAMESPACE = uuid.UUID("6f2a4c1e-5b0d-4e8a-9c3f-2d7b1a9e0c41")
"""Keys become UIDs as UUID5s in this namespace: the same key, the same UID, in every worker."""
APPLIED_KEY = "X-VOXLOG-APPLIED-KEY"
"""An event's record of the reschedule keys applied to it (UUID5s of them)."""
BOOKING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,254}")
"""The UIDs this connector reads back as resource names: its own (UUIDs), nothing that makes a path."""
ICALENDAR = "text/calendar; charset=utf-8"
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
VTIMEZONE_YEARS = 10
"""How far ahead of an event its VTIMEZONE defines the zone (in case it is made recurring)."""
PROPFIND_CALENDAR = """<?xml version="1.0" encoding="utf-8"?>
<D:propfind xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:resourcetype/><D:displayname/><C:supported-calendar-component-set/>
    <D:current-user-privilege-set/></D:prop>
</D:propfind>"""
DAV = "{DAV:}"
CALDAV = "{urn:ietf:params:xml:ns:caldav}"
WRITE_PRIVILEGES = ({f"{DAV}all"}, {f"{DAV}write"}, {f"{DAV}write-content", f"{DAV}bind"})
"""Any of these sets lets a user create and change events (RFC 3744 3.1, 3.3, 3.9)."""

T = TypeVar("T")


def connect(settings: CalDavSettings, secrets: Secrets, timeout_s: float) -> CalDavCalendar:
    password = secrets.resolve(settings.password, "caldav password")
    return CalDavCalendar(settings.url, settings.username, password, settings.hours,
                          calendar=settings.calendar, timeout_s=timeout_s)


def ical_text(text: str) -> str:
    """`text` as an iCalendar TEXT value holds it (RFC 5545 3.3.11): line breaks are newlines, and there
    are no control characters but tab. What a booking answers is what reading it back answers."""
    return CONTROL_CHARACTERS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def booking_uid(idempotency_key: str) -> str:
    """The UID (and resource name, with `.ics`) of the event that the booking with this key makes."""
    return str(uuid.uuid5(KEY_NAMESPACE, idempotency_key))


@dataclass(frozen=True)
class _Stored:
    """An event resource as read: the calendar object, its (master) VEVENT, and the ETag it was read at."""

    url: str
    calendar: icalendar.Calendar
    event: icalendar.Event
    etag: str | None

    @property
    def uid(self) -> str:
        return str(self.event.get("UID", ""))

    @property
    def cancelled(self) -> bool:
        return str(self.event.get("STATUS", "")).upper() == "CANCELLED"

    @property
    def applied_keys(self) -> set[str]:
        marks = self.event.get(APPLIED_KEY, [])
        return {str(mark) for mark in (marks if isinstance(marks, list) else [marks])}


@dataclass(frozen=True)
class _Busy:
    uid: str
    start: datetime
    end: datetime


class CalDavCalendar:
    """The connector: one calendar collection of one user, under that user's name and password."""

    vendor = VENDOR
    rate_limit = RateLimit(
        10, 1.0,
        source="none published: CalDAV (RFC 4791) defines no limit and self-hosted servers set none; "
               "10 requests/s is a conservative default that a small server's disk keeps up with")

    def __init__(self, url: str, username: str, password: SecretStr, hours: OpeningHours, *,
                 calendar: str | None = None, timeout_s: float) -> None:
        self._root = url if url.endswith("/") else f"{url}/"
        self._username = username
        self._hours = hours
        self._zone = hours.zone
        self._calendar_name = calendar
        self._calendar_url: str | None = self._root if calendar is None else None
        # The library's hint says int; the value goes to niquests, which takes seconds as a float.
        self._client = DAVClient(url=self._root, username=username, password=password.get_secret_value(),
                                 auth_type="basic", timeout=timeout_s,  # type: ignore[arg-type]
                                 enable_rfc6764=False)

    # -- CalendarConnector ----------------------------------------------------------------------------

    def free_slots(self, start: datetime, end: datetime, duration_s: int) -> list[Slot]:
        _need_aware(start, end)
        busy = [(b.start, b.end) for b in self._busy(start, end)]
        return free_slots(busy, start, end, duration_s, self._hours)

    def book(self, request: BookingRequest, idempotency_key: str) -> Booking:
        self._check_bookable(request.start, request.end)
        uid = booking_uid(idempotency_key)
        url = self._event_url(uid)
        # The slot first: a calendar that is gone answers 404 here, where a 404 to the GET below means
        # only that no booking has this key yet.
        busy = self._busy(request.start, request.end)
        existing = self._load(url)
        if existing is not None:
            return self._booking(existing)
        self._refuse_taken(busy, request.start, uid)
        created = self._request("create the event", "PUT", url, self._new_event(uid, request),
                                {"Content-Type": ICALENDAR, "If-None-Match": "*"})
        if created.status == 412:  # a worker with the same key created it first: one event, its answer
            existing = self._load(url)
            if existing is None:  # ... and let it go again, as it lost the slot to another booking
                raise ConnectorError(FailureKind.CONFLICT, "that time is taken: another booking got it first")
            return self._booking(existing)
        self._expect(created, "create the event", 200, 201, 204)
        if _others(self._busy(request.start, request.end), uid):
            self._delete(url, _etag(created))
            raise ConnectorError(FailureKind.CONFLICT, "that time is taken: another booking got it first")
        return Booking(uid, request.start.astimezone(self._zone), request.end.astimezone(self._zone),
                       ical_text(request.title), url)

    def reschedule(self, booking_id: str, start: datetime, end: datetime, idempotency_key: str) -> Booking:
        stored = self._existing(booking_id)
        if stored.cancelled:
            raise ConnectorError(FailureKind.CONFLICT, f"booking {booking_id} was cancelled")
        mark = booking_uid(idempotency_key)
        if mark in stored.applied_keys:
            return self._booking(stored)
        self._check_bookable(start, end)
        self._refuse_taken(self._busy(start, end), start, booking_id)
        moved = _copy(stored.calendar)
        event = _master(moved)
        for name in ("DTSTART", "DTEND", "DURATION"):
            event.pop(name, None)
        event.add("DTSTART", start.astimezone(self._zone))
        event.add("DTEND", end.astimezone(self._zone))
        event.add(APPLIED_KEY, mark)
        _touch(event)
        written = self._write_over(stored, _with_timezone(moved, start), "move the event")
        if _others(self._busy(start, end), booking_id):
            # Back where it was, unless someone changed it since (then theirs stands, as a 412).
            back = self._request("put the event back", "PUT", stored.url, stored.calendar.to_ical().decode(),
                                 {"Content-Type": ICALENDAR, **({"If-Match": written} if written else {})})
            self._expect(back, "put the event back", 200, 201, 204, 412)
            raise ConnectorError(FailureKind.CONFLICT, "that time is taken: another booking got it first")
        return Booking(booking_id, start.astimezone(self._zone), end.astimezone(self._zone),
                       str(event.get("SUMMARY", "")), stored.url)

    def cancel(self, booking_id: str, idempotency_key: str) -> None:
        # A cancelled event stays cancelled: the key is not needed to make a repeat harmless.
        stored = self._existing(booking_id)
        if stored.cancelled:
            return
        cancelled = _copy(stored.calendar)
        event = _master(cancelled)
        for name in ("STATUS", "TRANSP"):
            event.pop(name, None)
        event.add("STATUS", "CANCELLED")
        event.add("TRANSP", "TRANSPARENT")
        _touch(event)
        self._write_over(stored, cancelled, "cancel the event")

    def check(self) -> list[CheckResult]:
        host = urlsplit(self._root).netloc
        try:
            url = self._resolved_calendar_url()
            answer = self._request("read the calendar's properties", "PROPFIND", url, PROPFIND_CALENDAR,
                                   {"Depth": "0", "Content-Type": "application/xml; charset=utf-8"})
            self._expect(answer, "read the calendar's properties", 207)
            props = _properties(answer)
        except ConnectorError as exc:
            return self._check_failed(exc, host)
        results = [CheckResult("reach the CalDAV server", True, host),
                   CheckResult(f"sign in as {self._username}", True)]
        kinds = props.get(f"{DAV}resourcetype")
        if kinds is None or kinds.find(f"{CALDAV}calendar") is None:
            results.append(CheckResult("the calendar", False, f"{url} is not a calendar collection: "
                                       "check the calendar's URL (or its name)"))
            return results
        components = props.get(f"{CALDAV}supported-calendar-component-set")
        names = {comp.get("name", "").upper() for comp in components} if components is not None else {"VEVENT"}
        if "VEVENT" not in names:
            results.append(CheckResult("the calendar", False,
                                       f"{url} holds no events, only {', '.join(sorted(names))}"))
            return results
        results.append(CheckResult("the calendar", True, url))
        privileges = props.get(f"{DAV}current-user-privilege-set")
        if privileges is None:
            results.append(CheckResult("write events", True, "the server does not say; a booking will tell"))
        else:
            held = {p.tag for privilege in privileges for p in privilege}
            may_write = any(needed <= held for needed in WRITE_PRIVILEGES)
            results.append(CheckResult(
                "write events", may_write,
                "" if may_write else f"{self._username} may read but not write this calendar: "
                                     "grant the user write access to it"))
        return results

    # -- reading --------------------------------------------------------------------------------------

    def _busy(self, start: datetime, end: datetime) -> list[_Busy]:
        """Every busy occurrence overlapping [start, end), recurrences expanded, in the calendar's zone."""
        calendar = Calendar(client=self._client, url=self._resolved_calendar_url())

        def search() -> list[_Busy]:
            found: list[CalendarObjectResource] = _synchronous(calendar.search(
                start=start.astimezone(self._zone), end=end.astimezone(self._zone), event=True, expand=True))
            busy = []
            for occurrence in found:
                component = occurrence.icalendar_component
                span = self._span(component) if _blocks_time(component) else None
                if span is not None and overlaps(span[0], span[1], start, end):
                    busy.append(_Busy(str(component.get("UID", "")), *span))
            return busy

        return self._call("read the calendar's events", search)

    def _refuse_taken(self, busy: list[_Busy], start: datetime, own_uid: str) -> None:
        if _others(busy, own_uid):
            local = start.astimezone(self._zone)
            raise ConnectorError(FailureKind.CONFLICT,
                                 f"that time is taken: {local:%Y-%m-%d %H:%M} ({self._hours.timezone}) is busy")

    def _load(self, url: str) -> _Stored | None:
        """The event resource at `url`, or None where there is none."""
        answer = self._request("read the event", "GET", url)
        if answer.status == 404:
            return None
        self._expect(answer, "read the event", 200)
        try:
            calendar = icalendar.Calendar.from_ical(answer.raw)
        except ValueError as exc:
            raise ConnectorError(FailureKind.BAD_RESPONSE,
                                 f"{VENDOR}: {url} is not iCalendar data ({str(exc)[:200]})") from exc
        if not isinstance(calendar, icalendar.Calendar) or _master_or_none(calendar) is None:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {url} holds no event")
        stored = _Stored(url, calendar, _master(calendar), _etag(answer))
        if self._span(stored.event) is None:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: the event at {url} has no start")
        return stored

    def _existing(self, booking_id: str) -> _Stored:
        stored = self._load(self._event_url(booking_id)) if BOOKING_ID.fullmatch(booking_id) else None
        if stored is None:
            raise ConnectorError(FailureKind.NOT_FOUND, f"no booking {booking_id!r} in the calendar", status=404)
        return stored

    def _booking(self, stored: _Stored) -> Booking:
        span = self._span(stored.event)
        assert span is not None  # _load refuses events without a start
        return Booking(stored.uid, span[0], span[1], str(stored.event.get("SUMMARY", "")), stored.url)

    def _span(self, component: icalendar.cal.Component) -> tuple[datetime, datetime] | None:
        """An event's start and end as instants: a date is the calendar's midnight, a floating time the
        calendar's wall time. Without an end a dated event lasts its day and a timed one no time (RFC
        5545 3.6.1); None where it has no start."""
        if "DTSTART" not in component:
            return None
        raw_start = component.decoded("DTSTART")
        start = _instant(raw_start, self._zone)
        if "DTEND" in component:
            end = _instant(component.decoded("DTEND"), self._zone)
        elif "DURATION" in component:
            end = start + component.decoded("DURATION")
        elif isinstance(raw_start, datetime):
            end = start
        else:
            end = _instant(raw_start + timedelta(days=1), self._zone)
        return start.astimezone(self._zone), end.astimezone(self._zone)

    # -- writing --------------------------------------------------------------------------------------

    def _check_bookable(self, start: datetime, end: datetime) -> None:
        _need_aware(start, end)
        if end <= start:
            raise ConnectorError(FailureKind.INVALID, "a booking must end after it starts")
        if not self._hours.is_open(start, end):
            local_start, local_end = start.astimezone(self._zone), end.astimezone(self._zone)
            raise ConnectorError(FailureKind.INVALID, f"{local_start:%A %Y-%m-%d %H:%M} to {local_end:%H:%M} "
                                 f"({self._hours.timezone}) is outside the opening hours")

    def _new_event(self, uid: str, request: BookingRequest) -> str:
        event = icalendar.Event()
        event.add("UID", uid)
        event.add("DTSTART", request.start.astimezone(self._zone))
        event.add("DTEND", request.end.astimezone(self._zone))
        event.add("SUMMARY", ical_text(request.title))
        if request.description:
            event.add("DESCRIPTION", ical_text(request.description))
        contact = ", ".join(part for part in (request.attendee_name, request.attendee_phone,
                                              request.attendee_email) if part)
        if contact:
            event.add("CONTACT", ical_text(contact))
        event.add("STATUS", "CONFIRMED")
        event.add("TRANSP", "OPAQUE")
        now = datetime.now(UTC).replace(microsecond=0)
        event.add("CREATED", now)
        event.add("DTSTAMP", now)
        event.add("SEQUENCE", 0)
        calendar = icalendar.Calendar()
        calendar.add("PRODID", PRODID)
        calendar.add("VERSION", "2.0")
        calendar.add_component(event)
        return _with_timezone(calendar, request.start)

    def _write_over(self, stored: _Stored, text: icalendar.Calendar | str, what: str) -> str | None:
        """PUTs `text` over the stored event, on the condition that it is still the version read: the
        new ETag (None where the server gives none)."""
        body = text if isinstance(text, str) else text.to_ical().decode()
        condition = {"If-Match": stored.etag} if stored.etag else {}
        answer = self._request(what, "PUT", stored.url, body, {"Content-Type": ICALENDAR, **condition})
        if answer.status == 412:
            raise ConnectorError(FailureKind.CONFLICT, f"booking {stored.uid} changed meanwhile: read it again",
                                 status=412)
        self._expect(answer, what, 200, 201, 204)
        return _etag(answer)

    def _delete(self, url: str, etag: str | None) -> None:
        answer = self._request("take back the event", "DELETE", url, headers={"If-Match": etag} if etag else {})
        if answer.status not in (404, 412):  # gone already, or changed by someone else: theirs now
            self._expect(answer, "take back the event", 200, 204)

    # -- the wire -------------------------------------------------------------------------------------

    def _resolved_calendar_url(self) -> str:
        """The calendar collection's URL; where the settings name it, found once (by its path, or its
        display name among the user's calendars)."""
        if self._calendar_url is not None:
            return self._calendar_url
        name = self._calendar_name
        assert name is not None
        if "/" in name:
            self._calendar_url = urljoin(self._root, name.strip("/") + "/")
            return self._calendar_url
        try:
            found = self._call(f"find the calendar {name!r}",
                               lambda: _synchronous(self._client.get_principal().calendar(name=name)))
        except ConnectorError as exc:
            if exc.kind is not FailureKind.BAD_RESPONSE or not isinstance(exc.__cause__, caldav_error.NotFoundError):
                raise
            raise ConnectorError(FailureKind.CONFIGURATION,
                                 f"{self._username} has no calendar named {name!r} on {self._root}") from None
        self._calendar_url = str(found.url)
        return self._calendar_url

    def _event_url(self, uid: str) -> str:
        return f"{self._resolved_calendar_url()}{quote(uid, safe='@')}.ics"

    def _request(self, what: str, method: str, url: str, body: str = "",
                 headers: Mapping[str, str] | None = None) -> DAVResponse:
        return self._call(what, lambda: self._client.request(url, method, body, dict(headers or {})))

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """`operation()`, with what the library and the HTTP client raise turned into ConnectorErrors
        (from status codes and the server's words, never a header)."""
        try:
            return operation()
        except ConnectorError:
            raise
        except caldav_error.RateLimitError as exc:  # 429, or 503 with Retry-After
            raise failure_for_status(exc.status or 429, f"{what}: {_vendor_text(exc)}", vendor=VENDOR,
                                     retry_after=exc.retry_after) from exc
        except caldav_error.DAVError as exc:
            if exc.status is None:
                raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {what}: {_vendor_text(exc)}") from exc
            raise failure_for_status(exc.status, f"{what}: {_vendor_text(exc)}", vendor=VENDOR) from exc
        except SyntaxError as exc:  # lxml's XMLSyntaxError: a body that is not the XML it says it is
            raise ConnectorError(FailureKind.BAD_RESPONSE,
                                 f"{VENDOR}: {what}: the answer is not well-formed XML ({exc.msg})") from exc
        except OSError as exc:  # the HTTP client's connection errors and timeouts
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"{VENDOR}: {what}: {type(exc).__name__} talking to {urlsplit(self._root).netloc}"
                                 ) from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # The libraries' parsers fail in all these ways on answers that are not CalDAV (an HTML page
            # with status 200, a multistatus without its parts, calendar data that does not parse).
            raise ConnectorError(FailureKind.BAD_RESPONSE,
                                 f"{VENDOR}: {what}: unreadable answer ({type(exc).__name__}: {str(exc)[:200]})"
                                 ) from exc

    def _expect(self, answer: DAVResponse, what: str, *statuses: int) -> None:
        if answer.status in statuses:
            return
        if 200 <= answer.status < 300:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {what}: answered HTTP {answer.status}, "
                                 f"not {' or '.join(map(str, statuses))}", status=answer.status)
        raise failure_for_status(answer.status, f"{what}: {_answer_text(answer)}", vendor=VENDOR,
                                 retry_after=answer.headers.get("Retry-After"))

    def _check_failed(self, exc: ConnectorError, host: str) -> list[CheckResult]:
        reached = CheckResult("reach the CalDAV server", True, host)
        signed_in = CheckResult(f"sign in as {self._username}", True)
        if exc.kind is FailureKind.UNAVAILABLE and exc.status is None:
            return [CheckResult("reach the CalDAV server", False, f"{host} did not answer: {exc.args[0]}")]
        if exc.kind is FailureKind.AUTH:
            return [reached, CheckResult(f"sign in as {self._username}", False,
                                         f"password refused (401): check the CalDAV password of {self._username}")]
        if exc.kind is FailureKind.SCOPE:
            return [reached, signed_in, CheckResult(
                "the calendar", False, f"access refused (403): {self._username} may not read the calendar")]
        if exc.kind is FailureKind.NOT_FOUND:
            where = self._calendar_url or self._root
            return [reached, signed_in, CheckResult(
                "the calendar", False, f"nothing at {where} (404): check the calendar's URL")]
        if exc.kind is FailureKind.CONFIGURATION:
            return [reached, signed_in, CheckResult("the calendar", False, str(exc.args[0]))]
        if exc.kind is FailureKind.BAD_RESPONSE:
            return [reached, CheckResult("a CalDAV server", False,
                                         f"{exc.args[0]}: is the URL a CalDAV server's (not a web page's)?")]
        return [CheckResult("reach the CalDAV server", False, str(exc))]


# -- iCalendar -------------------------------------------------------------------------------------------


def _others(busy: list[_Busy], own_uid: str) -> bool:
    return any(b.uid != own_uid for b in busy)


def _need_aware(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ConnectorError(FailureKind.INVALID, "times must carry their time zone")


def _instant(value: date | datetime, zone: ZoneInfo) -> datetime:
    if not isinstance(value, datetime):
        return datetime.combine(value, time(0), tzinfo=zone)
    return value if value.tzinfo is not None else value.replace(tzinfo=zone)


def _blocks_time(component: icalendar.cal.Component) -> bool:
    return (str(component.get("TRANSP", "OPAQUE")).upper() != "TRANSPARENT"
            and str(component.get("STATUS", "")).upper() != "CANCELLED")


def _master_or_none(calendar: icalendar.Calendar) -> icalendar.Event | None:
    events = [c for c in calendar.walk("VEVENT") if isinstance(c, icalendar.Event)]
    masters = [e for e in events if "RECURRENCE-ID" not in e]
    return next(iter(masters or events), None)


def _master(calendar: icalendar.Calendar) -> icalendar.Event:
    event = _master_or_none(calendar)
    assert event is not None
    return event


def _copy(calendar: icalendar.Calendar) -> icalendar.Calendar:
    copied = icalendar.Calendar.from_ical(calendar.to_ical())
    assert isinstance(copied, icalendar.Calendar)
    return copied


def _touch(event: icalendar.Event) -> None:
    """A significant change (RFC 5545 3.8.7.4): the next SEQUENCE, and when it was made."""
    sequence = int(event.get("SEQUENCE", 0)) + 1
    now = datetime.now(UTC).replace(microsecond=0)
    for name in ("SEQUENCE", "DTSTAMP", "LAST-MODIFIED"):
        event.pop(name, None)
    event.add("SEQUENCE", sequence)
    event.add("DTSTAMP", now)
    event.add("LAST-MODIFIED", now)


def _with_timezone(calendar: icalendar.Calendar, start: datetime) -> str:
    """The calendar's text with a VTIMEZONE for each TZID it uses, from a year before `start` on."""
    for old in list(calendar.walk("VTIMEZONE")):
        calendar.subcomponents.remove(old)
    first = start.date().replace(month=1, day=1)
    calendar.add_missing_timezones(first.replace(year=first.year - 1), first.replace(year=first.year + VTIMEZONE_YEARS))
    return str(calendar.to_ical().decode())


def _etag(answer: DAVResponse) -> str | None:
    etag = answer.headers.get("ETag")
    return str(etag) if etag and not str(etag).startswith("W/") else None  # If-Match compares strongly


def _synchronous(value: T | Coroutine[Any, Any, T]) -> T:
    """The library answers coroutines only to its async client; this one is synchronous."""
    assert not isinstance(value, Coroutine)
    return value


# -- WebDAV answers --------------------------------------------------------------------------------------


def _properties(answer: DAVResponse) -> dict[str, ET.Element]:
    """The properties a PROPFIND found (propstat 200), by Clark name."""
    try:
        root = ET.fromstring(answer.raw)
    except ET.ParseError as exc:
        raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: PROPFIND: not well-formed XML ({exc})") from exc
    if root.tag != f"{DAV}multistatus":
        raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: PROPFIND answered {root.tag}, not a multistatus")
    found: dict[str, ET.Element] = {}
    for propstat in root.iter(f"{DAV}propstat"):
        status = propstat.findtext(f"{DAV}status", "")
        prop = propstat.find(f"{DAV}prop")
        if prop is not None and " 200 " in f"{status} ":
            found.update({child.tag: child for child in prop})
    return found


def _vendor_text(exc: caldav_error.DAVError) -> str:
    """The server's own words for a failure: its DAV:error preconditions, or a plain-text body."""
    if exc.preconditions:
        return "precondition " + ", ".join(tag.rsplit("}", 1)[-1] for tag in exc.preconditions) + " failed"
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else (exc.body or "")
    return _plain(body)


def _answer_text(answer: DAVResponse) -> str:
    content_type = str(answer.headers.get("Content-Type", ""))
    return _plain(answer.raw) if content_type.startswith("text/plain") else ""


def _plain(body: str) -> str:
    text = " ".join(body.split())
    return "" if text.startswith("<") else text[:300]
