"""Every vendor's settings, as a tenant's `integrations` names them in its `tenant.yaml`: the models the
tenants are loaded with, apart from the connectors they configure. Loading tenants (every CLI command,
`voxlog workers`) needs only these; a vendor's SDK is imported where its connector is built
(`integrations.build_connectors`, in the tool worker and `voxlog integrations check`). So this module
imports pydantic, the standard library and voxlog's own light modules, and no SDK or HTTP client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from streams.connectors.secrets import SecretRef
from streams.connectors.slots import OpeningHours

# -- CRM ----------------------------------------------------------------------------------------------

HUBSPOT_API = "https://api.hubapi.com"


class HubSpotSettings(BaseModel):
    """A tenant's HubSpot: the private app's access token (by reference) and the API's URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hubspot"]
    token: SecretRef
    """The private app's access token (Settings > Integrations > Private Apps; `pat-...`)."""
    base_url: str = Field(HUBSPOT_API, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")


Flow = Literal["client_credentials", "jwt_bearer"]
"""How a Salesforce connected app signs in: OAuth 2.0 client credentials, or a JWT bearer assertion."""

ENTERPRISE_DAILY_API_REQUESTS = 100_000
"""Salesforce, "API Request Limits and Allocations": an Enterprise Edition org's base allocation of
API requests per rolling 24 hours (plus 1,000 per Salesforce license, and any purchased add-ons;
Unlimited and Performance add 5,000 per license). Calls that last 20 s or longer are limited apart
from it, to 25 at once in a production org or sandbox (5 in a Developer Edition or trial org),
beyond which Salesforce answers REQUEST_LIMIT_EXCEEDED; the connector's calls are short reads and
single-record writes, so they count only against the daily allocation."""

DEFAULT_DETAIL_FIELDS = ("Title", "Account.Type")
"""Fields every org has (the contact's job title, the account's type such as "Customer - Direct"),
read into `Contact.details`. An org's own tier field (`Account.Tier__c`) can be added in settings;
a field the integration user cannot see makes the query fail with INVALID_FIELD, so the default
stays with standard fields."""

FIELD_PATH = r"^[A-Za-z][A-Za-z0-9_]{0,79}(\.[A-Za-z][A-Za-z0-9_]{0,79})?$"
"""A field, or one relationship and its field (`Account.Type`): what may be named in a SELECT. The
names go into SOQL as they are, so nothing else is accepted."""

_SANDBOX_AND_PRODUCTION_LOGIN = frozenset({"login.salesforce.com", "test.salesforce.com"})


class SalesforceSettings(BaseModel):
    """A tenant's Salesforce org, as its configuration names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["salesforce"] = "salesforce"
    login_url: str = Field("https://login.salesforce.com", pattern=r"^https://[^\s/?#]+(/[^\s?#]*)?$")
    """Where the token is asked for (`{login_url}/services/oauth2/token`): login.salesforce.com,
    test.salesforce.com for a sandbox, or the org's My Domain URL (`https://acme.my.salesforce.com`),
    which the client credentials flow requires. It is also the JWT assertion's audience, and Salesforce
    takes login.salesforce.com or test.salesforce.com there (or an Experience Cloud site's URL): the JWT
    bearer flow keeps to those."""
    flow: Flow
    client_id: str = Field(min_length=1)
    """The connected app's consumer key."""
    client_secret: SecretRef | None = None
    """The consumer secret: the client credentials flow."""
    username: str | None = Field(None, min_length=1)
    """The integration user the JWT bearer flow signs in as (pre-authorized for the app)."""
    private_key: SecretRef | None = None
    """The PEM RSA private key whose certificate is uploaded to the app: the JWT bearer flow."""
    api_version: str = Field("62.0", pattern=r"^[1-9][0-9]{1,2}\.0$")
    detail_fields: tuple[Annotated[str, StringConstraints(pattern=FIELD_PATH)], ...] = DEFAULT_DETAIL_FIELDS
    daily_api_requests: int = Field(ENTERPRISE_DAILY_API_REQUESTS, gt=0)
    """The org's allocation per 24 hours (Setup, Company Information, "API Requests, Last 24 Hours"),
    which the worker paces the connector at."""
    ca_file: Path | None = None
    """A PEM file of certificate authorities to trust instead of the system's (a TLS-inspecting proxy)."""

    @model_validator(mode="after")
    def _flow_has_its_fields(self) -> SalesforceSettings:
        if self.flow == "client_credentials":
            if self.client_secret is None:
                raise ValueError("the client_credentials flow needs client_secret")
            if self.username is not None or self.private_key is not None:
                raise ValueError("username and private_key belong to the jwt_bearer flow, not client_credentials")
            if urlsplit(self.login_url).hostname in _SANDBOX_AND_PRODUCTION_LOGIN:
                raise ValueError("the client_credentials flow needs the org's My Domain URL as login_url "
                                 "(https://<domain>.my.salesforce.com): Salesforce refuses it at "
                                 f"{urlsplit(self.login_url).hostname}")
        else:
            if self.username is None or self.private_key is None:
                raise ValueError("the jwt_bearer flow needs username and private_key")
            if self.client_secret is not None:
                raise ValueError("client_secret belongs to the client_credentials flow, not jwt_bearer")
        return self


# -- ticket desks -------------------------------------------------------------------------------------

ZendeskPlan = Literal["team", "growth", "professional", "enterprise", "enterprise_plus", "high_volume"]
FreshdeskPlan = Literal["trial", "growth", "pro", "enterprise"]


class ZendeskSettings(BaseModel):
    """A tenant's Zendesk account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zendesk"] = "zendesk"
    subdomain: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
    """`acme` for acme.zendesk.com."""
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    """The agent the API token signs in as."""
    token: SecretRef
    base_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    """Where requests for https://{subdomain}.zendesk.com go instead (a test server, an egress proxy)."""
    plan: ZendeskPlan = "team"
    """The account's plan, for its published rate limit; the lowest (Team) unless named."""
    default_requester_email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+$")
    """The end user a ticket is requested by where the caller gave no email (else the API user)."""


class FreshdeskSettings(BaseModel):
    """A tenant's Freshdesk account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["freshdesk"] = "freshdesk"
    domain: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
    """`acme.freshdesk.com` (or the account's own help desk domain)."""
    api_key: SecretRef
    base_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    """Where requests go instead of https://{domain} (a test server, an egress proxy)."""
    plan: FreshdeskPlan = "growth"
    """The account's plan, for its published rate limit; Growth (the lowest with API access) unless named."""


class BuiltinDeskSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["voxlog"]


# -- calendars ----------------------------------------------------------------------------------------

GOOGLE_APIS = "https://www.googleapis.com/"
CALCOM_API = "https://api.cal.com/v2"


class CalDavSettings(BaseModel):
    """A tenant's CalDAV calendar: `url` is the calendar collection's URL, or the server's root with
    `calendar` naming the calendar (its display name, or its path under the root)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["caldav"] = "caldav"
    url: str = Field(pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")
    """No user or password in it: those are `username` and `password`."""
    username: str = Field(min_length=1)
    password: SecretRef
    calendar: str | None = None
    hours: OpeningHours = OpeningHours()

    @field_validator("calendar")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("calendar is a display name or a path; leave it out where url is the calendar")
        return value


class GoogleCalendarSettings(BaseModel):
    """A tenant's Google calendar, as its configuration names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["google"] = "google"
    calendar_id: str
    """`primary` (the delegated user's own), or a calendar's id (`...@group.calendar.google.com`)."""
    service_account: SecretRef
    """The service account's JSON key, as Google Cloud's console downloads it."""
    delegated_user: str | None = None
    """The Workspace user the account acts as (domain-wide delegation of the calendar scope); None: the
    account itself, with the calendar shared to it ("Make changes to events")."""
    base_url: str = GOOGLE_APIS
    hours: OpeningHours


class CalComSettings(BaseModel):
    """A tenant's Cal.com event type, as its configuration names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["calcom"] = "calcom"
    api_key: SecretRef
    event_type_id: int
    base_url: str = CALCOM_API
    timezone: str
    """The zone slots are asked in and bookings answered in (the host's, `Europe/Berlin`)."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        ZoneInfo(value)  # raises for an unknown zone
        return value


# -- webhooks -----------------------------------------------------------------------------------------


class WebhookSettings(BaseModel):
    """One of a tenant's webhooks, named in its `integrations.webhooks`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s]+$")
    secret: SecretRef
    timeout_s: float = Field(5.0, gt=0, le=30)
    """How long one attempt may take."""
    retries: int = Field(2, ge=0, le=5)
    """How many times a failure that is safe to retry (429, 5xx, no answer) is tried again."""
    requests_per_s: float = Field(10.0, gt=0)
    """How fast voxlog may call it: the receiver's own limit, which only its owner knows."""
