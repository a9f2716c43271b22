"""Tenants as operators define them: `tenant.yaml` (or `.toml`) in the tenant's folder of agents.

A tenant file holds what is the tenant's rather than one agent's: the API keys that act for it (as
SHA-256 digests; the keys themselves are never stored), its outbound dialling policy (caller
ids it may present, how fast calls may be placed), its limits (calls at once, API requests) and
the consent law its calls fall under (`consent.rule`: docs/compliance.md).
A tenant with no file has no API access.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from streams.config.agents import TENANT_FILES, AgentConfigError
from streams.config.consent import ConsentRule
from streams.config.sip_trunks import SipTrunks
from streams.connectors.integrations import TenantIntegrations

E164 = r"^\+[1-9][0-9]{6,14}$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiKey(_Spec):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """A name for the key, recorded with what it does (never the key itself)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """`sha256(key).hexdigest()`: `voxlog keys hash KEY` prints it."""


class Dialing(_Spec):
    caller_ids: tuple[str, ...] = ()
    """Numbers (E.164) the tenant may call from; the first is the default."""
    calls_per_minute: float = Field(10.0, gt=0)
    """Sustained rate of placed calls, across all of the tenant's dials."""
    burst: int = Field(3, ge=1)
    """How many calls may be placed at once before the rate applies."""
    max_wait_s: int = Field(600, ge=1)
    """A dial not placed within this long after its request is given up."""
    ring_timeout_s: int = Field(30, ge=5, le=600)


class Limits(_Spec):
    max_concurrent_calls: int | None = Field(None, ge=1)
    """Calls of this tenant one gateway serves at once (unset: only the gateway's capacity); more are told busy."""
    api_requests_per_minute: float = Field(600.0, gt=0)
    """Sustained requests per API key; over it the API answers 429 with Retry-After."""
    api_burst: int = Field(60, ge=1)


class Retention(_Spec):
    """How long callers' personal data in the log stays readable; past it the retention job destroys the
    data keys (crypto-shredding): the events stay, their personal fields no longer open."""

    audio_days: int | None = Field(None, ge=1)
    """Callers' voice (and the agent's, in their calls): the audio chunks. Unset: as long as `personal_days`."""
    personal_days: int | None = Field(None, ge=1)
    """Everything personal: numbers, words, tool arguments and results, memory, and the audio too.
    Unset: until the caller is erased."""


class TenantConsent(_Spec):
    rule: ConsentRule = "one_party"
    """The consent law the tenant's calls fall under, and so the least every agent of it asks
    (`streams.config.consent.RULE_MINIMUM`): `one_party` (the agent's own mode), `all_party` (every
    party consents: at least `opt_out`, the caller can refuse), `explicit` (consent is an act: `opt_in`)."""


class TenantSpec(_Spec):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    name: str = ""
    api_keys: tuple[ApiKey, ...] = ()
    dialing: Dialing = Dialing()
    limits: Limits = Limits()
    retention: Retention = Retention()
    consent: TenantConsent = TenantConsent()
    integrations: TenantIntegrations = TenantIntegrations()
    """The tenant's own CRM, ticket desk, calendar and webhooks, which its agents' tools act in."""
    sip: SipTrunks = SipTrunks()
    """Its SIP trunks and PBXs: the addresses and credentials its INVITEs come with (streams/config/sip_trunks.py)."""

    def key_id(self, key: str) -> str | None:
        """The id of the API key `key`, if it is one of this tenant's."""
        digest = hash_api_key(key)
        for api_key in self.api_keys:
            if hmac.compare_digest(api_key.sha256, digest):
                return api_key.id
        return None


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_tenant_file(path: Path) -> bool:
    return path.name in TENANT_FILES


def load_tenants(directory: Path) -> dict[str, TenantSpec]:
    tenants: dict[str, TenantSpec] = {}
    for path in sorted(p for p in directory.rglob("*") if is_tenant_file(p)):
        try:
            text = path.read_text()
            raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
            tenant = TenantSpec.model_validate(raw)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise AgentConfigError(f"{path}: {exc}") from exc
        if tenant.id in tenants:
            raise AgentConfigError(f"{path}: tenant {tenant.id} is defined twice")
        tenants[tenant.id] = tenant
    return tenants


class Tenants:
    """The tenants, and which one an API key belongs to."""

    def __init__(self, tenants: dict[str, TenantSpec]) -> None:
        self.tenants = tenants
        seen: dict[str, str] = {}
        users: dict[str, str] = {}
        for tenant in tenants.values():
            for credential in tenant.sip.inbound.credentials:
                if credential.username in users:  # a username says whose trunk a call is on: one tenant's only
                    raise AgentConfigError(f"SIP credential {credential.username} of tenant {tenant.id} is also "
                                           f"one of {users[credential.username]}")
                users[credential.username] = tenant.id
            for key in tenant.api_keys:
                if key.sha256 in seen:
                    raise AgentConfigError(f"an API key of tenant {tenant.id} is also one of {seen[key.sha256]}")
                seen[key.sha256] = tenant.id

    def get(self, tenant_id: str) -> TenantSpec:
        return self.tenants.get(tenant_id) or TenantSpec(id=tenant_id)

    def by_api_key(self, key: str) -> tuple[TenantSpec, str] | None:
        """(tenant, key id) for a valid key, else None. Every tenant is checked, so the time taken
        does not tell which tenant came close."""
        found = None
        for tenant in self.tenants.values():
            key_id = tenant.key_id(key)
            if key_id is not None:
                found = (tenant, key_id)
        return found
