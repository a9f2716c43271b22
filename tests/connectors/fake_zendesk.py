"""A local Zendesk Support API (v2) for one account, written from Zendesk's public API reference: the
Tickets API (create, show, update with a comment, list filtered by `external_id`), Ticket Comments,
Users (`/users/me.json`), cursor pagination (`page[size]`, `page[after]`, `meta.has_more`,
`links.next`), the Idempotency-Key header of ticket creation, API-token auth
(`{email}/token:{token}` in HTTP Basic) and Zendesk's error bodies (`{"error": "RecordNotFound",
"description": ...}`, 422 `RecordInvalid` with `details`).

Links in answers name `https://{subdomain}.zendesk.com`, as Zendesk's own do: the connector under
test routes that origin to this server (its `base_url`). What the server does not model it refuses
(a 422), so a connector that sends something else fails here rather than passing by luck.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from tests.connectors.vendor_server import Answer, SeenRequest, VendorServer

PRIORITIES = ("low", "normal", "high", "urgent")
STATUSES = ("new", "open", "pending", "hold", "solved", "closed")
MAX_PAGE_SIZE = 100
_TICKET_PATH = re.compile(r"^/api/v2/tickets/(\d+)\.json$")
_COMMENTS_PATH = re.compile(r"^/api/v2/tickets/(\d+)/comments\.json$")

_ERRORS: dict[int, dict[str, Any]] = {
    400: {"error": "InvalidParameter", "description": "Parameter is invalid"},
    401: {"error": "Couldn't authenticate you"},
    403: {"error": "Forbidden", "description": "You do not have access to this page. Please contact the account "
                                               "owner of this help desk for further help."},
    404: {"error": "RecordNotFound", "description": "Not found"},
    409: {"error": "TicketUpdateConflict", "description": "The ticket was updated by another request"},
    422: {"error": "RecordInvalid", "description": "Record validation errors",
          "details": {"base": [{"description": "Requester: is invalid", "error": "InvalidValue"}]}},
    429: {"error": "APIRateLimitExceeded", "description": "Number of allowed API requests per minute exceeded"},
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_invalid(field: str, description: str) -> Answer:
    return Answer.of_json(422, {"error": "RecordInvalid", "description": "Record validation errors",
                                "details": {field: [{"description": description, "error": "InvalidValue"}]}})


class FakeZendesk(VendorServer):
    """One Zendesk account whose API user (`email`, an admin) signs in with `token`."""

    def __init__(self, subdomain: str = "acme", email: str = "agent@acme.example", token: str = "zd-token") -> None:
        super().__init__()
        self.subdomain = subdomain
        self.public_url = f"https://{subdomain}.zendesk.com"
        self._auth = "Basic " + base64.b64encode(f"{email}/token:{token}".encode()).decode()
        self.me: dict[str, Any] = {"id": 1, "url": f"{self.public_url}/api/v2/users/1.json",
                                   "name": "Voxlog", "email": email, "role": "admin", "active": True}
        self.anonymous_for_bad_credentials = False
        """Whether `/users/me.json` answers Zendesk's anonymous user (200) to wrong credentials, as
        Zendesk does in some cases, instead of a 401."""
        self.users: dict[int, dict[str, Any]] = {1: self.me}
        self.tickets: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, list[dict[str, Any]]] = {}
        self._idempotent: dict[str, tuple[Any, Answer]] = {}
        self._next_id = 100

    # -- the harness's view ------------------------------------------------------------------------

    def expire_idempotency_keys(self) -> None:
        """What two hours do: Zendesk forgets the Idempotency-Keys it has seen."""
        with self._lock:
            self._idempotent.clear()

    def seed_ticket(self, subject: str, *, external_id: str | None = None, status: str = "open") -> int:
        with self._lock:
            ticket_id = self._new_ticket({"subject": subject, "comment": {"body": f"about {subject}"},
                                          "external_id": external_id}, requester_id=1)
            self.tickets[ticket_id]["status"] = status
            return ticket_id

    def add_comment(self, ticket_id: int, body: str, *, public: bool = True) -> dict[str, Any]:
        with self._lock:
            return self._add_comment(ticket_id, body, public, audit_id=self._new_id())

    # -- wire --------------------------------------------------------------------------------------

    def authorised(self, request: SeenRequest) -> Answer | None:
        if request.headers.get("authorization") == self._auth:
            return None
        if request.path == "/api/v2/users/me.json" and request.method == "GET" and self.anonymous_for_bad_credentials:
            return Answer.of_json(200, {"user": {"id": None, "url": None, "name": "Anonymous user",
                                                 "email": "invalid@example.com", "role": "end-user"}})
        return Answer.of_json(401, _ERRORS[401], {"www-authenticate": 'Basic realm="Web Password"'})

    def error_body(self, status: int) -> str:
        return json.dumps(_ERRORS.get(status, {"error": "ServerError", "description": "Internal Server Error"}))

    def route(self, request: SeenRequest) -> Answer:
        path, method = request.path, request.method
        if path == "/api/v2/users/me.json" and method == "GET":
            return Answer.of_json(200, {"user": self.me})
        if path == "/api/v2/tickets.json" and method == "GET":
            return self._list_tickets(request)
        if path == "/api/v2/tickets.json" and method == "POST":
            return self._create(request)
        if (match := _TICKET_PATH.match(path)) is not None:
            ticket_id = int(match[1])
            if ticket_id not in self.tickets:
                return Answer.of_json(404, _ERRORS[404])
            if method == "GET":
                return Answer.of_json(200, {"ticket": self.tickets[ticket_id]})
            if method == "PUT":
                return self._update(ticket_id, request)
        if (match := _COMMENTS_PATH.match(path)) is not None and method == "GET":
            ticket_id = int(match[1])
            if ticket_id not in self.tickets:
                return Answer.of_json(404, _ERRORS[404])
            return self._page(request, path, "comments", self.comments[ticket_id])
        return Answer.of_json(404, {"error": "InvalidEndpoint", "description": "Not found"})

    # -- tickets -----------------------------------------------------------------------------------

    def _list_tickets(self, request: SeenRequest) -> Answer:
        external_id = request.param("external_id")
        tickets = [t for t in self.tickets.values() if external_id is None or t["external_id"] == external_id]
        return self._page(request, request.path, "tickets", tickets)

    def _create(self, request: SeenRequest) -> Answer:
        try:
            payload = request.json()
        except ValueError:
            return Answer.of_json(400, {"error": "Unprocessable Entity", "description": "Server could not parse JSON"})
        key = request.headers.get("idempotency-key")
        if key is not None and key in self._idempotent:
            original_payload, original = self._idempotent[key]
            if original_payload != payload:
                return Answer.of_json(400, {"error": "IdempotentRequestError",
                                            "description": "Request parameters don't match the original request"})
            return Answer(original.status, original.body, {**original.headers, "x-idempotency-lookup": "hit"})
        ticket = payload.get("ticket") if isinstance(payload, dict) else None
        if not isinstance(ticket, dict):
            return Answer.of_json(400, {"error": "InvalidParameter", "description": "ticket is required"})
        refused = _refusal(ticket)
        if refused is not None:
            return refused
        requester = ticket.get("requester")
        requester_id = self._requester(requester) if isinstance(requester, dict) else self.me["id"]
        ticket_id = self._new_ticket(ticket, requester_id)
        created = self.tickets[ticket_id]
        answer = Answer.of_json(201, {"ticket": created, "audit": self._audit(created, self.comments[ticket_id][-1],
                                                                               creating=True)},
                                {"location": created["url"]})
        if key is not None:
            self._idempotent[key] = (payload, answer)
            answer = Answer(answer.status, answer.body, {**answer.headers, "x-idempotency-lookup": "miss"})
        return answer

    def _update(self, ticket_id: int, request: SeenRequest) -> Answer:
        payload = request.json()
        changes = payload.get("ticket") if isinstance(payload, dict) else None
        if not isinstance(changes, dict) or set(changes) - {"id", "comment", "status"}:
            return _record_invalid("base", "this server models comments and status changes only")
        ticket = self.tickets[ticket_id]
        if "status" in changes:
            if changes["status"] not in STATUSES:
                return _record_invalid("status", "Status: is not valid")
            ticket["status"] = changes["status"]
        comment = changes.get("comment")
        added = None
        if comment is not None:
            if not isinstance(comment, dict) or not str(comment.get("body") or "").strip():
                return _record_invalid("comment", "Comment: body cannot be blank")
            added = self._add_comment(ticket_id, comment["body"], bool(comment.get("public", True)),
                                      audit_id=self._new_id())
            if ticket["status"] == "new":
                ticket["status"] = "open"  # an agent's comment opens a new ticket
        ticket["updated_at"] = _now()
        return Answer.of_json(200, {"ticket": ticket, "audit": self._audit(ticket, added, creating=False)})

    def _new_ticket(self, fields: dict[str, Any], requester_id: int) -> int:
        ticket_id = self._new_id()
        now = _now()
        body = fields["comment"]["body"]
        self.tickets[ticket_id] = {
            "url": f"{self.public_url}/api/v2/tickets/{ticket_id}.json", "id": ticket_id,
            "external_id": fields.get("external_id"), "via": {"channel": "api"}, "created_at": now,
            "updated_at": now, "type": None, "subject": fields.get("subject") or body[:50],
            "raw_subject": fields.get("subject") or body[:50], "description": body,
            "priority": fields.get("priority"), "status": "new", "requester_id": requester_id,
            "submitter_id": self.me["id"], "assignee_id": None, "tags": list(fields.get("tags") or []),
        }
        self.comments[ticket_id] = []
        self._add_comment(ticket_id, body, bool(fields["comment"].get("public", True)), audit_id=self._new_id())
        return ticket_id

    def _add_comment(self, ticket_id: int, body: str, public: bool, audit_id: int) -> dict[str, Any]:
        comment = {"id": self._new_id(), "type": "Comment", "author_id": self.me["id"], "body": body,
                   "html_body": f"<div class=\"zd-comment\"><p>{body}</p></div>", "plain_body": body,
                   "public": public, "attachments": [], "audit_id": audit_id, "via": {"channel": "api"},
                   "created_at": _now(), "metadata": {"system": {}, "custom": {}}}
        self.comments[ticket_id].append(comment)
        return comment

    def _audit(self, ticket: dict[str, Any], comment: dict[str, Any] | None, *, creating: bool) -> dict[str, Any]:
        events: list[dict[str, Any]] = [] if comment is None else [
            {key: comment[key] for key in ("id", "type", "author_id", "body", "html_body", "plain_body", "public",
                                           "attachments", "audit_id")}]
        if creating:
            events += [{"id": self._new_id(), "type": "Create", "value": ticket[name], "field_name": name}
                       for name in ("subject", "status", "priority")]
        return {"id": comment["audit_id"] if comment is not None else self._new_id(), "ticket_id": ticket["id"],
                "created_at": ticket["updated_at"], "author_id": self.me["id"],
                "metadata": {"system": {"client": "voxlog"}, "custom": {}}, "events": events}

    def _requester(self, requester: dict[str, Any]) -> int:
        email = requester["email"]
        for user in self.users.values():
            if user.get("email") == email:
                return int(user["id"])
        user_id = self._new_id()
        self.users[user_id] = {"id": user_id, "name": requester.get("name") or email, "email": email,
                               "role": "end-user"}
        return user_id

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- cursor pagination -------------------------------------------------------------------------

    def _page(self, request: SeenRequest, path: str, name: str, items: list[dict[str, Any]]) -> Answer:
        cursor = request.param("page[after]")
        try:
            size = min(int(request.param("page[size]") or MAX_PAGE_SIZE), MAX_PAGE_SIZE)
            start = int(base64.urlsafe_b64decode(cursor)) if cursor else 0
        except (ValueError, binascii.Error):
            return Answer.of_json(400, {"error": "InvalidPaginationParameter",
                                        "description": "page[after] is not a cursor this server gave"})
        page = items[start:start + size]
        end = start + len(page)
        has_more = end < len(items)
        after = base64.urlsafe_b64encode(str(end).encode()).decode()
        before = base64.urlsafe_b64encode(str(start).encode()).decode()
        kept = {k: v[0] for k, v in request.query.items() if not k.startswith("page[")}
        next_link = f"{self.public_url}{path}?{urlencode({**kept, 'page[after]': after, 'page[size]': size})}"
        return Answer.of_json(200, {
            name: page,
            "meta": {"has_more": has_more, "after_cursor": after if page else None,
                     "before_cursor": before if page else None},
            "links": {"next": next_link if has_more else None, "prev": None},
        })


def _refusal(ticket: dict[str, Any]) -> Answer | None:
    """Zendesk's 422 for a ticket it would not create, or None."""
    comment = ticket.get("comment")
    if not isinstance(comment, dict) or not str(comment.get("body") or "").strip():
        return _record_invalid("description", "Description: cannot be blank")
    if ticket.get("priority") not in (None, *PRIORITIES):
        return _record_invalid("priority", "Priority: is not valid")
    requester = ticket.get("requester")
    if requester is not None and (not isinstance(requester, dict) or "@" not in str(requester.get("email") or "")):
        return _record_invalid("requester", "Requester: email is invalid (this server models requesters by email)")
    tags = ticket.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag and " " not in tag for tag in tags):
        return _record_invalid("tags", "Tags: is invalid")
    return None
