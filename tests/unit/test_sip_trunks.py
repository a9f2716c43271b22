"""streams.config.sip_trunks and a tenant file's `sip:` section: the addresses (CIDRs, single addresses,
IPv4 and IPv6) whose INVITEs a tenant takes, bad ones refused when the tenants load, the digest
credentials each tenant's INVITEs may prove instead, and one credential username per tenant; the
outbound trunk (proxy, transport, credential) and the URIs a call through it is sent to and from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from streams.config.agents import AgentConfigError
from streams.config.sip_trunks import SipCredential, SipInbound, SipOutbound, SipTrunks, invite_source
from streams.config.tenants import Tenants, TenantSpec, load_tenants
from streams.connectors.secrets import SecretRef
from voxlog.settings import DEFAULT_AGENTS_DIR


def trunks(allow: tuple[str, ...] = (), credentials: tuple[tuple[str, str], ...] = ()) -> SipTrunks:
    """A trunk allowing `allow`, with credentials (username, password's environment variable)."""
    return SipTrunks(inbound=SipInbound(allow=allow, credentials=tuple(
        SipCredential(username=username, password=SecretRef(env=env)) for username, env in credentials)))


def tenant(tenant_id: str, sip: dict[str, Any]) -> TenantSpec:
    return TenantSpec.model_validate({"id": tenant_id, "sip": sip})


def write_tenant(folder: Path, document: dict[str, Any]) -> None:
    (folder / document["id"]).mkdir(parents=True)
    (folder / document["id"] / "tenant.yaml").write_text(yaml.safe_dump(document))


PBX = trunks(("10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"))


@pytest.mark.parametrize("address", ["10.0.0.1", "10.255.255.255", "192.0.2.7", "2001:db8::5", "2001:db8:ffff::1",
                                     "::1"])
def test_an_address_in_an_allowed_network_or_an_allowed_address_is_allowed(address: str) -> None:
    assert invite_source(address, [("acme", PBX)]).allowed == {"acme"}


@pytest.mark.parametrize("address", ["11.0.0.1", "9.255.255.255", "192.0.2.6", "192.0.2.8", "2001:db9::1", "::2",
                                     "127.0.0.1"])
def test_an_address_outside_every_allowed_network_is_not(address: str) -> None:
    assert invite_source(address, [("acme", PBX)]).allowed == frozenset()


def test_a_network_written_with_host_bits_set_means_its_whole_network() -> None:
    loose = trunks(("10.1.2.3/16",))
    assert loose.inbound.networks()[0].with_prefixlen == "10.1.0.0/16"
    assert invite_source("10.1.200.9", [("acme", loose)]).allowed == {"acme"}
    assert invite_source("10.2.0.1", [("acme", loose)]).allowed == frozenset()


def test_every_tenant_that_allows_an_address_is_named() -> None:
    sources = [("a", trunks(("198.51.100.0/24",))), ("b", trunks(("198.51.100.10",))), ("c", trunks(("10.0.0.0/8",))),
               ("d", trunks())]
    assert invite_source("198.51.100.10", sources).allowed == {"a", "b"}
    assert invite_source("198.51.100.11", sources).allowed == {"a"}
    assert invite_source("203.0.113.1", sources).allowed == frozenset()


@pytest.mark.parametrize("address", ["", "not-an-ip", "10.0.0.1:5060", "[::1]", "[::1]:5060", "10.0.0.0/8",
                                     "localhost", "10.0.0.256"])
def test_an_address_that_is_not_an_ip_is_allowed_by_nobody(address: str) -> None:
    everything = trunks(("0.0.0.0/0", "::/0"), credentials=(("pbx-1", "PBX_PASSWORD"),))
    source = invite_source(address, [("acme", everything)])
    assert source.allowed == frozenset()
    assert set(source.by_credential) == {"pbx-1"}, "it may still prove a credential"


def test_credentials_are_mapped_to_their_tenant() -> None:
    a, b = trunks(credentials=(("pbx-a", "A_PASSWORD"), ("carrier-a", "A2"))), trunks(credentials=(("pbx-b", "B"),))
    source = invite_source("203.0.113.5", [("a", a), ("b", b), ("c", trunks(("10.0.0.0/8",)))])
    assert source.allowed == frozenset()
    assert {username: tenant for username, (tenant, _) in source.by_credential.items()} == {
        "pbx-a": "a", "carrier-a": "a", "pbx-b": "b"}
    assert source.by_credential["pbx-b"][1].password == SecretRef(env="B")


def test_a_tenant_with_neither_addresses_nor_credentials_takes_no_sip_calls() -> None:
    source = invite_source("127.0.0.1", [("quiet", SipTrunks())])
    assert source.allowed == frozenset()
    assert not source.by_credential
    assert TenantSpec(id="quiet").sip == SipTrunks()


def test_a_tenant_file_declares_its_trunk() -> None:
    spec = tenant("acme", {"inbound": {"allow": ["203.0.113.0/24", "2001:db8::1"],
                                       "credentials": [{"username": "acme-pbx", "password": {"env": "ACME_SIP"}},
                                                       {"username": "acme.carrier", "password": {"file": "sip"}}]}})
    assert [n.with_prefixlen for n in spec.sip.inbound.networks()] == ["203.0.113.0/24", "2001:db8::1/128"]
    assert [(c.username, str(c.password)) for c in spec.sip.inbound.credentials] == [
        ("acme-pbx", "env ACME_SIP"), ("acme.carrier", "file sip")]


def test_the_demo_tenant_takes_invites_from_this_machine_only() -> None:
    demo = load_tenants(DEFAULT_AGENTS_DIR)["demo"]
    source = [("demo", demo.sip)]
    assert invite_source("127.0.0.1", source).allowed == {"demo"}
    assert invite_source("::1", source).allowed == {"demo"}
    assert invite_source("192.0.2.1", source).allowed == frozenset()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.2.3", "not-a-network", "2001:db8::/129", "10.0.0.0/8/8", ""])
def test_an_invalid_network_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"'{bad}' does not appear to be an IPv4 or IPv6")):
        tenant("acme", {"inbound": {"allow": ["10.0.0.0/8", bad]}})


def test_an_invalid_network_is_refused_when_the_tenants_load_naming_the_file_and_the_value(tmp_path: Path) -> None:
    write_tenant(tmp_path, {"id": "acme", "sip": {"inbound": {"allow": ["192.0.2.0/24", "192.0.2.0/40"]}}})
    with pytest.raises(AgentConfigError, match=re.escape("192.0.2.0/40")) as raised:
        load_tenants(tmp_path)
    assert "acme/tenant.yaml" in str(raised.value)


@pytest.mark.parametrize("credential", [
    {"username": "pbx", "password": "the password itself"},
    {"username": "pbx", "password": {"env": "A", "file": "b"}},
    {"username": "pbx"},
    {"username": "", "password": {"env": "A"}},
    {"username": "has space", "password": {"env": "A"}},
    {"username": "pbx", "password": {"env": "A"}, "realm": "extra"},
])
def test_a_credential_must_name_where_its_password_is(credential: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        tenant("acme", {"inbound": {"credentials": [credential]}})


def test_the_tenants_refuse_a_credential_username_shared_by_two_tenants(tmp_path: Path) -> None:
    for tenant_id in ("acme", "globex"):
        write_tenant(tmp_path, {"id": tenant_id, "sip": {"inbound": {"credentials": [
            {"username": f"{tenant_id}-own", "password": {"env": f"{tenant_id.upper()}_OWN"}},
            {"username": "shared-pbx", "password": {"env": f"{tenant_id.upper()}_SIP"}}]}}})
    with pytest.raises(AgentConfigError, match="SIP credential shared-pbx of tenant globex is also one of acme"):
        Tenants(load_tenants(tmp_path))


def test_the_tenants_take_distinct_usernames_and_the_same_addresses() -> None:
    """Two tenants may share a carrier's addresses: the number dialled tells their calls apart."""
    tenants = Tenants({
        tenant_id: tenant(tenant_id, {"inbound": {"allow": ["198.51.100.0/24"], "credentials": [
            {"username": f"{tenant_id}-pbx", "password": {"env": tenant_id.upper()}}]}})
        for tenant_id in ("acme", "globex")
    })
    source = invite_source("198.51.100.1", ((t.id, t.sip) for t in tenants.tenants.values()))
    assert source.allowed == {"acme", "globex"}
    assert {u: t for u, (t, _) in source.by_credential.items()} == {"acme-pbx": "acme", "globex-pbx": "globex"}


def test_an_ipv4_peer_seen_on_a_dual_stack_socket_is_that_ipv4_address() -> None:
    assert invite_source("::ffff:203.0.113.5", [("acme", trunks(allow=("203.0.113.0/28",)))]).allowed == {"acme"}
    assert invite_source("::ffff:198.51.100.1", [("acme", trunks(allow=("203.0.113.0/28",)))]).allowed == frozenset()


# Outbound.

@pytest.mark.parametrize(("proxy", "transport", "target", "caller"), [
    ("sip.carrier.example", "udp", "sip:+15557770100@sip.carrier.example", "sip:+15550100@sip.carrier.example"),
    ("sip.carrier.example:5080", "tcp", "sip:+15557770100@sip.carrier.example:5080;transport=tcp",
     "sip:+15550100@sip.carrier.example"),
    ("192.0.2.10:5061", "tls", "sip:+15557770100@192.0.2.10:5061;transport=tls", "sip:+15550100@192.0.2.10"),
    ("[2001:db8::10]:5060", "udp", "sip:+15557770100@[2001:db8::10]:5060", "sip:+15550100@[2001:db8::10]"),
    ("[2001:db8::10]", "udp", "sip:+15557770100@[2001:db8::10]", "sip:+15550100@[2001:db8::10]"),
])
def test_a_call_through_the_trunk_goes_to_the_number_at_its_proxy_from_the_caller_id_at_its_host(
        proxy: str, transport: str, target: str, caller: str) -> None:
    trunk = SipOutbound.model_validate({"proxy": proxy, "transport": transport})
    assert trunk.target("+15557770100") == target
    assert trunk.caller("+15550100") == caller


@pytest.mark.parametrize("proxy", ["", "sip:carrier.example", "carrier.example:0", "carrier.example:65536",
                                   "carrier example", "carrier.example;transport=tcp", "carrier.example:50a",
                                   "user@carrier.example", "-carrier.example", "[not-v6]:5060",
                                   "carrier.example\r\nX: y", "carrier.example\n"])
def test_a_proxy_that_is_not_a_host_and_port_is_refused(proxy: str) -> None:
    with pytest.raises(ValidationError):
        SipOutbound(proxy=proxy)


@pytest.mark.parametrize("credential", [{"username": "voxlog"}, {"password": {"env": "TRUNK_PASSWORD"}},
                                        {"username": "a b", "password": {"env": "TRUNK_PASSWORD"}}])
def test_a_trunk_credential_is_a_username_and_where_its_password_is_both(credential: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SipOutbound.model_validate({"proxy": "carrier.example", **credential})


def test_a_tenant_file_declares_its_outbound_trunk() -> None:
    spec = tenant("acme", {"outbound": {"proxy": "sip.carrier.example:5060", "transport": "tcp",
                                        "username": "acme-out", "password": {"file": "acme-trunk"}}})
    assert spec.sip.outbound == SipOutbound(proxy="sip.carrier.example:5060", transport="tcp", username="acme-out",
                                            password=SecretRef(file="acme-trunk"))
    assert tenant("plain", {}).sip.outbound is None, "without one, its calls go out through Twilio"
