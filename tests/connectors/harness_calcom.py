"""The Cal.com connector against its local server (tests/connectors/fake_calcom.py): httpx on Cal.com's
API v2, an event type of 60 minutes bookable all seven days 08:00-18:00 Europe/Berlin."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, time

from streams.connectors.calendar_calcom import CalComConnector, CalComSettings, connect
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.slots import WEEKDAYS, OpeningHours
from tests.connectors.fake_calcom import FakeCalCom
from tests.connectors.harness import FaultsOnServer

TIMEZONE = "Europe/Berlin"
HOURS = OpeningHours(timezone=TIMEZONE, days=WEEKDAYS, opens=time(8, 0), closes=time(18, 0), slot_minutes=60)
"""What the event type's availability is on the server (Cal.com keeps it; the connector is not told)."""
API_KEY = "cal_live_5f0e1d2c3b4a59687f6e5d4c3b2a1908"
KEY_ENV = "CALCOM_API_KEY"
EVENT_TYPE_ID = 4242


@dataclass
class CalComHarness(FaultsOnServer):
    server: FakeCalCom
    connector: CalComConnector
    secret_values: tuple[str, ...] = (API_KEY,)
    timezone: str = TIMEZONE
    refreshes_tokens: bool = False

    def add_busy(self, start: datetime, end: datetime, title: str = "busy") -> None:
        self.server.add_booking(start, end, title)

    def events(self) -> list[tuple[datetime, datetime, str]]:
        return [(b.start, b.end, b.title) for b in self.server.bookings()]


@contextmanager
def harness(*, timeout_s: float = 1.0) -> Iterator[CalComHarness]:
    with FakeCalCom(api_key=API_KEY, event_type_id=EVENT_TYPE_ID, timezone=TIMEZONE, opens=HOURS.opens,
                    closes=HOURS.closes, slot_minutes=HOURS.slot_minutes) as server:
        settings = CalComSettings(api_key=SecretRef(env=KEY_ENV), event_type_id=EVENT_TYPE_ID,
                                  base_url=server.base_url, timezone=TIMEZONE)
        connector = connect(settings, Secrets(environ={KEY_ENV: API_KEY}), timeout_s=timeout_s)
        yield CalComHarness(server=server, connector=connector)
