"""A tenant's integrations, as its `tenant.yaml` declares them, and the connectors built from them.

    integrations:
      crm: {kind: hubspot, token: {env: ACME_HUBSPOT_TOKEN}}
      tickets: {kind: zendesk, subdomain: acme, email: ops@acme.example, token: {file: zendesk-token}}
      calendar: {kind: caldav, url: https://dav.acme.example/cal/visits/, username: bot,
                 password: {env: ACME_CALDAV_PASSWORD}, hours: {timezone: Europe/Berlin}}
      webhooks:
        orders: {url: https://acme.example/voxlog, secret: {env: ACME_WEBHOOK_SECRET}}

Secrets are named, never written (streams/connectors/secrets.py); only the tool worker resolves them,
when it first runs a tool of the tenant's."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from streams.connectors.base import CheckResult, ConnectorError
from streams.connectors.operations import Connectors
from streams.connectors.secrets import Secrets
from streams.connectors.vendor_settings import (
    BuiltinDeskSettings,
    CalComSettings,
    CalDavSettings,
    FreshdeskSettings,
    GoogleCalendarSettings,
    HubSpotSettings,
    SalesforceSettings,
    WebhookSettings,
    ZendeskSettings,
)

CrmSettings = Annotated[HubSpotSettings | SalesforceSettings, Field(discriminator="kind")]
DeskSettings = Annotated[ZendeskSettings | FreshdeskSettings | BuiltinDeskSettings, Field(discriminator="kind")]
CalendarSettings = Annotated[CalDavSettings | GoogleCalendarSettings | CalComSettings, Field(discriminator="kind")]


class TenantIntegrations(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    crm: CrmSettings | None = None
    tickets: DeskSettings | None = None
    calendar: CalendarSettings | None = None
    webhooks: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")], WebhookSettings] = Field(
        default_factory=dict)
    request_timeout_s: float = Field(5.0, gt=0, le=30)
    """How long one request to a vendor may take (a tool's own deadline bounds its retries)."""
    booking_minutes: int = Field(60, ge=5, le=480)
    """How long a visit booked by `calendar.book` is, unless the tool's arguments say."""


def calendar_zone(settings: CalendarSettings | None) -> str:
    if settings is None:
        return "UTC"
    if isinstance(settings, CalComSettings):
        return settings.timezone
    return settings.hours.timezone


VENDOR_MODULES: dict[type[BaseModel], str] = {
    HubSpotSettings: "crm_hubspot", SalesforceSettings: "crm_salesforce", ZendeskSettings: "tickets_zendesk",
    FreshdeskSettings: "tickets_freshdesk", CalDavSettings: "calendar_caldav",
    GoogleCalendarSettings: "calendar_google", CalComSettings: "calendar_calcom",
}
"""Each vendor's settings, and the module whose `connect(settings, secrets, timeout_s)` builds its connector."""


def _connect(settings: BaseModel, secrets: Secrets, timeout_s: float) -> Any:
    # The vendor's module is imported here, where its connector is built, and only for a tenant that has
    # that vendor: the modules import their SDKs, which loading tenants (every process) does not need.
    module = importlib.import_module(f"streams.connectors.{VENDOR_MODULES[type(settings)]}")
    return module.connect(settings, secrets, timeout_s)


def build_connectors(tenant_id: str, integrations: TenantIntegrations, secrets: Secrets, state_dir: Path) -> Connectors:
    """The tenant's connectors. Each is built on its own: one that cannot be (a secret not set) is left out,
    its reason kept in `problems`, and the others work."""
    timeout_s = integrations.request_timeout_s
    crm, tickets, calendar = integrations.crm, integrations.tickets, integrations.calendar
    built = Connectors(calendar_zone=calendar_zone(calendar), booking_minutes=integrations.booking_minutes)

    def attempt(family: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except ConnectorError as exc:
            built.problems[family] = exc
            return None

    for family, settings in (("crm", crm), ("tickets", tickets), ("calendar", calendar)):
        if isinstance(settings, BuiltinDeskSettings):
            from streams.connectors.tickets_builtin import BuiltinDesk
            built.tickets = BuiltinDesk(state_dir / "desk.db", tenant_id)
        elif settings is not None:
            setattr(built, family, attempt(family, partial(_connect, settings, secrets, timeout_s)))
    if integrations.webhooks:
        from streams.connectors import webhook_http
        for name, hook in integrations.webhooks.items():
            target = attempt(f"webhook {name}", partial(webhook_http.connect, hook, secrets, name))
            if target is not None:
                built.webhooks[name] = target
    return built


def check_integrations(tenant_id: str, integrations: TenantIntegrations, secrets: Secrets,
                       state_dir: Path) -> Mapping[str, list[CheckResult]]:
    """Each configured connection tried (`voxlog integrations check`): what works and what is wrong."""
    connectors = build_connectors(tenant_id, integrations, secrets, state_dir)
    results: dict[str, list[CheckResult]] = {
        what: [CheckResult("configuration", False, str(problem))] for what, problem in connectors.problems.items()}
    for family, connector in (("crm", connectors.crm), ("tickets", connectors.tickets),
                              ("calendar", connectors.calendar)):
        if connector is None:
            continue
        try:
            results[f"{family} ({connector.vendor})"] = connector.check()
        except ConnectorError as exc:
            results[f"{family} ({connector.vendor})"] = [CheckResult("check", False, str(exc))]
    for name, target in connectors.webhooks.items():
        results[f"webhook {name}"] = target.check()
    return results


class TenantConnectors:
    """Each tenant's connectors, built when first needed and kept (their clients, and OAuth tokens, are
    reused). A tenant whose configuration cannot be built is tried again next time: a secret may be set
    meanwhile."""

    def __init__(self, integrations_of: Callable[[str], TenantIntegrations], secrets: Secrets,
                 state_dir: Path) -> None:
        self._integrations_of = integrations_of
        self._secrets = secrets
        self._state_dir = state_dir
        self._built: dict[str, Connectors] = {}
        self._lock = threading.Lock()

    def __call__(self, tenant_id: str) -> Connectors:
        with self._lock:
            built = self._built.get(tenant_id)
            if built is None:
                built = build_connectors(tenant_id, self._integrations_of(tenant_id), self._secrets, self._state_dir)
                if not built.problems:  # else built again next time: a secret may be set meanwhile
                    self._built[tenant_id] = built
            return built
