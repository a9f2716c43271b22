"""The Zendesk connector (zenpy) against the local Zendesk (fake_zendesk.py), for the desk contract
suite (tests/connectors/harness.py, `DeskHarness`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from streams.connectors.base import TicketDesk
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.tickets_zendesk import ZendeskDesk, ZendeskSettings, connect
from tests.connectors.fake_zendesk import FakeZendesk
from tests.connectors.harness import FaultsOnServer

SUBDOMAIN = "acme"
EMAIL = "voxlog@acme.example"
TOKEN = "zd-6wH0k3Yq-api-token"


class ZendeskHarness(FaultsOnServer):
    refreshes_tokens: bool = False
    secret_values: tuple[str, ...] = (TOKEN,)
    connector: TicketDesk
    server: FakeZendesk

    def __init__(self, server: FakeZendesk, connector: ZendeskDesk) -> None:
        self.server = server
        self.connector = connector

    def tickets(self) -> list[Mapping[str, str]]:
        with self.server._lock:
            return [{"id": str(t["id"]), "subject": t["subject"], "status": t["status"],
                     "external_id": t["external_id"] or "", "description": t["description"]}
                    for t in self.server.tickets.values()]

    def comments(self, ticket_id: str) -> list[str]:
        with self.server._lock:
            return [c["body"] for c in self.server.comments[int(ticket_id)][1:]]  # the first is the description


@contextmanager
def harness(*, timeout_s: float = 1.0) -> Iterator[ZendeskHarness]:
    with FakeZendesk(subdomain=SUBDOMAIN, email=EMAIL, token=TOKEN) as server:
        settings = ZendeskSettings(subdomain=SUBDOMAIN, email=EMAIL, token=SecretRef(env="ZENDESK_TOKEN"),
                                   base_url=server.base_url)
        connector = connect(settings, Secrets(environ={"ZENDESK_TOKEN": TOKEN}), timeout_s)
        try:
            yield ZendeskHarness(server, connector)
        finally:
            connector.close()
