"""Tool calls as connector operations: what each of an agent's operations (`calendar.book`,
`crm.log_call`, ...) reads from the tool's arguments, which connector it asks, and the JSON result the
agent hears. Blocking (connectors are), with no log I/O: the tool worker runs it in a thread.

Arguments are what an LLM or the offline script sends; they are checked here, and a missing or
malformed one is an INVALID failure the agent can say something about, never a crash."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from streams.connectors.base import (
    BookingRequest,
    CalendarConnector,
    CallNote,
    ConnectorError,
    ContactFields,
    CrmConnector,
    FailureKind,
    TicketDesk,
    TicketRequest,
)
from streams.connectors.spoken_time import caller_zone, resolve_start, say_when

if TYPE_CHECKING:
    # Only named in annotations: webhook_http imports httpx, which loading tenants does not need.
    from streams.connectors.webhook_http import WebhookTarget

SLOTS_SAID = 5
"""How many free slots a `calendar.free_slots` result offers: more than a caller can hold in mind is noise."""


@dataclass(frozen=True)
class ToolCall:
    """One tool call as the worker runs it."""

    tool: str
    operation: str
    arguments: Mapping[str, Any]
    idempotency_key: str
    tenant_id: str
    call_id: str
    caller_number: str
    now: datetime


@dataclass(frozen=True)
class OperationResult:
    result: dict[str, Any]
    """What the agent hears (the tool's JSON result)."""
    connector: str
    """The vendor that did it."""
    remote_id: str = ""
    """The id of what it made or changed there."""


@dataclass
class Connectors:
    """One tenant's connected systems, as its `integrations` configure them."""

    crm: CrmConnector | None = None
    tickets: TicketDesk | None = None
    calendar: CalendarConnector | None = None
    webhooks: dict[str, WebhookTarget] = field(default_factory=dict)
    problems: dict[str, ConnectorError] = field(default_factory=dict)
    """Why a configured connector could not be built (`crm`, `tickets`, `calendar`, `webhook NAME`)."""
    calendar_zone: str = "UTC"
    """The calendar's own zone: where a caller's zone cannot be told from the number."""
    booking_minutes: int = 60


def _text(arguments: Mapping[str, Any], name: str, *, required: bool = False, default: str = "") -> str:
    value = arguments.get(name)
    if value is None or value == "":
        if required:
            raise ConnectorError(FailureKind.INVALID, f"argument {name!r} is missing")
        return default
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConnectorError(FailureKind.INVALID, f"argument {name!r} must be text")
    return str(value)


def _number(arguments: Mapping[str, Any], name: str, default: int) -> int:
    text = _text(arguments, name, default=str(default))
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        raise ConnectorError(FailureKind.INVALID, f"argument {name!r} must be a number, not {text[:40]!r}") from None


def _need(connectors: Connectors, family: str, tenant_id: str) -> Any:
    connector = getattr(connectors, family)
    if connector is None:
        problem = connectors.problems.get(family)
        if problem is not None:
            raise problem
        raise ConnectorError(FailureKind.CONFIGURATION,
                             f"tenant {tenant_id} has no {family} configured (integrations.{family})")
    return connector


def confirmation_code(booking_id: str) -> str:
    """A short code a caller can write down, the same for the same booking."""
    digest = hashlib.sha256(booking_id.encode()).digest()
    return base64.b32encode(digest).decode()[:6]


def _crm_find(call: ToolCall, c: Connectors) -> OperationResult:
    crm: CrmConnector = _need(c, "crm", call.tenant_id)
    phone = _text(call.arguments, "phone", default=call.caller_number)
    if not phone:
        raise ConnectorError(FailureKind.INVALID, "no phone number to look up")
    contact = crm.find_contact(phone)
    if contact is None:
        return OperationResult({"found": False}, crm.vendor)
    return OperationResult({"found": True, "contact_id": contact.id, "name": contact.name,
                            "first_name": contact.first_name, "email": contact.email, "company": contact.company,
                            "details": dict(contact.details)}, crm.vendor, contact.id)


def _crm_upsert(call: ToolCall, c: Connectors) -> OperationResult:
    crm: CrmConnector = _need(c, "crm", call.tenant_id)
    a = call.arguments
    fields = ContactFields(phone=_text(a, "phone", default=call.caller_number), first_name=_text(a, "first_name"),
                           last_name=_text(a, "last_name"), email=_text(a, "email"), company=_text(a, "company"))
    if not fields.phone:
        raise ConnectorError(FailureKind.INVALID, "a contact needs a phone number")
    contact = crm.upsert_contact(fields, call.idempotency_key)
    return OperationResult({"contact_id": contact.id, "name": contact.name}, crm.vendor, contact.id)


def _crm_log_call(call: ToolCall, c: Connectors) -> OperationResult:
    crm: CrmConnector = _need(c, "crm", call.tenant_id)
    a = call.arguments
    contact_id = _text(a, "contact_id")
    if not contact_id:
        contact = crm.find_contact(_text(a, "phone", default=call.caller_number))
        if contact is None:
            raise ConnectorError(FailureKind.NOT_FOUND, "the caller is not a contact in the CRM")
        contact_id = contact.id
    started = resolve_start(start=_text(a, "started_at"), day=None, at="00:00", zone=ZoneInfo("UTC"), now=call.now)
    note = CallNote(call_id=_text(a, "call_id", default=call.call_id),
                    started_at=started if _text(a, "started_at") else call.now,
                    duration_s=_number(a, "duration_s", 0),
                    direction=_text(a, "direction", default="inbound"), outcome=_text(a, "outcome"),
                    summary=_text(a, "summary", required=True), recording_url=_text(a, "recording_url"),
                    ticket_id=_text(a, "ticket_id"))
    remote = crm.log_call(contact_id, note, call.idempotency_key)
    return OperationResult({"logged": True, "contact_id": contact_id, "activity_id": remote}, crm.vendor, remote)


def _ticket_create(call: ToolCall, c: Connectors) -> OperationResult:
    desk: TicketDesk = _need(c, "tickets", call.tenant_id)
    a = call.arguments
    summary = _text(a, "summary") or _text(a, "description", required=True)
    subject = _text(a, "subject") or (summary if len(summary) <= 80 else summary[:77].rstrip() + "...")
    priority = _text(a, "priority", default="normal")
    if priority not in ("low", "normal", "high", "urgent"):
        raise ConnectorError(FailureKind.INVALID, f"priority {priority!r} is not low, normal, high or urgent")
    ticket = desk.create(TicketRequest(subject=subject, description=_text(a, "description", default=summary),
                                       requester_phone=call.caller_number, requester_name=_text(a, "name"),
                                       requester_email=_text(a, "email"), priority=priority), call.idempotency_key)
    return OperationResult({"ticket_id": ticket.id, "status": ticket.status, "url": ticket.url}, desk.vendor,
                           ticket.id)


def _ticket_comment(call: ToolCall, c: Connectors) -> OperationResult:
    desk: TicketDesk = _need(c, "tickets", call.tenant_id)
    ticket_id = _text(call.arguments, "ticket_id", required=True)
    comment = desk.comment(ticket_id, _text(call.arguments, "body", required=True), call.idempotency_key)
    return OperationResult({"ticket_id": ticket_id, "comment_id": comment}, desk.vendor, ticket_id)


def _ticket_status(call: ToolCall, c: Connectors) -> OperationResult:
    desk: TicketDesk = _need(c, "tickets", call.tenant_id)
    ticket = desk.status(_text(call.arguments, "ticket_id", required=True))
    return OperationResult({"ticket_id": ticket.id, "status": ticket.status, "subject": ticket.subject},
                           desk.vendor, ticket.id)


def _zone(call: ToolCall, c: Connectors) -> ZoneInfo:
    named = _text(call.arguments, "timezone")
    if named:
        try:
            return ZoneInfo(named)
        except (ValueError, KeyError):
            raise ConnectorError(FailureKind.INVALID, f"{named!r} is not a time zone") from None
    return caller_zone(call.caller_number, c.calendar_zone)


def _minutes(call: ToolCall, c: Connectors) -> int:
    minutes = _number(call.arguments, "duration_minutes", c.booking_minutes)
    if not 5 <= minutes <= 8 * 60:
        raise ConnectorError(FailureKind.INVALID, f"a booking of {minutes} minutes is not taken")
    return minutes


def _start(call: ToolCall, zone: ZoneInfo) -> datetime:
    a = call.arguments
    start = resolve_start(start=_text(a, "start"), day=_text(a, "day"), at=_text(a, "time"), zone=zone, now=call.now)
    if start <= call.now:
        raise ConnectorError(FailureKind.INVALID, f"{say_when(start, zone)} has passed: ask for a later time")
    return start


def _booked(booking_id: str, start: datetime, zone: ZoneInfo, vendor: str) -> OperationResult:
    return OperationResult({"booking_id": booking_id, "confirmation": confirmation_code(booking_id),
                            "when": say_when(start, zone), "start": start.isoformat()}, vendor, booking_id)


def _free_slots(call: ToolCall, c: Connectors) -> OperationResult:
    calendar: CalendarConnector = _need(c, "calendar", call.tenant_id)
    zone = _zone(call, c)
    day = _text(call.arguments, "day")
    begin = resolve_start(start=None, day=day, at="00:00", zone=zone, now=call.now) if day else call.now
    begin = max(begin, call.now)
    end = begin.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1 if day else 7)
    slots = calendar.free_slots(begin, end, _minutes(call, c) * 60)[:SLOTS_SAID]
    return OperationResult({"slots": [{"start": s.start.isoformat(), "said": say_when(s.start, zone)} for s in slots],
                            "count": len(slots)}, calendar.vendor)


def _book(call: ToolCall, c: Connectors) -> OperationResult:
    calendar: CalendarConnector = _need(c, "calendar", call.tenant_id)
    zone = _zone(call, c)
    start = _start(call, zone)
    a = call.arguments
    request = BookingRequest(start=start, end=start + timedelta(minutes=_minutes(call, c)),
                             title=_text(a, "title", default="Visit booked by phone"),
                             description=_text(a, "note") or _text(a, "description"),
                             attendee_name=_text(a, "name"), attendee_phone=call.caller_number,
                             attendee_email=_text(a, "email"), attendee_timezone=zone.key)
    try:
        booking = calendar.book(request, call.idempotency_key)
    except ConnectorError as exc:
        if exc.kind != FailureKind.CONFLICT:
            raise
        why = _taken(calendar, request, zone, call.now)
        raise ConnectorError(FailureKind.CONFLICT, why, status=exc.status) from None
    return _booked(booking.id, booking.start, zone, calendar.vendor)


def _taken(calendar: CalendarConnector, request: BookingRequest, zone: ZoneInfo, now: datetime) -> str:
    """Why a booking was refused, with what is free that day instead (for the agent to offer)."""
    said = f"{say_when(request.start, zone)} is taken"
    day = request.start.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        free = calendar.free_slots(max(day, now), day + timedelta(days=1),
                                   int((request.end - request.start).total_seconds()))[:3]
    except ConnectorError:
        return said
    if not free:
        return f"{said}, and nothing else is free that day"
    times = ", ".join(s.start.astimezone(zone).strftime("%I:%M %p").lstrip("0") for s in free)
    return f"{said}; free that day: {times}"


def _reschedule(call: ToolCall, c: Connectors) -> OperationResult:
    calendar: CalendarConnector = _need(c, "calendar", call.tenant_id)
    zone = _zone(call, c)
    start = _start(call, zone)
    booking = calendar.reschedule(_text(call.arguments, "booking_id", required=True), start,
                                  start + timedelta(minutes=_minutes(call, c)), call.idempotency_key)
    return _booked(booking.id, booking.start, zone, calendar.vendor)


def _cancel(call: ToolCall, c: Connectors) -> OperationResult:
    calendar: CalendarConnector = _need(c, "calendar", call.tenant_id)
    booking_id = _text(call.arguments, "booking_id", required=True)
    calendar.cancel(booking_id, call.idempotency_key)
    return OperationResult({"booking_id": booking_id, "cancelled": True}, calendar.vendor, booking_id)


OPERATIONS: dict[str, Callable[[ToolCall, Connectors], OperationResult]] = {
    "crm.find_contact": _crm_find,
    "crm.upsert_contact": _crm_upsert,
    "crm.log_call": _crm_log_call,
    "tickets.create": _ticket_create,
    "tickets.comment": _ticket_comment,
    "tickets.status": _ticket_status,
    "calendar.free_slots": _free_slots,
    "calendar.book": _book,
    "calendar.reschedule": _reschedule,
    "calendar.cancel": _cancel,
}
"""Every operation but `webhook.post`, which needs its target (`post_webhook`)."""


def run_operation(call: ToolCall, connectors: Connectors) -> OperationResult:
    operation = OPERATIONS.get(call.operation)
    if operation is None:
        raise ConnectorError(FailureKind.CONFIGURATION, f"no operation {call.operation!r}")
    return operation(call, connectors)


def post_webhook(call: ToolCall, target: WebhookTarget) -> OperationResult:
    payload = {"tool": call.tool, "arguments": dict(call.arguments), "call_id": call.call_id,
               "tenant_id": call.tenant_id}
    return OperationResult(target.post(payload, call.idempotency_key), target.vendor)


def connector_of(operation: str, connectors: Connectors) -> Any:
    """The connector an operation paces against (its rate limit), or None where none is configured."""
    family = operation.split(".", 1)[0]
    return {"crm": connectors.crm, "tickets": connectors.tickets, "calendar": connectors.calendar}.get(family)
