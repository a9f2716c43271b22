"""A local Salesforce org: the OAuth 2.0 token endpoint and the part of the REST API the Salesforce
connector uses, written from Salesforce's public references ("REST API Developer Guide", "SOQL and
SOSL Reference", "Object Reference for the Salesforce Platform", "OAuth 2.0 Client Credentials Flow
for Server-to-Server Integration", "OAuth 2.0 JWT Bearer Flow for Server-to-Server Integration").

It serves HTTPS on 127.0.0.1 with a certificate made for the run (`ca_file` is what a client trusts):
simple-salesforce builds every REST URL as `https://{instance}/...`, as Salesforce serves nothing else.

- `POST /services/oauth2/token`: `grant_type=client_credentials` with the consumer key and secret (in
  the form, or as HTTP Basic), or `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` with an
  assertion whose RS256 signature is checked with the app's certificate's public key (iss = consumer
  key, sub = a known username, aud = the login URL, exp not past). It answers `{access_token,
  instance_url, id, token_type, issued_at}`, or 400 `{error, error_description}`.
- `GET /services/data/vXX.X/query?q=SOQL`: a strict subset of SOQL (SELECT fields, a relationship's
  field such as `Account.Name`, FROM one object, WHERE comparisons with `=`, `!=` and `LIKE` joined by
  AND or by OR (mixing them needs parentheses, as in SOQL), ORDER BY one field, LIMIT), string
  literals with SOQL's backslash escapes, `=` ignoring case as SOQL's does. Results come `page_size`
  at a time, the rest behind `nextRecordsUrl` (`/services/data/vXX.X/query/01g...-2000`).
- `POST /services/data/vXX.X/sobjects/{Contact,Account,Task}/`: 201 `{id, success, errors}`, with
  Salesforce's checks (unknown or read-only fields, required fields, lengths, picklists, references).
- `PATCH .../sobjects/{object}/{id}`: 204. `GET .../sobjects/{object}/describe`.

Every REST request needs `Authorization: Bearer <a token it issued>`, else 401 INVALID_SESSION_ID.
Errors are Salesforce's bodies: a JSON list of `{"message", "errorCode", "fields"}`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import functools
import ipaddress
import itertools
import json
import re
import secrets
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.connectors.vendor_server import Answer, Fault, SeenRequest, VendorServer

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_EPOCH = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)

# The objects, their fields, and which of them a create or update may set.
FIELDS: Mapping[str, tuple[str, ...]] = {
    "Contact": ("Id", "Name", "FirstName", "LastName", "Email", "Phone", "MobilePhone", "Title", "Department",
                "AccountId", "CreatedDate", "LastModifiedDate"),
    "Account": ("Id", "Name", "Type", "Industry", "Rating", "CreatedDate", "LastModifiedDate"),
    "Task": ("Id", "WhoId", "Subject", "Description", "TaskSubtype", "CallType", "CallDurationInSeconds",
             "CallObject", "CallDisposition", "Status", "Priority", "ActivityDate", "CreatedDate", "LastModifiedDate"),
}
READ_ONLY = {"Id", "CreatedDate", "LastModifiedDate"}
COMPUTED = {("Contact", "Name")}
REQUIRED = {"Contact": ("LastName",), "Account": ("Name",), "Task": ()}
LENGTHS = {"FirstName": 40, "LastName": 80, "Email": 80, "Phone": 40, "MobilePhone": 40, "Title": 128, "Name": 255,
           "Subject": 255, "CallObject": 255, "CallDisposition": 255, "Description": 32_000}
PICKLISTS = {("Task", "TaskSubtype"): {"Task", "Email", "ListEmail", "Cadence", "Call", "LinkedIn"},
             ("Task", "CallType"): {"Internal", "Inbound", "Outbound"},
             ("Task", "Status"): {"Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred"}}
REFERENCES = {("Task", "WhoId"): "Contact", ("Contact", "AccountId"): "Account"}
RELATIONSHIPS = {("Contact", "Account"): ("Account", "AccountId")}
KEY_PREFIXES = {"Contact": "003", "Account": "001", "Task": "00T"}
_ID = re.compile(r"^[A-Za-z0-9]{15}([A-Za-z0-9]{3})?$")

DEFAULT_ERRORS: Mapping[int, tuple[str, str]] = {
    400: ("INVALID_FIELD", "(injected) No such column 'Fault' on entity"),
    401: ("INVALID_SESSION_ID", "Session expired or invalid"),
    403: ("INSUFFICIENT_ACCESS_OR_READONLY", "(injected) insufficient access rights on object id"),
    404: ("NOT_FOUND", "The requested resource does not exist"),
    409: ("CONFLICT", "(injected) conflict"),
    422: ("UNPROCESSABLE_ENTITY", "(injected) the request was well-formed but was unable to be followed"),
    429: ("REQUEST_LIMIT_EXCEEDED", "(injected) ConcurrentPerOrgLongTxn Limit exceeded."),
    500: ("UNKNOWN_EXCEPTION", "(injected) An unexpected error occurred. Please include this ErrorId."),
    502: ("SERVER_UNAVAILABLE", "(injected) Bad gateway"),
    503: ("SERVER_UNAVAILABLE", "(injected) Server unavailable"),
}


class SalesforceFault(Exception):
    """An error answer: HTTP status and Salesforce's error list."""

    def __init__(self, status: int, code: str, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.body = [{"message": message, "errorCode": code, "fields": list(fields)}]


def _malformed(message: str) -> SalesforceFault:
    return SalesforceFault(400, "MALFORMED_QUERY", message)


# -- SOQL ------------------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "N": "\n", "r": "\r", "R": "\r", "t": "\t", "T": "\t",
            "b": "\b", "B": "\b", "f": "\f", "F": "\f"}
_KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "ORDER", "BY", "ASC", "DESC", "LIMIT", "LIKE", "NULL", "NOT"}


@dataclass(frozen=True)
class StringLiteral:
    """A string literal: its characters, and for each whether it was a `\\%` or `\\_` (literal in LIKE)."""

    text: str
    escaped_wildcards: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Token:
    kind: str  # word, string, number, symbol
    value: str | StringLiteral


def tokenize(soql: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(soql):
        char = soql[i]
        if char.isspace():
            i += 1
        elif char == "'":
            chars: list[str] = []
            wildcards: set[int] = set()
            i += 1
            while True:
                if i >= len(soql):
                    raise _malformed("unterminated string literal")
                char = soql[i]
                if char == "'":
                    i += 1
                    break
                if char == "\\":
                    if i + 1 >= len(soql):
                        raise _malformed("unterminated string literal")
                    escaped = soql[i + 1]
                    if escaped in "%_":
                        wildcards.add(len(chars))
                        chars.append(escaped)
                    elif escaped in _ESCAPES:
                        chars.append(_ESCAPES[escaped])
                    else:
                        raise _malformed(f"Invalid string literal: illegal escape sequence \\{escaped}")
                    i += 2
                else:
                    chars.append(char)
                    i += 1
            tokens.append(Token("string", StringLiteral("".join(chars), frozenset(wildcards))))
        elif char.isdigit():
            match = re.match(r"\d+", soql[i:])
            assert match is not None
            tokens.append(Token("number", match.group()))
            i += match.end()
        elif char.isalpha() or char == "_":
            match = re.match(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", soql[i:])
            assert match is not None
            tokens.append(Token("word", match.group()))
            i += match.end()
        elif soql.startswith("!=", i):
            tokens.append(Token("symbol", "!="))
            i += 2
        elif char in ",()=":
            tokens.append(Token("symbol", char))
            i += 1
        else:
            raise _malformed(f"unexpected token: '{char}'")
    return tokens


@dataclass(frozen=True)
class Comparison:
    field: str
    operator: str  # =, !=, LIKE
    value: StringLiteral | None  # None: NULL


@dataclass(frozen=True)
class Junction:
    operator: str  # AND, OR
    parts: tuple[Comparison | Junction, ...]


Condition = Comparison | Junction


@dataclass(frozen=True)
class Query:
    fields: tuple[str, ...]
    sobject: str
    where: Condition | None
    order_by: tuple[str, bool] | None  # field, descending
    limit: int | None


class _Parser:
    def __init__(self, soql: str) -> None:
        self.tokens = tokenize(soql)
        self.at = 0

    def peek_word(self) -> str | None:
        if self.at < len(self.tokens) and self.tokens[self.at].kind == "word":
            value = self.tokens[self.at].value
            assert isinstance(value, str)
            return value.upper()
        return None

    def take(self, kind: str, value: str | None = None) -> Token:
        if self.at >= len(self.tokens):
            raise _malformed("unexpected end of query")
        token = self.tokens[self.at]
        matches = token.kind == kind and (
            value is None or (isinstance(token.value, str) and token.value.upper() == value))
        if not matches:
            shown = token.value.text if isinstance(token.value, StringLiteral) else token.value
            raise _malformed(f"unexpected token: '{shown}'")
        self.at += 1
        return token

    def name(self) -> str:
        token = self.take("word")
        assert isinstance(token.value, str)
        if token.value.upper() in _KEYWORDS:
            raise _malformed(f"unexpected token: '{token.value}'")
        return token.value

    def query(self) -> Query:
        self.take("word", "SELECT")
        fields = [self.name()]
        while self.at < len(self.tokens) and self.tokens[self.at] == Token("symbol", ","):
            self.at += 1
            fields.append(self.name())
        self.take("word", "FROM")
        sobject = self.name()
        where = order_by = limit = None
        if self.peek_word() == "WHERE":
            self.at += 1
            where = self.condition()
        if self.peek_word() == "ORDER":
            self.at += 1
            self.take("word", "BY")
            field_name = self.name()
            descending = False
            if self.peek_word() in ("ASC", "DESC"):
                descending = self.peek_word() == "DESC"
                self.at += 1
            order_by = (field_name, descending)
        if self.peek_word() == "LIMIT":
            self.at += 1
            number = self.take("number").value
            assert isinstance(number, str)
            limit = int(number)
        if self.at != len(self.tokens):
            token = self.tokens[self.at]
            shown = token.value.text if isinstance(token.value, StringLiteral) else token.value
            raise _malformed(f"unexpected token: '{shown}'")
        return Query(tuple(fields), sobject, where, order_by, limit)

    def condition(self) -> Condition:
        parts = [self.operand()]
        joiner: str | None = None
        while self.peek_word() in ("AND", "OR"):
            word = self.peek_word()
            assert word is not None
            if joiner is not None and word != joiner:
                # SOQL: "unexpected token: 'OR'" where AND and OR meet without parentheses.
                raise _malformed(f"unexpected token: '{word}'")
            joiner = word
            self.at += 1
            parts.append(self.operand())
        return parts[0] if joiner is None else Junction(joiner, tuple(parts))

    def operand(self) -> Condition:
        if self.at < len(self.tokens) and self.tokens[self.at] == Token("symbol", "("):
            self.at += 1
            inner = self.condition()
            self.take("symbol", ")")
            return inner
        field_name = self.name()
        if self.peek_word() == "LIKE":
            self.at += 1
            operator = "LIKE"
        else:
            symbol = self.take("symbol").value
            if symbol not in ("=", "!="):
                raise _malformed(f"unexpected token: '{symbol}'")
            assert isinstance(symbol, str)
            operator = symbol
        if self.peek_word() == "NULL" and operator != "LIKE":
            self.at += 1
            return Comparison(field_name, operator, None)
        value = self.take("string").value
        assert isinstance(value, StringLiteral)
        return Comparison(field_name, operator, value)


def parse_soql(soql: str) -> Query:
    return _Parser(soql).query()


def _like(pattern: StringLiteral) -> re.Pattern[str]:
    parts = []
    for index, char in enumerate(pattern.text):
        if index not in pattern.escaped_wildcards and char == "%":
            parts.append(".*")
        elif index not in pattern.escaped_wildcards and char == "_":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


# -- TLS and keys ----------------------------------------------------------------------------------


@functools.cache
def _tls_certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 (PEM), and its key: made once a run."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-salesforce.test")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@functools.cache
def signing_key_pair() -> tuple[str, str]:
    """An RSA key pair for the JWT bearer flow (PEM private key, PEM public key): the key a connected
    app's uploaded certificate holds, made once a run."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


# -- the server ------------------------------------------------------------------------------------


RecordedRequest = SeenRequest
"""An API request as the org logged it (token requests are in `token_requests`)."""


@dataclass(frozen=True)
class TokenRequest:
    form: dict[str, str]
    headers: dict[str, str]
    claims: dict[str, Any] | None  # the JWT assertion's, where one came and its signature held


class FakeSalesforce(VendorServer):
    """`with FakeSalesforce(client_id=..., client_secret=...) as org:`; `org.url` is both the login URL
    and the instance URL."""

    methods = ("GET", "POST", "PATCH", "DELETE")
    keep_blank_query_values = False

    def __init__(self, *, client_id: str, client_secret: str | None = None, username: str | None = None,
                 public_key: str | None = None, api_version: str = "62.0", page_size: int = 2000) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.username = username
        self.public_key = public_key
        self.api_version = api_version
        self.page_size = page_size
        self.audience: str | None = None  # the JWT's expected aud; the server's URL when None
        self.token_refusal: tuple[str, str] | None = None  # (error, error_description) for every token request
        self.duplicate_rule_on_email = False  # a Contact's create with a taken Email: DUPLICATES_DETECTED
        self.createable: dict[str, bool] = {name: True for name in FIELDS}
        self.uncreateable_fields: set[tuple[str, str]] = set()
        self.token_requests: list[TokenRequest] = []
        self.records: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in FIELDS}
        self._tokens: set[str] = set()
        self._cursors: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._folder = tempfile.TemporaryDirectory(prefix="fake-salesforce-")
        certificate, key = _tls_certificate()
        self.ca_file = Path(self._folder.name) / "ca.pem"
        self.ca_file.write_bytes(certificate)
        key_file = Path(self._folder.name) / "key.pem"
        key_file.write_bytes(key)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self.ca_file, key_file)
        super().__init__(tls=tls)

    @property
    def url(self) -> str:
        return self.origin

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        super().__exit__(exc_type, exc, tb)
        self._folder.cleanup()

    # -- what tests do -----------------------------------------------------------------------------

    def malformed_next(self, body: str = "<html><body>Down for maintenance</body></html>") -> None:
        with self._lock:
            self._faults.append(Fault(malformed=True, body=body))

    def expire_tokens(self) -> None:
        """Every token issued so far is refused from now on (a session timed out or was revoked)."""
        with self._lock:
            self._tokens.clear()

    def add(self, sobject: str, **values: Any) -> str:
        """Puts a record straight into the org (no checks): its Id."""
        with self._lock:
            record_id = self._new_id(sobject)
            stamp = self._stamp()
            self.records[sobject][record_id] = {"Id": record_id, "CreatedDate": stamp, "LastModifiedDate": stamp,
                                                **values}
            return record_id

    def clear(self) -> None:
        with self._lock:
            for table in self.records.values():
                table.clear()
            self.requests.clear()
            self.token_requests.clear()
            self._faults.clear()
            self._cursors.clear()

    # -- internals ---------------------------------------------------------------------------------

    def _new_id(self, sobject: str) -> str:
        return f"{KEY_PREFIXES[sobject]}5g00000{next(self._ids):05d}AAA"

    def _stamp(self) -> str:
        moment = _EPOCH + dt.timedelta(seconds=next(self._clock))
        return moment.strftime("%Y-%m-%dT%H:%M:%S.000+0000")

    def _value(self, sobject: str, record: Mapping[str, Any], path: str) -> Any:
        if (sobject, path) in COMPUTED:
            return f"{record.get('FirstName') or ''} {record.get('LastName') or ''}".strip()
        if "." in path:
            relationship, name = path.split(".", 1)
            target_type, key = RELATIONSHIPS[(sobject, relationship)]
            target = self.records[target_type].get(record.get(key) or "")
            return None if target is None else self._value(target_type, target, name)
        return record.get(path)

    def _check_field(self, sobject: str, path: str) -> None:
        if "." in path:
            relationship, name = path.split(".", 1)
            if (sobject, relationship) in RELATIONSHIPS and name in FIELDS[RELATIONSHIPS[(sobject, relationship)][0]]:
                return
        elif path in FIELDS[sobject]:
            return
        raise SalesforceFault(400, "INVALID_FIELD", f"No such column '{path}' on entity '{sobject}'. If you are "
                              "attempting to use a custom field, be sure to append the '__c' after the custom "
                              "field name. Please reference your WSDL or the describe call for the appropriate names.")

    def _matches(self, sobject: str, record: Mapping[str, Any], condition: Condition) -> bool:
        if isinstance(condition, Junction):
            results = (self._matches(sobject, record, part) for part in condition.parts)
            return all(results) if condition.operator == "AND" else any(results)
        value = self._value(sobject, record, condition.field)
        if condition.value is None:
            return (value is None) == (condition.operator == "=")
        if condition.operator == "LIKE":
            return value is not None and _like(condition.value).fullmatch(str(value)) is not None
        equal = value is not None and str(value).casefold() == condition.value.text.casefold()
        return equal == (condition.operator == "=")

    def _conditions(self, condition: Condition) -> Iterator[Comparison]:
        if isinstance(condition, Junction):
            for part in condition.parts:
                yield from self._conditions(part)
        else:
            yield condition

    def run_query(self, soql: str) -> dict[str, Any]:
        query = parse_soql(soql)
        if query.sobject not in FIELDS:
            raise SalesforceFault(400, "INVALID_TYPE", f"sObject type '{query.sobject}' is not supported.")
        for path in query.fields:
            self._check_field(query.sobject, path)
        if query.where is not None:
            for comparison in self._conditions(query.where):
                self._check_field(query.sobject, comparison.field)
        if query.order_by is not None:
            self._check_field(query.sobject, query.order_by[0])
        with self._lock:
            rows = [row for row in self.records[query.sobject].values()
                    if query.where is None or self._matches(query.sobject, row, query.where)]
            if query.order_by is not None:
                order_field, descending = query.order_by
                rows.sort(key=lambda row: str(self._value(query.sobject, row, order_field) or ""), reverse=descending)
            if query.limit is not None:
                rows = rows[: query.limit]
            shaped = [self._shape(query.sobject, row, query.fields) for row in rows]
            locator = "01g" + secrets.token_hex(8).upper()[:15]
            self._cursors[locator] = (query.sobject, shaped)
        return self._page(locator, 0)

    def _page(self, locator: str, offset: int) -> dict[str, Any]:
        with self._lock:
            if locator not in self._cursors:
                raise SalesforceFault(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            _, shaped = self._cursors[locator]
        page = shaped[offset: offset + self.page_size]
        answer: dict[str, Any] = {"totalSize": len(shaped), "done": offset + self.page_size >= len(shaped),
                                  "records": page}
        if not answer["done"]:
            answer["nextRecordsUrl"] = f"/services/data/v{self.api_version}/query/{locator}-{offset + self.page_size}"
        return answer

    def _shape(self, sobject: str, row: Mapping[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
        shaped: dict[str, Any] = {"attributes": self._attributes(sobject, row["Id"])}
        for path in paths:
            if "." not in path:
                shaped[path] = self._value(sobject, row, path)
                continue
            relationship, name = path.split(".", 1)
            target_type, key = RELATIONSHIPS[(sobject, relationship)]
            target = self.records[target_type].get(row.get(key) or "")
            if target is None:
                shaped[relationship] = None
            else:
                nested = shaped.get(relationship) or {"attributes": self._attributes(target_type, target["Id"])}
                nested[name] = self._value(target_type, target, name)
                shaped[relationship] = nested
        return shaped

    def _attributes(self, sobject: str, record_id: str) -> dict[str, str]:
        return {"type": sobject, "url": f"/services/data/v{self.api_version}/sobjects/{sobject}/{record_id}"}

    def _validate(self, sobject: str, data: Mapping[str, Any], *, creating: bool) -> None:
        for name in data:
            if name not in FIELDS[sobject]:
                raise SalesforceFault(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}")
            if name in READ_ONLY or (sobject, name) in COMPUTED or (creating and (sobject, name) in
                                                                     self.uncreateable_fields):
                raise SalesforceFault(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                                      f"Unable to create/update fields: {name}. Please check the security settings "
                                      "of this field and verify that it is read/write for your profile or "
                                      "permission set.", (name,))
        if creating:
            missing = [name for name in REQUIRED[sobject] if not data.get(name)]
            if missing:
                raise SalesforceFault(400, "REQUIRED_FIELD_MISSING",
                                      f"Required fields are missing: [{', '.join(missing)}]", tuple(missing))
        for name, value in data.items():
            if value is None:
                continue
            if name == "CallDurationInSeconds":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise SalesforceFault(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of integer from "
                                          f"{type(value).__name__} value {value!r} at [line:1, column:1]")
                continue
            if not isinstance(value, str):
                raise SalesforceFault(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of string from "
                                      f"{type(value).__name__} value at [line:1, column:1]")
            if name in LENGTHS and len(value) > LENGTHS[name]:
                raise SalesforceFault(400, "STRING_TOO_LONG", f"{name}: data value too large: {value[:20]}... "
                                      f"(max length={LENGTHS[name]})", (name,))
            allowed = PICKLISTS.get((sobject, name))
            if allowed is not None and value not in allowed:
                raise SalesforceFault(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                      f"{name}: bad value for restricted picklist field: {value}", (name,))
            if name == "ActivityDate" and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                raise SalesforceFault(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of date from "
                                      f"VALUE_STRING value {value} at [line:1, column:1]")
            if name == "Email" and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
                raise SalesforceFault(400, "INVALID_EMAIL_ADDRESS", f"Email: invalid email address: {value}", (name,))
            target = REFERENCES.get((sobject, name))
            if target is not None:
                if not _ID.match(value):
                    raise SalesforceFault(400, "MALFORMED_ID", f"{name}: id value of incorrect type: {value}", (name,))
                if value[:15] not in {key[:15] for key in self.records[target]}:
                    raise SalesforceFault(400, "INVALID_CROSS_REFERENCE_KEY",
                                          f"{name}: invalid cross reference id", (name,))

    def create(self, sobject: str, data: Mapping[str, Any]) -> str:
        with self._lock:
            if not self.createable[sobject]:
                raise SalesforceFault(403, "INSUFFICIENT_ACCESS_OR_READONLY",
                                      f"insufficient access rights to create {sobject}")
            self._validate(sobject, data, creating=True)
            email = data.get("Email")
            if sobject == "Contact" and self.duplicate_rule_on_email and email and any(
                    str(row.get("Email") or "").casefold() == str(email).casefold()
                    for row in self.records["Contact"].values()):
                raise SalesforceFault(400, "DUPLICATES_DETECTED", "Use one of these records?")
            return self.add(sobject, **data)

    def update(self, sobject: str, record_id: str, data: Mapping[str, Any]) -> None:
        with self._lock:
            record = next((row for key, row in self.records[sobject].items() if key[:15] == record_id[:15]), None)
            if record is None:
                raise SalesforceFault(404, "NOT_FOUND", f"Provided external ID field does not exist or is not "
                                      f"accessible: {record_id}")
            self._validate(sobject, data, creating=False)
            record.update(data)
            record["LastModifiedDate"] = self._stamp()

    def describe(self, sobject: str) -> dict[str, Any]:
        fields = [{"name": name, "type": "id" if name == "Id" else "string", "length": LENGTHS.get(name, 0),
                   "createable": name not in READ_ONLY and (sobject, name) not in COMPUTED
                   and (sobject, name) not in self.uncreateable_fields,
                   "updateable": name not in READ_ONLY and (sobject, name) not in COMPUTED,
                   "nillable": name not in REQUIRED[sobject] and name != "Id"}
                  for name in FIELDS[sobject]]
        base = f"/services/data/v{self.api_version}/sobjects/{sobject}"
        return {"name": sobject, "label": sobject, "createable": self.createable[sobject], "updateable": True,
                "deletable": True, "queryable": True, "keyPrefix": KEY_PREFIXES[sobject], "fields": fields,
                "urls": {"sobject": base, "describe": f"{base}/describe", "rowTemplate": f"{base}/{{ID}}"}}

    def issue_token(self, form: Mapping[str, str], headers: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """The token endpoint's answer (status, JSON) to a form."""
        claims: dict[str, Any] | None = None
        grant = form.get("grant_type", "")
        refusal: tuple[str, str] | None = self.token_refusal
        if refusal is None and grant == "client_credentials":
            client_id, client_secret = form.get("client_id"), form.get("client_secret")
            basic = headers.get("authorization", "")
            if basic.lower().startswith("basic "):
                with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
                    client_id, client_secret = base64.b64decode(basic[6:]).decode().split(":", 1)
            if self.client_secret is None or (client_id, client_secret) != (self.client_id, self.client_secret):
                refusal = ("invalid_client", "invalid client credentials")
        elif refusal is None and grant == JWT_BEARER:
            refusal, claims = self._check_assertion(form.get("assertion", ""))
        elif refusal is None:
            refusal = ("unsupported_grant_type", "grant type not supported")
        with self._lock:
            self.token_requests.append(TokenRequest(dict(form), dict(headers), claims))
            if refusal is not None:
                return 400, {"error": refusal[0], "error_description": refusal[1]}
            token = "00D5g000004ABCD!AQ" + secrets.token_urlsafe(48)
            self._tokens.add(token)
        issued_at = str(int(dt.datetime.now(dt.UTC).timestamp() * 1000))
        return 200, {"access_token": token, "instance_url": self.url,
                     "id": f"{self.url}/id/00D5g000004ABCDEAA/0055g00000AbCdEAAA", "token_type": "Bearer",
                     "issued_at": issued_at, "scope": "api"}

    def _check_assertion(self, assertion: str) -> tuple[tuple[str, str] | None, dict[str, Any] | None]:
        if self.public_key is None:
            return ("invalid_grant", "invalid assertion"), None
        try:
            claims: dict[str, Any] = jwt.decode(assertion, self.public_key, algorithms=["RS256"],
                                                audience=self.audience or self.url,
                                                options={"require": ["iss", "sub", "aud", "exp"]})
        except jwt.ExpiredSignatureError:
            return ("invalid_grant", "expired authorization code"), None
        except jwt.InvalidAudienceError:
            return ("invalid_grant", "audience is invalid"), None
        except jwt.PyJWTError:
            return ("invalid_grant", "invalid assertion"), None
        if claims["iss"] != self.client_id:
            return ("invalid_client_id", "client identifier invalid"), claims
        if claims["sub"] != self.username:
            return ("invalid_grant", "user hasn't approved this consumer"), claims
        return None, claims

    def authorized(self, header: str) -> bool:
        with self._lock:
            return header.startswith("Bearer ") and header[7:] in self._tokens

    # -- the wire ----------------------------------------------------------------------------------

    def unfaulted(self, request: SeenRequest) -> Answer | None:
        """Token requests: never faulted, never in `requests` (they are in `token_requests`)."""
        if request.path != "/services/oauth2/token" or request.method != "POST":
            return None
        form = {name: values[0] for name, values in parse_qs(request.body.decode(), keep_blank_values=True).items()}
        status, answer = self.issue_token(form, dict(request.headers))
        return self._answer(status, json.dumps(answer).encode())

    def failure_answer(self, fault: Fault, request: SeenRequest) -> Answer:
        assert fault.status is not None
        code, message = DEFAULT_ERRORS.get(fault.status, ("UNKNOWN_EXCEPTION", "(injected) error"))
        default = json.dumps([{"message": message, "errorCode": code}])
        return self._answer(fault.status, (fault.body if fault.body is not None else default).encode(), fault.headers)

    def malformed_answer(self, fault: Fault) -> Answer:
        return self._answer(200, (fault.body or "").encode())

    def respond(self, request: SeenRequest) -> Answer:
        try:
            status, answer = self._route(request)
        except SalesforceFault as refused:
            return self._answer(refused.status, json.dumps(refused.body).encode())
        return self._answer(status, b"" if answer is None else json.dumps(answer).encode())

    def _answer(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Answer:
        sent = {} if status == 204 else {"Content-Type": "application/json;charset=UTF-8"}
        return Answer(status, body, {**sent, "Sforce-Limit-Info": f"api-usage={len(self.requests)}/100000",
                                     **(headers or {})})

    def _route(self, request: SeenRequest) -> tuple[int, Any]:
        path = request.path
        if not self.authorized(request.headers.get("authorization", "")):
            raise SalesforceFault(401, "INVALID_SESSION_ID", "Session expired or invalid")
        prefix = f"/services/data/v{self.api_version}/"
        if not path.startswith(prefix):
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        parts = [part for part in path[len(prefix):].split("/") if part]
        if parts == ["query"] and request.method == "GET":
            soql = parse_qs(request.raw_query).get("q")
            if not soql:
                raise _malformed("no query (q) given")
            return 200, self.run_query(soql[0])
        if len(parts) == 2 and parts[0] == "query" and request.method == "GET":
            locator, _, offset = parts[1].rpartition("-")
            if not offset.isdigit():
                raise SalesforceFault(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            return 200, self._page(locator, int(offset))
        if len(parts) >= 2 and parts[0] == "sobjects":
            sobject = parts[1]
            if sobject not in FIELDS:
                raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
            if parts[2:] == ["describe"] and request.method == "GET":
                return 200, self.describe(sobject)
            data = _json(request.body) if request.method in ("POST", "PATCH") else {}
            if len(parts) == 2 and request.method == "POST":
                return 201, {"id": self.create(sobject, data), "success": True, "errors": []}
            if len(parts) == 3 and request.method == "PATCH":
                self.update(sobject, parts[2], data)
                return 204, None
        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise SalesforceFault(400, "JSON_PARSER_ERROR", "Unexpected character: was expecting JSON") from None
    if not isinstance(data, dict):
        raise SalesforceFault(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of object from array")
    return data
