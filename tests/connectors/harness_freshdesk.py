"""The Freshdesk connector (httpx) against the local Freshdesk (fake_freshdesk.py), for the desk
contract suite (tests/connectors/harness.py, `DeskHarness`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from streams.connectors.base import TicketDesk
from streams.connectors.secrets import SecretRef, Secrets
from streams.connectors.tickets_freshdesk import FreshdeskDesk, FreshdeskSettings, connect
from tests.connectors.fake_freshdesk import FakeFreshdesk
from tests.connectors.harness import FaultsOnServer

DOMAIN = "acme.freshdesk.com"
API_KEY = "fd-Xq81mZr0aP2kLw7s"


class FreshdeskHarness(FaultsOnServer):
    refreshes_tokens: bool = False
    secret_values: tuple[str, ...] = (API_KEY,)
    connector: TicketDesk
    server: FakeFreshdesk

    def __init__(self, server: FakeFreshdesk, connector: FreshdeskDesk) -> None:
        self.server = server
        self.connector = connector

    def tickets(self) -> list[Mapping[str, str]]:
        with self.server._lock:
            return [{"id": str(t["id"]), "subject": t["subject"], "status": str(t["status"]),
                     "description": t["description_text"], "tags": " ".join(t["tags"])}
                    for t in self.server.tickets.values()]

    def comments(self, ticket_id: str) -> list[str]:
        """The notes' text (Freshdesk keeps the description apart from the conversations)."""
        with self.server._lock:
            return [c["body_text"] for c in self.server.conversations[int(ticket_id)]]


@contextmanager
def harness(*, timeout_s: float = 1.0) -> Iterator[FreshdeskHarness]:
    with FakeFreshdesk(domain=DOMAIN, api_key=API_KEY) as server:
        settings = FreshdeskSettings(domain=DOMAIN, api_key=SecretRef(env="FRESHDESK_API_KEY"),
                                     base_url=server.base_url)
        connector = connect(settings, Secrets(environ={"FRESHDESK_API_KEY": API_KEY}), timeout_s)
        try:
            yield FreshdeskHarness(server, connector)
        finally:
            connector.close()
