"""The door of the SIP channel: what an INVITE gets before anyone answers it, decided at once from the
operators' configuration alone (no I/O but a secret's file), so that the SIP stack answers a refusal
in the same breath as it reads the INVITE and a flood of them holds nothing.

An INVITE must come from an address one of the tenants allows (`sip.inbound.allow`), or prove one of
their digest credentials (401 with a challenge, then 403 for a wrong answer); the number it dials picks
the agent (404 when none answers it, or when the agent is another tenant's: a trunk never reaches,
nor learns of, another tenant's agent). Refusals that matter are `Denial`s, for the audit trail.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from streams.channels.sip_digest import (
    DigestAuthority,
    DigestError,
    ReplayedAnswer,
    StaleAnswer,
    header_value,
    number_of,
    parse_digest,
    request_uri,
)
from streams.config.agents import AgentRouter, AgentSpec, RoutingError
from streams.config.sip_trunks import IpNetwork, SipCredential, SipTrunks, invite_source
from streams.config.tenants import Tenants
from streams.connectors.base import ConnectorError
from streams.connectors.secrets import Secrets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Denial:
    """A refusal for the audit trail: whose, what, why."""

    tenant_id: str
    action: str
    detail: str


@dataclass(frozen=True)
class Refused:
    code: int
    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)
    denial: Denial | None = None


@dataclass(frozen=True)
class Routed:
    agent: AgentSpec
    number: str


SOURCE_HEADER = "X-Voxlog-Source"
"""Where a trusted SIP proxy in front of the gateways (`VOXLOG_SIP_TRUSTED_PROXIES`; deploy/kamailio)
names the address an INVITE reached it from: `ip:port` or `[v6]:port`. It removes any the sender
wrote."""


def vouched_source(network_source: str, message: str, proxies: Iterable[IpNetwork]) -> str | None:
    """Where an INVITE comes from, `ip:port`: the network's word for it, or, when that is a trusted proxy,
    the proxy's (`SOURCE_HEADER`), which screening, rate limits and audits then go by. None when a
    trusted proxy names no address, or nonsense. A header from anyone else is ignored, whatever it says."""
    network = _endpoint(network_source)
    if network is None or not any(network[0] in trusted for trusted in proxies):
        return network_source
    claimed = header_value(message, SOURCE_HEADER)
    named = _endpoint(claimed) if claimed is not None and len(claimed) <= 64 else None
    if named is None:
        return None
    ip, port = named
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _endpoint(source: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The IP (IPv4-mapped IPv6 as IPv4) and port of `ip:port` or `[v6]:port`, or None."""
    host = source.strip()
    if host.startswith("["):
        host, bracket, rest = host[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None
        port = rest[1:]
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    else:
        return None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(port)


@dataclass(frozen=True)
class InviteScreen:
    router: AgentRouter
    tenants: Tenants
    secrets: Secrets
    digest: DigestAuthority

    def screen(self, source_ip: str, to_uri: str, message: str) -> Refused | Routed:
        trunks = ((tenant.id, tenant.sip) for tenant in self.tenants.tenants.values())
        allowed = self._allowed(source_ip, message, trunks)
        if isinstance(allowed, Refused):
            return allowed
        number = number_of(to_uri)
        try:
            agent = self.router.by_number(number)
        except RoutingError:
            return Refused(404, "Not Found")
        if agent.tenant not in allowed:
            return Refused(404, "Not Found", denial=Denial(
                "platform", "sip.wrong_tenant", f"{number} is not a number of {', '.join(sorted(allowed))}"))
        return Routed(agent, number)

    def _allowed(self, source_ip: str, message: str,
                 trunks: Iterable[tuple[str, SipTrunks]]) -> frozenset[str] | Refused:
        """The tenants the INVITE may reach: those that allow its address, else the one whose credential it proves."""
        source = invite_source(source_ip, trunks)
        if source.allowed:
            return source.allowed
        if not source.by_credential:
            return Refused(403, "Forbidden", denial=Denial("platform", "sip.address_denied",
                                                           f"no tenant allows {source_ip}"))
        authorization = header_value(message, "Authorization")
        if authorization is None:
            return Refused(401, "Unauthorized", {"WWW-Authenticate": self.digest.challenge()})

        def password_of(username: str) -> str | None:
            entry = source.by_credential.get(username)
            if entry is None:
                return None
            try:
                return self.secrets.resolve(entry[1].password, f"SIP credential {username}").get_secret_value()
            except ConnectorError as exc:  # a secret not mounted: nobody gets in with that name, and it is said
                log.error("%s", exc)
                return None

        try:
            username = self.digest.verify(authorization, "INVITE", request_uri(message), password_of)
        except StaleAnswer as exc:
            # A nonce past its life is routine (a user agent that keeps one); an answer given twice is not.
            return Refused(401, "Unauthorized", {"WWW-Authenticate": self.digest.challenge(stale=True)},
                           denial=Denial(self._tenant_claimed(authorization, source.by_credential),
                                         "sip.credentials_replayed", str(exc))
                           if isinstance(exc, ReplayedAnswer) else None)
        except DigestError as exc:
            return Refused(403, "Forbidden", denial=Denial(
                self._tenant_claimed(authorization, source.by_credential), "sip.credentials_denied", str(exc)))
        return frozenset({source.by_credential[username][0]})

    @staticmethod
    def _tenant_claimed(authorization: str, by_credential: Mapping[str, tuple[str, SipCredential]]) -> str:
        """The tenant whose credential an answer names, for its audit trail ("platform" for none)."""
        try:
            claimed = parse_digest(authorization).get("username", "")
        except DigestError:
            return "platform"
        return by_credential[claimed][0] if claimed in by_credential else "platform"
