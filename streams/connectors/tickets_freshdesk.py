"""Freshdesk as the ticket desk, through its documented REST API v2 over httpx (Freshdesk publishes
no maintained Python SDK; python-freshdesk has had no release since 2022). Auth is HTTP Basic with
the API key as the user name and `X` as the password.

Operations and their endpoints:
- `create`: the key's ticket looked up (below), else `POST /api/v2/tickets` with the subject, the
  description (HTML, escaped), the caller as requester (`phone` with `name`, which Freshdesk requires
  when there is no email; `email` where the call gave one: Freshdesk makes the contact if it is new),
  the priority on Freshdesk's scale (1 low, 2 medium, 3 high, 4 urgent), status 2 (open), source 3
  (phone) and the tags `voxlog` and `voxlog-key-<hash of the key>`.
- `comment`: the ticket's conversations (`GET /api/v2/tickets/{id}/conversations`, `per_page=100`,
  the `Link` header's `rel="next"` page after page) searched for the key's token, else
  `POST /api/v2/tickets/{id}/notes` with `private: false`. A public note, not a reply: it is shown to
  the requester on the portal as a comment is, while a reply is an email, and a phone caller has
  often given none; the note's last line carries the token.
- `status`: `GET /api/v2/tickets/{id}`, Freshdesk's status numbers as its words (2 open, 3 pending,
  4 resolved, 5 closed; an account's own statuses as `status <n>`).
- `check`: `GET /api/v2/agents/me` (the key's agent), `GET /api/v2/tickets?per_page=1`.

Idempotency: Freshdesk takes no idempotency header and a ticket has no external id, so the key goes
in a tag, `voxlog-key-` and 96 bits of the key's SHA-256 (lowercase hex: nothing in it needs quoting
in a query, and any key gives one). Before a create the tag is searched for (`GET
/api/v2/search/tickets?query="tag:'voxlog-key-...'"`: the query between double quotes, string values
between single quotes, at most 512 characters, URL-encoded; "Filter Tickets", Freshdesk API v2). The
search reads an index Freshdesk updates "in a few minutes", so the newest tickets are read too
(`GET /api/v2/tickets?order_by=created_at&order_type=desc&per_page=100`, each with its tags): a
repeat soon after the first create (a retry after a timeout) finds it there, a repeat later finds it
in the search. Two creates with one key at the same moment (two workers holding one command) can both
miss it: Freshdesk has nothing that would catch that.

Rate limit: Freshdesk's per-account limit of its plan ("Rate Limit", Freshdesk API v2: Growth 200
calls a minute, Pro 400, Enterprise 700, a trial 50; within them ticket creates are capped at 80,
160 and 280 and ticket lists at 20, 100 and 200); Growth's unless the settings name the plan.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
from pydantic import SecretStr

from streams.connectors.base import CheckResult, ConnectorError, FailureKind, RateLimit, Ticket, TicketRequest
from streams.connectors.http_status import failure_for_status
from streams.connectors.secrets import Secrets
from streams.connectors.ticket_ids import key_token, not_the_api, numeric_id, ticket_number
from streams.connectors.vendor_settings import FreshdeskPlan
from streams.connectors.vendor_settings import FreshdeskSettings as FreshdeskSettings

VENDOR = "freshdesk"
REQUESTS_PER_MINUTE: Mapping[FreshdeskPlan, int] = {"trial": 50, "growth": 200, "pro": 400, "enterprise": 700}
PRIORITIES: Mapping[str, int] = {"low": 1, "normal": 2, "high": 3, "urgent": 4}
STATUS_WORDS: Mapping[int, str] = {2: "open", 3: "pending", 4: "resolved", 5: "closed"}
STATUS_OPEN = 2
SOURCE_PHONE = 3
TAG = "voxlog"
PAGE_SIZE = 100
"""Freshdesk's largest `per_page`."""
MAX_QUERY_CHARS = 512


def tag_query(tag: str) -> str:
    """The Filter Tickets query for one tag. A tag of `key_tag`'s alphabet needs no escaping inside
    the single quotes; anything else is refused rather than guessed at (Freshdesk documents none)."""
    if not tag or not all(c.isascii() and (c.isalnum() or c in "-_") for c in tag):
        raise ValueError(f"a tag to search for is letters, digits, - and _: {tag!r}")
    query = f"\"tag:'{tag}'\""
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError("a Freshdesk query is at most 512 characters")
    return query


def error_text(body: str) -> str:
    """Freshdesk's words in an error body (`{"description": "Validation failed", "errors": [{"field",
    "message", "code"}]}`, `{"code", "message"}`), else the body's text."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if not isinstance(document, dict):
        return body.strip()[:300]
    words = [str(document[part]) for part in ("description", "message") if isinstance(document.get(part), str)]
    if isinstance(document.get("code"), str):
        words.append(f"({document['code']})")
    errors = document.get("errors")
    for problem in errors if isinstance(errors, list) else []:
        if isinstance(problem, dict):
            field = problem.get("field")
            message = problem.get("message")
            code = problem.get("code")
            words.append(" ".join(str(part) for part in (f"{field}:" if field else None, message,
                                                          f"({code})" if code else None) if part))
    return " ".join(word for word in words if word) or body.strip()[:300]


def as_html(text: str) -> str:
    """Plain text as the HTML Freshdesk's descriptions and notes are."""
    return "<div>" + html.escape(text).replace("\n", "<br>") + "</div>"


class FreshdeskDesk:
    """`TicketDesk` on one Freshdesk account."""

    vendor = VENDOR

    def __init__(self, domain: str, api_key: SecretStr, *, timeout_s: float, base_url: str | None = None,
                 plan: FreshdeskPlan = "growth") -> None:
        self.rate_limit = RateLimit(REQUESTS_PER_MINUTE[plan], 60.0,
                                    f'Freshdesk API v2 reference, "Rate Limit": the {plan} plan\'s calls a minute')
        self._domain = domain
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._client = httpx.Client(base_url=(base_url or f"https://{domain}").rstrip("/") + "/",
                                    auth=httpx.BasicAuth(api_key.get_secret_value(), "X"),
                                    timeout=httpx.Timeout(timeout_s), headers={"Accept": "application/json"})

    # -- TicketDesk --------------------------------------------------------------------------------

    def create(self, request: TicketRequest, idempotency_key: str) -> Ticket:
        priority = PRIORITIES.get(request.priority)
        if priority is None:
            raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: priority {request.priority!r} is not one of "
                                                      f"{', '.join(PRIORITIES)}")
        if not request.requester_phone and not request.requester_email:
            raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: a ticket needs the caller's phone number or email")
        tag = key_token(idempotency_key)
        existing = self._ticket_tagged(tag)
        if existing is not None:
            return existing
        fields: dict[str, Any] = {"subject": request.subject, "description": as_html(request.description),
                                  "priority": priority, "status": STATUS_OPEN, "source": SOURCE_PHONE,
                                  "tags": [TAG, tag]}
        if request.requester_email:
            fields["email"] = request.requester_email
        if request.requester_phone:
            fields["phone"] = request.requester_phone
        if request.requester_name or request.requester_phone:
            fields["name"] = request.requester_name or request.requester_phone
        created = self._json(self._call("POST", "api/v2/tickets", "creating the ticket", json=fields),
                             "creating the ticket")
        return self._ticket(created, "creating the ticket")

    def comment(self, ticket_id: str, body: str, idempotency_key: str) -> str:
        number = ticket_number(ticket_id, VENDOR, "Freshdesk")
        token = key_token(idempotency_key)
        for conversation in self._conversations(number):
            if token in str(conversation.get("body_text") or "") or token in str(conversation.get("body") or ""):
                return numeric_id(conversation.get("id"), "a conversation", VENDOR)
        note = self._json(self._call("POST", f"api/v2/tickets/{number}/notes", "adding the note",
                                     json={"body": as_html(f"{body}\n\n[{token}]"), "private": False}),
                          "adding the note")
        if not isinstance(note, dict):
            raise not_the_api(VENDOR, "Freshdesk", "adding the note", "no note in the answer")
        return numeric_id(note.get("id"), "a note", VENDOR)

    def status(self, ticket_id: str) -> Ticket:
        number = ticket_number(ticket_id, VENDOR, "Freshdesk")
        found = self._json(self._call("GET", f"api/v2/tickets/{number}", "reading the ticket"), "reading the ticket")
        return self._ticket(found, "reading the ticket")

    def check(self) -> list[CheckResult]:
        try:
            me = self._json(self._call("GET", "api/v2/agents/me", "reading the key's agent"), "reading the key's agent")
            contact = me.get("contact") if isinstance(me, dict) else None
            if not isinstance(contact, dict):
                raise not_the_api(VENDOR, "Freshdesk", "reading the key's agent", "no agent in the answer")
        except ConnectorError as exc:
            return [CheckResult("sign in", False, _check_detail(exc))]
        who = contact.get("email") or contact.get("name") or "an agent"
        results = [CheckResult("sign in", True, f"signed in as {who}")]
        try:
            listed = self._json(self._call("GET", "api/v2/tickets", "listing tickets", params={"per_page": 1}),
                                "listing tickets")
            if not isinstance(listed, list):
                raise not_the_api(VENDOR, "Freshdesk", "listing tickets", "no list in the answer")
        except ConnectorError as exc:
            results.append(CheckResult("read tickets", False, _check_detail(exc)))
        else:
            results.append(CheckResult("read tickets", True, "tickets can be listed"))
        return results

    def close(self) -> None:
        """Closes the pooled connections (the interface has no such step; whoever drops a connector may)."""
        self._client.close()

    # -- the API -----------------------------------------------------------------------------------

    def _ticket_tagged(self, tag: str) -> Ticket | None:
        """The oldest ticket with this tag, from the search, else from the newest tickets."""
        what = "searching tickets by tag"
        found = self._json(self._call("GET", "api/v2/search/tickets", what, params={"query": tag_query(tag)}), what)
        results = found.get("results") if isinstance(found, dict) else None
        if not isinstance(results, list):
            raise not_the_api(VENDOR, "Freshdesk", what, "no results in the answer")
        if not results:
            what = "reading the newest tickets"
            newest = self._json(self._call("GET", "api/v2/tickets", what, params={
                "order_by": "created_at", "order_type": "desc", "per_page": PAGE_SIZE}), what)
            if not isinstance(newest, list):
                raise not_the_api(VENDOR, "Freshdesk", what, "no list in the answer")
            results = [t for t in newest if isinstance(t, dict) and tag in _tags(t)]
        tickets = [self._ticket(found_ticket, what) for found_ticket in results]
        return min(tickets, key=lambda ticket: int(ticket.id)) if tickets else None

    def _conversations(self, number: int) -> Iterator[Mapping[str, Any]]:
        """The ticket's conversations, following each answer's `Link: <...>; rel="next"`. The link's
        path and query are asked of this connector's own base URL, so a proxy in between stays in."""
        what = "reading the ticket's conversations"
        path: str | None = f"api/v2/tickets/{number}/conversations?per_page={PAGE_SIZE}"
        seen: set[str] = set()
        while path is not None:
            seen.add(path)
            response = self._call("GET", path, what)
            page = self._json(response, what)
            if not isinstance(page, list):
                raise not_the_api(VENDOR, "Freshdesk", what, "no list in the answer")
            for conversation in page:
                if not isinstance(conversation, dict):
                    raise not_the_api(VENDOR, "Freshdesk", what, "a conversation that is not an object")
                yield conversation
            link = response.links.get("next", {}).get("url")
            try:
                path = httpx.URL(link).raw_path.decode("ascii").lstrip("/") if link else None
            except httpx.InvalidURL:
                raise not_the_api(VENDOR, "Freshdesk", what, "a next page link that is not a URL") from None
            if path in seen:
                raise not_the_api(VENDOR, "Freshdesk", what, "a next page that was already read")

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"{VENDOR}: no answer within {self._timeout_s:g} s while {what}") from None
        except httpx.HTTPError as exc:
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"{VENDOR}: the connection failed while {what} ({type(exc).__name__})") from None
        if response.status_code >= 400:
            detail = error_text(response.text).replace(self._api_key.get_secret_value(), "***")
            raise failure_for_status(response.status_code, detail, vendor=VENDOR,
                                     retry_after=response.headers.get("Retry-After"))
        if not 200 <= response.status_code < 300:
            raise not_the_api(VENDOR, "Freshdesk", what, f"HTTP {response.status_code}")
        return response

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise not_the_api(VENDOR, "Freshdesk", what, "a body that is not JSON") from None

    def _ticket(self, found: Any, what: str) -> Ticket:
        if not isinstance(found, dict):
            raise not_the_api(VENDOR, "Freshdesk", what, "no ticket in the answer")
        number = numeric_id(found.get("id"), "a ticket", VENDOR)
        status = found.get("status")
        if isinstance(status, bool) or not isinstance(status, int):
            raise not_the_api(VENDOR, "Freshdesk", what, "a ticket without a status")
        return Ticket(id=number, status=STATUS_WORDS.get(status, f"status {status}"),
                      subject=str(found.get("subject") or ""), url=f"https://{self._domain}/a/tickets/{number}")


def _tags(ticket: Mapping[str, Any]) -> list[Any]:
    tags = ticket.get("tags")
    return tags if isinstance(tags, list) else []


def _check_detail(exc: ConnectorError) -> str:
    if exc.kind is FailureKind.AUTH:
        return "the API key was refused (401): check the key (the agent's Profile settings, Your API Key)"
    if exc.kind is FailureKind.SCOPE:
        return "signed in, but refused (403): the key's agent lacks the permission"
    return str(exc)


def connect(settings: FreshdeskSettings, secrets: Secrets, timeout_s: float) -> FreshdeskDesk:
    return FreshdeskDesk(settings.domain, secrets.resolve(settings.api_key, "Freshdesk API key"), timeout_s=timeout_s,
                         base_url=settings.base_url, plan=settings.plan)
