"""What every connector is: the interfaces of the customer's systems the agent acts in, and how a
call to one fails.

A connector is a blocking adapter over its vendor's own SDK or documented HTTP API (the SDKs are
synchronous); the tool worker runs it in a thread under the tool's deadline, so a slow vendor never
holds an event loop. Connectors do no retrying of their own and keep no state but their client (and
an OAuth token): the worker retries what `ConnectorError.retryable` says is safe, honouring
`retry_after_s`, and paces each connector at its `rate_limit` (the vendor's published limit).

Every operation with a side effect takes an idempotency key, and the key reaches the remote system
(an external id, a CalDAV UID, an idempotency header, or a search before the create), so the same
key twice (a redelivered command, a worker killed mid-operation and run again) makes one object and
answers its id both times.

Times are timezone-aware `datetime`s; a connector converts to and from its calendar's own zone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable


class FailureKind(StrEnum):
    """How an operation failed; recorded in `tool.failed` and shown by `voxlog integrations check`."""

    AUTH = "auth"
    """401: the credentials are wrong, revoked or expired (after one token refresh, for OAuth)."""
    SCOPE = "scope"
    """403: authenticated, but the token or user lacks a permission (a private app's scope)."""
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    """409 or the vendor's word for a duplicate; a slot already taken."""
    INVALID = "invalid"
    """400/422: the vendor refused what it was sent (a field, a value)."""
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    """5xx, a connection refused or dropped, a timeout."""
    BAD_RESPONSE = "bad_response"
    """The vendor answered something that is not its API (malformed JSON, a missing field)."""
    CONFIGURATION = "configuration"
    """The tenant's configuration cannot work (a secret not set, a calendar that does not exist)."""


RETRYABLE = frozenset({FailureKind.RATE_LIMITED, FailureKind.UNAVAILABLE})


class ConnectorError(Exception):
    """An operation that did not happen, or may not have (a timeout): what the vendor said, in words an
    operator can act on. The message never carries a secret (connectors build it from status codes and
    the vendor's error text, never from request headers)."""

    def __init__(self, kind: FailureKind, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.kind.value}{where}: {self.args[0]}"


@dataclass(frozen=True)
class RateLimit:
    """How fast the worker may run a connector's operations for one account: `requests` per `per_s`
    seconds, one per operation attempt. Derived from the vendor's published limit; a connector whose
    operations make several requests declares the operation rate that keeps within it."""

    requests: int
    per_s: float
    source: str
    """Where the vendor publishes it (a page title), for whoever wonders why the worker waits."""

    @property
    def rate_per_s(self) -> float:
        return self.requests / self.per_s


@dataclass(frozen=True)
class CheckResult:
    """One thing `voxlog integrations check` tried: reaching the vendor, signing in, a scope."""

    what: str
    ok: bool
    detail: str = ""


# -- CRM -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contact:
    id: str
    """The CRM's own id of the record (a HubSpot contact id, a Salesforce Contact Id)."""
    name: str = ""
    first_name: str = ""
    email: str = ""
    phone: str = ""
    company: str = ""
    details: Mapping[str, str] = field(default_factory=dict)
    """Other fields the CRM holds (lifecycle stage, owner, an account's tier), for the LLM's context."""


@dataclass(frozen=True)
class ContactFields:
    """What `upsert_contact` sets; empty strings leave a field as it is."""

    phone: str
    first_name: str = ""
    last_name: str = ""
    email: str = ""
    company: str = ""


@dataclass(frozen=True)
class CallNote:
    """A finished call, as `log_call` writes it on the contact."""

    call_id: str
    started_at: datetime
    duration_s: int
    direction: str
    """`inbound` or `outbound`."""
    outcome: str
    summary: str
    recording_url: str = ""
    ticket_id: str = ""


@runtime_checkable
class CrmConnector(Protocol):
    vendor: str
    rate_limit: RateLimit

    def find_contact(self, phone: str) -> Contact | None:
        """The contact whose phone (or mobile) number is `phone` (E.164), or None; the most recently
        changed one where several match."""
        ...

    def upsert_contact(self, fields: ContactFields, idempotency_key: str) -> Contact:
        """Updates the contact with this phone number, or creates it."""
        ...

    def log_call(self, contact_id: str, note: CallNote, idempotency_key: str) -> str:
        """Writes the call on the contact (a call engagement, a Task): the remote object's id."""
        ...

    def check(self) -> list[CheckResult]: ...


# -- ticketing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TicketRequest:
    subject: str
    description: str
    requester_phone: str = ""
    requester_name: str = ""
    requester_email: str = ""
    priority: str = "normal"
    """`low`, `normal`, `high` or `urgent`; each desk maps it to its own scale."""


@dataclass(frozen=True)
class Ticket:
    id: str
    status: str
    """The desk's own word (`new`, `open`, `pending`, `solved`...)."""
    subject: str = ""
    url: str = ""


@runtime_checkable
class TicketDesk(Protocol):
    vendor: str
    rate_limit: RateLimit

    def create(self, request: TicketRequest, idempotency_key: str) -> Ticket: ...

    def comment(self, ticket_id: str, body: str, idempotency_key: str) -> str:
        """Adds a public comment (a note where the desk has no public comment): its id."""
        ...

    def status(self, ticket_id: str) -> Ticket: ...

    def check(self) -> list[CheckResult]: ...


# -- calendars -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Booking:
    id: str
    """What `reschedule` and `cancel` take: a CalDAV UID, a Google event id, a Cal.com booking uid."""
    start: datetime
    end: datetime
    title: str = ""
    url: str = ""


@dataclass(frozen=True)
class BookingRequest:
    start: datetime
    end: datetime
    title: str
    description: str = ""
    attendee_name: str = ""
    attendee_phone: str = ""
    attendee_email: str = ""
    attendee_timezone: str = ""
    """The caller's IANA zone, where the vendor keeps one per attendee (Cal.com)."""


@runtime_checkable
class CalendarConnector(Protocol):
    vendor: str
    rate_limit: RateLimit

    def free_slots(self, start: datetime, end: datetime, duration_s: int) -> list[Slot]:
        """Bookable slots of `duration_s` between `start` and `end`, in order, none overlapping a busy
        time, within the calendar's opening hours."""
        ...

    def book(self, request: BookingRequest, idempotency_key: str) -> Booking:
        """Books the slot, or raises CONFLICT where it overlaps a busy time (a double booking refused)."""
        ...

    def reschedule(self, booking_id: str, start: datetime, end: datetime, idempotency_key: str) -> Booking: ...

    def cancel(self, booking_id: str, idempotency_key: str) -> None:
        """Cancels the booking; cancelling one already cancelled is not an error."""
        ...

    def check(self) -> list[CheckResult]: ...
