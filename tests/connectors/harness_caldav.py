"""The CalDAV connector's harness: a real Radicale server (streams/connectors/radicale_server.py) with one
calendar, `alice`'s `appointments`, in Europe/Berlin, open 08:00-18:00 every day; the connector reaches
it through a FaultProxy (tests/connectors/fault_proxy.py), which answers faults with Radicale's own
error bodies. The harness itself writes and reads the calendar directly, as another CalDAV client
(a phone's calendar app) would, so what it does is not counted in `requests_seen`.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import icalendar
from caldav.davclient import DAVClient
from pydantic import SecretStr

from streams.connectors.calendar_caldav import CalDavCalendar
from streams.connectors.radicale_server import RadicaleServer
from streams.connectors.slots import WEEKDAYS, OpeningHours
from tests.connectors.fault_proxy import FaultProxy

TIMEZONE = "Europe/Berlin"
HOURS = OpeningHours(timezone=TIMEZONE, days=WEEKDAYS, opens=time(8), closes=time(18), slot_minutes=60)
USER = "alice"
PASSWORD = "rad1cale-Pa55-7f3a9c"
"""Distinctive, so that a test finds it in any text it leaks into."""
CALENDAR_ID = "appointments"
TIMEOUT_S = 1.0

RADICALE_ERROR_BODIES: Mapping[int, tuple[str, str]] = {
    # radicale/httputils.py: what Radicale itself answers with these statuses
    401: ("text/plain", "Access to the requested resource forbidden."),
    403: ("text/plain", "Access to the requested resource forbidden."),
    400: ("text/plain", "Bad Request"),
    404: ("text/plain", "The requested resource could not be found."),
    409: ("text/plain", "Conflict in the request."),
    412: ("text/plain", "Precondition failed."),
    500: ("text/plain", "A server error occurred.  Please contact the administrator."),
}
RADICALE_ERROR_HEADERS: Mapping[int, Mapping[str, str]] = {
    401: {"WWW-Authenticate": 'Basic realm="Radicale - Password Required"'},
}


@dataclass
class CaldavHarness:
    connector: CalDavCalendar
    server: RadicaleServer
    proxy: FaultProxy
    calendar_url: str
    """The calendar's URL on Radicale itself (the connector's goes through the proxy)."""
    timezone: str = TIMEZONE
    refreshes_tokens: bool = False
    secret_values: tuple[str, ...] = (PASSWORD,)
    other_client: DAVClient = field(init=False)

    def __post_init__(self) -> None:
        self.other_client = DAVClient(url=self.server.url, username=USER, password=PASSWORD, auth_type="basic",
                                      timeout=10, enable_rfc6764=False)

    # -- WireFaults -----------------------------------------------------------------------------------

    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        self.proxy.fail_next(status, times=times, body=body, headers=headers)

    def stall_next(self, seconds: float) -> None:
        self.proxy.stall_next(seconds)

    def malformed_next(self) -> None:
        self.proxy.malformed_next()

    @property
    def requests_seen(self) -> int:
        return self.proxy.requests_seen

    # -- the calendar, directly -----------------------------------------------------------------------

    def add_busy(self, start: datetime, end: datetime, title: str = "busy") -> None:
        """An event in UTC, as some calendar apps write them."""
        event = icalendar.Event()
        event.add("UID", str(uuid.uuid4()))
        event.add("DTSTAMP", datetime.now(UTC))
        event.add("DTSTART", start.astimezone(UTC))
        event.add("DTEND", end.astimezone(UTC))
        event.add("SUMMARY", title)
        calendar = icalendar.Calendar()
        calendar.add("PRODID", "-//voxlog tests//another client//EN")
        calendar.add("VERSION", "2.0")
        calendar.add_component(event)
        self.put_event(calendar.to_ical().decode())

    def put_event(self, ics: str, name: str | None = None, headers: Mapping[str, str] | None = None) -> int:
        """Writes iCalendar text as it is, as `<name>.ics` (its UID by default): the HTTP status."""
        calendar = icalendar.Calendar.from_ical(ics)
        resource = name or str(calendar.walk("VEVENT")[0]["UID"])
        answer = self.other_client.request(f"{self.calendar_url}{resource}.ics", "PUT", ics,
                                           {"Content-Type": "text/calendar; charset=utf-8", **(headers or {})})
        assert answer.status < 300 or headers, f"PUT {resource}.ics: {answer.status} {answer.raw}"
        return int(answer.status)

    def event_text(self, uid: str) -> str:
        """The iCalendar text Radicale holds at `<uid>.ics`."""
        answer = self.other_client.request(f"{self.calendar_url}{uid}.ics")
        assert answer.status == 200, f"GET {uid}.ics: {answer.status}"
        return str(answer.raw)

    def event_count(self) -> int:
        """Every event resource in the calendar, cancelled ones included."""
        return len(self._resources())

    def events(self) -> list[tuple[datetime, datetime, str]]:
        zone = ZoneInfo(self.timezone)
        found = []
        for text in self._resources():
            for event in icalendar.Calendar.from_ical(text).walk("VEVENT"):
                if str(event.get("STATUS", "")).upper() == "CANCELLED" or "RECURRENCE-ID" in event:
                    continue
                start, end = event.decoded("DTSTART"), event.decoded("DTEND")
                found.append((_aware(start, zone), _aware(end, zone), str(event.get("SUMMARY", ""))))
        return sorted(found)

    def _resources(self) -> list[str]:
        """The calendar data of every resource in the calendar (a calendar-query without a filter's range)."""
        query = ('<?xml version="1.0" encoding="utf-8"?>'
                 '<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
                 '<D:prop><C:calendar-data/></D:prop>'
                 '<C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter>'
                 '</C:calendar-query>')
        answer = self.other_client.report(self.calendar_url, query, depth=1)
        assert answer.status == 207, answer.status
        assert answer.tree is not None
        return [str(data.text) for data in answer.tree.iter("{urn:ietf:params:xml:ns:caldav}calendar-data")]

    def connector_with(self, *, password: str = PASSWORD, url: str | None = None, calendar: str | None = None,
                       user: str = USER, timeout_s: float = TIMEOUT_S) -> CalDavCalendar:
        """Another connector to this server through the proxy (a second worker, a wrong password...)."""
        return CalDavCalendar(url or self.proxy.url_for(self.calendar_url), user, SecretStr(password), HOURS,
                              calendar=calendar, timeout_s=timeout_s)


def _aware(value: date | datetime, zone: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=zone)
    return datetime(value.year, value.month, value.day, tzinfo=zone)  # a date: its midnight there


@contextmanager
def harness(*, users: Mapping[str, str] | None = None, rights: str | None = None) -> Iterator[CaldavHarness]:
    """A started Radicale (with `users` besides alice, and a rights file's text if given) and the connector."""
    with tempfile.TemporaryDirectory(prefix="voxlog-radicale-") as folder, \
            RadicaleServer(Path(folder), users={USER: PASSWORD, **(users or {})}, rights=rights) as server:
        calendar_url = server.make_calendar(USER, CALENDAR_ID, "Appointments")
        with FaultProxy(server.url, error_bodies=RADICALE_ERROR_BODIES, error_headers=RADICALE_ERROR_HEADERS) as proxy:
            connector = CalDavCalendar(proxy.url_for(calendar_url), USER, SecretStr(PASSWORD), HOURS,
                                       timeout_s=TIMEOUT_S)
            yield CaldavHarness(connector, server, proxy, calendar_url)
