"""Zendesk Support as the ticket desk, through zenpy (the Zendesk API's Python client), signed in as
one agent with an API token (HTTP Basic, `{email}/token:{token}`).

Operations and their endpoints (Support API v2):
- `create`: `GET /api/v2/tickets.json?external_id=KEY` (the key's ticket, if one exists), else
  `POST /api/v2/tickets.json` with the subject, the description as the first public comment, the
  priority (`low`, `normal`, `high`, `urgent` are Zendesk's own), the tag `voxlog` and
  `external_id` = the idempotency key. The requester is the caller where the call gave an email
  (Zendesk's documented requester object is `{name, email}`; a new email makes a new end user), else
  the configured default requester, else the API user (Zendesk's default); the caller's name and
  phone number close the description either way, so the agent can call back.
- `comment`: the ticket's comments (`GET /api/v2/tickets/{id}/comments.json`, cursor pagination)
  searched for the key's marker, else `PUT /api/v2/tickets/{id}.json` with a public comment whose
  last line is the marker; the comment's id is the audit's Comment event.
- `status`: `GET /api/v2/tickets/{id}.json`; Zendesk's status words as they are.
- `check`: `GET /api/v2/users/me.json` (Zendesk answers a 200 with its anonymous user, id null, where it
  signs no one in), the user's role (the Tickets API is an agent's), `GET /api/v2/tickets.json`.

Idempotency: the key is the ticket's `external_id`, looked up before every create (the list
filtered by `external_id` reads the database, not a search index, so it sees a ticket the moment it
exists), so a repeat at any later time answers the first ticket. Two creates with the same key that
race past the lookup are caught by Zendesk itself: the create carries the key (as `voxlog-key-` and a
hash of it: a header takes ASCII only) in the `Idempotency-Key` header, and Zendesk answers a repeat
within two hours with the original ticket (`x-idempotency-lookup: hit`) ("Idempotency", Zendesk API
introduction). A comment carries the same token in a last line `[voxlog-key-...]`, and the ticket's
comments are searched for it before one is added.

Rate limit: Zendesk's per-account limit of its plan ("Rate limits", Zendesk API reference: Support
and Suite plans, Team 200 requests a minute, Growth and Professional 400, Enterprise 700, Enterprise
Plus and the High Volume API add-on 2500); Team's unless the settings name the plan. Zendesk also
limits updates to one ticket (30 in 10 minutes per user), which a call's few comments stay under.

zenpy builds `https://{subdomain}.zendesk.com` URLs and follows the `links.next` Zendesk returns, so
`base_url` (a test server, an egress proxy) is reached through a transport adapter on that origin,
not a different host given to zenpy. zenpy waits out a 429's Retry-After and asks again; voxlog's
worker does its own waiting, so a 429 is raised at once (a response hook) with its Retry-After.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import requests
from pydantic import SecretStr
from requests.adapters import HTTPAdapter
from zenpy import Zenpy
from zenpy.lib.api_objects import Audit, Comment, TicketAudit, User
from zenpy.lib.api_objects import Ticket as ZenpyTicket
from zenpy.lib.exception import APIException, ZenpyException
from zenpy.lib.generator import BaseResultGenerator

from streams.connectors.base import CheckResult, ConnectorError, FailureKind, RateLimit, Ticket, TicketRequest
from streams.connectors.http_status import failure_for_status
from streams.connectors.secrets import Secrets
from streams.connectors.ticket_ids import key_token, not_the_api, numeric_id, ticket_number
from streams.connectors.vendor_settings import ZendeskPlan
from streams.connectors.vendor_settings import ZendeskSettings as ZendeskSettings

VENDOR = "zendesk"
PRIORITIES = ("low", "normal", "high", "urgent")
REQUESTS_PER_MINUTE: Mapping[ZendeskPlan, int] = {
    "team": 200, "growth": 400, "professional": 400, "enterprise": 700, "enterprise_plus": 2500, "high_volume": 2500,
}
TAG = "voxlog"
AGENT_ROLES = ("agent", "admin")


def comment_marker(idempotency_key: str) -> str:
    """The last line of a comment written under this key."""
    return f"[{key_token(idempotency_key)}]"


def error_text(body: str) -> str:
    """Zendesk's words in an error body, in whichever of its shapes (`{"error": "RecordNotFound",
    "description": ...}`, 422 `{"error": "RecordInvalid", "details": {field: [{"description": ...}]}}`,
    `{"error": {"title", "message"}}`, `{"errors": [{"title", "detail"}]}`), else the body's text."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if not isinstance(document, dict):
        return body.strip()[:300]
    words: list[str] = []
    error = document.get("error")
    if isinstance(error, dict):
        words += [str(error[part]) for part in ("title", "message") if isinstance(error.get(part), str | int)]
    elif isinstance(error, str | int):
        words.append(str(error))
    if isinstance(document.get("description"), str):
        words.append(document["description"])
    details = document.get("details")
    if isinstance(details, dict):
        for problems in details.values():
            for problem in problems if isinstance(problems, list) else [problems]:
                if isinstance(problem, dict) and isinstance(problem.get("description"), str):
                    words.append(problem["description"])
    errors = document.get("errors")
    if isinstance(errors, list):
        for problem in errors:
            if isinstance(problem, dict):
                words += [str(problem[part]) for part in ("title", "detail") if isinstance(problem.get(part), str)]
    return ": ".join(words) if words else body.strip()[:300]


class _TooManyRequests(Exception):
    """A 429, raised before zenpy can sleep through its Retry-After."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__("429")
        self.response = response


def _refuse_to_wait(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    if response.status_code == 429:
        raise _TooManyRequests(response)
    return response


class _Forwarding(HTTPAdapter):
    """Sends requests for `origin` to `base_url` instead; zenpy still sees its own URLs (it matches a
    response to its API by the URL it asked)."""

    def __init__(self, origin: str, base_url: str) -> None:
        super().__init__()
        self._origin = origin
        self._base_url = base_url.rstrip("/")

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        forwarded = request.copy()
        forwarded.url = self._base_url + (request.url or "")[len(self._origin):]
        response = super().send(forwarded, *args, **kwargs)
        response.request = request
        response.url = request.url or ""
        return response


class _Session(requests.Session):
    """zenpy's session: no retries (requests' default adapters), a 429 raised at once, `base_url`
    routing, and headers for one call from one thread (zenpy's `create` takes none)."""

    def __init__(self, origin: str, base_url: str | None) -> None:
        super().__init__()
        if base_url is not None:
            self.mount(origin + "/", _Forwarding(origin, base_url))
        self.hooks["response"].append(_refuse_to_wait)
        self._this_call = threading.local()

    @contextmanager
    def headers_for_this_call(self, headers: Mapping[str, str]) -> Iterator[None]:
        self._this_call.headers = headers
        try:
            yield
        finally:
            self._this_call.headers = None

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        extra = getattr(self._this_call, "headers", None)
        if extra:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **extra}
        return super().request(method, url, *args, **kwargs)


class ZendeskDesk:
    """`TicketDesk` on one Zendesk account."""

    vendor = VENDOR

    def __init__(self, subdomain: str, email: str, token: SecretStr, *, timeout_s: float,
                 base_url: str | None = None, plan: ZendeskPlan = "team",
                 default_requester_email: str | None = None) -> None:
        self.rate_limit = RateLimit(REQUESTS_PER_MINUTE[plan], 60.0,
                                    f'Zendesk API reference, "Rate limits": the {plan} plan\'s requests a minute')
        self._origin = f"https://{subdomain}.zendesk.com"
        self._email = email
        self._token = token
        self._timeout_s = timeout_s
        self._default_requester_email = default_requester_email
        self._session = _Session(self._origin, base_url)
        # The cache off: a status read twice must ask Zendesk twice.
        self._client = Zenpy(subdomain=subdomain, email=email, token=token.get_secret_value(),
                             session=self._session, timeout=timeout_s, disable_cache=True)

    # -- TicketDesk --------------------------------------------------------------------------------

    def create(self, request: TicketRequest, idempotency_key: str) -> Ticket:
        if request.priority not in PRIORITIES:
            raise ConnectorError(FailureKind.INVALID, f"{VENDOR}: priority {request.priority!r} is not one of "
                                                      f"{', '.join(PRIORITIES)}")
        what = "looking the ticket up by its external id"
        with self._calling(what):
            # zenpy puts query values into the URL as they are: quoted here, read back whole by Zendesk.
            found = self._all(self._client.tickets(external_id=quote(idempotency_key, safe="")), ZenpyTicket, what)
            existing = next(found, None)
        if existing is not None:
            return self._ticket(existing)
        requester = request.requester_email or self._default_requester_email
        ticket = ZenpyTicket(
            subject=request.subject, comment=Comment(body=_description(request), public=True),
            priority=request.priority, tags=[TAG], external_id=idempotency_key,
            requester=User(name=request.requester_name or None, email=requester) if requester else None,
        )
        with self._session.headers_for_this_call({"Idempotency-Key": key_token(idempotency_key)}), \
                self._calling("creating the ticket"):
            created = self._client.tickets.create(ticket)
        if not isinstance(created, TicketAudit) or not isinstance(created.ticket, ZenpyTicket):
            raise not_the_api(VENDOR, "Zendesk", "creating the ticket", "no ticket in the answer")
        return self._ticket(created.ticket)

    def comment(self, ticket_id: str, body: str, idempotency_key: str) -> str:
        number = ticket_number(ticket_id, VENDOR, "Zendesk")
        marker = comment_marker(idempotency_key)
        what = "reading the ticket's comments"
        with self._calling(what):
            for existing in self._all(self._client.tickets.comments(number), Comment, what):
                if marker in str(existing.body or ""):
                    return numeric_id(existing.id, "a comment", VENDOR)
        with self._calling("adding the comment"):
            update = self._client.tickets.update(
                ZenpyTicket(id=number, comment=Comment(body=f"{body}\n\n{marker}", public=True)))
        audit = update.audit if isinstance(update, TicketAudit) else None
        events = audit.events if isinstance(audit, Audit) else None
        comments = [event for event in events or [] if isinstance(event, Mapping) and event.get("type") == "Comment"]
        if not comments:
            raise not_the_api(VENDOR, "Zendesk", "adding the comment", "no Comment event in the ticket's audit")
        return numeric_id(comments[0].get("id"), "a comment", VENDOR)

    def status(self, ticket_id: str) -> Ticket:
        number = ticket_number(ticket_id, VENDOR, "Zendesk")
        with self._calling("reading the ticket"):
            found = self._client.tickets(id=number)
        if not isinstance(found, ZenpyTicket):
            raise not_the_api(VENDOR, "Zendesk", "reading the ticket", "no ticket in the answer")
        return self._ticket(found)

    def check(self) -> list[CheckResult]:
        try:
            with self._calling("reading the signed-in user"):
                me = self._client.users.me()
            if not isinstance(me, User):
                raise not_the_api(VENDOR, "Zendesk", "reading the signed-in user", "no user in the answer")
        except ConnectorError as exc:
            return [CheckResult("sign in", False, _check_detail(exc, self._email))]
        if me.id is None:
            return [CheckResult("sign in", False, f"Zendesk signed no one in (it answered with its anonymous user): "
                                                  f"check the API token of {self._email}, and that token access is "
                                                  f"on (Admin Center, Apps and integrations, Zendesk API)")]
        results = [CheckResult("sign in", True, f"signed in as {me.email or self._email}")]
        if me.role not in AGENT_ROLES:
            results.append(CheckResult("agent role", False, f"{self._email} has the role {me.role!r}: the Tickets "
                                                             f"API takes an agent or an admin"))
            return results
        results.append(CheckResult("agent role", True, f"{self._email} has the role {me.role!r}"))
        try:
            with self._calling("listing tickets"):
                next(self._all(self._client.tickets(cursor_pagination=1), ZenpyTicket, "listing tickets"), None)
        except ConnectorError as exc:
            results.append(CheckResult("read tickets", False, _check_detail(exc, self._email)))
        else:
            results.append(CheckResult("read tickets", True, "tickets can be listed"))
        return results

    def close(self) -> None:
        """Closes the pooled connections (the interface has no such step; whoever drops a connector may)."""
        self._session.close()

    # -- zenpy -------------------------------------------------------------------------------------

    def _ticket(self, ticket: ZenpyTicket) -> Ticket:
        number = numeric_id(ticket.id, "a ticket", VENDOR)
        if not isinstance(ticket.status, str):
            raise not_the_api(VENDOR, "Zendesk", "reading a ticket", "a ticket without a status")
        return Ticket(id=number, status=ticket.status, subject=str(ticket.subject or ""),
                      url=f"{self._origin}/agent/tickets/{number}")

    def _all(self, result: Any, kind: type[Any], what: str) -> Iterator[Any]:
        """The objects of a listing, across its pages (zenpy fetches each next page as it is reached)."""
        if not isinstance(result, BaseResultGenerator):
            raise not_the_api(VENDOR, "Zendesk", what, "no list in the answer")
        for item in result:
            if not isinstance(item, kind):
                raise not_the_api(VENDOR, "Zendesk", what, f"an item that is not a {kind.__name__}")
            yield item

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """zenpy's and requests' failures as ConnectorErrors."""
        try:
            yield
        except _TooManyRequests as exc:
            raise self._failure(exc.response) from None
        except (APIException, requests.HTTPError) as exc:
            if exc.response is None:
                raise not_the_api(VENDOR, "Zendesk", what, type(exc).__name__) from None
            raise self._failure(exc.response) from None
        except requests.Timeout:
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"{VENDOR}: no answer within {self._timeout_s:g} s while {what}") from None
        except requests.RequestException as exc:
            if isinstance(exc, ValueError):  # a body that is not JSON, a next-page link that is not a URL
                raise not_the_api(VENDOR, "Zendesk", what, type(exc).__name__) from None
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"{VENDOR}: the connection failed while {what} ({type(exc).__name__})") from None
        except (ZenpyException, ValueError, KeyError, TypeError, AttributeError) as exc:
            # zenpy reads a body of an unexpected shape by indexing into it
            raise not_the_api(VENDOR, "Zendesk", what, type(exc).__name__) from None

    def _failure(self, response: requests.Response) -> ConnectorError:
        detail = error_text(response.text).replace(self._token.get_secret_value(), "***")
        return failure_for_status(response.status_code, detail, vendor=VENDOR,
                                  retry_after=response.headers.get("Retry-After"))


def _description(request: TicketRequest) -> str:
    caller = ", ".join(part for part in (request.requester_name, request.requester_phone) if part)
    return f"{request.description}\n\nCaller: {caller}" if caller else request.description


def _check_detail(exc: ConnectorError, email: str) -> str:
    if exc.kind is FailureKind.AUTH:
        return f"the API token was refused (401): check {email}'s token, and that token access is on"
    if exc.kind is FailureKind.SCOPE:
        return f"signed in, but refused (403): {email} lacks the permission"
    return str(exc)


def connect(settings: ZendeskSettings, secrets: Secrets, timeout_s: float) -> ZendeskDesk:
    return ZendeskDesk(settings.subdomain, settings.email, secrets.resolve(settings.token, "Zendesk API token"),
                       timeout_s=timeout_s, base_url=settings.base_url, plan=settings.plan,
                       default_requester_email=settings.default_requester_email)
