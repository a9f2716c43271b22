"""The Salesforce connector against a local Salesforce org (tests/connectors/fake_salesforce.py), for
the CRM contract suite (`CrmHarness`) and tests/integration/test_salesforce_connector.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import SecretStr

from streams.connectors.crm_salesforce import Flow, SalesforceConnector
from tests.connectors.fake_salesforce import FakeSalesforce, signing_key_pair

CLIENT_ID = "3MVG9fake.consumer.key"
CLIENT_SECRET = "F4KE-consumer-secret-5e1f"
USERNAME = "voxlog-integration@acme.example"
TIMEOUT_S = 1.0


@dataclass
class SalesforceHarness:
    """`CrmHarness` over a `FakeSalesforce`; `org` is the server, for what the contract does not ask."""

    org: FakeSalesforce
    connector: SalesforceConnector
    secret_values: tuple[str, ...]
    refreshes_tokens: bool = True

    def fail_next(self, status: int, *, times: int = 1, body: str | None = None,
                  headers: Mapping[str, str] | None = None) -> None:
        self.org.fail_next(status, times=times, body=body, headers=headers)

    def stall_next(self, seconds: float) -> None:
        self.org.stall_next(seconds)

    def malformed_next(self) -> None:
        self.org.malformed_next()

    @property
    def requests_seen(self) -> int:
        return self.org.requests_seen

    def expire_tokens(self) -> None:
        """The connector's token is refused from now on: its next call gets 401 and signs in again."""
        self.org.expire_tokens()

    def seed_contact(self, phone: str, first_name: str, last_name: str, email: str = "") -> str:
        return self.org.add("Contact", Phone=phone, FirstName=first_name, LastName=last_name, Email=email or None)

    def contacts_with_phone(self, phone: str) -> list[Mapping[str, str]]:
        return [_strings(row) for row in list(self.org.records["Contact"].values())
                if phone in (row.get("Phone"), row.get("MobilePhone"))]

    def calls_logged(self, contact_id: str) -> list[Mapping[str, str]]:
        return [{**_strings(row), "summary": str(row.get("Description") or "")}
                for row in list(self.org.records["Task"].values()) if row.get("WhoId") == contact_id]


def _strings(row: Mapping[str, object]) -> dict[str, str]:
    return {name: str(value) for name, value in row.items() if value is not None}


@contextmanager
def harness(flow: Flow = "client_credentials", *, page_size: int = 2000) -> Iterator[SalesforceHarness]:
    """The connector, signing in by `flow`, against a fresh org on 127.0.0.1."""
    private_key, public_key = signing_key_pair()
    with FakeSalesforce(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, username=USERNAME, public_key=public_key,
                        page_size=page_size) as org:
        if flow == "client_credentials":
            connector = SalesforceConnector(login_url=org.url, flow=flow, client_id=CLIENT_ID, timeout_s=TIMEOUT_S,
                                            client_secret=SecretStr(CLIENT_SECRET), ca_file=org.ca_file)
            secret_values: tuple[str, ...] = (CLIENT_SECRET,)
        else:
            connector = SalesforceConnector(login_url=org.url, flow=flow, client_id=CLIENT_ID, timeout_s=TIMEOUT_S,
                                            username=USERNAME, private_key=SecretStr(private_key), ca_file=org.ca_file)
            secret_values = (private_key,)
        yield SalesforceHarness(org, connector, secret_values)
