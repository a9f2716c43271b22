"""`hubspot`: the customer's HubSpot CRM, through HubSpot's own SDK (`hubspot-api-client` 12: the CRM v3
objects and search APIs), signed in as a private app (its access token, sent as a Bearer token).

What each operation sends:
- `find_contact(phone)`: `POST /crm/v3/objects/contacts/search` with four filter groups, which HubSpot
  ORs: `phone`, `mobilephone`, `hs_calculated_phone_number` or `hs_calculated_mobile_number` EQ the
  number (the last two are HubSpot's own E.164 readings of the first two, so a number typed as
  "(415) 555-0100" is found by +14155550100); sorted by `lastmodifieddate` descending with `limit` 1,
  so HubSpot answers the most recently changed match in one page however many match.
- `upsert_contact(fields, key)`: the same search, then `PATCH /crm/v3/objects/contacts/{id}` with the
  fields given (not the phone: the match may hold the number as its mobile) where a contact has the
  number, else `POST /crm/v3/objects/contacts`. HubSpot keeps emails unique: an email that is another
  contact's is a CONFLICT, with HubSpot's "Contact already exists. Existing ID: N".
- `log_call(contact_id, note, key)`: `POST /crm/v3/objects/calls/search` for the key, then, where no call
  has it, `POST /crm/v3/objects/calls` with `hs_timestamp` (the start), `hs_call_title`, `hs_call_body`
  (summary, outcome and ticket as HTML paragraphs: HubSpot shows the body as rich text),
  `hs_call_duration` (milliseconds), `hs_call_direction` (INBOUND or OUTBOUND), `hs_call_status`
  COMPLETED, `hs_call_recording_url`, `hs_call_external_id` (the key), and the contact in the create's
  `associations` (`HUBSPOT_DEFINED` type 194, call to contact): the call and its association are one write.
- `check()`: `GET /crm/v3/objects/contacts?limit=1` (reach, the token, reading contacts), the same for
  calls, and the write scope by `PATCH /crm/v3/objects/contacts/0` and `.../calls/0` with no properties:
  HubSpot never gives id 0, so nothing changes, and it checks a token's scopes before it looks an object
  up, so a 403 says the scope is missing and a 404 that it is granted. HubSpot's 403 names the scopes
  it wants (`crm.objects.contacts.write`; its calls API uses the contacts scopes); the detail says them.

Idempotency. A call's key goes into `hs_call_external_id` (HubSpot's property for the id a call has in
the system that logged it), as `voxlog:<key>` so that it cannot meet a calling app's own ids in the same
account, and a search on it comes before the create: the same key again answers the call the first made.
A contact's key is its phone number, which HubSpot searches on: a repeated upsert finds the contact the
first created and sets the same fields again, so it creates nothing and changes nothing. HubSpot's search
index follows writes by a few seconds ("Search the CRM"), so a repeat within them can miss the first's
object; the worker's retries come later than that, a redelivered command later still.

Failures (`ConnectorError`): an HTTP error through `http_status.failure_for_status`, with HubSpot's own
message (and a 403's scopes); no answer within `timeout_s` (urllib3's total timeout, on every request),
or no connection: UNAVAILABLE; an answer that is not HubSpot's JSON, or an object without an id:
BAD_RESPONSE. The SDK's urllib3 retries are off: the worker retries. No message carries the token.

Rate limit. HubSpot's "API usage guidelines and limits": a private app in a Free or Starter account may
make 100 requests every 10 seconds (190 on Professional and Enterprise), and the CRM search endpoints
take 5 requests a second. Every operation here searches once and writes at most once, so 5 operations a
second keep both limits (10 requests, 5 of them searches): `rate_limit` is 5 a second.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any, TypeVar

import urllib3
from hubspot import HubSpot
from hubspot.crm import contacts as hs_contacts
from hubspot.crm.objects import calls as hs_calls
from pydantic import SecretStr

from streams.connectors.base import (
    CallNote,
    CheckResult,
    ConnectorError,
    Contact,
    ContactFields,
    FailureKind,
    RateLimit,
)
from streams.connectors.http_status import failure_for_status
from streams.connectors.secrets import Secrets
from streams.connectors.vendor_settings import HUBSPOT_API
from streams.connectors.vendor_settings import HubSpotSettings as HubSpotSettings

T = TypeVar("T")

VENDOR = "hubspot"

RATE_LIMIT = RateLimit(
    requests=5, per_s=1.0,
    source="HubSpot, API usage guidelines and limits: private apps (Free, Starter) 100 requests per 10 seconds; "
           "CRM search endpoints 5 requests per second; every operation here searches once",
)

CALL_TO_CONTACT = 194
"""HubSpot's default (`HUBSPOT_DEFINED`) association type from a call to a contact."""
KEY_PREFIX = "voxlog:"
"""Before the idempotency key in `hs_call_external_id`, apart from calling apps' own call ids."""

PHONE_PROPERTIES = ("phone", "mobilephone", "hs_calculated_phone_number", "hs_calculated_mobile_number")
"""Where a contact's number may be: as typed, and as HubSpot's E.164 reading of it."""
DETAIL_PROPERTIES = ("lifecyclestage", "hs_lead_status", "hubspot_owner_id", "jobtitle", "mobilephone")
"""What a contact carries besides name, email, phone and company, for the agent's context."""
CONTACT_PROPERTIES = ("firstname", "lastname", "email", "phone", "company", "lastmodifieddate", *DETAIL_PROPERTIES)
SEARCH_SORT = {"propertyName": "lastmodifieddate", "direction": "DESCENDING"}

SDK_HTTP_ERRORS = (hs_contacts.ApiException, hs_calls.ApiException)
"""Each SDK package has its own exception classes; these carry the HTTP status, body and headers."""
SDK_MODEL_ERRORS = (ValueError, TypeError, AttributeError, KeyError)
"""What the SDK raises reading an answer whose parts have the wrong JSON types (`properties` a list has no
`items`). Its models check nothing themselves (the SDK turns client-side validation off): `_results` and
`_object` check what the connector reads."""

CONTACTS_READ = "crm.objects.contacts.read"
CONTACTS_WRITE = "crm.objects.contacts.write"
"""The private app's scopes the operations need; HubSpot's calls API takes the contacts scopes too."""
NEVER_AN_ID = "0"
"""An object id HubSpot never gives: `check()` writes to it to learn the write scope, changing nothing."""


class HubSpotCrm:
    """A `CrmConnector` over one HubSpot account."""

    vendor = VENDOR
    rate_limit = RATE_LIMIT

    def __init__(self, token: SecretStr, *, timeout_s: float, base_url: str = HUBSPOT_API) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._base_url = base_url.rstrip("/")
        # One client per API, made once: each holds its own urllib3 pool. `retry=False`: urllib3 would
        # otherwise retry a refused or dropped connection itself, past the deadline.
        sdk = HubSpot(access_token=token.get_secret_value(), host=self._base_url, retry=False)
        self._contacts = sdk.crm.contacts.basic_api
        self._contacts_search = sdk.crm.contacts.search_api
        self._calls = sdk.crm.objects.calls.basic_api
        self._calls_search = sdk.crm.objects.calls.search_api

    # -- contacts -------------------------------------------------------------------------------------

    def find_contact(self, phone: str) -> Contact | None:
        found = self._find(phone)
        return None if found is None else _contact(*found)

    def upsert_contact(self, fields: ContactFields, idempotency_key: str) -> Contact:
        if not fields.phone.strip():
            raise ConnectorError(FailureKind.INVALID, "HubSpot: a contact is upserted by its phone number; none given")
        given = {name: value for name, value in (("firstname", fields.first_name), ("lastname", fields.last_name),
                                                   ("email", fields.email), ("company", fields.company)) if value}
        # The key stays here: the phone number is what makes a repeat find the first's contact.
        found = self._find(fields.phone)
        if found is None:
            created = self._sdk(self._contacts.create, simple_public_object_input_for_create=(
                hs_contacts.SimplePublicObjectInputForCreate(properties={"phone": fields.phone, **given})))
            return _contact(*_object(created))
        contact_id, properties = found
        if not given:
            return _contact(contact_id, properties)
        updated = self._sdk(self._contacts.update, contact_id=contact_id,
                            simple_public_object_input=hs_contacts.SimplePublicObjectInput(properties=given))
        _, changed = _object(updated)
        return _contact(contact_id, {**properties, **changed})

    def _find(self, phone: str) -> tuple[str, dict[str, str]] | None:
        """The id and properties of the most recently changed contact with this number."""
        number = phone.strip()
        if not number:
            return None
        request = hs_contacts.PublicObjectSearchRequest(
            filter_groups=[hs_contacts.FilterGroup(filters=[hs_contacts.Filter(property_name=name, operator="EQ",
                                                                               value=number)])
                           for name in PHONE_PROPERTIES],
            sorts=[SEARCH_SORT], properties=list(CONTACT_PROPERTIES), limit=1)
        page = self._sdk(self._contacts_search.do_search, public_object_search_request=request)
        results = _results(page)
        return _object(results[0]) if results else None

    # -- calls ----------------------------------------------------------------------------------------

    def log_call(self, contact_id: str, note: CallNote, idempotency_key: str) -> str:
        direction = note.direction.strip().upper()
        if direction not in ("INBOUND", "OUTBOUND"):
            raise ConnectorError(FailureKind.INVALID,
                                 f"HubSpot: a call's direction is inbound or outbound, not {note.direction!r}")
        external_id = KEY_PREFIX + idempotency_key
        search = hs_calls.PublicObjectSearchRequest(
            filter_groups=[hs_calls.FilterGroup(filters=[hs_calls.Filter(property_name="hs_call_external_id",
                                                                         operator="EQ", value=external_id)])],
            properties=["hs_call_external_id"], limit=1)
        existing = _results(self._sdk(self._calls_search.do_search, public_object_search_request=search))
        if existing:
            return _object(existing[0])[0]
        properties = {
            "hs_timestamp": note.started_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "hs_call_title": f"{direction.capitalize()} call with the voice agent" + (
                f": {note.outcome}" if note.outcome else ""),
            "hs_call_body": _call_body(note),
            "hs_call_duration": str(max(note.duration_s, 0) * 1000),
            "hs_call_direction": direction,
            "hs_call_status": "COMPLETED",
            "hs_call_external_id": external_id,
        }
        if note.recording_url:
            properties["hs_call_recording_url"] = note.recording_url
        association = hs_calls.PublicAssociationsForObject(
            to=hs_calls.PublicObjectId(id=contact_id),
            types=[hs_calls.AssociationSpec(association_category="HUBSPOT_DEFINED",
                                            association_type_id=CALL_TO_CONTACT)])
        created = self._sdk(self._calls.create, simple_public_object_input_for_create=(
            hs_calls.SimplePublicObjectInputForCreate(properties=properties, associations=[association])))
        return _object(created)[0]

    # -- check ----------------------------------------------------------------------------------------

    def check(self) -> list[CheckResult]:
        probes: list[tuple[str, bool, Callable[[], object]]] = [  # (what, whether it writes, the request)
            (f"read contacts ({CONTACTS_READ})", False, lambda: self._sdk(self._contacts.get_page, limit=1)),
            (f"read calls ({CONTACTS_READ})", False, lambda: self._sdk(self._calls.get_page, limit=1)),
            (f"write contacts ({CONTACTS_WRITE})", True, lambda: self._sdk(
                self._contacts.update, contact_id=NEVER_AN_ID,
                simple_public_object_input=hs_contacts.SimplePublicObjectInput(properties={}))),
            (f"write calls ({CONTACTS_WRITE})", True, lambda: self._sdk(
                self._calls.update, call_id=NEVER_AN_ID,
                simple_public_object_input=hs_calls.SimplePublicObjectInput(properties={}))),
        ]
        reached = CheckResult("reach HubSpot", True, self._base_url)
        results = [reached, CheckResult("private app token", True, "accepted")]
        for what, writes, probe in probes:
            try:
                probe()
            except ConnectorError as error:
                if error.kind is FailureKind.UNAVAILABLE and len(results) == 2:
                    return [CheckResult("reach HubSpot", False, f"{self._base_url}: {error}")]
                if error.kind is FailureKind.AUTH:
                    refused = f"token refused (401): check the private app's access token; {error.args[0]}"
                    return [reached, CheckResult("private app token", False, refused)]
                results.append(_probe_failure(what, writes, error))
            else:
                results.append(CheckResult(what, True, "granted"))
        return results

    # -- the SDK --------------------------------------------------------------------------------------

    def _sdk(self, operation: Callable[..., T], /, **arguments: Any) -> T:
        """One SDK request under the timeout, its failures as `ConnectorError`s."""
        try:
            return operation(**arguments, _request_timeout=self._timeout_s)
        except SDK_HTTP_ERRORS as error:
            if not error.status:  # raised by the SDK itself, not for an HTTP answer (a date it cannot read)
                raise ConnectorError(FailureKind.BAD_RESPONSE, f"HubSpot: {self._scrub(str(error.reason))}") from error
            headers = error.headers or {}
            raise failure_for_status(error.status, self._scrub(_error_text(error.body)), vendor="HubSpot",
                                     retry_after=headers.get("Retry-After")) from error
        except urllib3.exceptions.NewConnectionError as error:  # a TimeoutError to urllib3, but refused at once
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"HubSpot could not be reached ({type(error).__name__})") from error
        except urllib3.exceptions.TimeoutError as error:
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"HubSpot did not answer within {self._timeout_s:g} s") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"HubSpot could not be reached ({type(error).__name__})") from error
        except SDK_MODEL_ERRORS as error:
            if isinstance(error.__context__, SDK_HTTP_ERRORS):
                # The SDK fails decoding the body of its own status-0 error (a TLS failure): no answer came.
                reason = self._scrub(str(error.__context__.reason))
                raise ConnectorError(FailureKind.UNAVAILABLE, f"HubSpot could not be reached ({reason})") from error
            raise ConnectorError(FailureKind.BAD_RESPONSE,
                                 f"HubSpot answered something that is not its API ({type(error).__name__})") from error

    def _scrub(self, text: str) -> str:
        """`text` without the token, should an error ever echo it."""
        return text.replace(self._token.get_secret_value(), "[token]")


def connect(settings: HubSpotSettings, secrets: Secrets, timeout_s: float) -> HubSpotCrm:
    return HubSpotCrm(secrets.resolve(settings.token, "HubSpot private app token"), timeout_s=timeout_s,
                      base_url=settings.base_url)


# -- reading HubSpot's answers ---------------------------------------------------------------------------


def _results(page: Any) -> list[Any]:
    results = getattr(page, "results", None)
    if not isinstance(results, list):
        raise ConnectorError(FailureKind.BAD_RESPONSE, "HubSpot: a search answer without its results")
    return results


def _object(answer: Any) -> tuple[str, dict[str, str]]:
    """An object's id and its properties, those without a value left out."""
    object_id = getattr(answer, "id", None)
    properties = getattr(answer, "properties", None)
    if not isinstance(object_id, str) or not object_id.strip() or not isinstance(properties, dict):
        raise ConnectorError(FailureKind.BAD_RESPONSE, "HubSpot: an object without its id or properties")
    return object_id, {str(name): str(value).strip() for name, value in properties.items()
                       if value is not None and str(value).strip()}


def _contact(contact_id: str, properties: Mapping[str, str]) -> Contact:
    first, last = properties.get("firstname", ""), properties.get("lastname", "")
    return Contact(
        id=contact_id,
        name=" ".join(part for part in (first, last) if part),
        first_name=first,
        email=properties.get("email", ""),
        phone=properties.get("phone") or properties.get("mobilephone", ""),
        company=properties.get("company", ""),
        details={name: properties[name] for name in DETAIL_PROPERTIES if name in properties},
    )


def _call_body(note: CallNote) -> str:
    """The call's notes, as the HTML HubSpot shows them in."""
    paragraphs = [note.summary]
    if note.outcome:
        paragraphs.append(f"Outcome: {note.outcome}")
    if note.ticket_id:
        paragraphs.append(f"Ticket: {note.ticket_id}")
    paragraphs.append(f"voxlog call {note.call_id}")
    return "".join(f"<p>{html.escape(text, quote=False)}</p>" for text in paragraphs if text)


def _error_text(body: object) -> str:
    """HubSpot's message from its error body (`{"status": "error", "message", "category", ...}`), with the
    scopes a 403 names (`errors[].context.requiredGranularScopes`); the body itself where it is not JSON."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return " ".join(text.split())
    message = str(parsed.get("message") or "").strip() or " ".join(text.split())
    scopes = [str(scope) for error in parsed.get("errors") or [] if isinstance(error, dict)
              for scope in (error.get("context") or {}).get("requiredGranularScopes") or []]
    return f"required scopes {', '.join(scopes)}: {message}" if scopes else message


def _probe_failure(what: str, writes: bool, error: ConnectorError) -> CheckResult:
    """What a check's refused request says of its scope."""
    if writes and error.kind in (FailureKind.NOT_FOUND, FailureKind.INVALID):
        # The write to NEVER_AN_ID got past HubSpot's scope check, to the object's lookup.
        return CheckResult(what, True, "granted")
    if error.kind is FailureKind.SCOPE:
        return CheckResult(what, False, f"scope missing (403): add it to the private app; {error.args[0]}")
    if error.kind is FailureKind.RATE_LIMITED and error.retry_after_s is not None:
        return CheckResult(what, False, f"rate limited (429): try again in {error.retry_after_s:g} s")
    return CheckResult(what, False, str(error))
