"""Cal.com through its API v2 (`https://api.cal.com/v2`, or a self-hosted instance's), with httpx:
Cal.com publishes no Python SDK. An API key (`cal_live_...`) goes in `Authorization: Bearer`, and each
endpoint family is pinned by the `cal-api-version` header its reference requires (without it the
endpoint answers in an older version's shapes): slots 2024-09-04, bookings 2024-08-13, event types
2024-06-14. Every request is bounded by `timeout_s` (httpx's connect, read and write timeouts).

Cal.com owns the availability: the event type's schedule, its booking notice and window, and the
host's other bookings and connected calendars decide which slots it offers, and the event type fixes
a booking's length.

Operations:
- `free_slots`: GET /v2/slots?eventTypeId&start&end&timeZone&format=range (slots grouped by day, in the
  calendar's zone), those of `duration_s` within the window.
- `book`: GET /v2/bookings around the time (every page) for an earlier booking with this key; the
  time must be an offered slot (GET /v2/slots); then POST /v2/bookings {start (UTC), eventTypeId,
  attendee {name, email, phoneNumber, timeZone (the caller's)}, metadata {voxlog_key}}. A time not
  offered is CONFLICT when another booking holds it, INVALID otherwise (outside the availability, the
  notice or window, or another length). Cal.com's own 400 for a slot taken meanwhile ("User either
  already has booking at this time or is not available") is CONFLICT too.
- `reschedule`: POST /v2/bookings/{uid}/reschedule {start}. Cal.com cancels the booking and makes a new
  one with a new uid, which is what this answers.
- `cancel`: POST /v2/bookings/{uid}/cancel; one cancelled already is left as it is.
- `check`: GET /v2/me (the key works) and GET /v2/event-types/{id} (the event type is the key's).

Idempotency: Cal.com's API reference documents no idempotency header for creating bookings, so the key
rides in the booking's `metadata` (`voxlog_key`), and `book` searches before it creates: GET
/v2/bookings over a day either side of the time (`afterStart`/`beforeEnd`, `take`/`skip` pages) for a
booking of this event type carrying the key, answering it when found. `reschedule` and `cancel` first
read the booking (GET /v2/bookings/{uid}) and follow `rescheduledToUid` to the booking that now holds
the appointment: one already at the requested time is answered as it is, one cancelled is not
cancelled again.

Errors: Cal.com's body is `{"status": "error", "error": {"code", "message"}}`; statuses map through
`failure_for_status`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from pydantic import SecretStr

from streams.connectors.base import Booking, BookingRequest, CheckResult, ConnectorError, FailureKind, RateLimit, Slot
from streams.connectors.http_status import failure_for_status
from streams.connectors.secrets import Secrets
from streams.connectors.slots import overlaps
from streams.connectors.vendor_settings import CALCOM_API
from streams.connectors.vendor_settings import CalComSettings as CalComSettings

VENDOR = "Cal.com"
SLOTS_VERSION = "2024-09-04"
BOOKINGS_VERSION = "2024-08-13"
EVENT_TYPES_VERSION = "2024-06-14"
KEY_FIELD = "voxlog_key"
"""The metadata key that carries the idempotency key (Cal.com: at most 40 characters per key)."""
SLOT_TAKEN = "already has booking at this time"
"""Cal.com's words for a slot taken (its 400 "User either already has booking at this time or is not available")."""
ACTIVE = frozenset({"accepted", "pending"})
PAGE_SIZE = 100
SEARCH_MARGIN = timedelta(days=1)
"""How far either side of a booking's time the search before a create looks (bookings overlapping it)."""
MAX_RESCHEDULES = 20
"""How many `rescheduledToUid` links are followed before giving up on a booking's chain."""


def utc_text(moment: datetime) -> str:
    """A time as Cal.com takes `start`: ISO 8601 in UTC."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: Any) -> datetime:
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError("a time without an offset")
    return moment


def slots_from(data: Any) -> list[Slot]:
    """The slots of GET /v2/slots's `data` in the `range` format (`{"2050-09-05": [{"start", "end"}, ...]}`,
    times with their offsets), in order."""
    if not isinstance(data, dict):
        raise ValueError("slots are not grouped by day")
    slots: list[Slot] = []
    for day in data.values():
        if not isinstance(day, list):
            raise ValueError("a day's slots are not a list")
        slots.extend(Slot(parse_time(slot["start"]), parse_time(slot["end"])) for slot in day)
    return sorted(slots, key=lambda s: s.start)


class CalComConnector:
    vendor = "calcom"
    rate_limit = RateLimit(120, 60.0, "Cal.com API v2, Introduction to API v2: Rate limits (API key: 120 requests "
                                      "per minute)")

    def __init__(self, *, api_key: SecretStr, event_type_id: int, timezone: str, timeout_s: float,
                 base_url: str = CALCOM_API) -> None:
        self.event_type_id = event_type_id
        self.zone = ZoneInfo(timezone)
        self.timezone = timezone
        self._client = httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=timeout_s,
                                    headers={"Authorization": f"Bearer {api_key.get_secret_value()}",
                                             "Accept": "application/json"})

    # -- operations ---------------------------------------------------------------------------------

    def free_slots(self, start: datetime, end: datetime, duration_s: int) -> list[Slot]:
        if end <= start:
            return []
        length = timedelta(seconds=duration_s)
        return [s for s in self._offered(start, end) if start <= s.start and s.end <= end and s.end - s.start == length]

    def book(self, request: BookingRequest, idempotency_key: str) -> Booking:
        start, end = _aware(request.start), _aware(request.end)
        around = self._bookings_around(start, end)
        mine = [b for b in around if _carries(b, idempotency_key) and b.get("eventTypeId") == self.event_type_id]
        if mine:
            # Booked by an earlier attempt with this key; the one at the asked time, if it was moved since.
            return self._booking(next((b for b in mine if self._starts_at(b, start)), mine[0]))
        if not any(s.start == start and s.end == end for s in self._offered(start, end)):
            self._refuse(start, end, around)
        if not (request.attendee_email or request.attendee_phone):
            raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: a booking needs the caller's email or phone number")
        attendee: dict[str, str] = {"name": request.attendee_name or "Caller",
                                    "timeZone": request.attendee_timezone or self.timezone}
        if request.attendee_email:
            attendee["email"] = request.attendee_email
        if request.attendee_phone:
            attendee["phoneNumber"] = request.attendee_phone
        body: dict[str, Any] = {"start": utc_text(start), "eventTypeId": self.event_type_id, "attendee": attendee,
                                "metadata": {KEY_FIELD: idempotency_key}}
        # The event type names the booking; the tool's title and description go into the notes.
        notes = "\n\n".join(part for part in (request.title, request.description) if part)
        if notes:
            body["bookingFieldsResponses"] = {"notes": notes}
        return self._booking(self._data("POST", "bookings", BOOKINGS_VERSION, json=body))

    def reschedule(self, booking_id: str, start: datetime, end: datetime, idempotency_key: str) -> Booking:
        start, end = _aware(start), _aware(end)
        current = self._current(booking_id)
        if current.get("status") == "cancelled":
            raise ConnectorError(FailureKind.CONFLICT, f"{VENDOR}: booking {booking_id} was cancelled")
        booking = self._booking(current)
        if booking.start == start and booking.end == end:
            return booking  # moved by an earlier attempt with this key, or asked to stay where it is
        offered = self._offered(start, end, rescheduling=booking.id)
        if not any(s.start == start and s.end == end for s in offered):
            self._refuse(start, end, self._bookings_around(start, end), moving=booking.id)
        body = {"start": utc_text(start), "reschedulingReason": "Rescheduled by the caller on a phone call"}
        return self._booking(self._data("POST", f"bookings/{booking.id}/reschedule", BOOKINGS_VERSION, json=body))

    def cancel(self, booking_id: str, idempotency_key: str) -> None:
        current = self._current(booking_id)
        if current.get("status") == "cancelled":
            return
        self._data("POST", f"bookings/{current['uid']}/cancel", BOOKINGS_VERSION,
                   json={"cancellationReason": "Cancelled by the caller on a phone call"})

    def check(self) -> list[CheckResult]:
        try:
            me = self._data("GET", "me", None)
        except ConnectorError as failure:
            return [_check_failure(failure, "sign-in", "the account")]
        who = str(me.get("email") or me.get("username") or "the account")
        results = [CheckResult("sign-in", True, f"the API key is {who}'s")]
        try:
            event_type = self._data("GET", f"event-types/{self.event_type_id}", EVENT_TYPES_VERSION)
        except ConnectorError as failure:
            return [*results, _check_failure(failure, "event type", f"event type {self.event_type_id}")]
        detail = f"{event_type.get('title', 'untitled')} ({event_type.get('lengthInMinutes', '?')} minutes)"
        return [*results, CheckResult("event type", True, detail)]

    # -- the API ------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, version: str | None, *, params: dict[str, Any] | None = None,
              json: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request (no retries: the worker retries): Cal.com's whole answer, `{"status": "success", ...}`."""
        headers = {"cal-api-version": version} if version else {}
        try:
            response = self._client.request(method, path, params=params, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"{VENDOR}: {method} /{path} timed out") from exc
        except httpx.HTTPError as exc:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"{VENDOR}: {method} /{path} got no answer "
                                 f"({type(exc).__name__})") from exc
        if not response.is_success:
            message = _error_message(response)
            if response.status_code == 400 and SLOT_TAKEN in message:
                raise ConnectorError(FailureKind.CONFLICT, f"{VENDOR}: {message}", status=400)
            raise failure_for_status(response.status_code, message, vendor=VENDOR,
                                     retry_after=response.headers.get("retry-after"))
        try:
            answer = response.json()
        except ValueError as exc:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {method} /{path} answered something that is "
                                 "not JSON") from exc
        if not isinstance(answer, dict) or answer.get("status") != "success" or "data" not in answer:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {method} /{path} answered without "
                                 "status success and data")
        return answer

    def _data(self, method: str, path: str, version: str | None, *, params: dict[str, Any] | None = None,
              json: dict[str, Any] | None = None) -> dict[str, Any]:
        data = self._send(method, path, version, params=params, json=json)["data"]
        if not isinstance(data, dict):
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {method} /{path} answered data that is not "
                                 "an object")
        return data

    def _offered(self, start: datetime, end: datetime, *, rescheduling: str | None = None) -> list[Slot]:
        params: dict[str, Any] = {"eventTypeId": self.event_type_id, "start": utc_text(start), "end": utc_text(end),
                                  "timeZone": self.timezone, "format": "range"}
        if rescheduling is not None:
            params["bookingUidToReschedule"] = rescheduling  # its own time counts as free
        answer = self._send("GET", "slots", SLOTS_VERSION, params=params)
        try:
            slots = slots_from(answer["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: GET /slots answered slots that cannot be "
                                 "read") from exc
        return [Slot(s.start.astimezone(self.zone), s.end.astimezone(self.zone)) for s in slots]

    def _bookings_around(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Every booking of the key's account starting and ending within a day of [start, end), all pages."""
        params: dict[str, Any] = {"afterStart": utc_text(start - SEARCH_MARGIN),
                                  "beforeEnd": utc_text(end + SEARCH_MARGIN), "take": PAGE_SIZE, "skip": 0}
        bookings: list[dict[str, Any]] = []
        while True:
            answer = self._send("GET", "bookings", BOOKINGS_VERSION, params=params)
            page, pagination = answer["data"], answer.get("pagination")
            if not isinstance(page, list) or not all(isinstance(b, dict) for b in page) \
                    or not isinstance(pagination, dict):
                raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: GET /bookings answered without bookings "
                                     "and pagination")
            bookings.extend(page)
            if not pagination.get("hasNextPage") or not page:
                return bookings
            params["skip"] += len(page)

    def _current(self, uid: str) -> dict[str, Any]:
        """The booking, or the one it was rescheduled to (and so on): the one holding the appointment now."""
        booking = self._data("GET", f"bookings/{uid}", BOOKINGS_VERSION)
        for _ in range(MAX_RESCHEDULES):
            successor = booking.get("rescheduledToUid")
            if booking.get("status") != "cancelled" or not isinstance(successor, str) or not successor:
                break
            booking = self._data("GET", f"bookings/{successor}", BOOKINGS_VERSION)
        if not isinstance(booking.get("uid"), str):
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: a booking without a uid")
        return booking

    def _refuse(self, start: datetime, end: datetime, around: list[dict[str, Any]], *, moving: str = "") -> None:
        """Raises why Cal.com offers no slot at [start, end): another booking holds it, or it is not bookable."""
        for other in around:
            if other.get("status") in ACTIVE and other.get("uid") != moving:
                other_start, other_end = self._times(other)
                if overlaps(start, end, other_start, other_end):
                    raise ConnectorError(FailureKind.CONFLICT, f"{VENDOR}: {self._span(start, end)} is taken")
        raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: event type {self.event_type_id} offers no "
                             f"{self._span(start, end)} slot (outside its availability, booking notice or window, "
                             "or not its length)")

    # -- values -------------------------------------------------------------------------------------

    def _times(self, booking: dict[str, Any]) -> tuple[datetime, datetime]:
        try:
            return parse_time(booking["start"]), parse_time(booking["end"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: a booking without readable start and "
                                 "end") from exc

    def _starts_at(self, booking: dict[str, Any], start: datetime) -> bool:
        return self._times(booking)[0] == start

    def _booking(self, booking: dict[str, Any]) -> Booking:
        if not isinstance(booking.get("uid"), str):
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: a booking without a uid")
        start, end = self._times(booking)
        return Booking(id=booking["uid"], start=start.astimezone(self.zone), end=end.astimezone(self.zone),
                       title=str(booking.get("title", "")), url=str(booking.get("meetingUrl") or ""))

    def _span(self, start: datetime, end: datetime) -> str:
        local_start, local_end = start.astimezone(self.zone), end.astimezone(self.zone)
        return f"{local_start:%Y-%m-%d %H:%M}-{local_end:%H:%M} {self.timezone}"


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: booking times need a timezone")
    return moment


def _carries(booking: dict[str, Any], idempotency_key: str) -> bool:
    metadata = booking.get("metadata")
    return isinstance(metadata, dict) and metadata.get(KEY_FIELD) == idempotency_key


def _error_message(response: httpx.Response) -> str:
    """Cal.com's `error.message`, or nothing when the body is not Cal.com's (a proxy's page)."""
    try:
        error = response.json()["error"]
        return str(error.get("message", "")) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return ""


def _check_failure(failure: ConnectorError, what: str, subject: str) -> CheckResult:
    if failure.kind is FailureKind.AUTH:
        return CheckResult(what, False, "the API key was refused (401): check the Cal.com API key")
    if failure.kind is FailureKind.SCOPE:
        return CheckResult(what, False, f"the API key may not read {subject} (403)")
    if failure.kind is FailureKind.NOT_FOUND:
        return CheckResult(what, False, f"{subject} was not found for this API key (404): check event_type_id")
    if failure.kind is FailureKind.UNAVAILABLE and failure.status is None:
        return CheckResult("reach", False, f"Cal.com cannot be reached: {failure.args[0]}")
    return CheckResult(what, False, str(failure))


def connect(settings: CalComSettings, secrets: Secrets, timeout_s: float) -> CalComConnector:
    return CalComConnector(api_key=secrets.resolve(settings.api_key, "Cal.com API key"),
                           event_type_id=settings.event_type_id, timezone=settings.timezone, timeout_s=timeout_s,
                           base_url=settings.base_url)
