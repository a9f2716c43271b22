"""A tenant's SIP trunks, as its `tenant.yaml` declares them (`sip:`), and which tenants an INVITE may
reach.

Outbound (`outbound:`), the trunk the dialer places the tenant's calls through: the carrier's or PBX's
SIP server (`proxy`, host and port), how to reach it, and the digest credential it challenges for.

An INVITE is the tenant's when it comes from one of the tenant's addresses (`inbound.allow`, CIDRs:
the PBX or the carrier's signalling hosts), or when it proves one of the tenant's digest credentials
(`inbound.credentials`, from anywhere). A tenant with neither takes no SIP calls. The number dialled
then picks the agent, which must be one of those tenants': a trunk never reaches another tenant's agent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streams.connectors.secrets import SecretRef

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SipCredential(_Spec):
    username: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
    password: SecretRef
    """Where the password is (`{env: NAME}` or `{file: NAME}`), never the password itself."""


class SipInbound(_Spec):
    allow: tuple[str, ...] = ()
    """Source addresses (CIDRs, or single addresses) whose INVITEs need no credentials."""
    credentials: tuple[SipCredential, ...] = ()
    """Digest credentials (RFC 8760) an INVITE from any other address must prove."""

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad one
        return value

    def networks(self) -> tuple[IpNetwork, ...]:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow)


_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"


class SipOutbound(_Spec):
    proxy: str = Field(pattern=rf"^{_HOST}(?::[0-9]{{1,5}})?$")
    """The trunk's SIP server, `host` or `host:port` (an IPv6 address in brackets): INVITEs go to
    `sip:<number>@<proxy>`."""
    transport: Literal["udp", "tcp", "tls"] = "udp"
    username: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
    password: SecretRef | None = None
    """The digest credential the trunk challenges for (401 or 407), where the password is."""

    @field_validator("proxy")
    @classmethod
    def _port(cls, value: str) -> str:
        _, colon, port = value.rpartition("]")[2].rpartition(":")
        if colon and not 0 < int(port) < 65536:
            raise ValueError(f"the port of {value} is not 1 to 65535")
        return value

    @model_validator(mode="after")
    def _credential_whole(self) -> SipOutbound:
        if (self.username is None) != (self.password is None):
            raise ValueError("a trunk's credential needs both username and password")
        return self

    def target(self, number: str) -> str:
        """The Request-URI of a call to `number` through this trunk."""
        return f"sip:{number}@{self.proxy}" + ("" if self.transport == "udp" else f";transport={self.transport}")

    def caller(self, number: str) -> str:
        """The From URI of a call from the tenant's `number`: that number at the trunk's host."""
        host = self.proxy if self.proxy.endswith("]") else self.proxy.rpartition(":")[0] or self.proxy
        return f"sip:{number}@{host}"


class SipTrunks(_Spec):
    inbound: SipInbound = SipInbound()
    outbound: SipOutbound | None = None
    """Where the tenant's outbound calls go when it has a SIP trunk (else through Twilio)."""


@dataclass(frozen=True)
class InviteSource:
    """Who may have sent an INVITE from one address: the tenants that allow the address, and the
    tenants whose credentials it could prove instead."""

    allowed: frozenset[str]
    """Tenants that take this address's INVITEs without credentials."""
    by_credential: Mapping[str, tuple[str, SipCredential]]
    """username -> (tenant, credential), for the tenants that take INVITEs from anywhere with credentials."""


def invite_source(address: str, trunks: Iterable[tuple[str, SipTrunks]]) -> InviteSource:
    """What the tenants' trunks say about an INVITE from `address` (an IP, no port). An address that is
    not an IP (a broken peer) is allowed by nobody."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's IPv4 peer (::ffff:203.0.113.5) is that IPv4 address
    allowed: set[str] = set()
    by_credential: dict[str, tuple[str, SipCredential]] = {}
    for tenant, trunk in trunks:
        if ip is not None and any(ip in network for network in trunk.inbound.networks()):
            allowed.add(tenant)
        for credential in trunk.inbound.credentials:
            by_credential.setdefault(credential.username, (tenant, credential))
    return InviteSource(frozenset(allowed), by_credential)
