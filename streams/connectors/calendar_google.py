"""Google Calendar through Google's own client: google-api-python-client's Calendar API v3 resource,
built from the discovery document the package ships (`static_discovery=True`: nothing is fetched to
build it), on an `httplib2.Http(timeout=timeout_s)` that `google_auth_httplib2.AuthorizedHttp`
signs with a service account's token.

Auth: a service account key (its JSON, as a secret), optionally acting for a Workspace user through
domain-wide delegation (`delegated_user`, the JWT's `sub`). google-auth signs an RS256 JWT assertion
with the key and trades it at the key file's `token_uri` for an access token, and fetches a new one
itself before the old one expires. A 401 from the API refreshes the token once and retries the
request (`AuthorizedHttp(max_refresh_attempts=1)`); a second 401 is AUTH.

Operations:
- `free_slots`: POST freeBusy for the window, then `slots.free_slots` with the opening hours.
- `book`: within the opening hours (INVALID if not), free per freeBusy (CONFLICT if not), then
  events.insert with start and end as local `dateTime` plus the calendar's `timeZone`.
- `reschedule`: events.get (its ETag and times), the new time within the opening hours and free of
  every other event (events.list, page by page), then events.patch with the ETag in `If-Match`: an
  event changed meanwhile answers 412, which is CONFLICT.
- `cancel`: events.delete; 410 Gone (deleted already) is success.
- `check`: a token from the token endpoint, then calendarList.get for the calendar's access role
  (writer or owner is needed), falling back to calendars.get for a calendar shared with the
  account but not in its calendar list.

Idempotency: Google lets the client choose an event's id (base32hex characters a-v and 0-9, 5 to
1024 of them), so the id is derived from the idempotency key (`event_id_for`). A repeated book finds
its own event: freeBusy says busy, and events.get by that id answers the event booked the first time;
if the first attempt's insert landed between the repeat's freeBusy and insert, the insert answers
409 duplicate and events.get answers it likewise. A reschedule already at the requested time answers
the event unchanged.

Errors: Google's body is `{"error": {"code", "message", "errors": [{"domain", "reason", "message"}]}}`.
Statuses map through `failure_for_status`, except that a 403 whose reason is rateLimitExceeded,
userRateLimitExceeded or quotaExceeded is Google's way of saying "slow down", not a missing
permission: RATE_LIMITED (Google's "Handle API errors" page: retry those with exponential backoff).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from typing import Any

import google_auth_httplib2
import httplib2
from google.auth.exceptions import RefreshError, TransportError
from google.oauth2 import service_account
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from pydantic import SecretStr

from streams.connectors.base import Booking, BookingRequest, CheckResult, ConnectorError, FailureKind, RateLimit, Slot
from streams.connectors.http_status import failure_for_status, retry_after_s
from streams.connectors.secrets import Secrets
from streams.connectors.slots import OpeningHours, free_slots, overlaps
from streams.connectors.vendor_settings import GOOGLE_APIS
from streams.connectors.vendor_settings import GoogleCalendarSettings as GoogleCalendarSettings

VENDOR = "Google Calendar"
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"})
"""403 reasons that mean "too many requests" (Google's "Handle API errors" page), not a missing scope."""
WRITE_ROLES = frozenset({"writer", "owner"})


def event_id_for(idempotency_key: str) -> str:
    """The event id a booking with this key gets: 52 base32hex characters of the key's SHA-256 (Google's
    ids are [a-v0-9]{5,1024}), the same for the same key."""
    digest = hashlib.sha256(f"voxlog:{idempotency_key}".encode()).digest()
    return base64.b32hexencode(digest).decode().rstrip("=").lower()


class GoogleApiError(ConnectorError):
    """A non-2xx answer from the API, with the reasons of Google's error body (`duplicate`, ...)."""

    def __init__(self, failure: ConnectorError, reasons: frozenset[str]) -> None:
        super().__init__(failure.kind, failure.args[0], status=failure.status, retry_after_s=failure.retry_after_s)
        self.reasons = reasons


def api_failure(status: int, content: bytes, retry_after: str | None) -> GoogleApiError:
    """The error for a non-2xx answer, from Google's error body (or its absence)."""
    message, reasons = "", frozenset[str]()
    try:
        error = json.loads(content)["error"]
        message = str(error.get("message", ""))
        reasons = frozenset(str(e.get("reason", "")) for e in error.get("errors", []) if isinstance(e, dict))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # not Google's JSON (a proxy's page): the status alone says what happened
    if status == 403 and reasons & RATE_LIMIT_REASONS:
        failure = ConnectorError(FailureKind.RATE_LIMITED, f"{VENDOR}: {message or 'rate limit exceeded'}",
                                 status=status, retry_after_s=retry_after_s(retry_after))
    else:
        failure = failure_for_status(status, message, vendor=VENDOR, retry_after=retry_after)
    return GoogleApiError(failure, reasons)


def event_time(value: Any, hours: OpeningHours) -> datetime:
    """An event's `start` or `end` as an aware datetime: `dateTime` (RFC 3339, with its offset), or the
    midnight in the calendar's zone that begins an all-day event's `date`."""
    if not isinstance(value, dict):
        raise ValueError("not an event time")
    if "dateTime" in value:
        moment = datetime.fromisoformat(str(value["dateTime"]))
        if moment.tzinfo is None:
            raise ValueError("an event time without an offset")
        return moment
    return datetime.combine(date.fromisoformat(str(value["date"])), time(0), tzinfo=hours.zone)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class GoogleCalendarConnector:
    vendor = "google"
    rate_limit = RateLimit(600, 60.0, "Google Calendar API, Usage limits: 600 requests per minute per user "
                                      "per project (10,000 per minute per project)")

    def __init__(self, *, calendar_id: str, service_account_key: SecretStr, hours: OpeningHours, timeout_s: float,
                 delegated_user: str | None = None, base_url: str = GOOGLE_APIS) -> None:
        try:
            info = json.loads(service_account_key.get_secret_value())
            credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[CALENDAR_SCOPE], subject=delegated_user)
        except (ValueError, TypeError, AttributeError):
            # The key's own text never goes into the message: it is the secret.
            raise ConnectorError(FailureKind.CONFIGURATION, f"{VENDOR}: the service account key is not a Google "
                                 "service account JSON key (type, client_email, private_key, token_uri)") from None
        self.calendar_id = calendar_id
        self.hours = hours
        self.delegated_user = delegated_user
        self._credentials = credentials
        self._http = google_auth_httplib2.AuthorizedHttp(credentials, http=httplib2.Http(timeout=timeout_s),
                                                         max_refresh_attempts=1)
        self._service = build("calendar", "v3", http=self._http, static_discovery=True, cache_discovery=False,
                              client_options={"api_endpoint": base_url.rstrip("/") + "/calendar/v3/"})

    # -- operations ---------------------------------------------------------------------------------

    def free_slots(self, start: datetime, end: datetime, duration_s: int) -> list[Slot]:
        if end <= start:
            return []
        return free_slots(self._busy(start, end), start, end, duration_s, self.hours)

    def book(self, request: BookingRequest, idempotency_key: str) -> Booking:
        self._within_hours(request.start, request.end)
        event_id = event_id_for(idempotency_key)
        if any(overlaps(request.start, request.end, b, e) for b, e in self._busy(request.start, request.end)):
            # Busy may be this very booking, made by an earlier attempt with the same key.
            existing = self._event_or_none(event_id)
            if existing is not None and existing.get("status") != "cancelled":
                return self._booking(existing)
            raise ConnectorError(FailureKind.CONFLICT, f"{VENDOR}: {self._span(request.start, request.end)} is busy")
        body = {
            "id": event_id,
            "summary": request.title,
            "description": _description(request),
            "start": self._local(request.start),
            "end": self._local(request.end),
        }
        try:
            event = self._execute(self._events().insert(calendarId=self.calendar_id, body=body), "events.insert")
        except GoogleApiError as failure:
            if failure.status != 409 or "duplicate" not in failure.reasons:
                raise
            # Made by an attempt with the same key that landed after this one's freeBusy.
            event = self._execute(self._events().get(calendarId=self.calendar_id, eventId=event_id), "events.get")
        return self._booking(event)

    def reschedule(self, booking_id: str, start: datetime, end: datetime, idempotency_key: str) -> Booking:
        event = self._execute(self._events().get(calendarId=self.calendar_id, eventId=booking_id), "events.get")
        if event.get("status") == "cancelled":
            raise ConnectorError(FailureKind.CONFLICT, f"{VENDOR}: event {booking_id} was cancelled")
        current = self._booking(event)
        if current.start == start and current.end == end:
            return current  # moved by an earlier attempt with this key, or asked to stay where it is
        self._within_hours(start, end)
        for other in self._events_between(start, end):
            if other.get("id") != booking_id and _blocks(other) and overlaps(
                    start, end, self._time(other, "start"), self._time(other, "end")):
                raise ConnectorError(FailureKind.CONFLICT, f"{VENDOR}: {self._span(start, end)} is busy")
        patch = self._events().patch(calendarId=self.calendar_id, eventId=booking_id,
                                     body={"start": self._local(start), "end": self._local(end)})
        if "etag" in event:
            patch.headers["If-Match"] = event["etag"]  # a change since the get answers 412: CONFLICT
        return self._booking(self._execute(patch, "events.patch"))

    def cancel(self, booking_id: str, idempotency_key: str) -> None:
        try:
            self._execute(self._events().delete(calendarId=self.calendar_id, eventId=booking_id), "events.delete")
        except GoogleApiError as failure:
            if failure.status != 410:  # 410 Gone: deleted already, by an earlier attempt or by hand
                raise

    def check(self) -> list[CheckResult]:
        who = self._credentials.service_account_email + (f" as {self.delegated_user}" if self.delegated_user else "")
        try:
            self._credentials.refresh(google_auth_httplib2.Request(self._http.http))
        except RefreshError as exc:
            hint = " and the domain-wide delegation of the calendar scope" if self.delegated_user else ""
            return [CheckResult("sign-in", False, f"the token endpoint refused {who} ({_refusal(exc)}): check the "
                                                  f"service account key{hint}")]
        except (TransportError, OSError, httplib2.HttpLib2Error, http.client.HTTPException) as exc:
            return [CheckResult("reach", False, f"the token endpoint cannot be reached ({type(exc).__name__})")]
        results = [CheckResult("sign-in", True, f"{who} got an access token")]
        try:
            entry = self._execute(self._service.calendarList().get(calendarId=self.calendar_id), "calendarList.get")
        except ConnectorError as failure:
            if failure.status != 404:
                return [*results, CheckResult("calendar", False, _plain(failure, self.calendar_id, who))]
        else:
            role = str(entry.get("accessRole", ""))
            return [*results, CheckResult("calendar", True, f"{self.calendar_id} is in {who}'s calendar list"),
                    CheckResult("write access", role in WRITE_ROLES,
                                f"access role {role or 'unknown'}" + ("" if role in WRITE_ROLES else
                                f": bookings need writer or owner (share the calendar with {who} with "
                                "'Make changes to events')"))]
        try:
            self._execute(self._service.calendars().get(calendarId=self.calendar_id), "calendars.get")
        except ConnectorError as failure:
            return [*results, CheckResult("calendar", False, _plain(failure, self.calendar_id, who))]
        return [*results, CheckResult("calendar", True, f"{self.calendar_id} is readable, but not in {who}'s "
                                      "calendar list, so its access role (writer or owner needed) was not read")]

    # -- the API ------------------------------------------------------------------------------------

    def _events(self) -> Any:
        return self._service.events()

    def _execute(self, request: Any, what: str) -> dict[str, Any]:
        """Runs one request of the client (no retries: the worker retries); its answer, or the error."""
        try:
            answer = request.execute()
        except HttpError as exc:
            raise api_failure(exc.resp.status, exc.content, exc.resp.get("retry-after")) from exc
        except RefreshError as exc:
            kind = FailureKind.UNAVAILABLE if exc.retryable else FailureKind.AUTH
            raise ConnectorError(kind, f"{VENDOR}: the token endpoint refused the service account "
                                       f"({_refusal(exc)})") from exc
        except (TransportError, OSError, httplib2.HttpLib2Error, http.client.HTTPException) as exc:
            # Timeouts (socket.timeout is an OSError), refused or dropped connections, unknown hosts.
            raise ConnectorError(FailureKind.UNAVAILABLE, f"{VENDOR}: {what} got no answer "
                                 f"({type(exc).__name__})") from exc
        except ValueError as exc:  # the client's JSON model could not read a 2xx body
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {what} answered something that is not "
                                 "the API's JSON object") from exc
        if answer in ("", None):
            return {}  # 204 No Content (events.delete)
        if not isinstance(answer, dict):  # the client hands a body that is not JSON over as text
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: {what} answered something that is not "
                                 "the API's JSON object")
        return answer

    def _busy(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        body = {"timeMin": rfc3339(start), "timeMax": rfc3339(end), "timeZone": self.hours.timezone,
                "items": [{"id": self.calendar_id}]}
        answer = self._execute(self._service.freebusy().query(body=body), "freeBusy")
        try:
            calendar = answer["calendars"][self.calendar_id]
            errors = [str(e.get("reason", "")) for e in calendar.get("errors", [])]
            busy = [(datetime.fromisoformat(b["start"]), datetime.fromisoformat(b["end"])) for b in calendar["busy"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: freeBusy answered without the calendar's "
                                 "busy times") from exc
        if "notFound" in errors:
            raise ConnectorError(FailureKind.CONFIGURATION, f"{VENDOR}: calendar {self.calendar_id} was not found, "
                                 "or is not shared with the service account")
        if errors:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"{VENDOR}: freeBusy could not read the calendar "
                                 f"({', '.join(errors)})")
        if any(b.tzinfo is None for pair in busy for b in pair):
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: freeBusy answered times without offsets")
        return busy

    def _events_between(self, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
        """Every event overlapping [start, end), recurring ones expanded, page by page (nextPageToken)."""
        events = self._events()
        request = events.list(calendarId=self.calendar_id, timeMin=rfc3339(start), timeMax=rfc3339(end),
                              singleEvents=True, orderBy="startTime")
        while request is not None:
            page = self._execute(request, "events.list")
            items = page.get("items", [])
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: events.list answered items that are "
                                     "not events")
            yield from items
            request = events.list_next(request, page)

    def _event_or_none(self, event_id: str) -> dict[str, Any] | None:
        try:
            return self._execute(self._events().get(calendarId=self.calendar_id, eventId=event_id), "events.get")
        except GoogleApiError as failure:
            if failure.status == 404:
                return None
            raise

    # -- values -------------------------------------------------------------------------------------

    def _within_hours(self, start: datetime, end: datetime) -> None:
        if start.tzinfo is None or end.tzinfo is None:
            raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: booking times need a timezone")
        if not self.hours.is_open(start, end):
            raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: {self._span(start, end)} is outside the opening "
                                 f"hours ({', '.join(self.hours.days)} {self.hours.opens:%H:%M}-"
                                 f"{self.hours.closes:%H:%M} {self.hours.timezone})")

    def _local(self, moment: datetime) -> dict[str, str]:
        """An event time as Google takes it: the calendar's local time with its offset, and its zone."""
        return {"dateTime": moment.astimezone(self.hours.zone).isoformat(), "timeZone": self.hours.timezone}

    def _span(self, start: datetime, end: datetime) -> str:
        local_start, local_end = start.astimezone(self.hours.zone), end.astimezone(self.hours.zone)
        return f"{local_start:%Y-%m-%d %H:%M}-{local_end:%H:%M} {self.hours.timezone}"

    def _time(self, event: dict[str, Any], which: str) -> datetime:
        try:
            return event_time(event[which], self.hours)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: an event without a readable {which} "
                                 "time") from exc

    def _booking(self, event: dict[str, Any]) -> Booking:
        if not isinstance(event.get("id"), str):
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"{VENDOR}: an event without an id")
        start, end = self._time(event, "start"), self._time(event, "end")
        return Booking(id=event["id"], start=start.astimezone(self.hours.zone), end=end.astimezone(self.hours.zone),
                       title=str(event.get("summary", "")), url=str(event.get("htmlLink", "")))


def _blocks(event: dict[str, Any]) -> bool:
    """Whether an event makes its time busy: not cancelled, and not marked "free" (transparent)."""
    return event.get("status") != "cancelled" and event.get("transparency") != "transparent"


def _description(request: BookingRequest) -> str:
    # The caller goes into the text, not into `attendees`: a service account without domain-wide
    # delegation may not invite attendees (403 forbiddenForServiceAccounts).
    caller = ", ".join(part for part in (request.attendee_name, request.attendee_phone, request.attendee_email) if part)
    lines = [request.description] if request.description else []
    if caller:
        lines.append(f"Caller: {caller}")
    return "\n".join(lines)


def _refusal(exc: RefreshError) -> str:
    """The token endpoint's own words (`invalid_grant: Invalid JWT Signature.`), never the assertion."""
    return str(exc.args[0])[:200] if exc.args else "refused"


def _plain(failure: ConnectorError, calendar_id: str, who: str) -> str:
    if failure.kind is FailureKind.AUTH:
        return f"the access token was refused (401): check that {who} may use the Calendar API"
    if failure.kind is FailureKind.SCOPE:
        return f"{who} may not read calendar {calendar_id} (403): share it with the account, or delegate the scope"
    if failure.kind is FailureKind.NOT_FOUND:
        return f"calendar {calendar_id} was not found for {who} (404): check calendar_id and its sharing"
    return str(failure)


def connect(settings: GoogleCalendarSettings, secrets: Secrets, timeout_s: float) -> GoogleCalendarConnector:
    return GoogleCalendarConnector(
        calendar_id=settings.calendar_id,
        service_account_key=secrets.resolve(settings.service_account, "Google Calendar service account key"),
        hours=settings.hours, timeout_s=timeout_s, delegated_user=settings.delegated_user, base_url=settings.base_url)

