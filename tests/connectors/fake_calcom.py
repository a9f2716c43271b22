"""A local Cal.com API v2 on 127.0.0.1, written from Cal.com's API v2 reference (and the shapes of its
open-source server, apps/api/v2 of calcom/cal.com): one host with one event type, available all seven
days from `opens` to `closes` in its zone, in slots of the event type's length.

- GET /v2/me; GET /v2/event-types/{id} (cal-api-version 2024-06-14);
- GET /v2/slots (2024-09-04): eventTypeId, start, end (UTC, or a date alone), timeZone, format=range,
  bookingUidToReschedule; slots grouped by day in `timeZone`, none overlapping an accepted or pending
  booking;
- /v2/bookings (2024-08-13): GET (afterStart, beforeEnd, eventTypeId, attendeeEmail, status, take/skip
  pagination), POST (a slot not offered: 400 "User either already has booking at this time or is not
  available"; `lengthInMinutes` for an event type of one length: 400; metadata limits), GET /{uid},
  POST /{uid}/reschedule (a new booking with a new uid; the old one cancelled, `rescheduledToUid`),
  POST /{uid}/cancel.

Every request needs `Authorization: Bearer <api key>`; the versioned endpoints need their
`cal-api-version` (Cal.com answers older shapes without it: this server refuses, so a request that
would get them shows). Errors use Cal.com's body, `{"status": "error", "error": {"code", "message"}}`.
Faults (the harness protocol's `WireFaults`) apply to every request.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tests.connectors.vendor_server import Answer, Fault, SeenRequest, VendorServer

VERSIONS = {"slots": "2024-09-04", "bookings": "2024-08-13", "event-types": "2024-06-14"}
SLOT_TAKEN = "User either already has booking at this time or is not available"
ACTIVE = frozenset({"accepted", "pending"})
HOST = {"id": 1042, "username": "frontdesk", "name": "Front Desk", "email": "frontdesk@acme.example"}
EXCEPTIONS = {400: "BadRequestException", 401: "UnauthorizedException", 403: "ForbiddenException",
              404: "NotFoundException", 409: "ConflictException", 422: "UnprocessableEntityException",
              429: "ThrottlerException", 500: "InternalServerErrorException", 502: "BadGatewayException",
              503: "ServiceUnavailableException"}
DEFAULT_MESSAGES = {401: "ApiAuthStrategy - api key - Invalid API Key", 403: "Forbidden resource",
                    429: "ThrottlerException: Too Many Requests", 500: "Internal server error"}


def calcom_error(status: int, message: str | None = None, path: str = "/v2") -> str:
    """Cal.com's error body (its HttpExceptionFilter's shape)."""
    code = EXCEPTIONS.get(status, "HttpException")
    text = message or DEFAULT_MESSAGES.get(status, code.removesuffix("Exception"))
    return json.dumps({"status": "error", "timestamp": _ms(datetime.now(UTC)), "path": path,
                       "error": {"code": code, "message": text, "details": {"message": text, "statusCode": status}}})


@dataclass
class StoredBooking:
    id: int
    uid: str
    event_type_id: int
    title: str
    start: datetime
    end: datetime
    attendees: list[dict[str, Any]]
    metadata: dict[str, str] = field(default_factory=dict)
    responses: dict[str, Any] = field(default_factory=dict)
    status: str = "accepted"
    cancellation_reason: str | None = None
    rescheduled_to_uid: str | None = None
    rescheduled_from_uid: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def output(self, event_type_slug: str, host_zone: str) -> dict[str, Any]:
        """The booking as GET /v2/bookings/{uid} answers it (BookingOutput_2024_08_13)."""
        out: dict[str, Any] = {
            "id": self.id, "uid": self.uid, "title": self.title, "description": str(self.responses.get("notes", "")),
            "hosts": [{**HOST, "displayEmail": HOST["email"], "timeZone": host_zone}],
            "status": self.status, "start": _ms(self.start), "end": _ms(self.end),
            "duration": int((self.end - self.start).total_seconds() // 60), "eventTypeId": self.event_type_id,
            "eventType": {"id": self.event_type_id, "slug": event_type_slug},
            "meetingUrl": f"https://app.cal.com/video/{self.uid}", "location": f"https://app.cal.com/video/{self.uid}",
            "absentHost": False, "createdAt": _ms(self.created_at), "updatedAt": _ms(self.created_at),
            "metadata": self.metadata, "attendees": self.attendees, "guests": [],
            "bookingFieldsResponses": self.responses,
        }
        for name, value in (("cancellationReason", self.cancellation_reason),
                            ("rescheduledToUid", self.rescheduled_to_uid),
                            ("rescheduledFromUid", self.rescheduled_from_uid)):
            if value is not None:
                out[name] = value
        return out


def _answer(status: int, body: str = "", headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


class FakeCalCom(VendorServer):
    """One host (`HOST`) with one event type of `slot_minutes`, bookable daily from `opens` to `closes`."""

    methods = ("GET", "POST", "PATCH", "DELETE")
    keep_blank_query_values = False

    def __init__(self, *, api_key: str, event_type_id: int = 4242, timezone: str = "Europe/Berlin",
                 opens: time = time(8, 0), closes: time = time(18, 0), slot_minutes: int = 60,
                 event_type_title: str = "Service visit") -> None:
        super().__init__()
        self.api_key = api_key
        self.event_type_id = event_type_id
        self.timezone = timezone
        self.zone = ZoneInfo(timezone)
        self.opens, self.closes = opens, closes
        self.length = timedelta(minutes=slot_minutes)
        self.event_type_title = event_type_title
        self.event_type_slug = "service-visit"
        self._stored: dict[str, StoredBooking] = {}
        self._next_id = 1000

    @property
    def base_url(self) -> str:
        """What the connector's `base_url` is set to (Cal.com's is `https://api.cal.com/v2`)."""
        return f"{self.origin}/v2"

    # -- the test's side ----------------------------------------------------------------------------

    def add_booking(self, start: datetime, end: datetime, title: str, *, metadata: dict[str, str] | None = None,
                    event_type_id: int | None = None) -> str:
        """A booking made elsewhere (the booking page, another event type of the host): its uid."""
        with self._lock:
            attendee = {"name": "Someone Else", "email": "someone@example.org", "timeZone": self.timezone}
            return self._create(event_type_id or self.event_type_id, title, start, end, [_attendee(attendee)],
                                metadata or {}, {}).uid

    def bookings(self) -> list[StoredBooking]:
        """The bookings, cancelled ones (rescheduled ones too) excepted, earliest first."""
        with self._lock:
            return sorted((b for b in self._stored.values() if b.status != "cancelled"), key=lambda b: (b.start, b.id))

    def booking(self, uid: str) -> StoredBooking:
        with self._lock:
            return self._stored[uid]

    def seen(self, method: str, path: str) -> list[SeenRequest]:
        """The requests of this method to this path (`/v2/bookings`)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    # -- the wire -----------------------------------------------------------------------------------

    def error_body(self, status: int) -> str:
        return calcom_error(status)

    def malformed_answer(self, fault: Fault) -> Answer:
        return _answer(200, "<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", {"Content-Type": "text/html"})

    def respond(self, request: SeenRequest) -> Answer:
        with self._lock:
            try:
                return self._api(request)
            except (KeyError, TypeError, ValueError, ZoneInfoNotFoundError) as exc:
                return _answer(400, calcom_error(400, f"Invalid request: {exc}", request.path))

    def _api(self, request: SeenRequest) -> Answer:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _answer(401, calcom_error(401, path=request.path))
        route = request.path.removeprefix("/v2/").split("/")
        required = VERSIONS.get(route[0])
        if required is not None and request.headers.get("cal-api-version") != required:
            return _answer(400, calcom_error(400, f"cal-api-version must be {required} (older versions answer in "
                                                  "other shapes)", request.path))
        match request.method, route:
            case "GET", ["me"]:
                return self._success({**HOST, "timeZone": self.timezone, "weekStart": "Monday",
                                      "timeFormat": 24, "defaultScheduleId": 77, "locale": "en"})
            case "GET", ["event-types", event_type_id]:
                if int(event_type_id) != self.event_type_id:
                    return _answer(404, calcom_error(404, f"Event type with id={event_type_id} not found",
                                                     request.path))
                return self._success({"id": self.event_type_id, "title": self.event_type_title,
                                      "slug": self.event_type_slug, "lengthInMinutes": int(self.length.seconds // 60),
                                      "slotInterval": int(self.length.seconds // 60), "ownerId": HOST["id"],
                                      "locations": [{"type": "integration", "integration": "cal-video"}]})
            case "GET", ["slots"]:
                return self._slots(request)
            case "GET", ["bookings"]:
                return self._list(request)
            case "POST", ["bookings"]:
                return self._book(request)
            case "GET", ["bookings", uid]:
                if uid not in self._stored:
                    return _answer(404, calcom_error(404, f"Booking with uid={uid} not found", request.path))
                return self._success(self._out(self._stored[uid]))
            case "POST", ["bookings", uid, "reschedule"]:
                return self._reschedule(uid, request)
            case "POST", ["bookings", uid, "cancel"]:
                return self._cancel(uid, request)
        return _answer(404, calcom_error(404, f"Cannot {request.method} {request.path}", request.path))

    def _success(self, data: Any, status: int = 200, **extra: Any) -> Answer:
        return _answer(status, json.dumps({"status": "success", "data": data, **extra}))

    def _out(self, booking: StoredBooking) -> dict[str, Any]:
        return booking.output(self.event_type_slug, self.timezone)

    def _offered(self, start: datetime, end: datetime, *, ignoring: str | None = None) -> list[datetime]:
        """Slot starts within [start, end] (Cal.com offers a slot when it starts in the window) that no
        accepted or pending booking overlaps."""
        taken = [(b.start, b.end) for b in self._stored.values() if b.status in ACTIVE and b.uid != ignoring]
        starts = []
        day, last = start.astimezone(self.zone).date(), end.astimezone(self.zone).date()
        while day <= last:
            at = datetime.combine(day, self.opens, tzinfo=self.zone)
            closes = datetime.combine(day, self.closes, tzinfo=self.zone)
            while at + self.length <= closes:
                if start <= at <= end and not any(at < e and s < at + self.length for s, e in taken):
                    starts.append(at)
                at += self.length
            day += timedelta(days=1)
        return starts

    def _slots(self, request: SeenRequest) -> Answer:
        if int(request.param("eventTypeId") or 0) != self.event_type_id:
            return _answer(404, calcom_error(404, f"Event Type with id={request.param('eventTypeId')} not found",
                                             request.path))
        start, end = _query_time(request.param("start"), end_of_day=False), _query_time(request.param("end"), True)
        zone = ZoneInfo(request.param("timeZone") or "UTC")
        grouped: dict[str, list[dict[str, str]]] = {}
        for at in self._offered(start, end, ignoring=request.param("bookingUidToReschedule")):
            local = at.astimezone(zone)
            slot = {"start": _ms(local)}
            if request.param("format") == "range":
                slot["end"] = _ms(local + self.length)
            grouped.setdefault(local.date().isoformat(), []).append(slot)
        return self._success(grouped)

    def _list(self, request: SeenRequest) -> Answer:
        take, skip = int(request.param("take") or 100), int(request.param("skip") or 0)
        if not 1 <= take <= 250 or skip < 0:
            return _answer(400, calcom_error(400, "take must be between 1 and 250, skip at least 0", request.path))
        after = _query_time(request.param("afterStart"), False) if request.param("afterStart") else None
        before = _query_time(request.param("beforeEnd"), True) if request.param("beforeEnd") else None
        statuses = set((request.param("status") or "").split(",")) - {""}
        event_type_id, email = request.param("eventTypeId"), request.param("attendeeEmail")
        now = datetime.now(UTC)
        matching = [b for b in sorted(self._stored.values(), key=lambda b: (b.start, b.id))
                    if (after is None or b.start >= after) and (before is None or b.end <= before)
                    and (event_type_id is None or b.event_type_id == int(event_type_id))
                    and (email is None or any(a.get("email") == email for a in b.attendees))
                    and (not statuses or _status_word(b, now) in statuses)]
        page = matching[skip:skip + take]
        pagination = {"totalItems": len(matching), "remainingItems": max(0, len(matching) - skip - len(page)),
                      "returnedItems": len(page), "itemsPerPage": take, "currentPage": skip // take + 1,
                      "totalPages": math.ceil(len(matching) / take), "hasNextPage": skip + len(page) < len(matching),
                      "hasPreviousPage": skip > 0}
        return self._success([self._out(b) for b in page], pagination=pagination)

    def _book(self, request: SeenRequest) -> Answer:
        body = request.json()
        if body.get("eventTypeId") != self.event_type_id:
            return _answer(404, calcom_error(404, f"Event type with id {body.get('eventTypeId')} not found.",
                                             request.path))
        if "lengthInMinutes" in body:
            return _answer(400, calcom_error(400, "Can't specify 'lengthInMinutes' because event type does not have "
                                                  "multiple possible lengths. Please, remove the 'lengthInMinutes' "
                                                  "field from the request.", request.path))
        attendee = body["attendee"]
        ZoneInfo(attendee["timeZone"])
        if not attendee.get("name") or not (attendee.get("email") or attendee.get("phoneNumber")):
            return _answer(400, calcom_error(400, "Attendee must have at least one contact method (email or phone "
                                                  "number)", request.path))
        metadata = body.get("metadata") or {}
        if len(metadata) > 50 or any(len(k) > 40 or len(str(v)) > 500 for k, v in metadata.items()):
            return _answer(400, calcom_error(400, "Metadata must have at most 50 keys, each key up to 40 characters, "
                                                  "and string values up to 500 characters.", request.path))
        start = _query_time(body["start"], False)
        if start not in self._offered(start, start):
            return _answer(400, calcom_error(400, SLOT_TAKEN, request.path))
        title = f"{self.event_type_title} between {HOST['name']} and {attendee['name']}"
        responses = {**body.get("bookingFieldsResponses", {}), "name": attendee["name"],
                     "email": attendee.get("email", "")}
        booking = self._create(self.event_type_id, title, start, start + self.length, [_attendee(attendee)],
                               metadata, responses)
        return self._success(self._out(booking), status=201)

    def _reschedule(self, uid: str, request: SeenRequest) -> Answer:
        old = self._stored.get(uid)
        if old is None:
            return _answer(404, calcom_error(404, f"Booking with uid={uid} not found", request.path))
        if old.status == "cancelled":
            return _answer(400, calcom_error(400, "Cannot reschedule a cancelled booking", request.path))
        start = _query_time(request.json()["start"], False)
        if start not in self._offered(start, start, ignoring=uid):
            return _answer(400, calcom_error(400, SLOT_TAKEN, request.path))
        new = self._create(old.event_type_id, old.title, start, start + (old.end - old.start), old.attendees,
                           old.metadata, old.responses)
        new.rescheduled_from_uid = uid
        old.status, old.rescheduled_to_uid = "cancelled", new.uid
        return self._success(self._out(new), status=201)

    def _cancel(self, uid: str, request: SeenRequest) -> Answer:
        booking = self._stored.get(uid)
        if booking is None:
            return _answer(404, calcom_error(404, f"Booking with uid={uid} not found", request.path))
        if booking.status == "cancelled":
            return _answer(400, calcom_error(400, "This booking has already been cancelled.", request.path))
        booking.status = "cancelled"
        booking.cancellation_reason = str(request.json().get("cancellationReason", "")) if request.body else None
        return self._success(self._out(booking))

    def _create(self, event_type_id: int, title: str, start: datetime, end: datetime, attendees: list[dict[str, Any]],
                metadata: dict[str, str], responses: dict[str, Any]) -> StoredBooking:
        self._next_id += 1
        booking = StoredBooking(id=self._next_id, uid=secrets.token_urlsafe(16).replace("-", "x").replace("_", "y"),
                                event_type_id=event_type_id, title=title, start=start.astimezone(UTC),
                                end=end.astimezone(UTC), attendees=attendees, metadata=dict(metadata),
                                responses=dict(responses))
        self._stored[booking.uid] = booking
        return booking


def _attendee(given: Mapping[str, Any]) -> dict[str, Any]:
    email = str(given.get("email", ""))
    out = {"name": given["name"], "email": email, "displayEmail": email, "timeZone": given["timeZone"],
           "language": "en", "absent": False}
    if given.get("phoneNumber"):
        out["phoneNumber"] = given["phoneNumber"]
    return out


def _status_word(booking: StoredBooking, now: datetime) -> str:
    """The word GET /v2/bookings?status= filters on."""
    if booking.status == "cancelled":
        return "cancelled"
    if booking.status == "pending":
        return "unconfirmed"
    return "past" if booking.end <= now else "upcoming"


def _query_time(text: str | None, end_of_day: bool) -> datetime:
    """A time as Cal.com reads `start`/`end`: ISO 8601 (UTC unless it says otherwise), or a date alone,
    the start (or the last second) of that day in UTC."""
    value = str(text)
    if len(value) == 10:
        day = date.fromisoformat(value)
        return datetime.combine(day, time(23, 59, 59) if end_of_day else time(0), tzinfo=UTC)
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _ms(moment: datetime) -> str:
    """Cal.com's times: milliseconds, `Z` for UTC, the offset otherwise."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
