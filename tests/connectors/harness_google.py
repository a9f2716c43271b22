"""The Google Calendar connector against its local server (tests/connectors/fake_google_calendar.py):
google-api-python-client and google-auth as shipped, a service account key made for the test (its
`token_uri` the local token endpoint), acting for a Workspace user by domain-wide delegation."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from streams.connectors.calendar_google import GoogleCalendarConnector, GoogleCalendarSettings, connect
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.slots import WEEKDAYS, OpeningHours
from tests.connectors.fake_google_calendar import FakeGoogleCalendar
from tests.connectors.harness import FaultsOnServer

TIMEZONE = "Europe/Berlin"
HOURS = OpeningHours(timezone=TIMEZONE, days=WEEKDAYS, opens=time(8, 0), closes=time(18, 0), slot_minutes=60)
CALENDAR_ID = "c_frontdesk0example@group.calendar.google.com"
CLIENT_EMAIL = "voxlog-scheduler@acme-voice.iam.gserviceaccount.com"
KEY_ID = "5e1d2f0c3b4a69788796a5b4c3d2e1f0a9b8c7d6"
DELEGATED_USER = "frontdesk@acme.example"
KEY_ENV = "GOOGLE_CALENDAR_SERVICE_ACCOUNT"


@functools.cache
def _private_key_pem() -> bytes:
    """One RSA key per test process (making one takes a noticeable fraction of a second)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem() -> bytes:
    key = serialization.load_pem_private_key(_private_key_pem(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def service_account_key(token_uri: str) -> str:
    """A key file as Google Cloud's console downloads it, its `token_uri` pointed at the local server."""
    return json.dumps({
        "type": "service_account", "project_id": "acme-voice", "private_key_id": KEY_ID,
        "private_key": _private_key_pem().decode(), "client_email": CLIENT_EMAIL, "client_id": "109876543210987654321",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{CLIENT_EMAIL}",
        "universe_domain": "googleapis.com",
    })


@dataclass
class GoogleCalendarHarness(FaultsOnServer):
    server: FakeGoogleCalendar
    connector: GoogleCalendarConnector
    secret_values: tuple[str, ...]
    timezone: str = TIMEZONE
    refreshes_tokens: bool = True

    def add_busy(self, start: datetime, end: datetime, title: str = "busy") -> None:
        self.server.add_event(start, end, title)

    def events(self) -> list[tuple[datetime, datetime, str]]:
        return [(e.start, e.end, e.summary) for e in self.server.events()]


@contextmanager
def harness(*, page_size: int = 250, token_lifetime_s: int = 3600, access_role: str = "owner",
            timeout_s: float = 1.0) -> Iterator[GoogleCalendarHarness]:
    with FakeGoogleCalendar(calendar_id=CALENDAR_ID, time_zone=TIMEZONE, client_email=CLIENT_EMAIL, key_id=KEY_ID,
                            public_key_pem=public_key_pem(), delegated_users=frozenset({DELEGATED_USER}),
                            access_role=access_role, page_size=page_size, token_lifetime_s=token_lifetime_s) as server:
        key = service_account_key(server.token_uri)
        settings = GoogleCalendarSettings(calendar_id=CALENDAR_ID, service_account=SecretRef(env=KEY_ENV),
                                          delegated_user=DELEGATED_USER, base_url=server.base_url, hours=HOURS)
        connector = connect(settings, Secrets(environ={KEY_ENV: key}), timeout_s=timeout_s)
        private_key = _private_key_pem().decode()
        # The key's base64 body, line by line: any line of it in a message is a leak.
        key_lines = tuple(line for line in private_key.splitlines() if line and not line.startswith("-----"))
        yield GoogleCalendarHarness(server=server, connector=connector, secret_values=(key, private_key, *key_lines))
