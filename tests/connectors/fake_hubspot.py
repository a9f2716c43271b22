"""HubSpot's CRM v3 on 127.0.0.1: contacts and calls, their search, and HubSpot's errors, written from
HubSpot's public API reference (CRM objects, "Search the CRM", "Calls", "API usage guidelines and
limits") so that the real `hubspot-api-client` SDK can be tested against its own wire protocol.

What it speaks:
- `GET /crm/v3/objects/{contacts|calls}?limit&after&properties`: a page, `paging.next.after` a cursor.
- `POST /crm/v3/objects/{contacts|calls}/search`: `filterGroups` (OR-ed groups of AND-ed filters; at
  most 5 groups, 6 filters a group, 18 in all; the `EQ` operator, case-insensitive as HubSpot's is),
  one sort `{propertyName, direction}`, `limit` (at most 200), `after` (an offset); `total`, `results`
  and `paging.next.after` only where more results follow. Requested properties a record lacks come
  back as null, as HubSpot's do.
- `POST /crm/v3/objects/{contacts|calls}`: 201 and the record; a call needs `hs_timestamp` and may carry
  `associations` (call to contact: `HUBSPOT_DEFINED` type 194). A contact's email is unique: 409
  "Contact already exists. Existing ID: N".
- `PATCH /crm/v3/objects/{contacts|calls}/{id}`: the record, or 404.
- Auth: `Authorization: Bearer <token>`, else 401; each route needs its private-app scope (calls use the
  contacts scopes, as HubSpot's calls API does), else 403 whose body names the scope
  (`errors[].context.requiredGranularScopes`).
- Errors: `{"status": "error", "message", "correlationId", "category"}`; 429 with HubSpot's rate-limit
  body (`errorType: RATE_LIMIT`, `policyName`) and `X-HubSpot-RateLimit-*` headers.

Where it is simpler than HubSpot: search is consistent at once (HubSpot's index lags a few seconds behind
a write), and `hs_calculated_phone_number` / `hs_calculated_mobile_number` (HubSpot's E.164 readings of
`phone` and `mobilephone`) are read as US numbers where they have no country code (HubSpot uses the
contact's country or the account's default).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import phonenumbers

from tests.connectors.vendor_server import Answer, Fault, SeenRequest, VendorServer

CONTACTS_READ = "crm.objects.contacts.read"
CONTACTS_WRITE = "crm.objects.contacts.write"
ALL_SCOPES = frozenset({CONTACTS_READ, CONTACTS_WRITE})

CALL_TO_CONTACT = 194
"""HubSpot's default (`HUBSPOT_DEFINED`) association type from a call to a contact."""

OBJECT_TYPES = ("contacts", "calls")
DEFAULT_PROPERTIES = {
    "contacts": ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"),
    "calls": ("hs_createdate", "hs_lastmodifieddate", "hs_object_id"),
}
"""What a read or search returns when it names no properties (HubSpot's defaults per object)."""
ALWAYS_RETURNED = {
    "contacts": ("createdate", "hs_object_id", "lastmodifieddate"),
    "calls": ("hs_createdate", "hs_lastmodifieddate", "hs_object_id"),
}
MODIFIED = {"contacts": "lastmodifieddate", "calls": "hs_lastmodifieddate"}
CREATED = {"contacts": "createdate", "calls": "hs_createdate"}
CALCULATED_PHONES = {"phone": "hs_calculated_phone_number", "mobilephone": "hs_calculated_mobile_number"}
CALL_DIRECTIONS = frozenset({"INBOUND", "OUTBOUND"})
CALL_STATUSES = frozenset({"BUSY", "CALLING_CRM_USER", "CANCELED", "COMPLETED", "CONNECTING", "FAILED",
                           "IN_PROGRESS", "MISSED", "NO_ANSWER", "QUEUED", "RINGING"})

SEARCH_MAX_LIMIT = 200
LIST_MAX_LIMIT = 100
MAX_FILTER_GROUPS, MAX_FILTERS_PER_GROUP, MAX_FILTERS = 5, 6, 18

CATEGORIES = {400: "VALIDATION_ERROR", 401: "INVALID_AUTHENTICATION", 403: "MISSING_SCOPES",
              404: "OBJECT_NOT_FOUND", 409: "CONFLICT", 422: "VALIDATION_ERROR"}
MESSAGES = {
    400: "Invalid input JSON on line 1, column 1: Cannot build PublicObjectSearchRequest",
    401: ("Authentication credentials not found. This API supports OAuth 2.0 authentication and you can "
          "find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview"),
    403: ("This app hasn't been granted all required scopes to make this call. Read more about required "
          "scopes here: https://developers.hubspot.com/scopes."),
    404: "resource not found",
    409: "Conflict: the object was changed by another request",
    422: "Property values were not valid",
}
MALFORMED = b'{"total": 1, "results": [{"id": "'
"""A 200 body cut off mid-JSON, as a proxy that drops the connection leaves it."""


@dataclass
class Record:
    """A contact or a call as HubSpot keeps it."""

    id: str
    properties: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    associations: list[tuple[str, str, int]] = field(default_factory=list)
    """(object type, id, association type id) of what it is associated with."""

    def wire(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The record as the API answers it, with `names` (null where unset), or every property set."""
        properties = dict(self.properties) if names is None else {name: self.properties.get(name) for name in names}
        return {"id": self.id, "properties": properties, "createdAt": _iso(self.created_at),
                "updatedAt": _iso(self.updated_at), "archived": False}


class HubSpotError(Exception):
    """An answer with HubSpot's error body."""

    def __init__(self, status: int, message: str, *, category: str | None = None,
                 extra: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"status": "error", "message": message, "correlationId": str(uuid.uuid4())}
        if category is not None:
            self.body["category"] = category
        self.body.update(extra or {})
        self.headers = dict(headers or {})


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_for(status: int, *, scope: str = CONTACTS_READ) -> HubSpotError:
    """HubSpot's own error for `status` (`scope`: what a 403 says is missing)."""
    if status == 403:
        return HubSpotError(403, MESSAGES[403], category="MISSING_SCOPES", extra={
            "errors": [{"message": "One or more of the following scopes are required.",
                        "context": {"requiredGranularScopes": [scope]}}],
            "links": {"scopes": "https://developers.hubspot.com/scopes"}})
    if status == 429:
        return HubSpotError(429, "You have reached your ten_secondly_rolling limit.", extra={
            "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING",
            "groupName": "publicapi:private-app"}, headers={
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000", "X-HubSpot-RateLimit-Max": "100",
            "X-HubSpot-RateLimit-Remaining": "0"})
    if status >= 500:
        return HubSpotError(status, "internal error", category="INTERNAL_ERROR")
    return HubSpotError(status, MESSAGES.get(status, "request refused"), category=CATEGORIES.get(status))


def calculated_phone(number: str) -> str | None:
    """HubSpot's E.164 reading of a phone property (US where the number has no country code)."""
    try:
        parsed = phonenumbers.parse(number, "US")
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class FakeHubSpot(VendorServer):
    """`with FakeHubSpot(token) as hubspot:` serves on `hubspot.base_url` until the block ends; state
    (records, faults, `requests`) in memory. `granted_scopes` are the private app's scopes."""

    methods = ("GET", "POST", "PATCH", "DELETE")
    keep_blank_query_values = False

    def __init__(self, token: str, scopes: Iterable[str] = ALL_SCOPES) -> None:
        super().__init__()
        self.token = token
        self.granted_scopes = set(scopes)
        self.records: dict[str, dict[str, Record]] = {kind: {} for kind in OBJECT_TYPES}
        self._next_id = 1001
        self._clock = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    # -- what a test puts in or reads out -------------------------------------------------------------

    def add_contact(self, properties: Mapping[str, Any], *, modified_at: datetime | None = None) -> str:
        """A contact put in directly, its properties as they are (null or numbers included)."""
        with self._lock:
            record = self._create("contacts", dict(properties))
            if modified_at is not None:
                record.updated_at = modified_at
                record.properties["lastmodifieddate"] = _iso(modified_at)
            return record.id

    def records_of(self, kind: str) -> list[Record]:
        """Every contact or call (`kind`: `contacts`, `calls`), oldest first."""
        with self._lock:
            return list(self.records[kind].values())

    def calls_of(self, contact_id: str) -> list[Record]:
        """The calls associated with the contact (call to contact, type 194)."""
        return [call for call in self.records_of("calls")
                if ("contacts", contact_id, CALL_TO_CONTACT) in call.associations]

    # -- serving --------------------------------------------------------------------------------------

    def failure_answer(self, fault: Fault, request: SeenRequest) -> Answer:
        assert fault.status is not None
        error = error_for(fault.status, scope=_scope_of(request.method, request.path))
        body = fault.body.encode() if fault.body is not None else json.dumps(error.body).encode()
        return _answer(fault.status, body, {**error.headers, **fault.headers})

    def malformed_answer(self, fault: Fault) -> Answer:
        return _answer(200, MALFORMED)

    def respond(self, request: SeenRequest) -> Answer:
        try:
            status, body = self._route(request)
        except HubSpotError as error:
            return _answer(error.status, json.dumps(error.body).encode(), error.headers)
        except (TypeError, ValueError, AttributeError) as error:  # a body this fake cannot read
            failed = HubSpotError(400, f"Invalid input: {error}", category="VALIDATION_ERROR")
            return _answer(400, json.dumps(failed.body).encode())
        return _answer(status, json.dumps(body).encode())

    def _route(self, request: SeenRequest) -> tuple[int, Any]:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            raise error_for(401)
        parts = request.path.strip("/").split("/")
        if parts[:3] != ["crm", "v3", "objects"] or len(parts) not in (4, 5) or parts[3] not in OBJECT_TYPES:
            raise HubSpotError(404, f"Unable to infer object type from: {request.path}")
        scope = _scope_of(request.method, request.path)
        if scope not in self.granted_scopes:
            raise error_for(403, scope=scope)
        kind, rest = parts[3], parts[4] if len(parts) == 5 else None
        with self._lock:
            if request.method == "GET" and rest is None:
                return 200, self._page(kind, request.query)
            if request.method == "POST" and rest == "search":
                return 200, self._search(kind, _json_body(request))
            if request.method == "POST" and rest is None:
                return 201, self._create_from(kind, _json_body(request)).wire()
            if request.method == "PATCH" and rest is not None:
                return 200, self._update(kind, rest, _json_body(request)).wire()
        raise HubSpotError(405, f"{request.method} is not supported on {request.path}")

    # -- the CRM --------------------------------------------------------------------------------------

    def _tick(self) -> datetime:
        """The time of a write: the wall clock, but always later than the write before (ties would make
        "the most recently changed" ambiguous)."""
        self._clock = max(datetime.now(UTC), self._clock + timedelta(milliseconds=1))
        return self._clock

    def _create(self, kind: str, properties: dict[str, Any]) -> Record:
        now = self._tick()
        record_id = str(self._next_id)
        self._next_id += 1
        record = Record(record_id, {}, now, now)
        record.properties.update(properties)
        record.properties.update({"hs_object_id": record_id, CREATED[kind]: _iso(now), MODIFIED[kind]: _iso(now)})
        self._calculate(kind, record)
        self.records[kind][record_id] = record
        return record

    def _calculate(self, kind: str, record: Record) -> None:
        if kind != "contacts":
            return
        for source, calculated in CALCULATED_PHONES.items():
            value = record.properties.get(source)
            record.properties[calculated] = calculated_phone(value) if isinstance(value, str) else None

    def _create_from(self, kind: str, body: Mapping[str, Any]) -> Record:
        properties = _properties_of(body)
        associations = self._associations_of(kind, body.get("associations", []))
        if kind == "contacts":
            self._unique_email(properties, None)
        else:
            _valid_call(properties)
        record = self._create(kind, properties)
        record.associations.extend(associations)
        return record

    def _update(self, kind: str, record_id: str, body: Mapping[str, Any]) -> Record:
        record = self.records[kind].get(record_id)
        if record is None:
            raise error_for(404)
        properties = _properties_of(body)
        if kind == "contacts":
            self._unique_email(properties, record_id)
        record.properties.update(properties)
        record.updated_at = self._tick()
        record.properties[MODIFIED[kind]] = _iso(record.updated_at)
        self._calculate(kind, record)
        return record

    def _unique_email(self, properties: Mapping[str, Any], own_id: str | None) -> None:
        email = properties.get("email")
        if not email:
            return
        for other in self.records["contacts"].values():
            if other.id != own_id and str(other.properties.get("email") or "").casefold() == email.casefold():
                raise HubSpotError(409, f"Contact already exists. Existing ID: {other.id}", category="CONFLICT")

    def _associations_of(self, kind: str, associations: Any) -> list[tuple[str, str, int]]:
        if not isinstance(associations, list):
            raise HubSpotError(400, "associations must be a list", category="VALIDATION_ERROR")
        found: list[tuple[str, str, int]] = []
        for association in associations:
            to_id = str((association.get("to") or {}).get("id", ""))
            types = association.get("types") or []
            if kind != "calls" or to_id not in self.records["contacts"]:
                raise HubSpotError(400, "One or more associations are invalid", category="VALIDATION_ERROR",
                                   extra={"context": {"toObjectId": [to_id]}})
            for spec in types:
                if (spec.get("associationCategory"), spec.get("associationTypeId")) != ("HUBSPOT_DEFINED",
                                                                                        CALL_TO_CONTACT):
                    raise HubSpotError(400, f"Association type {spec} is not valid from calls to contacts",
                                       category="VALIDATION_ERROR")
                found.append(("contacts", to_id, CALL_TO_CONTACT))
        return found

    def _page(self, kind: str, query: Mapping[str, list[str]]) -> dict[str, Any]:
        limit = _bounded(query.get("limit", ["10"])[0], LIST_MAX_LIMIT)
        after = query.get("after", [None])[0]
        names = [n for value in query.get("properties", []) for n in value.split(",") if n]
        records = sorted(self.records[kind].values(), key=lambda r: int(r.id))
        if after is not None:
            records = [r for r in records if int(r.id) > int(after)]
        page = records[:limit]
        returned = [*names, *ALWAYS_RETURNED[kind]] if names else list(DEFAULT_PROPERTIES[kind])
        answer: dict[str, Any] = {"results": [r.wire(returned) for r in page]}
        if len(records) > limit:
            answer["paging"] = {"next": {"after": page[-1].id, "link": f"?after={page[-1].id}"}}
        return answer

    def _search(self, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
        groups = body.get("filterGroups") or []
        _valid_filter_groups(groups)
        limit = _bounded(body.get("limit", 10), SEARCH_MAX_LIMIT)
        offset = int(body.get("after") or 0)
        matches = [r for r in self.records[kind].values() if not groups or any(_matches(r, g) for g in groups)]
        matches.sort(key=lambda r: int(r.id))
        for sort in reversed(body.get("sorts") or []):
            if not isinstance(sort, dict) or "propertyName" not in sort:
                raise HubSpotError(400, f"Unable to parse sort {sort!r}", category="VALIDATION_ERROR")
            name = sort["propertyName"]
            matches.sort(key=lambda r: str(r.properties.get(name) or ""),
                         reverse=sort.get("direction", "ASCENDING") == "DESCENDING")
        names = body.get("properties") or []
        returned = [*names, *ALWAYS_RETURNED[kind]] if names else list(DEFAULT_PROPERTIES[kind])
        page = matches[offset:offset + limit]
        answer: dict[str, Any] = {"total": len(matches), "results": [r.wire(returned) for r in page]}
        if offset + limit < len(matches):
            after = str(offset + limit)
            answer["paging"] = {"next": {"after": after, "link": f"?after={after}"}}
        return answer


def _scope_of(method: str, path: str) -> str:
    reads = method == "GET" or path.endswith("/search")
    return CONTACTS_READ if reads else CONTACTS_WRITE


def _json_body(request: SeenRequest) -> dict[str, Any]:
    try:
        body = request.json()
    except ValueError:
        raise HubSpotError(400, "Invalid input JSON on line 1, column 1", category="VALIDATION_ERROR") from None
    if not isinstance(body, dict):
        raise HubSpotError(400, "Invalid input JSON: expected an object", category="VALIDATION_ERROR")
    return body


def _properties_of(body: Mapping[str, Any]) -> dict[str, Any]:
    properties = body.get("properties")
    if not isinstance(properties, dict):
        raise HubSpotError(400, "properties must be an object", category="VALIDATION_ERROR")
    return {name: None if value is None else str(value) for name, value in properties.items()}


def _valid_call(properties: Mapping[str, Any]) -> None:
    problems = []
    if not properties.get("hs_timestamp"):
        problems.append("hs_timestamp is required")
    if properties.get("hs_call_direction") not in (None, *CALL_DIRECTIONS):
        problems.append(f"{properties['hs_call_direction']} is not a valid hs_call_direction")
    if properties.get("hs_call_status") not in (None, *CALL_STATUSES):
        problems.append(f"{properties['hs_call_status']} is not a valid hs_call_status")
    if not str(properties.get("hs_call_duration") or "0").isdigit():
        problems.append("hs_call_duration must be a number of milliseconds")
    if problems:
        raise HubSpotError(400, "Property values were not valid: " + "; ".join(problems), category="VALIDATION_ERROR")


def _valid_filter_groups(groups: Any) -> None:
    if not isinstance(groups, list) or len(groups) > MAX_FILTER_GROUPS:
        raise HubSpotError(400, f"at most {MAX_FILTER_GROUPS} filterGroups are allowed", category="VALIDATION_ERROR")
    counts = [len(group.get("filters") or []) for group in groups]
    if any(count > MAX_FILTERS_PER_GROUP for count in counts) or sum(counts) > MAX_FILTERS:
        raise HubSpotError(400, f"at most {MAX_FILTERS_PER_GROUP} filters a group and {MAX_FILTERS} in all",
                           category="VALIDATION_ERROR")
    for group in groups:
        for condition in group.get("filters") or []:
            if condition.get("operator") != "EQ":
                raise HubSpotError(400, f"operator {condition.get('operator')} is not supported by this fake",
                                   category="VALIDATION_ERROR")


def _matches(record: Record, group: Mapping[str, Any]) -> bool:
    for condition in group.get("filters") or []:
        value = record.properties.get(condition.get("propertyName"))
        if value is None or str(value).casefold() != str(condition.get("value")).casefold():
            return False
    return True


def _bounded(value: Any, most: int) -> int:
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise HubSpotError(400, f"limit {value!r} is not a number", category="VALIDATION_ERROR") from None
    if not 0 < limit <= most:
        raise HubSpotError(400, f"limit must be between 1 and {most}", category="VALIDATION_ERROR")
    return limit


def _answer(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, body, {"Content-Type": "application/json;charset=utf-8",
                                 "X-HubSpot-Correlation-Id": str(uuid.uuid4()), **(headers or {})})
