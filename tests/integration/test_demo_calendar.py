"""The demo tenant's calendar when several gateways serve one VOXLOG_HOME (a test's cluster, a user's
second `voxlog serve`): each runs its own Radicale on the shared storage, and none breaks another's."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from streams.config.tenants import load_tenants
from streams.connectors.base import BookingRequest
from streams.connectors.calendar_caldav import CalDavCalendar, connect
from streams.connectors.radicale_server import RadicaleServer
from streams.connectors.secrets import Secrets
from streams.connectors.vendor_settings import CalDavSettings
from voxlog.demo_calendar import DEMO_TENANT, DemoCalendar, demo_calendar
from voxlog.settings import DEFAULT_AGENTS_DIR

GATEWAYS = 4


def test_gateways_starting_together_on_one_home_each_serve_the_one_calendar(tmp_path: Path) -> None:
    tenants = load_tenants(DEFAULT_AGENTS_DIR)

    def start() -> DemoCalendar:
        calendar = demo_calendar(tmp_path, tenants)
        assert calendar is not None
        calendar.start()
        return calendar

    def served(calendar: DemoCalendar) -> CalDavCalendar:
        spec = calendar.tenant(tenants[DEMO_TENANT]).integrations.calendar
        assert isinstance(spec, CalDavSettings)
        assert spec.url == calendar.url
        return connect(spec, Secrets(calendar.environ), timeout_s=10)

    with ThreadPoolExecutor(GATEWAYS) as pool:
        calendars = list(pool.map(lambda _: start(), range(GATEWAYS)))
    try:
        assert len({c.password for c in calendars}) == 1  # one password kept, whichever came first
        assert len({c.server.port for c in calendars}) == GATEWAYS
        assert all(c.server.running for c in calendars)
        zone = ZoneInfo("America/New_York")
        for n, calendar in enumerate(calendars):
            start_at = datetime(2031, 3, 3, 9 + n, tzinfo=zone)
            served(calendar).book(
                BookingRequest(start_at, start_at + timedelta(hours=1), f"visit {n}", ""), f"visit {n}")
        # What each booked through its own server, every other reads from the shared storage.
        for calendar in calendars:
            slots = served(calendar).free_slots(
                datetime(2031, 3, 3, tzinfo=zone), datetime(2031, 3, 4, tzinfo=zone), 3600)
            assert not {9, 10, 11, 12} & {s.start.astimezone(zone).hour for s in slots}
    finally:
        for calendar in calendars:
            calendar.stop()
    assert not list((tmp_path / "caldav").glob("users.*"))  # the passwords' files go with their servers
    assert not list((tmp_path / "caldav").glob("password.*"))


def test_a_chosen_port_is_held_from_when_the_server_is_made_until_it_answers(tmp_path: Path) -> None:
    """The port is in the demo tenant's URL from the gateway's build, before the server starts: until it
    answers there, nothing else may take the port (a connection's ephemeral port took one in CI once)."""
    server = RadicaleServer(tmp_path / "caldav", users={"demo": "secret"})
    with socket.socket() as squatter, pytest.raises(OSError, match="in use"):
        squatter.bind((server.host, server.port))
    server.start()
    try:
        assert httpx.get(server.url, timeout=10).status_code in (200, 302, 401)
        with socket.socket() as squatter, pytest.raises(OSError, match="in use"):  # now Radicale's own
            squatter.bind((server.host, server.port))
    finally:
        server.stop()
    with socket.socket() as after:
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (the request's connection may linger)
        after.bind((server.host, server.port))
        after.listen()  # given back with the server: nobody listens there, and nothing holds it
