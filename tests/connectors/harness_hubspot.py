"""The HubSpot connector for the contract suites: `HubSpotCrm` made by `connect()` from its settings (the
token by reference, from an environment of the test's own), against `FakeHubSpot` on 127.0.0.1."""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from streams.connectors.crm_hubspot import HubSpotCrm, HubSpotSettings, connect
from streams.connectors.secrets import SecretRef, Secrets
from tests.connectors.fake_hubspot import FakeHubSpot, Record
from tests.connectors.harness import FaultsOnServer

TIMEOUT_S = 1.0
TOKEN_ENV = "HUBSPOT_TOKEN"


@dataclass
class HubSpotHarness(FaultsOnServer):
    """A `CrmHarness` (tests/connectors/harness.py) over a running `FakeHubSpot`."""

    server: FakeHubSpot
    connector: HubSpotCrm
    refreshes_tokens = False

    @property
    def secret_values(self) -> tuple[str, ...]:
        return (self.server.token,)

    def seed_contact(self, phone: str, first_name: str, last_name: str, email: str = "") -> str:
        properties = {"phone": phone, "firstname": first_name, "lastname": last_name}
        return self.server.add_contact({**properties, "email": email} if email else properties)

    def contacts_with_phone(self, phone: str) -> list[Mapping[str, str]]:
        with_phone = [record for record in self.server.records_of("contacts")
                      if phone in (record.properties.get("phone"), record.properties.get("mobilephone"))]
        return [_plain(record) for record in with_phone]

    def calls_logged(self, contact_id: str) -> list[Mapping[str, str]]:
        """Each call with `summary`: the text of its body (`hs_call_body`, which the connector writes
        as HTML paragraphs: the summary, the outcome, the ticket)."""
        return [{**_plain(call), "summary": _text(str(call.properties.get("hs_call_body") or ""))}
                for call in self.server.calls_of(contact_id)]


def _plain(record: Record) -> dict[str, str]:
    """The record's id and its properties that have a value, as strings."""
    properties = {name: str(value) for name, value in record.properties.items() if value is not None}
    return {**properties, "id": record.id}


def _text(body: str) -> str:
    """HTML paragraphs as lines of plain text."""
    return html.unescape(re.sub(r"<[^>]+>", "", body.replace("</p>", "\n"))).strip()


@contextmanager
def harness() -> Iterator[HubSpotHarness]:
    token = f"pat-na1-{secrets.token_hex(16)}"
    with FakeHubSpot(token) as server:
        settings = HubSpotSettings(kind="hubspot", token=SecretRef(env=TOKEN_ENV), base_url=server.base_url)
        connector = connect(settings, Secrets(environ={TOKEN_ENV: token}), TIMEOUT_S)
        yield HubSpotHarness(server, connector)
