"""Salesforce as the customer's CRM: contacts found and kept by phone number, calls logged as Tasks,
through simple-salesforce (the REST API, `/services/data/vXX.X/`).

Signing in is OAuth 2.0 server to server, in one of the two flows a connected app (or an external
client app) offers an unattended integration:

- the client credentials flow: the consumer key and secret are posted to the org's token endpoint
  (`{login_url}/services/oauth2/token`, `grant_type=client_credentials`) and Salesforce answers a token
  for the app's Run As user. Salesforce accepts this flow only at the org's My Domain URL, never at
  login.salesforce.com or test.salesforce.com (the settings refuse those);
- the JWT bearer flow: an assertion (iss = consumer key, sub = the integration user's username,
  aud = the login URL, exp three minutes on), signed RS256 with the private key whose certificate
  was uploaded to the app, posted with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`.

Either answer carries `access_token` and `instance_url` (the org's own host, where every REST call
goes) and no refresh token: the connector signs in lazily, on its first call, and signs in again
when the REST API answers 401 (INVALID_SESSION_ID: the session timed out or was revoked), retrying
that one request once; a second 401 is FailureKind.AUTH. simple-salesforce is given the token
(`Salesforce(instance_url=..., session_id=...)`) rather than doing the sign-in itself, since its own
login builds `https://{domain}.salesforce.com` URLs and retries a 401 up to three times.

simple-salesforce sets no timeout on its requests, and most of its calls (SFType's create, update,
describe) take no keyword to pass one through, so the connector's `requests.Session` carries an
adapter that bounds every request it sends (connect and each read) by `timeout_s`.

Errors: Salesforce answers a JSON list of `{"message", "errorCode"}`. The HTTP status is mapped by
`failure_for_status`, and the errorCode overrides it where it says more (`_KIND_BY_ERROR_CODE`):
REQUEST_LIMIT_EXCEEDED comes with 403 but is a rate limit, DUPLICATE_VALUE and DUPLICATES_DETECTED
(a duplicate rule) come with 400 but are conflicts, INVALID_CROSS_REFERENCE_KEY (400) names a record
that is not there, UNABLE_TO_LOCK_ROW (400) is contention worth retrying.

Idempotency:
- `log_call`: Salesforce takes no idempotency header on a create, and a Task has no external id
  field. It does have `CallObject` ("Call Object Identifier", a string of up to 255 characters that
  call-center (CTI) integrations fill with their own call's id), so the key is written there and a
  `SELECT Id, CallObject FROM Task WHERE CallObject = <key>` runs before each create: a repeat answers
  the Task the first run made. SOQL's `=` ignores case, so the matches are read to the last page and
  the Task whose CallObject is exactly the key is taken. SOQL (unlike SOSL, whose index lags) sees a
  record as soon as its create returns. Two runs of the same key at the same moment could both find
  nothing and both create: the check covers a redelivered command or a worker run again after a crash,
  which is what the tool worker's retries are.
- `upsert_contact`: a Contact has no standard field to carry a key either; the phone number is the
  natural one. The contact with the number is looked up first and updated (only the fields that
  differ), or created, so the same fields twice make one contact and change nothing the second time.

Every value put into SOQL is quoted by simple-salesforce's `format_soql` (backslash escapes for
`'`, `"`, `\\` and control characters, Salesforce's "Quoted String Escape Sequences"), so a phone
number or key like `' OR Name LIKE '%` is compared as the string it is.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jwt
import requests
from pydantic import SecretStr
from requests.adapters import HTTPAdapter
from simple_salesforce.api import Salesforce, SFType
from simple_salesforce.exceptions import SalesforceError
from simple_salesforce.format import format_soql

from streams.connectors.base import (
    CallNote,
    CheckResult,
    ConnectorError,
    Contact,
    ContactFields,
    FailureKind,
    RateLimit,
)
from streams.connectors.http_status import failure_for_status, retry_after_s
from streams.connectors.secrets import Secrets
from streams.connectors.vendor_settings import DEFAULT_DETAIL_FIELDS, ENTERPRISE_DAILY_API_REQUESTS, FIELD_PATH
from streams.connectors.vendor_settings import Flow as Flow
from streams.connectors.vendor_settings import SalesforceSettings as SalesforceSettings

T = TypeVar("T")

VENDOR = "Salesforce"

RATE_LIMIT_SOURCE = ("Salesforce Developer Limits and Allocations Quick Reference, \"API Request Limits and "
                     "Allocations\" (Enterprise Edition: 100,000 requests per 24 hours, plus 1,000 per license)")

_FIELD_PATH = re.compile(FIELD_PATH)
_TOKEN_PATH = "/services/oauth2/token"
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_JWT_LIFETIME_S = 180  # Salesforce: the assertion's exp within 3 minutes of now

# Task field limits (Salesforce Object Reference, Task).
_SUBJECT_MAX = 255
_CALL_OBJECT_MAX = 255
_CALL_DISPOSITION_MAX = 255
_DESCRIPTION_MAX = 32_000
_CALL_TYPES = {"inbound": "Inbound", "outbound": "Outbound"}

_CONTACT_FIELDS = ("Id", "Name", "FirstName", "LastName", "Email", "Phone", "MobilePhone", "AccountId", "Account.Name")

_KIND_BY_ERROR_CODE: Mapping[str, FailureKind] = {
    # Where Salesforce's errorCode says better than the HTTP status it came with.
    "INVALID_SESSION_ID": FailureKind.AUTH,
    "REQUEST_LIMIT_EXCEEDED": FailureKind.RATE_LIMITED,  # 403: the daily allocation or concurrent long calls
    "INSUFFICIENT_ACCESS_OR_READONLY": FailureKind.SCOPE,  # 403, or 400 on a record the user cannot edit
    "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY": FailureKind.SCOPE,  # 400: a WhoId the user cannot see
    "NOT_FOUND": FailureKind.NOT_FOUND,
    "ENTITY_IS_DELETED": FailureKind.NOT_FOUND,  # 400
    "INVALID_CROSS_REFERENCE_KEY": FailureKind.NOT_FOUND,  # 400: a WhoId or AccountId naming no record
    "DUPLICATE_VALUE": FailureKind.CONFLICT,  # 400: a unique field's value is taken
    "DUPLICATES_DETECTED": FailureKind.CONFLICT,  # 400: the org's duplicate rule blocked the create
    "UNABLE_TO_LOCK_ROW": FailureKind.UNAVAILABLE,  # 400: another transaction holds the record; transient
    "SERVER_UNAVAILABLE": FailureKind.UNAVAILABLE,
    "MALFORMED_QUERY": FailureKind.INVALID,
    "INVALID_FIELD": FailureKind.INVALID,
}


class _BoundedAdapter(HTTPAdapter):
    """Bounds every request by the connector's timeout, verifies TLS against the configured CA file
    where there is one (requests lets REQUESTS_CA_BUNDLE override a session's own `verify`), and keeps
    each thread's last Retry-After (the SDK's exceptions keep an answer's body, not its headers)."""

    def __init__(self, timeout_s: float, ca_file: Path | None) -> None:
        super().__init__()
        self._timeout_s = timeout_s
        self._ca_file = None if ca_file is None else str(ca_file)
        self._last = threading.local()

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: float | tuple[float | None, float | None] | None = None, verify: bool | str = True,
             cert: str | tuple[str, str] | None = None, proxies: dict[str, str] | None = None) -> requests.Response:
        self._last.retry_after = None
        response = super().send(request, stream=stream, timeout=self._timeout_s if timeout is None else timeout,
                                verify=self._ca_file or verify, cert=cert, proxies=proxies)
        self._last.retry_after = response.headers.get("Retry-After")
        return response

    def last_retry_after(self) -> str | None:
        """The Retry-After of this thread's last answer."""
        value: str | None = getattr(self._last, "retry_after", None)
        return value


class SalesforceConnector:
    """A Salesforce org's contacts and call Tasks (`CrmConnector`)."""

    vendor = "salesforce"

    def __init__(self, *, login_url: str, flow: Flow, client_id: str, timeout_s: float,
                 client_secret: SecretStr | None = None, username: str | None = None,
                 private_key: SecretStr | None = None, api_version: str = "62.0",
                 detail_fields: Sequence[str] = DEFAULT_DETAIL_FIELDS,
                 daily_api_requests: int = ENTERPRISE_DAILY_API_REQUESTS, ca_file: Path | None = None) -> None:
        if flow == "client_credentials" and client_secret is None:
            raise ConnectorError(FailureKind.CONFIGURATION,
                                 "Salesforce: the client credentials flow needs a client secret")
        if flow == "jwt_bearer" and (username is None or private_key is None):
            raise ConnectorError(FailureKind.CONFIGURATION,
                                 "Salesforce: the JWT bearer flow needs a username and a private key")
        unusable = [name for name in detail_fields if not _FIELD_PATH.match(name)]
        if unusable:
            raise ConnectorError(FailureKind.CONFIGURATION, f"Salesforce: not field names: {', '.join(unusable)}")
        self.rate_limit = RateLimit(requests=daily_api_requests, per_s=86_400.0, source=RATE_LIMIT_SOURCE)
        self._login_url = login_url.rstrip("/")
        self._flow = flow
        self._client_id = client_id
        self._client_secret = client_secret
        self._username = username
        self._private_key = private_key
        self._api_version = api_version
        self._detail_fields = tuple(dict.fromkeys(name for name in detail_fields if name not in _CONTACT_FIELDS))
        self._timeout_s = timeout_s
        self._adapter = _BoundedAdapter(timeout_s, ca_file)
        self._http = requests.Session()
        self._http.mount("https://", self._adapter)
        self._http.mount("http://", self._adapter)
        self._signing_in = threading.Lock()
        self._api: Salesforce | None = None

    # -- CrmConnector ------------------------------------------------------------------------------

    def find_contact(self, phone: str) -> Contact | None:
        record = self._contact_record(phone)
        return None if record is None else self._contact(record)

    def upsert_contact(self, fields: ContactFields, idempotency_key: str) -> Contact:
        # The phone number is the key that reaches Salesforce (module docstring): `idempotency_key` has
        # no standard Contact field to go into.
        if not fields.phone.strip():
            raise ConnectorError(FailureKind.INVALID,
                                 "Salesforce: a contact is kept by its phone number, and none was given")
        record = self._contact_record(fields.phone)
        account_id, company = (self._account_named(fields.company), fields.company) if fields.company else (None, "")
        wanted = {"FirstName": fields.first_name, "LastName": fields.last_name, "Email": fields.email,
                  "AccountId": account_id}
        if record is None:
            data = {name: value for name, value in wanted.items() if value}
            data["LastName"] = fields.last_name or fields.phone  # Salesforce requires a LastName
            data["Phone"] = fields.phone
            contact_id = self._create("Contact", data)
            return Contact(id=contact_id, name=f"{fields.first_name} {data['LastName']}".strip(),
                           first_name=fields.first_name, email=fields.email, phone=fields.phone, company=company)
        current = self._contact(record)
        changes = {name: value for name, value in wanted.items() if value and value != _text(record, name)}
        if changes:
            self._rest(lambda api: self._sobject(api, "Contact").update(current.id, changes))
        first_name = changes.get("FirstName", current.first_name)
        last_name = changes.get("LastName", _text(record, "LastName"))
        return Contact(id=current.id, name=f"{first_name} {last_name}".strip(), first_name=first_name,
                       email=changes.get("Email", current.email), phone=current.phone,
                       company=company or current.company, details=current.details)

    def log_call(self, contact_id: str, note: CallNote, idempotency_key: str) -> str:
        if not idempotency_key:
            raise ConnectorError(FailureKind.INVALID, "Salesforce: log_call needs an idempotency key")
        call_object = _call_object(idempotency_key)
        soql = format_soql("SELECT Id, CallObject FROM Task WHERE CallObject = {key}", key=call_object)
        for record in self._records(soql):
            if _text(record, "CallObject") == call_object:  # `=` matched it ignoring case; the key is exact
                return _text(record, "Id", required=True)
        task: dict[str, Any] = {
            "WhoId": contact_id,
            "Subject": _subject(note)[:_SUBJECT_MAX],
            "Description": _description(note)[:_DESCRIPTION_MAX],
            "TaskSubtype": "Call",
            "Status": "Completed",
            "ActivityDate": note.started_at.date().isoformat(),
            "CallDurationInSeconds": max(note.duration_s, 0),
            "CallDisposition": note.outcome[:_CALL_DISPOSITION_MAX],
            "CallObject": call_object,
        }
        call_type = _CALL_TYPES.get(note.direction.lower())
        if call_type is not None:
            task["CallType"] = call_type
        return self._create("Task", task)

    def check(self) -> list[CheckResult]:
        flow = self._flow.replace("_", " ")
        try:
            self._signed_in()
        except ConnectorError as error:
            return [CheckResult("sign in", False, self._sign_in_advice(error))]
        results = [CheckResult("sign in", True, f"{flow} flow at {self._login_url}")]
        try:
            self._records("SELECT Id FROM Contact LIMIT 1")
        except ConnectorError as error:
            results.append(CheckResult("read Contacts", False, _advice(error, "reading Contacts")))
        else:
            results.append(CheckResult("read Contacts", True, "a query on Contact answered"))
        results.append(self._check_task_create())
        return results

    # -- Salesforce --------------------------------------------------------------------------------

    def _contact_record(self, phone: str) -> dict[str, Any] | None:
        """The most recently changed Contact whose Phone or MobilePhone is `phone`."""
        if not phone.strip():
            return None  # `Phone = ''` would match every contact without a number
        fields = ", ".join((*_CONTACT_FIELDS, *self._detail_fields))
        soql = format_soql(f"SELECT {fields} FROM Contact WHERE Phone = {{phone}} OR MobilePhone = {{phone}} "
                           "ORDER BY LastModifiedDate DESC LIMIT 1", phone=phone)
        records = self._records(soql)
        return records[0] if records else None

    def _account_named(self, name: str) -> str:
        """The Account with this name (the oldest, where several have it), made where there is none: a
        Contact's company is its Account."""
        soql = format_soql("SELECT Id FROM Account WHERE Name = {name} ORDER BY CreatedDate ASC LIMIT 1", name=name)
        records = self._records(soql)
        if records:
            return _text(records[0], "Id", required=True)
        return self._create("Account", {"Name": name})

    def _contact(self, record: Mapping[str, Any]) -> Contact:
        details = {name: value for name in self._detail_fields if (value := _text(record, name))}
        return Contact(id=_text(record, "Id", required=True), name=_text(record, "Name"),
                       first_name=_text(record, "FirstName"), email=_text(record, "Email"),
                       phone=_text(record, "Phone") or _text(record, "MobilePhone"),
                       company=_text(record, "Account.Name"), details=details)

    def _check_task_create(self) -> CheckResult:
        try:
            described = self._rest(lambda api: self._sobject(api, "Task").describe())
        except ConnectorError as error:
            return CheckResult("create Tasks", False, _advice(error, "describing Task"))
        if not isinstance(described, dict) or not isinstance(described.get("fields"), list):
            return CheckResult("create Tasks", False, "Salesforce answered Task's describe without its fields")
        if described.get("createable") is not True:
            return CheckResult("create Tasks", False, "the integration user has no permission to create Tasks: "
                                                      "give its profile or permission set Create on Tasks")
        createable = {field.get("name") for field in described["fields"]
                      if isinstance(field, dict) and field.get("createable") is True}
        missing = [name for name in ("CallObject", "TaskSubtype", "WhoId") if name not in createable]
        if missing:
            return CheckResult("create Tasks", False, f"the integration user has no permission to set Task's "
                                                      f"{', '.join(missing)} (field-level security), which logging "
                                                      "a call (and its idempotency key) needs")
        return CheckResult("create Tasks", True, "Task is createable, with CallObject, TaskSubtype and WhoId")

    def _sign_in_advice(self, error: ConnectorError) -> str:
        if error.kind == FailureKind.AUTH:
            if self._flow == "client_credentials":
                hint = ("check the consumer key and secret, that the app enables the client credentials flow "
                        "with a Run As user, and that login_url is the org's My Domain URL")
            else:
                hint = ("check the consumer key, the username, that the certificate uploaded to the app matches "
                        "the private key, and that the user is pre-authorized for the app")
            return f"token refused: {error}; {hint}"
        return _advice(error, "signing in")

    def _records(self, soql: str) -> list[dict[str, Any]]:
        """Every record the query answers, page after page (Salesforce answers up to 2,000 records a page
        and names the next page's URL in `nextRecordsUrl`)."""
        records = self._rest(lambda api: list(api.query_all_iter(soql)))
        if not all(isinstance(record, dict) for record in records):
            raise ConnectorError(FailureKind.BAD_RESPONSE, "Salesforce: a query answered records that are not objects")
        return records

    def _create(self, sobject: str, data: dict[str, Any]) -> str:
        """Creates the record: its Id (from Salesforce's `201 {"id", "success", "errors"}`)."""
        answer = self._rest(lambda api: self._sobject(api, sobject).create(data))
        record_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(record_id, str) or not record_id or answer.get("success") is not True:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"Salesforce: creating a {sobject} answered no id")
        return record_id

    def _sobject(self, api: Salesforce, name: str) -> SFType:
        return SFType(name, api.session_id, api.sf_instance, sf_version=api.sf_version, session=api.session,
                      salesforce=api, object_pairs_hook=dict)

    def _rest(self, operation: Callable[[Salesforce], T]) -> T:
        """Runs `operation` with the current token; on a 401, signs in again and runs it once more (a
        401 is answered before anything is done, so running it again cannot do it twice)."""
        api = self._signed_in()
        try:
            return self._attempt(operation, api)
        except ConnectorError as error:
            if error.status != 401:
                raise
        try:
            return self._attempt(operation, self._signed_in(replacing=api))
        except ConnectorError as error:
            if error.status == 401:
                raise ConnectorError(FailureKind.AUTH, f"{error.args[0]} (again, with a new token)",
                                     status=401) from None
            raise

    def _attempt(self, operation: Callable[[Salesforce], T], api: Salesforce) -> T:
        try:
            return operation(api)
        except SalesforceError as exc:
            raise self._failure(exc.status, exc.content) from None
        except requests.exceptions.JSONDecodeError:
            raise ConnectorError(FailureKind.BAD_RESPONSE, "Salesforce answered something that is not JSON") from None
        except requests.Timeout:
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"Salesforce did not answer within {self._timeout_s:g} s") from None
        except requests.RequestException as exc:
            # The exception's text names the URL, and a query's URL holds a phone number: its type only.
            raise ConnectorError(FailureKind.UNAVAILABLE,
                                 f"Salesforce could not be reached ({type(exc).__name__})") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            # simple-salesforce reads `records`, `done` and `nextRecordsUrl` out of a query's answer.
            raise ConnectorError(FailureKind.BAD_RESPONSE, "Salesforce answered JSON that is not its API's") from None

    def _failure(self, status: int, content: object) -> ConnectorError:
        codes, text = _errors(content)
        error = failure_for_status(status, text, vendor=VENDOR, retry_after=self._adapter.last_retry_after())
        kind = next((_KIND_BY_ERROR_CODE[code] for code in codes if code in _KIND_BY_ERROR_CODE), None)
        if kind is None or kind == error.kind:
            return error
        return ConnectorError(kind, error.args[0], status=status,
                              retry_after_s=retry_after_s(self._adapter.last_retry_after()))

    # -- signing in --------------------------------------------------------------------------------

    def _signed_in(self, replacing: Salesforce | None = None) -> Salesforce:
        """The client with a token, signing in where there is none yet, or where the token `replacing`
        holds was refused (and no other thread has signed in again since)."""
        with self._signing_in:
            if self._api is None or self._api is replacing:
                self._api = self._sign_in()
            return self._api

    def _sign_in(self) -> Salesforce:
        flow = self._flow.replace("_", " ")
        try:
            answer = self._http.post(f"{self._login_url}{_TOKEN_PATH}", data=self._token_request(),
                                     headers={"Accept": "application/json"})
        except requests.Timeout:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"Salesforce's token endpoint did not answer within "
                                                          f"{self._timeout_s:g} s") from None
        except requests.RequestException as exc:
            raise ConnectorError(FailureKind.UNAVAILABLE, f"Salesforce's token endpoint could not be reached "
                                                          f"({type(exc).__name__})") from None
        try:
            body = answer.json()
        except ValueError:
            body = None
        if answer.status_code != 200:
            reason = _oauth_error(body) or f"HTTP {answer.status_code}"
            if answer.status_code in (400, 401):  # invalid_client, invalid_grant: the credentials
                raise ConnectorError(FailureKind.AUTH, f"Salesforce refused the {flow} sign-in: {reason}",
                                     status=answer.status_code)
            raise failure_for_status(answer.status_code, f"token endpoint: {reason}", vendor=VENDOR,
                                     retry_after=answer.headers.get("Retry-After"))
        token = body.get("access_token") if isinstance(body, dict) else None
        instance_url = body.get("instance_url") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or not isinstance(instance_url, str) \
                or not urlsplit(instance_url).hostname:
            raise ConnectorError(FailureKind.BAD_RESPONSE,
                                 "Salesforce's token endpoint answered no access_token and instance_url")
        # simple-salesforce takes the host (and a port other than 443) from instance_url, always https.
        return Salesforce(instance_url=instance_url, session_id=token, session=self._http,
                          version=self._api_version, object_pairs_hook=dict)

    def _token_request(self) -> dict[str, str]:
        if self._flow == "client_credentials":
            assert self._client_secret is not None
            return {"grant_type": "client_credentials", "client_id": self._client_id,
                    "client_secret": self._client_secret.get_secret_value()}
        assert self._username is not None
        assert self._private_key is not None
        claims = {"iss": self._client_id, "sub": self._username, "aud": self._login_url,
                  "exp": int(time.time()) + _JWT_LIFETIME_S}
        try:
            assertion = jwt.encode(claims, _pem(self._private_key), algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError):
            raise ConnectorError(FailureKind.CONFIGURATION,
                                 "Salesforce: the JWT bearer flow's private key is not a PEM RSA private key") from None
        return {"grant_type": _JWT_BEARER, "assertion": assertion}


def connect(settings: SalesforceSettings, secrets: Secrets, timeout_s: float) -> SalesforceConnector:
    """The connector the settings describe, its secrets resolved."""
    client_secret = secrets.resolve(settings.client_secret, "Salesforce client secret") \
        if settings.client_secret is not None else None
    private_key = secrets.resolve(settings.private_key, "Salesforce private key") \
        if settings.private_key is not None else None
    return SalesforceConnector(login_url=settings.login_url, flow=settings.flow, client_id=settings.client_id,
                               timeout_s=timeout_s, client_secret=client_secret, username=settings.username,
                               private_key=private_key, api_version=settings.api_version,
                               detail_fields=settings.detail_fields, daily_api_requests=settings.daily_api_requests,
                               ca_file=settings.ca_file)


def _text(record: Mapping[str, Any], path: str, *, required: bool = False) -> str:
    """A field of a query's record (`Account.Name` through the relationship) as text; "" where null."""
    value: Any = record
    for name in path.split("."):
        if value is None:
            break
        if not isinstance(value, Mapping):
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"Salesforce: a record's {path} is not where it should be")
        value = value.get(name)
    if value is None or value == "":
        if required:
            raise ConnectorError(FailureKind.BAD_RESPONSE, f"Salesforce: a record has no {path}")
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConnectorError(FailureKind.BAD_RESPONSE, f"Salesforce: a record's {path} is not a value")


def _errors(content: object) -> tuple[list[str], str]:
    """The errorCodes and the text of an error answer: Salesforce's `[{"message", "errorCode"}]`, or
    whatever else came (a proxy's page)."""
    if isinstance(content, list):
        entries = [entry for entry in content if isinstance(entry, dict)]
        codes = [str(entry.get("errorCode", "")) for entry in entries]
        text = "; ".join(": ".join(str(part) for part in (entry.get("errorCode"), entry.get("message")) if part)
                         for entry in entries)
        return codes, text
    if isinstance(content, dict):
        return _errors([content])
    if isinstance(content, bytes):
        return [], content.decode("utf-8", "replace")
    return [], str(content) if content is not None else ""


def _oauth_error(body: object) -> str:
    """`error: error_description` of a token endpoint's refusal (RFC 6749 5.2)."""
    if not isinstance(body, dict):
        return ""
    error, description = body.get("error"), body.get("error_description")
    return ": ".join(str(part) for part in (error, description) if part)


def _advice(error: ConnectorError, doing: str) -> str:
    """`check()`'s words for an error, by what an operator does about it."""
    if error.kind == FailureKind.AUTH:
        return f"token refused while {doing}: {error}"
    if error.kind == FailureKind.SCOPE:
        return f"no permission for {doing}: {error}; check the integration user's profile and permission sets"
    if error.kind == FailureKind.RATE_LIMITED:
        return f"the org's API request limit is reached: {error}"
    if error.kind == FailureKind.UNAVAILABLE:
        return f"Salesforce did not answer {doing}: {error}"
    return f"{doing} failed: {error}"


def _call_object(idempotency_key: str) -> str:
    """What goes into Task.CallObject (255 characters at most): the key, or a digest of a longer one."""
    if len(idempotency_key) <= _CALL_OBJECT_MAX:
        return idempotency_key
    return "sha256:" + hashlib.sha256(idempotency_key.encode()).hexdigest()


def _subject(note: CallNote) -> str:
    return f"Call ({note.direction}): {note.outcome}" if note.outcome else f"Call ({note.direction})"


def _description(note: CallNote) -> str:
    lines = [note.summary.strip(), "", f"Outcome: {note.outcome}"]
    if note.recording_url:
        lines.append(f"Recording: {note.recording_url}")
    if note.ticket_id:
        lines.append(f"Ticket: {note.ticket_id}")
    lines.append(f"Call id: {note.call_id}")
    return "\n".join(lines)


def _pem(private_key: SecretStr) -> str:
    """The key's PEM; one put in an environment variable often has its line breaks written `\\n`."""
    text = private_key.get_secret_value()
    return text.replace("\\n", "\n") if "\n" not in text else text
