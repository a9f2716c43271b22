"""The connectors' pure parts: how a vendor's failure is classified, secrets by reference, free slots,
times as callers say them, tool arguments read into operations, and webhook signatures; hypothesis
where the input is anybody's."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.connectors.base import ConnectorError, FailureKind, TicketRequest
from streams.connectors.http_status import MAX_RETRY_AFTER_S, failure_for_status, retry_after_s
from streams.connectors.operations import Connectors, ToolCall, confirmation_code, run_operation
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.slots import WEEKDAYS, OpeningHours, free_slots
from streams.connectors.spoken_time import caller_zone, resolve_start, say_when, spoken_time
from streams.connectors.tickets_builtin import BuiltinDesk
from streams.connectors.webhook_http import SignatureInvalid, WebhookSigner, verify_signature

NEW_YORK, BERLIN = ZoneInfo("America/New_York"), ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 12, 5, 15, 0, tzinfo=UTC)  # a Saturday


# -- failures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind"), [
    (401, FailureKind.AUTH), (403, FailureKind.SCOPE), (404, FailureKind.NOT_FOUND), (409, FailureKind.CONFLICT),
    (412, FailureKind.CONFLICT), (400, FailureKind.INVALID), (422, FailureKind.INVALID),
    (429, FailureKind.RATE_LIMITED), (408, FailureKind.UNAVAILABLE), (500, FailureKind.UNAVAILABLE),
    (503, FailureKind.UNAVAILABLE)])
def test_each_status_is_one_kind_of_failure(status: int, kind: FailureKind) -> None:
    error = failure_for_status(status, "nope", vendor="acme", retry_after="3")
    assert error.kind == kind
    assert error.retryable == (kind in (FailureKind.RATE_LIMITED, FailureKind.UNAVAILABLE))
    assert str(error).startswith(kind.value)


def test_retry_after_as_seconds_or_a_date() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Sat, 05 Dec 2026 15:00:30 GMT", now=NOW.timestamp()) == 30.0
    assert retry_after_s("Sat, 05 Dec 2026 14:00:00 GMT", now=NOW.timestamp()) == 0.0  # in the past: now
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert retry_after_s("99999999") == MAX_RETRY_AFTER_S  # a vendor's typo parks nobody for days


@given(st.text(max_size=60))
def test_any_retry_after_header_reads_as_a_bounded_delay_or_none(value: str) -> None:
    seconds = retry_after_s(value)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER_S


# -- secrets ----------------------------------------------------------------------------------------

def test_secrets_come_from_the_environment_or_the_secrets_folder(tmp_path: Path) -> None:
    (tmp_path / "zendesk-token").write_text("s3cr3t\n")
    secrets = Secrets(environ={"ACME_TOKEN": "t0ken"}, folder=tmp_path)
    assert secrets.resolve(SecretRef(env="ACME_TOKEN"), "crm").get_secret_value() == "t0ken"
    assert secrets.resolve(SecretRef(file="zendesk-token"), "desk").get_secret_value() == "s3cr3t"
    for missing in (SecretRef(env="UNSET"), SecretRef(file="absent")):
        with pytest.raises(ConnectorError) as caught:
            secrets.resolve(missing, "crm")
        assert caught.value.kind == FailureKind.CONFIGURATION
    with pytest.raises(ConnectorError, match="VOXLOG_SECRETS_DIR is not set"):
        Secrets(environ={}).resolve(SecretRef(file="zendesk-token"), "desk")


@pytest.mark.parametrize("reference", [{"file": "../etc/passwd"}, {"file": "/etc/passwd"}, {"env": "A", "file": "b"},
                                       {}, {"env": "NOT-A-NAME"}])
def test_a_reference_names_one_place_and_no_path(reference: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        SecretRef.model_validate(reference)


# -- free slots -------------------------------------------------------------------------------------

HOURS = OpeningHours(timezone="Europe/Berlin", days=WEEKDAYS, opens=time(8), closes=time(18))


def test_free_slots_skip_busy_times_and_closed_days() -> None:
    weekdays = OpeningHours(timezone="Europe/Berlin")  # mon-fri, 09-17
    day = datetime(2026, 12, 11, tzinfo=BERLIN)  # a Friday
    busy = [(day.replace(hour=10), day.replace(hour=11, minute=30))]
    slots = free_slots(busy, day, day + timedelta(days=3), 3600, weekdays)
    assert [s.start.hour for s in slots] == [9, 12, 13, 14, 15, 16]  # then the weekend is closed
    assert not weekdays.is_open(day.replace(hour=8), day.replace(hour=9))


@given(st.lists(st.tuples(st.integers(0, 47), st.integers(1, 8)), max_size=6), st.sampled_from([1800, 3600, 5400]))
def test_no_free_slot_overlaps_a_busy_time_or_leaves_the_opening_hours(busy_spans: list[tuple[int, int]],
                                                                       duration_s: int) -> None:
    start = datetime(2027, 3, 1, tzinfo=BERLIN)
    busy = [(start + timedelta(minutes=30 * at), start + timedelta(minutes=30 * (at + length)))
            for at, length in busy_spans]
    for slot in free_slots(busy, start, start + timedelta(days=2), duration_s, HOURS):
        assert slot.end - slot.start == timedelta(seconds=duration_s)
        assert HOURS.is_open(slot.start, slot.end)
        assert all(not (slot.start < e and b < slot.end) for b, e in busy)


# -- times as said ----------------------------------------------------------------------------------

def test_the_callers_zone_comes_from_the_number_where_it_tells_one() -> None:
    assert caller_zone("+12125550123", "Europe/Berlin") == NEW_YORK
    assert caller_zone("+15550001111", "Europe/Berlin") == BERLIN  # a number of no one place
    assert caller_zone("not a number", "UTC") == ZoneInfo("UTC")


@pytest.mark.parametrize(("said", "expected"), [
    ("10 am", time(10)), ("10:30 pm", time(22, 30)), ("at 2", time(14)), ("ten o'clock", time(10)),
    ("noon", time(12)), ("half past nine", time(9, 30)), ("12 am", time(0)), ("14:00", time(14))])
def test_times_of_day_as_callers_say_them(said: str, expected: time) -> None:
    assert spoken_time(said) == expected


def test_tomorrow_at_ten_in_new_york_is_sixteen_hundred_in_berlin() -> None:
    start = resolve_start(start=None, day="tomorrow", at="10 am", zone=NEW_YORK, now=NOW)
    assert start == datetime(2026, 12, 6, 10, tzinfo=NEW_YORK)
    assert start.astimezone(BERLIN).hour == 16
    assert say_when(start, NEW_YORK) == "Sunday, December 6 at 10:00 AM"
    tuesday = resolve_start(start=None, day="Tuesday", at="2:30 pm", zone=NEW_YORK, now=NOW)
    assert tuesday == datetime(2026, 12, 8, 14, 30, tzinfo=NEW_YORK)


@given(st.text(max_size=40), st.text(max_size=40))
def test_any_words_resolve_to_a_time_or_an_invalid_argument(day: str, at: str) -> None:
    kinds: list[FailureKind] = []
    try:
        start = resolve_start(start=None, day=day, at=at, zone=NEW_YORK, now=NOW)
    except ConnectorError as exc:
        kinds.append(exc.kind)
    else:
        assert start.tzinfo is not None
    assert kinds in ([], [FailureKind.INVALID])


# -- operations -------------------------------------------------------------------------------------

def call(operation: str, arguments: dict[str, Any], caller: str = "+12125550123") -> ToolCall:
    return ToolCall(tool="t", operation=operation, arguments=arguments, idempotency_key="call-1/t1", tenant_id="acme",
                    call_id="call-1", caller_number=caller, now=NOW)


def test_an_operation_without_its_system_says_which_is_missing() -> None:
    with pytest.raises(ConnectorError, match=r"no calendar configured \(integrations.calendar\)") as caught:
        run_operation(call("calendar.book", {"day": "tomorrow", "time": "10 am"}), Connectors())
    assert caught.value.kind == FailureKind.CONFIGURATION


@pytest.mark.parametrize(("operation", "arguments"), [
    ("tickets.create", {}), ("tickets.create", {"summary": ["a", "list"]}),
    ("tickets.create", {"summary": "x", "priority": "panic"}), ("tickets.comment", {"ticket_id": "T1001"}),
    ("tickets.status", {"ticket_id": None})])
def test_arguments_that_cannot_be_read_are_invalid_not_a_crash(operation: str, arguments: dict[str, Any],
                                                               tmp_path: Path) -> None:
    desk = BuiltinDesk(tmp_path / "desk.db", "acme")
    with pytest.raises(ConnectorError) as caught:
        run_operation(call(operation, arguments), Connectors(tickets=desk))
    assert caught.value.kind == FailureKind.INVALID
    assert desk.tickets() == []


def test_a_ticket_carries_the_callers_number_and_is_made_once(tmp_path: Path) -> None:
    desk = BuiltinDesk(tmp_path / "desk.db", "acme")
    made = run_operation(call("tickets.create", {"summary": "router blinks red " * 10}), Connectors(tickets=desk))
    again = run_operation(call("tickets.create", {"summary": "router blinks red " * 10}), Connectors(tickets=desk))
    assert made == again
    assert (made.connector, made.remote_id) == ("voxlog", made.result["ticket_id"])
    (ticket,) = desk.tickets()
    assert len(ticket["subject"]) <= 80
    assert desk.create(TicketRequest(subject="other", description="d"), "other-key").id != made.remote_id


def test_confirmation_codes_are_short_and_stable() -> None:
    assert confirmation_code("uid-1") == confirmation_code("uid-1") != confirmation_code("uid-2")
    assert len(confirmation_code("uid-1")) == 6


# -- webhook signatures -----------------------------------------------------------------------------

SECRET = b"whsec-test"


def signed(body: bytes, at: int) -> dict[str, str]:
    return WebhookSigner(SECRET).headers(body, at)


def test_a_receiver_accepts_what_voxlog_signed() -> None:
    body = json.dumps({"tool": "tell_orders"}).encode()
    verify_signature(SECRET, body, signed(body, 1_800_000_000), now=1_800_000_010)


@pytest.mark.parametrize("tamper", ["body", "timestamp", "old", "secret", "unsigned", "not a number"])
def test_a_receiver_refuses_a_forgery_or_a_replay(tamper: str) -> None:
    body, at = b'{"tool":"tell_orders"}', 1_800_000_000
    headers = signed(body, at)
    now: float = at + 1
    secret = SECRET
    if tamper == "body":
        body = b'{"tool":"refund_everything"}'
    elif tamper == "timestamp":
        headers["X-Voxlog-Timestamp"] = str(at + 5)
    elif tamper == "old":
        now = at + 3600  # the same request, captured and sent an hour later
    elif tamper == "secret":
        secret = b"another"
    elif tamper == "unsigned":
        headers.pop("X-Voxlog-Signature")
    else:
        headers["X-Voxlog-Timestamp"] = "soon"
    with pytest.raises(SignatureInvalid):
        verify_signature(secret, body, headers, now=now)


@given(st.binary(max_size=200), st.binary(min_size=1, max_size=200))
def test_no_other_body_passes_a_signature(body: bytes, other: bytes) -> None:
    headers = signed(body, 1_800_000_000)
    if other != body:
        with pytest.raises(SignatureInvalid):
            verify_signature(SECRET, other, headers, now=1_800_000_000)


def test_a_date_beyond_the_dst_change_keeps_its_wall_time() -> None:
    """2027-03-14: New York moves its clocks, Berlin not yet; ten o'clock is still ten in New York."""
    start = resolve_start(start=None, day="2027-03-15", at="10 am", zone=NEW_YORK, now=NOW)
    assert start.astimezone(BERLIN) == datetime(2027, 3, 15, 15, tzinfo=BERLIN)
    assert date(2027, 3, 15) == start.date()


def test_urllib3_is_urllib3() -> None:
    """caldav's niquests brings urllib3-future, whose wheel replaces urllib3 for every library using it unless
    it is built apart (tools/setup.sh, the Dockerfile): requests' users broke when it did."""
    import urllib3

    assert int(urllib3.__version__.split(".")[2]) < 900, f"urllib3-future {urllib3.__version__} replaced urllib3"


def test_a_connector_that_cannot_be_built_leaves_the_others_working(tmp_path: Path) -> None:
    from streams.connectors.integrations import TenantIntegrations, build_connectors, check_integrations

    integrations = TenantIntegrations.model_validate({
        "tickets": {"kind": "voxlog"},
        "calendar": {"kind": "caldav", "url": "http://127.0.0.1:9/cal/", "username": "bot",
                     "password": {"env": "ACME_CALDAV_PASSWORD"}}})
    connectors = build_connectors("acme", integrations, Secrets(environ={}), tmp_path)
    made = run_operation(call("tickets.create", {"summary": "router down"}), connectors)
    assert made.connector == "voxlog"
    with pytest.raises(ConnectorError, match="ACME_CALDAV_PASSWORD is not set") as caught:
        run_operation(call("calendar.book", {"day": "tomorrow", "time": "10 am"}), connectors)
    assert caught.value.kind == FailureKind.CONFIGURATION
    checked = check_integrations("acme", integrations, Secrets(environ={}), tmp_path)
    assert [r.ok for r in checked["calendar"]] == [False]
    assert all(r.ok for r in checked["tickets (voxlog)"])


def test_every_vendor_a_tenant_can_name_has_a_module_that_connects_it() -> None:
    import importlib
    import typing

    from streams.connectors.integrations import VENDOR_MODULES, CalendarSettings, CrmSettings, DeskSettings

    named = {kind for union in (CrmSettings, DeskSettings, CalendarSettings) for kind in typing.get_args(
        typing.get_args(union)[0])}
    named = {kind for kind in named if kind.__name__ != "BuiltinDeskSettings"}  # voxlog's own: no vendor
    assert named == set(VENDOR_MODULES)
    for module in VENDOR_MODULES.values():
        assert callable(importlib.import_module(f"streams.connectors.{module}").connect)
