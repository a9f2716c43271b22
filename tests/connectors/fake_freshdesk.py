"""A local Freshdesk API v2 for one account, written from Freshdesk's public API reference: Create /
View / List All Tickets, Filter Tickets (`/search/tickets?query="..."`, its query grammar, 30 results a
page, pages 1 to 10), Create a Note, List All Conversations of a Ticket, View the Agent behind the key
(`/agents/me`), `page`/`per_page` pagination with a `Link: <...>; rel="next"` header, HTTP Basic auth
with the API key as user name and `X` as password, and Freshdesk's error bodies (`{"description":
"Validation failed", "errors": [{"field", "message", "code"}]}`, `{"code", "message"}`).

The search reads an index that, as Freshdesk's, lags the tickets ("updates will take a few minutes to
get indexed"): a ticket is found by a search only once `index_search()` has run. Links name
`https://{domain}`, as Freshdesk's own do.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from tests.connectors.vendor_server import Answer, SeenRequest, VendorServer

SEARCH_PAGE_SIZE = 30
SEARCH_MAX_PAGE = 10
MAX_QUERY_CHARS = 512
MAX_PER_PAGE = 100
SOURCES = (1, 2, 3, 5, 6, 7, 9, 10)
_TICKET_PATH = re.compile(r"^/api/v2/tickets/(\d+)$")
_NOTES_PATH = re.compile(r"^/api/v2/tickets/(\d+)/notes$")
_CONVERSATIONS_PATH = re.compile(r"^/api/v2/tickets/(\d+)/conversations$")
# Filter Tickets' grammar: field:value conditions joined by AND / OR; strings between single quotes.
_CONDITION = re.compile(r"\s*(?P<field>[a-z_]+):(?P<value>'(?:[^'\\]|\\.)*'|-?\d+|null)\s*(?P<join>AND|OR|$)")
_SEARCHABLE = {"tag": str, "status": int, "priority": int, "requester_id": int}
_LIST_FIELDS_LEFT_OUT = ("description", "description_text")
"""List All Tickets leaves the description out (`include=description` adds it)."""

_ERRORS: dict[int, dict[str, Any] | None] = {
    422: {"description": "Validation failed",
          "errors": [{"field": "description", "message": "It should be a/an String", "code": "missing_field"}]},
    400: {"description": "Validation failed",
          "errors": [{"field": "priority", "message": "It should be one of these values: '1,2,3,4'",
                      "code": "invalid_value"}]},
    401: {"code": "invalid_credentials", "message": "You have to be logged in to perform this action."},
    403: {"code": "access_denied", "message": "You are not authorized to perform this action."},
    404: None,
    409: {"description": "Validation failed",
          "errors": [{"field": "email", "message": "It should be a unique value", "code": "duplicate_value"}]},
    429: {"code": "rate_limit_exceeded", "message": "You have exceeded the limit of requests per minute"},
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _invalid(field: str, message: str, code: str = "invalid_value") -> Answer:
    return Answer.of_json(400, {"description": "Validation failed",
                                "errors": [{"field": field, "message": message, "code": code}]})


def html_text(body: str) -> str:
    """An HTML body's text, as Freshdesk's `body_text` and `description_text` give it."""
    text = re.sub(r"<br\s*/?>|</(?:div|p)>", "\n", body)
    return html.unescape(re.sub(r"<[^>]*>", "", text)).strip()


class FakeFreshdesk(VendorServer):
    """One Freshdesk account whose agent's API key is `api_key`."""

    def __init__(self, domain: str = "acme.freshdesk.com", api_key: str = "fd-key") -> None:
        super().__init__()
        self.domain = domain
        self.public_url = f"https://{domain}"
        self._auth = "Basic " + base64.b64encode(f"{api_key}:X".encode()).decode()
        self.me = {"id": 1, "available": True, "occasional": False, "ticket_scope": 1, "type": "support_agent",
                   "contact": {"active": True, "email": "voxlog@acme.example", "name": "Voxlog"}}
        self.contacts: dict[int, dict[str, Any]] = {}
        self.tickets: dict[int, dict[str, Any]] = {}
        self.conversations: dict[int, list[dict[str, Any]]] = {}
        self.indexed: set[int] = set()
        self._next_ticket = 0
        self._next_id = 5000

    # -- the harness's view ------------------------------------------------------------------------

    def index_search(self) -> None:
        """What a few minutes do: the search index catches up with every ticket."""
        with self._lock:
            self.indexed = set(self.tickets)

    def seed_ticket(self, subject: str, *, tags: list[str] | None = None) -> int:
        with self._lock:
            requester_id = self._contact({"phone": "+15550000000", "name": "Seed"})
            return self._new_ticket({"subject": subject, "description": f"<div>{subject}</div>", "priority": 1,
                                     "status": 2, "source": 3, "tags": tags or []}, requester_id)

    def add_note(self, ticket_id: int, body: str) -> dict[str, Any]:
        with self._lock:
            return self._add_note(ticket_id, body, private=True)

    # -- wire --------------------------------------------------------------------------------------

    def authorised(self, request: SeenRequest) -> Answer | None:
        if request.headers.get("authorization") == self._auth:
            return None
        return Answer.of_json(401, _ERRORS[401])

    def error_body(self, status: int) -> str:
        known = _ERRORS.get(status, {"code": "internal_error", "message": "We're sorry, but something went wrong."})
        return "" if known is None else json.dumps(known)

    def route(self, request: SeenRequest) -> Answer:
        path, method = request.path, request.method
        if path == "/api/v2/agents/me" and method == "GET":
            return Answer.of_json(200, self.me)
        if path == "/api/v2/search/tickets" and method == "GET":
            return self._search(request)
        if path == "/api/v2/tickets" and method == "GET":
            return self._list(request)
        if path == "/api/v2/tickets" and method == "POST":
            return self._create(request)
        for pattern, wanted in ((_TICKET_PATH, "GET"), (_NOTES_PATH, "POST"), (_CONVERSATIONS_PATH, "GET")):
            match = pattern.match(path)
            if match is None or method != wanted:
                continue
            ticket_id = int(match[1])
            if ticket_id not in self.tickets:
                return Answer(404)
            if pattern is _TICKET_PATH:
                return Answer.of_json(200, self.tickets[ticket_id])
            if pattern is _NOTES_PATH:
                return self._note(ticket_id, request)
            return self._page(request, path, self.conversations[ticket_id])
        return Answer(404)

    # -- tickets -----------------------------------------------------------------------------------

    def _create(self, request: SeenRequest) -> Answer:
        try:
            fields = request.json()
        except ValueError:
            return Answer.of_json(400, {"code": "invalid_json", "message": "Request body has invalid json format"})
        if not isinstance(fields, dict):
            return Answer.of_json(400, {"code": "invalid_json", "message": "Request body has invalid json format"})
        refused = _refusal(fields)
        if refused is not None:
            return refused
        ticket_id = self._new_ticket(fields, requester_id=self._contact(fields))
        return Answer.of_json(201, self.tickets[ticket_id],
                              {"location": f"{self.public_url}/api/v2/tickets/{ticket_id}"})

    def _new_ticket(self, fields: dict[str, Any], requester_id: int) -> int:
        self._next_ticket += 1
        ticket_id = self._next_ticket
        now = _now()
        self.tickets[ticket_id] = {
            "cc_emails": [], "fwd_emails": [], "reply_cc_emails": [], "fr_escalated": False, "spam": False,
            "email_config_id": None, "group_id": None, "priority": fields["priority"], "requester_id": requester_id,
            "responder_id": None, "source": fields.get("source", 2), "company_id": None,
            "status": fields.get("status", 2), "subject": fields["subject"], "to_emails": None, "product_id": None,
            "id": ticket_id, "type": None, "due_by": now, "fr_due_by": now, "is_escalated": False,
            "description": fields["description"], "description_text": html_text(fields["description"]),
            "custom_fields": {}, "created_at": now, "updated_at": now, "tags": list(fields.get("tags") or []),
        }
        self.conversations[ticket_id] = []
        return ticket_id

    def _contact(self, fields: dict[str, Any]) -> int:
        for contact_id, contact in self.contacts.items():
            if (fields.get("email") and contact.get("email") == fields["email"]) or (
                    not fields.get("email") and fields.get("phone") and contact.get("phone") == fields["phone"]):
                return contact_id
        self._next_id += 1
        self.contacts[self._next_id] = {"id": self._next_id, "name": fields.get("name") or fields.get("email"),
                                        "email": fields.get("email"), "phone": fields.get("phone")}
        return self._next_id

    def _list(self, request: SeenRequest) -> Answer:
        order_by = request.param("order_by") or "created_at"
        order_type = request.param("order_type") or "desc"
        if order_by not in ("created_at", "due_by", "updated_at", "status"):
            return _invalid("order_by", "It should be one of these values: 'created_at,due_by,updated_at,status'")
        if order_type not in ("asc", "desc"):
            return _invalid("order_type", "It should be one of these values: 'asc,desc'")
        # Ties in a timestamp (one second) fall back to the id, the order Freshdesk creates them in.
        tickets = sorted(self.tickets.values(), key=lambda t: (t[order_by], t["id"]), reverse=order_type == "desc")
        listed = [{k: v for k, v in t.items() if k not in _LIST_FIELDS_LEFT_OUT} for t in tickets]
        return self._page(request, request.path, listed)

    def _note(self, ticket_id: int, request: SeenRequest) -> Answer:
        fields = request.json()
        if not isinstance(fields, dict) or not isinstance(fields.get("body"), str) or not fields["body"].strip():
            return _invalid("body", "It should be a/an String", "missing_field")
        if not isinstance(fields.get("private", True), bool):
            return _invalid("private", "It should be a/an Boolean", "datatype_mismatch")
        return Answer.of_json(201, self._add_note(ticket_id, fields["body"], private=fields.get("private", True)))

    def _add_note(self, ticket_id: int, body: str, *, private: bool) -> dict[str, Any]:
        self._next_id += 1
        now = _now()
        note = {"id": self._next_id, "body": body, "body_text": html_text(body), "incoming": False,
                "private": private, "user_id": self.me["id"], "support_email": None, "source": 2,
                "ticket_id": ticket_id, "to_emails": [], "from_email": None, "cc_emails": [], "bcc_emails": [],
                "attachments": [], "created_at": now, "updated_at": now}
        self.conversations[ticket_id].append(note)
        self.tickets[ticket_id]["updated_at"] = now
        return note

    # -- search ------------------------------------------------------------------------------------

    def _search(self, request: SeenRequest) -> Answer:
        query = request.param("query")
        if query is None or len(query) < 2 or not (query.startswith('"') and query.endswith('"')):
            return _invalid("query", "Query should be enclosed in double quotes", "invalid_value")
        if len(query) > MAX_QUERY_CHARS:
            return _invalid("query", "It should not have more than 512 characters", "invalid_value")
        try:
            page = int(request.param("page") or 1)
        except ValueError:
            page = 0
        if not 1 <= page <= SEARCH_MAX_PAGE:
            return _invalid("page", "It should be a Positive Integer less than or equal to 10", "invalid_value")
        matches = _matcher(query[1:-1])
        if matches is None:
            return _invalid("query", f"Invalid query {query}", "invalid_value")
        found = [self.tickets[i] for i in sorted(self.indexed, reverse=True) if matches(self.tickets[i])]
        start = (page - 1) * SEARCH_PAGE_SIZE
        return Answer.of_json(200, {"results": found[start:start + SEARCH_PAGE_SIZE], "total": len(found)})

    # -- page / per_page ---------------------------------------------------------------------------

    def _page(self, request: SeenRequest, path: str, items: list[dict[str, Any]]) -> Answer:
        try:
            page = int(request.param("page") or 1)
            per_page = int(request.param("per_page") or 30)
        except ValueError:
            return _invalid("page", "It should be a Positive Integer", "datatype_mismatch")
        if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
            return _invalid("per_page", "It should be a Positive Integer less than or equal to 100")
        start = (page - 1) * per_page
        headers = {}
        if start + per_page < len(items):
            kept = {k: v[0] for k, v in request.query.items() if k not in ("page", "per_page")}
            link = f"{self.public_url}{path}?{urlencode({**kept, 'page': page + 1, 'per_page': per_page})}"
            headers["link"] = f'<{link}>; rel="next"'
        return Answer.of_json(200, items[start:start + per_page], headers)


def _refusal(fields: dict[str, Any]) -> Answer | None:
    """Freshdesk's 400 for a ticket it would not create, or None."""
    if not any(fields.get(k) for k in ("requester_id", "email", "phone", "twitter_id", "facebook_id",
                                       "unique_external_id")):
        return _invalid("requester_id", "Please fill at least 1 of requester_id, phone, email, twitter_id, "
                                        "facebook_id, unique_external_id fields", "missing_field")
    if fields.get("phone") and not fields.get("email") and not fields.get("name"):
        return _invalid("name", "It should be a/an String", "missing_field")
    if fields.get("email") is not None and "@" not in str(fields["email"]):
        return _invalid("email", f"It is not a valid email address ({fields['email']})")
    if not isinstance(fields.get("subject"), str) or not fields["subject"].strip():
        return _invalid("subject", "It should be a/an String", "missing_field")
    if not isinstance(fields.get("description"), str) or not fields["description"].strip():
        return _invalid("description", "It should be a/an String", "missing_field")
    if fields.get("priority") not in (1, 2, 3, 4):
        return _invalid("priority", "It should be one of these values: '1,2,3,4'")
    if fields.get("status", 2) not in (2, 3, 4, 5):
        return _invalid("status", "It should be one of these values: '2,3,4,5'")
    if fields.get("source", 2) not in SOURCES:
        return _invalid("source", "It should be one of these values: '1,2,3,5,6,7,9,10'")
    tags = fields.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag.strip() for tag in tags):
        return _invalid("tags", "It should be a/an Array of String", "datatype_mismatch")
    unknown = set(fields) - {"subject", "description", "priority", "status", "source", "tags", "email", "phone",
                             "name", "requester_id", "type"}
    if unknown:
        return _invalid(sorted(unknown)[0], "Unexpected/invalid field in request", "invalid_field")
    return None


def _matcher(query: str) -> Callable[[dict[str, Any]], bool] | None:
    """A predicate on tickets for Filter Tickets' conditions (`tag:'x' OR status:2 ...`, AND binding
    tighter than OR), or None where the query is not of that grammar or names an unsupported field."""
    alternatives: list[list[tuple[str, Any]]] = [[]]
    position, join = 0, "AND"
    while position < len(query):
        match = _CONDITION.match(query, position)
        if match is None:
            return None
        field, raw, join = match["field"], match["value"], match["join"]
        kind = _SEARCHABLE.get(field)
        if kind is None or (raw.startswith("'") and kind is not str) or (raw[-1].isdigit() and kind is not int):
            return None
        value: Any = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith("'") else None if raw == "null" else int(raw)
        alternatives[-1].append((field, value))
        position = match.end()
        if join == "OR":
            alternatives.append([])
    if join:  # empty, or a condition left dangling after AND / OR
        return None

    def holds(ticket: dict[str, Any], field: str, value: Any) -> bool:
        if field == "tag":
            return value in ticket["tags"] if value is not None else not ticket["tags"]
        return bool(ticket.get(field) == value)

    return lambda ticket: any(all(holds(ticket, f, v) for f, v in conditions) for conditions in alternatives)
