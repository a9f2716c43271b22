"""Times as callers say them ("tomorrow", "10 am", "Tuesday at half past two") or as an LLM writes them
(ISO 8601), resolved to an instant in the caller's own time zone; and instants said back in that zone.
Pure: the clock and the zones are arguments."""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_zones

from streams.connectors.base import ConnectorError, FailureKind

WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
NUMBER_WORDS = {w: n for n, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])}
_CLOCK = re.compile(
    r"\b(?P<hour>\d{1,2}|" + "|".join(NUMBER_WORDS) + r")(?::(?P<minute>[0-5]\d))?\s*"
    r"(?P<half>a\.?\s?m\.?|p\.?\s?m\.?|o'?clock)?(?![\w:])", re.IGNORECASE)


def caller_zone(number: str, fallback: str) -> ZoneInfo:
    """The zone a phone number is in, where its numbering plan tells one zone (+1 212: New York);
    else `fallback` (the calendar's)."""
    try:
        zones = phone_zones.time_zones_for_number(phonenumbers.parse(number))
    except phonenumbers.NumberParseException:
        zones = ()
    if len(zones) == 1 and zones[0] != "Etc/Unknown":
        try:
            return ZoneInfo(zones[0])
        except ZoneInfoNotFoundError:
            pass
    return ZoneInfo(fallback)


def _invalid(message: str) -> ConnectorError:
    return ConnectorError(FailureKind.INVALID, message)


def spoken_day(text: str, today: date) -> date:
    words = text.strip().lower()
    if not words or words == "today":
        return today
    if words == "tomorrow":
        return today + timedelta(days=1)
    if words == "day after tomorrow":
        return today + timedelta(days=2)
    for index, name in enumerate(WEEKDAY_NAMES):
        if re.search(rf"\b{name}\b", words):
            ahead = (index - today.weekday()) % 7 or 7  # "Tuesday" said on a Tuesday is next week's
            return today + timedelta(days=ahead)
    try:
        return date.fromisoformat(words)
    except ValueError:
        raise _invalid(f"which day is {text!r}? Say today, tomorrow, a weekday or a date (2026-12-08)") from None


def spoken_time(text: str) -> time:
    words = text.strip().lower()
    if words in ("noon", "midday"):
        return time(12, 0)
    match = _CLOCK.search(words.replace("half past", "").replace("quarter past", ""))
    if match is None:
        raise _invalid(f"what time is {text!r}? Say 10 am, 2:30 pm or 14:00")
    raw = match["hour"].lower()
    hour = NUMBER_WORDS[raw] if raw in NUMBER_WORDS else int(raw)
    minute = int(match["minute"] or 0)
    if "half past" in words:
        minute = 30
    elif "quarter past" in words:
        minute = 15
    suffix = (match["half"] or "").replace(".", "").replace(" ", "")
    if suffix.startswith("p") and hour < 12:
        hour += 12
    elif suffix.startswith("a") and hour == 12:
        hour = 0
    elif (not suffix or suffix.startswith("o")) and 1 <= hour <= 7:  # "at two" for a visit means the afternoon
        hour += 12
    if hour > 23:
        raise _invalid(f"{text!r} is not a time of day")
    return time(hour, minute)


def resolve_start(*, start: str | None, day: str | None, at: str | None, zone: ZoneInfo, now: datetime) -> datetime:
    """The instant a caller means: an ISO 8601 `start` (its offset kept; none: the caller's zone), else a
    spoken `day` and time `at`, read in the caller's zone."""
    if start:
        try:
            parsed = datetime.fromisoformat(start)
        except ValueError:
            raise _invalid(f"start {start!r} is not an ISO 8601 time") from None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=zone)
    if not at:
        raise _invalid("a booking needs a time: say when")
    local_today = now.astimezone(zone).date()
    return datetime.combine(spoken_day(day or "", local_today), spoken_time(at), tzinfo=zone)


def say_when(instant: datetime, zone: ZoneInfo) -> str:
    """How the agent says a time to the caller, in the caller's zone: "Tuesday, December 8 at 10:00 AM"."""
    local = instant.astimezone(zone)
    clock = local.strftime("%I:%M %p").lstrip("0")
    return f"{local.strftime('%A, %B')} {local.day} at {clock}"
