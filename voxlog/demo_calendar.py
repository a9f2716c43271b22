"""The demo tenant's calendar: a real CalDAV server (Radicale) that voxlog runs beside the gateway when it
serves its own demo agents, so the offline demo books through a real integration protocol.

Its storage is `VOXLOG_HOME/caldav` (bookings outlive a restart), its one user `demo` has a password made
at the first start and kept there (0600), and it listens on a free port of 127.0.0.1: the demo tenant's
`integrations.calendar` names the calendar's path, and the URL it is served at is put in at start.
Any CalDAV client (Thunderbird, `curl`, the `caldav` library) reads the bookings with that user."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from streams.config.tenants import TenantSpec
from streams.connectors.radicale_server import RadicaleError, RadicaleServer
from streams.connectors.vendor_settings import CalDavSettings

DEMO_TENANT = "demo"
PASSWORD_ENV = "VOXLOG_DEMO_CALDAV_PASSWORD"
"""The environment variable the demo tenant's calendar password is named by (set for its tool worker only)."""


class DemoCalendar:
    def __init__(self, home: Path, calendar: CalDavSettings) -> None:
        self.folder = home / "caldav"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = urlsplit(calendar.url).path  # /demo/visits/
        self.username = calendar.username
        self.password = self._password()
        self.server = RadicaleServer(self.folder, users={self.username: self.password})

    def _password(self) -> str:
        """The kept password, or a new one kept whole: gateways starting together on one home agree on
        whichever was linked into place first, and none reads a half-written file."""
        kept = self.folder / "password"
        if not kept.exists():
            draft = self.folder / f"password.{os.getpid()}.{secrets.token_hex(4)}"
            descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_urlsafe(18))
            try:
                os.link(draft, kept)
            except FileExistsError:
                pass  # another gateway's, linked first
            finally:
                draft.unlink()
        return kept.read_text().strip()

    @property
    def url(self) -> str:
        """The calendar's URL as served now."""
        return self.server.url.rstrip("/") + self.path

    def tenant(self, tenant: TenantSpec) -> TenantSpec:
        """The demo tenant with its calendar at this server."""
        calendar = tenant.integrations.calendar
        assert isinstance(calendar, CalDavSettings)
        served = calendar.model_copy(update={"url": self.url})
        integrations = tenant.integrations.model_copy(update={"calendar": served})
        return tenant.model_copy(update={"integrations": integrations})

    @property
    def environ(self) -> dict[str, str]:
        """What the tool worker's secrets are resolved against, beside the process's environment."""
        return {**os.environ, PASSWORD_ENV: self.password}

    def start(self) -> None:
        self.server.start()
        calendar_id = self.path.strip("/").split("/")[-1]
        made = self.folder / "collections" / "collection-root" / self.username / calendar_id
        if not made.exists():
            try:
                self.server.make_calendar(self.username, calendar_id, "Acme technician visits")
            except RadicaleError:
                if not made.exists():  # else another gateway on this home made it first
                    self.server.stop()
                    raise

    def stop(self) -> None:
        self.server.stop()


def demo_calendar(home: Path, tenants: dict[str, TenantSpec]) -> DemoCalendar | None:
    """The demo calendar, where the tenant `demo` books into a CalDAV calendar on this machine (its URL on
    127.0.0.1 or localhost): voxlog serves that calendar itself, wherever the agents' folder is."""
    tenant = tenants.get(DEMO_TENANT)
    calendar = tenant.integrations.calendar if tenant is not None else None
    if not isinstance(calendar, CalDavSettings) or urlsplit(calendar.url).hostname not in ("127.0.0.1", "localhost"):
        return None
    return DemoCalendar(home, calendar)
