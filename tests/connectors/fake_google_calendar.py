"""A local Google Calendar API v3 and Google OAuth 2.0 token endpoint on 127.0.0.1, written from
Google's public references ("Using OAuth 2.0 for Server to Server Applications", the Calendar API's
Events, FreeBusy, CalendarList and Calendars references, "Handle API errors"), so that the real
google-api-python-client and google-auth can be driven against their own wire protocol.

- `POST /token`: the JWT bearer grant. The assertion is verified as Google verifies it: RS256 with the
  service account's public key (its `kid` the key's id), `iss` the account's email, `aud` Google's
  token endpoint, a `scope`, and a `sub` only for users delegation was granted for. Answers an access
  token that lives `token_lifetime_s`.
- `/calendar/v3/...`: calendarList.get, calendars.get, freeBusy, and events insert (with a client-chosen
  id: 409 duplicate for one taken, deleted ones included), get, list (timeMin/timeMax, pageToken
  pagination at `page_size`), patch (If-Match: 412 on a stale ETag) and delete (410 for one deleted).
  Every request needs a live access token with the calendar scope; errors use Google's body shape.

Faults (the harness protocol's `WireFaults`) apply to API requests, never to token requests.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import jwt

from tests.connectors.vendor_server import Answer, Fault, SeenRequest, VendorServer

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
API_PREFIX = "/calendar/v3/"
EVENT_ID = re.compile(r"^[a-v0-9]{5,1024}$")

STATUS_REASONS = {400: ("badRequest", "Bad Request"), 401: ("authError", "Invalid Credentials"),
                  403: ("forbidden", "Forbidden"), 404: ("notFound", "Not Found"),
                  409: ("conflict", "Conflict"), 410: ("deleted", "Resource has been deleted"),
                  412: ("conditionNotMet", "Precondition Failed"), 422: ("invalid", "Unprocessable"),
                  429: ("rateLimitExceeded", "Rate Limit Exceeded"), 500: ("backendError", "Backend Error"),
                  502: ("backendError", "Bad Gateway"), 503: ("backendError", "Service Unavailable")}


def google_error(status: int, reason: str | None = None, message: str | None = None) -> str:
    """Google's error body: `{"error": {"code", "message", "errors": [{"domain", "reason", "message"}]}}`."""
    default_reason, default_message = STATUS_REASONS.get(status, ("unknown", "Error"))
    reason, message = reason or default_reason, message or default_message
    domain = "usageLimits" if "Limit" in reason or reason == "quotaExceeded" else "global"
    return json.dumps({"error": {"code": status, "message": message,
                                 "errors": [{"domain": domain, "reason": reason, "message": message}]}})


@dataclass
class StoredEvent:
    id: str
    summary: str
    description: str
    start: datetime
    end: datetime
    time_zone: str
    etag_version: int
    status: str = "confirmed"
    transparency: str = "opaque"
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def blocks(self) -> bool:
        return self.status != "cancelled" and self.transparency != "transparent"

    def resource(self, calendar_id: str) -> dict[str, Any]:
        zone = ZoneInfo(self.time_zone)
        stamp = self.created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "kind": "calendar#event", "etag": f'"{self.etag_version}"', "id": self.id, "status": self.status,
            "htmlLink": f"https://www.google.com/calendar/event?eid={self.id}", "created": stamp, "updated": stamp,
            "summary": self.summary, "description": self.description, "transparency": self.transparency,
            "organizer": {"email": calendar_id, "self": True},
            "start": {"dateTime": self.start.astimezone(zone).isoformat(), "timeZone": self.time_zone},
            "end": {"dateTime": self.end.astimezone(zone).isoformat(), "timeZone": self.time_zone},
            "iCalUID": f"{self.id}@google.com", "sequence": self.etag_version - 1, "eventType": "default",
        }


def _answer(status: int, body: str = "", headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, body, {"Content-Type": "application/json; charset=UTF-8", **(headers or {})})


class FakeGoogleCalendar(VendorServer):
    """One calendar (`calendar_id`, in `time_zone`) that one service account may use."""

    methods = ("GET", "POST", "PATCH", "PUT", "DELETE")
    keep_blank_query_values = False

    def __init__(self, *, calendar_id: str, time_zone: str, client_email: str, key_id: str, public_key_pem: bytes,
                 delegated_users: frozenset[str] = frozenset(), access_role: str = "owner", page_size: int = 250,
                 token_lifetime_s: int = 3600) -> None:
        super().__init__()
        self.calendar_id = calendar_id
        self.time_zone = time_zone
        self.client_email = client_email
        self.key_id = key_id
        self.public_key_pem = public_key_pem
        self.delegated_users = delegated_users
        self.access_role = access_role
        self.page_size = page_size
        self.token_lifetime_s = token_lifetime_s
        self.token_grants: list[dict[str, Any]] = []
        """The verified claims of every assertion a token was issued for."""
        self.issued_tokens: list[str] = []
        self._stored: dict[str, StoredEvent] = {}
        self._live_tokens: dict[str, list[str]] = {}
        """Access tokens that work, with the scopes each was granted."""

    @property
    def base_url(self) -> str:
        """What the connector's `base_url` is set to (Google's is `https://www.googleapis.com/`)."""
        return f"{self.origin}/"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}token"

    # -- the test's side ----------------------------------------------------------------------------

    def add_event(self, start: datetime, end: datetime, summary: str, *, transparency: str = "opaque") -> str:
        with self._lock:
            event = StoredEvent(id=secrets.token_hex(13), summary=summary,
                                description="", start=start, end=end, time_zone=self.time_zone, etag_version=1,
                                transparency=transparency)
            self._stored[event.id] = event
            return event.id

    def events(self) -> list[StoredEvent]:
        """The calendar's events, deleted ones excepted, earliest first."""
        with self._lock:
            return sorted((e for e in self._stored.values() if e.status != "cancelled"), key=lambda e: e.start)

    def event(self, event_id: str) -> StoredEvent:
        with self._lock:
            return self._stored[event_id]

    def revoke_tokens(self) -> None:
        """Every access token issued so far stops working (as when Google revokes or expires them early)."""
        with self._lock:
            self._live_tokens.clear()

    def api_requests(self, method: str, path_suffix: str) -> list[SeenRequest]:
        """The API requests of this method whose path ends with `path_suffix` (`/events`, `freeBusy`)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    # -- the wire -----------------------------------------------------------------------------------

    def unfaulted(self, request: SeenRequest) -> Answer | None:
        """Token requests: never faulted, never in `requests` (they are in `token_grants`)."""
        if request.path == "/token" and request.method == "POST":
            with self._lock:
                return self._token(request)
        return None

    def error_body(self, status: int) -> str:
        return google_error(status)

    def malformed_answer(self, fault: Fault) -> Answer:
        return _answer(200, "<html><body>Service temporarily overloaded</body></html>", {"Content-Type": "text/html"})

    def respond(self, request: SeenRequest) -> Answer:
        with self._lock:
            return self._api(request)

    def _token(self, request: SeenRequest) -> Answer:
        form = parse_qs(request.body.decode())
        if form.get("grant_type", [""])[0] != JWT_BEARER_GRANT:
            return _answer(400, json.dumps({"error": "unsupported_grant_type",
                                            "error_description": "Invalid grant_type"}))
        assertion = form.get("assertion", [""])[0]
        try:
            if jwt.get_unverified_header(assertion).get("kid") != self.key_id:
                raise jwt.InvalidTokenError("unknown key id")
            claims = jwt.decode(assertion, self.public_key_pem, algorithms=["RS256"], audience=GOOGLE_TOKEN_AUDIENCE,
                                issuer=self.client_email, options={"require": ["iat", "exp", "iss", "aud", "scope"]})
        except jwt.InvalidTokenError:
            return _answer(400, json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
        if "sub" in claims and claims["sub"] not in self.delegated_users:
            return _answer(401, json.dumps({
                "error": "unauthorized_client",
                "error_description": "Client is unauthorized to retrieve access tokens using this method, or client "
                                     "not authorized for any of the scopes requested."}))
        token = f"ya29.{secrets.token_urlsafe(24)}"
        self.token_grants.append(claims)
        self.issued_tokens.append(token)
        self._live_tokens[token] = str(claims["scope"]).split()
        return _answer(200, json.dumps({"access_token": token, "expires_in": self.token_lifetime_s,
                                        "token_type": "Bearer"}))

    def _api(self, request: SeenRequest) -> Answer:
        authorization = request.headers.get("authorization", "")
        if not authorization.startswith("Bearer ") or authorization[7:] not in self._live_tokens:
            return _answer(401, google_error(401, "authError", "Request had invalid authentication credentials. "
                                             "Expected OAuth 2 access token, login cookie or other valid "
                                             "authentication credential."), {"WWW-Authenticate": 'Bearer realm="x"'})
        if CALENDAR_SCOPE not in self._live_tokens[authorization[7:]]:
            return _answer(403, google_error(403, "insufficientPermissions",
                                             "Request had insufficient authentication scopes."))
        if not request.path.startswith(API_PREFIX):
            return _answer(404, google_error(404))
        route = request.path[len(API_PREFIX):].split("/")
        match request.method, route:
            case "POST", ["freeBusy"]:
                return self._free_busy(request.json())
            case "GET", ["users", "me", "calendarList", calendar_id]:
                if calendar_id != self.calendar_id:
                    return _answer(404, google_error(404))
                return _answer(200, json.dumps({"kind": "calendar#calendarListEntry", "id": calendar_id,
                                                "summary": "Front desk", "timeZone": self.time_zone,
                                                "accessRole": self.access_role}))
            case "GET", ["calendars", calendar_id]:
                if calendar_id != self.calendar_id:
                    return _answer(404, google_error(404))
                return _answer(200, json.dumps({"kind": "calendar#calendar", "id": calendar_id,
                                                "summary": "Front desk", "timeZone": self.time_zone}))
            case _, ["calendars", calendar_id, "events", *_] if calendar_id != self.calendar_id:
                return _answer(404, google_error(404))
            case "POST", ["calendars", _, "events"]:
                return self._insert(request.json())
            case "GET", ["calendars", _, "events"]:
                return self._list(request)
            case "GET", ["calendars", _, "events", event_id]:
                event = self._stored.get(event_id)
                return _answer(200, self._resource(event)) if event else _answer(404, google_error(404))
            case "PATCH", ["calendars", _, "events", event_id]:
                return self._patch(event_id, request)
            case "DELETE", ["calendars", _, "events", event_id]:
                return self._delete(event_id)
        return _answer(404, google_error(404))

    def _resource(self, event: StoredEvent) -> str:
        return json.dumps(event.resource(self.calendar_id))

    def _free_busy(self, body: dict[str, Any]) -> Answer:
        time_min, time_max = _moment(body["timeMin"]), _moment(body["timeMax"])
        if time_max <= time_min:
            return _answer(400, google_error(400, "timeRangeEmpty", "The specified time range is empty."))
        calendars: dict[str, Any] = {}
        for item in body.get("items", []):
            if item["id"] != self.calendar_id:
                calendars[item["id"]] = {"errors": [{"domain": "global", "reason": "notFound"}], "busy": []}
                continue
            spans = sorted((max(e.start, time_min), min(e.end, time_max)) for e in self._stored.values()
                           if e.blocks() and e.start < time_max and time_min < e.end)
            merged: list[tuple[datetime, datetime]] = []
            for start, end in spans:
                if merged and start <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            calendars[item["id"]] = {"busy": [{"start": _z(s), "end": _z(e)} for s, e in merged]}
        return _answer(200, json.dumps({"kind": "calendar#freeBusy", "timeMin": _z(time_min), "timeMax": _z(time_max),
                                        "calendars": calendars}))

    def _insert(self, body: dict[str, Any]) -> Answer:
        event_id = body.get("id") or secrets.token_hex(13)
        if not EVENT_ID.match(event_id):
            return _answer(400, google_error(400, "invalid", "Invalid resource id value."))
        if event_id in self._stored:
            return _answer(409, google_error(409, "duplicate", "The requested identifier already exists."))
        try:
            start, end = _moment(body["start"]["dateTime"]), _moment(body["end"]["dateTime"])
        except (KeyError, TypeError, ValueError):
            return _answer(400, google_error(400, "required", "Missing end time."))
        if end <= start:
            return _answer(400, google_error(400, "timeRangeEmpty", "The specified time range is empty."))
        event = StoredEvent(id=event_id, summary=str(body.get("summary", "")),
                            description=str(body.get("description", "")), start=start, end=end,
                            time_zone=str(body["start"].get("timeZone") or self.time_zone), etag_version=1,
                            transparency=str(body.get("transparency", "opaque")))
        self._stored[event_id] = event
        return _answer(200, self._resource(event))

    def _list(self, request: SeenRequest) -> Answer:
        time_min = _moment(request.param("timeMin")) if request.param("timeMin") else None
        time_max = _moment(request.param("timeMax")) if request.param("timeMax") else None
        matching = sorted((e for e in self._stored.values()
                           if (e.status != "cancelled" or request.param("showDeleted") == "true")
                           and (time_min is None or e.end > time_min) and (time_max is None or e.start < time_max)),
                          key=lambda e: (e.start, e.id))
        size = min(int(request.param("maxResults") or self.page_size), self.page_size)
        token = request.param("pageToken")
        offset = int(token.removeprefix("page-")) if token else 0
        page: dict[str, Any] = {"kind": "calendar#events", "summary": "Front desk", "timeZone": self.time_zone,
                                "items": [e.resource(self.calendar_id) for e in matching[offset:offset + size]]}
        if offset + size < len(matching):
            page["nextPageToken"] = f"page-{offset + size}"
        return _answer(200, json.dumps(page))

    def _patch(self, event_id: str, request: SeenRequest) -> Answer:
        event = self._stored.get(event_id)
        if event is None:
            return _answer(404, google_error(404))
        if_match = request.headers.get("if-match")
        if if_match is not None and if_match != f'"{event.etag_version}"':
            return _answer(412, google_error(412))
        body = request.json()
        if "start" in body:
            event.start = _moment(body["start"]["dateTime"])
        if "end" in body:
            event.end = _moment(body["end"]["dateTime"])
        for name in ("summary", "description"):
            if name in body:
                setattr(event, name, str(body[name]))
        event.etag_version += 1
        return _answer(200, self._resource(event))

    def _delete(self, event_id: str) -> Answer:
        event = self._stored.get(event_id)
        if event is None:
            return _answer(404, google_error(404))
        if event.status == "cancelled":
            return _answer(410, google_error(410))
        event.status = "cancelled"
        event.etag_version += 1
        return _answer(204)


def _moment(text: str | None) -> datetime:
    moment = datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        raise ValueError("an RFC 3339 time needs an offset")
    return moment


def _z(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
