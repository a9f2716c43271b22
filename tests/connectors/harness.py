"""What a connector's test harness offers the contract suites (tests/contract/test_*_connector_contract.py).

Each vendor has a module `tests/connectors/harness_<vendor>.py` with a context manager `harness()`
that starts the vendor's local server on 127.0.0.1 (a wire-protocol fake written from the vendor's
public API reference, or the real server where one installs: Radicale), builds the real connector
against it (the vendor's SDK pointed at the local URL, `timeout_s=1.0`) and yields an object with the
methods below. Faults are injected on the wire, so the SDK's own error handling is what is tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from streams.connectors.base import CalendarConnector, CrmConnector, TicketDesk
from tests.connectors.vendor_server import VendorServer


class WireFaults(Protocol):
    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        """The next `times` requests (of any kind, token requests excepted) answer `status` with the
        vendor's own error body (or `body`) and `headers` (e.g. Retry-After)."""

    def stall_next(self, seconds: float) -> None:
        """The next request is answered only after `seconds` (longer than the connector's timeout)."""

    def malformed_next(self) -> None:
        """The next request is answered 200 with a body that is not the vendor's JSON (or XML)."""

    @property
    def requests_seen(self) -> int:
        """How many API requests reached the server (token requests excepted)."""

    refreshes_tokens: bool
    """Whether the connector holds an OAuth token it refreshes once on a 401 (Salesforce, Google)."""

    secret_values: tuple[str, ...]
    """The secrets the connector was given: none may appear in an error message."""


class FaultsOnServer:
    """A harness's `WireFaults`, put on its `server`: the vendor's local server (vendor_server.py)."""

    server: VendorServer

    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        self.server.fail_next(status, times=times, body=body, headers=headers)

    def stall_next(self, seconds: float) -> None:
        self.server.stall_next(seconds)

    def malformed_next(self) -> None:
        self.server.malformed_next()

    @property
    def requests_seen(self) -> int:
        return self.server.requests_seen


class CrmHarness(WireFaults, Protocol):
    connector: CrmConnector

    def seed_contact(self, phone: str, first_name: str, last_name: str, email: str = "") -> str:
        """Puts a contact into the server directly: its id."""

    def contacts_with_phone(self, phone: str) -> list[Mapping[str, str]]:
        """The server's contact records with this phone number."""

    def calls_logged(self, contact_id: str) -> list[Mapping[str, str]]:
        """The call engagements / tasks written on the contact, each with at least `summary`."""


class DeskHarness(WireFaults, Protocol):
    connector: TicketDesk

    def tickets(self) -> list[Mapping[str, str]]:
        """Every ticket on the server, each with at least `id` and `subject`."""

    def comments(self, ticket_id: str) -> list[str]:
        """The bodies of the ticket's comments, the description excepted."""


class CalendarHarness(WireFaults, Protocol):
    connector: CalendarConnector
    timezone: str
    """The calendar's zone, as the connector was configured (`Europe/Berlin`)."""

    def add_busy(self, start: datetime, end: datetime, title: str = "busy") -> None:
        """Puts an event into the calendar directly."""

    def events(self) -> list[tuple[datetime, datetime, str]]:
        """Every event in the calendar (start, end, title), cancelled ones excluded, as aware datetimes."""
