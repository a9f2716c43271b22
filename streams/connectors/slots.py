"""Free slots from busy times: what calendars that answer only "busy from/to" (CalDAV free-busy,
Google's freebusy) need to offer the caller bookable times. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from streams.connectors.base import Slot

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class OpeningHours(BaseModel):
    """When the calendar takes bookings, in its own time zone (a technician's working day)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str = "UTC"
    """The calendar's IANA zone (`Europe/Berlin`): opening hours are read in it."""
    days: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri")
    opens: time = time(9, 0)
    closes: time = time(17, 0)
    slot_minutes: int = Field(60, ge=5, le=24 * 60)
    """How long a booking is, unless a tool asks otherwise; slots start on multiples of it from `opens`."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        ZoneInfo(value)  # raises for an unknown zone
        return value

    @field_validator("days")
    @classmethod
    def _weekdays(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [d for d in value if d not in WEEKDAYS]
        if unknown:
            raise ValueError(f"unknown weekdays {unknown}: use {', '.join(WEEKDAYS)}")
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def is_open(self, start: datetime, end: datetime) -> bool:
        """Whether [start, end) lies within one opening period."""
        local_start, local_end = start.astimezone(self.zone), end.astimezone(self.zone)
        day = local_start.date()
        opens, closes = self.period(day)
        return WEEKDAYS[day.weekday()] in self.days and opens <= start and end <= closes and local_end > local_start

    def period(self, day: date) -> tuple[datetime, datetime]:
        return (datetime.combine(day, self.opens, tzinfo=self.zone),
                datetime.combine(day, self.closes, tzinfo=self.zone))


def overlaps(a_start: datetime, a_end: datetime, b_start: datetime, b_end: datetime) -> bool:
    return a_start < b_end and b_start < a_end


def free_slots(busy: Iterable[tuple[datetime, datetime]], start: datetime, end: datetime, duration_s: int,
               hours: OpeningHours, *, limit: int = 200) -> list[Slot]:
    """Slots of `duration_s` within [start, end) and the opening hours, overlapping nothing busy; at most
    `limit` of them, earliest first."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("free_slots needs timezone-aware times")
    busy_times = sorted(busy)
    length = timedelta(seconds=duration_s)
    step = timedelta(minutes=hours.slot_minutes)
    slots: list[Slot] = []
    day = start.astimezone(hours.zone).date()
    last_day = end.astimezone(hours.zone).date()
    while day <= last_day and len(slots) < limit:
        if WEEKDAYS[day.weekday()] in hours.days:
            opens, closes = hours.period(day)
            at = opens
            while at + length <= closes and len(slots) < limit:
                slot_end = at + length
                if start <= at and slot_end <= end and not any(overlaps(at, slot_end, b, e) for b, e in busy_times):
                    slots.append(Slot(at, slot_end))
                at += step
        day += timedelta(days=1)
    return slots
