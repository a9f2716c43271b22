"""streams.channels.sip_screening: what an INVITE gets at the door, from the operators' agent and tenant
files alone. The demo tenant takes INVITEs from this machine; a second tenant, `globex`, from its PBX's
network or from anywhere with its digest credential. A number picks the agent, never another tenant's;
an address nobody allows is challenged when credentials exist (401), refused when they do not (403), and
a wrong answer, an unknown name, an answer for another Request-URI or a credential whose secret is
missing is refused (403), a stale or replayed answer is challenged anew (401, stale=true), each with the
denial the audit trail records."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from streams.channels.sip_digest import NONCE_TTL_S, DigestAuthority, parse_digest
from streams.channels.sip_screening import SOURCE_HEADER, Denial, InviteScreen, Refused, Routed, vouched_source
from streams.config.agents import AgentRouter, load_agents
from streams.config.sip_trunks import SipInbound, SipTrunks
from streams.config.tenants import Tenants, load_tenants
from streams.connectors.secrets import Secrets
from voxlog.sim.demo_agents import demo_agents_with

REALM = "gw.voxlog.test"
NOW = 1_700_000_000.0
DEMO_NUMBER = "+15550100"
GLOBEX_NUMBER = "+15550200"
GLOBEX_PASSWORD = "globex's trunk password"
GLOBEX_NETWORK = "198.51.100.0/24"
ENVIRON = {"GLOBEX_SIP_PASSWORD": GLOBEX_PASSWORD}
ELSEWHERE = "203.0.113.9"
"""An address no tenant allows."""


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's agents and tenant, and globex: its own front desk, a PBX network and two credentials
    (one whose password's variable is never set)."""
    folder = demo_agents_with(tmp_path_factory.mktemp("sip") / "agents")
    front_desk: dict[str, Any] = yaml.safe_load((folder / "demo" / "front-desk.yaml").read_text())
    front_desk |= {"tenant": "globex", "routing": {"numbers": [GLOBEX_NUMBER], "widget_keys": ["globex-widget"]}}
    (folder / "globex").mkdir()
    (folder / "globex" / "front-desk.yaml").write_text(yaml.safe_dump(front_desk))
    (folder / "globex" / "tenant.yaml").write_text(yaml.safe_dump({"id": "globex", "sip": {"inbound": {
        "allow": [GLOBEX_NETWORK],
        "credentials": [{"username": "globex-pbx", "password": {"env": "GLOBEX_SIP_PASSWORD"}},
                        {"username": "globex-unmounted", "password": {"env": "GLOBEX_NEVER_SET"}}]}}}))
    return folder


@pytest.fixture(scope="module")
def router(agents: Path) -> AgentRouter:
    return AgentRouter(load_agents(agents))


@pytest.fixture
def tenants(agents: Path) -> Tenants:
    return Tenants(load_tenants(agents))


@pytest.fixture
def door(router: AgentRouter, tenants: Tenants) -> InviteScreen:
    return screen_of(router, tenants)


def screen_of(router: AgentRouter, tenants: Tenants, clock: float = NOW) -> InviteScreen:
    return InviteScreen(router, tenants, Secrets(environ=ENVIRON),
                        DigestAuthority(REALM, b"the gateway's secret", clock=lambda: clock))


def invite(number: str, authorization: str | None = None) -> tuple[str, str]:
    """An INVITE's To URI and text, with an Authorization header if given."""
    to = f"<sip:{number}@gw.voxlog.test;user=phone>"
    lines = [f"INVITE sip:{number}@gw.voxlog.test SIP/2.0",
             "Via: SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bK776asdhds",
             "From: <sip:+15557654321@pbx.example>;tag=1928301774",
             f"To: {to}",
             "Call-ID: a84b4c76e66710",
             "CSeq: 2 INVITE"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return to, "\r\n".join([*lines, "Content-Type: application/sdp", "Content-Length: 0", "", ""])


def answer(challenge: str, number: str, username: str = "globex-pbx", password: str = GLOBEX_PASSWORD) -> str:
    """An Authorization value answering `challenge` as RFC 2617/7616 say, computed here."""
    offered = parse_digest(challenge)
    h = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[offered.get("algorithm", "MD5")]
    uri, nc, cnonce = f"sip:{number}@gw.voxlog.test", "00000001", "6f2c1a9b"
    ha1 = h(f"{username}:{offered['realm']}:{password}".encode()).hexdigest()
    ha2 = h(f"INVITE:{uri}".encode()).hexdigest()
    response = h(f"{ha1}:{offered['nonce']}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="{username}", realm="{offered["realm"]}", nonce="{offered["nonce"]}", uri="{uri}", '
            f'response="{response}", algorithm={offered.get("algorithm", "MD5")}, qop=auth, nc={nc}, '
            f'cnonce="{cnonce}"')


def challenge_for(door: InviteScreen, number: str) -> str:
    refused = door.screen(ELSEWHERE, *invite(number))
    assert isinstance(refused, Refused)
    assert refused.code == 401
    return refused.headers["WWW-Authenticate"]


# From an allowed address.

@pytest.mark.parametrize("source", ["127.0.0.1", "127.8.9.10", "::1"])
def test_an_invite_from_an_allowed_address_reaches_the_agent_of_its_number(door: InviteScreen, router: AgentRouter,
                                                                           source: str) -> None:
    assert door.screen(source, *invite(DEMO_NUMBER)) == Routed(router.get("demo", "front-desk"), DEMO_NUMBER)


def test_a_tenants_pbx_network_reaches_its_own_agent(door: InviteScreen, router: AgentRouter) -> None:
    routed = door.screen("198.51.100.77", *invite(GLOBEX_NUMBER))
    assert routed == Routed(router.get("globex", "front-desk"), GLOBEX_NUMBER)


def test_an_unknown_number_is_not_found_and_not_a_denial(door: InviteScreen) -> None:
    refused = door.screen("127.0.0.1", *invite("+15559999"))
    assert refused == Refused(404, "Not Found")
    assert refused.denial is None


def test_another_tenants_number_is_not_found_from_this_tenants_trunk_and_denied(door: InviteScreen) -> None:
    refused = door.screen("127.0.0.1", *invite(GLOBEX_NUMBER))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.reason, dict(refused.headers)) == (404, "Not Found", {}), \
        "the trunk hears what an unknown number gets: it does not learn of the other tenant's agent"
    assert refused.denial is not None
    assert refused.denial.action == "sip.wrong_tenant"
    assert GLOBEX_NUMBER in refused.denial.detail
    assert "demo" in refused.denial.detail


def test_an_allowed_address_is_not_asked_for_credentials(door: InviteScreen, router: AgentRouter) -> None:
    """An Authorization header, even a wrong one, does not matter from an allowed address."""
    routed = door.screen("127.0.0.1", *invite(DEMO_NUMBER, 'Digest username="globex-pbx", response="wrong"'))
    assert routed == Routed(router.get("demo", "front-desk"), DEMO_NUMBER)


# From an address nobody allows.

def test_an_address_nobody_allows_is_forbidden_when_no_tenant_has_credentials(router: AgentRouter,
                                                                              tenants: Tenants) -> None:
    without_credentials = Tenants({tenant_id: spec.model_copy(update={"sip": SipTrunks(inbound=SipInbound(
        allow=spec.sip.inbound.allow))}) for tenant_id, spec in tenants.tenants.items()})
    refused = screen_of(router, without_credentials).screen(ELSEWHERE, *invite(DEMO_NUMBER))
    assert isinstance(refused, Refused)
    assert (refused.code, dict(refused.headers)) == (403, {})
    assert refused.denial is not None
    assert refused.denial.action == "sip.address_denied"
    assert ELSEWHERE in refused.denial.detail


@pytest.mark.parametrize("source", [ELSEWHERE, "2001:db8::1", "not-an-address"])
def test_without_authorization_an_address_nobody_allows_is_challenged(door: InviteScreen, source: str) -> None:
    refused = door.screen(source, *invite(GLOBEX_NUMBER))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.reason, refused.denial) == (401, "Unauthorized", None)
    challenge = parse_digest(refused.headers["WWW-Authenticate"])
    assert challenge["realm"] == REALM
    assert challenge["qop"] == "auth"
    assert challenge["algorithm"] in ("MD5", "SHA-256")
    assert challenge["nonce"]


def test_a_correct_answer_to_the_challenge_reaches_the_credentials_tenants_agent(door: InviteScreen,
                                                                                 router: AgentRouter) -> None:
    challenge = challenge_for(door, GLOBEX_NUMBER)
    routed = door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(challenge, GLOBEX_NUMBER)))
    assert routed == Routed(router.get("globex", "front-desk"), GLOBEX_NUMBER)


def test_a_credential_never_reaches_another_tenants_agent(door: InviteScreen) -> None:
    challenge = challenge_for(door, DEMO_NUMBER)
    refused = door.screen(ELSEWHERE, *invite(DEMO_NUMBER, answer(challenge, DEMO_NUMBER)))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.reason) == (404, "Not Found")
    assert refused.denial is not None
    assert refused.denial.action == "sip.wrong_tenant"
    assert DEMO_NUMBER in refused.denial.detail


def test_a_wrong_password_is_forbidden_and_denied_to_the_credentials_tenant(door: InviteScreen) -> None:
    challenge = challenge_for(door, GLOBEX_NUMBER)
    refused = door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(challenge, GLOBEX_NUMBER, password="guess")))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.reason, dict(refused.headers)) == (403, "Forbidden", {})
    assert refused.denial is not None
    assert (refused.denial.tenant_id, refused.denial.action) == ("globex", "sip.credentials_denied")
    assert "globex-pbx" in refused.denial.detail
    assert GLOBEX_PASSWORD not in refused.denial.detail


def test_an_unknown_username_is_forbidden_and_denied_to_the_platform(door: InviteScreen) -> None:
    challenge = challenge_for(door, GLOBEX_NUMBER)
    refused = door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(challenge, GLOBEX_NUMBER, username="intruder")))
    assert isinstance(refused, Refused)
    assert refused.code == 403
    assert refused.denial == Denial("platform", "sip.credentials_denied", "no credential is named 'intruder'")


@pytest.mark.parametrize("password", ["", "GLOBEX_NEVER_SET", GLOBEX_PASSWORD])
def test_a_credential_whose_secret_is_not_set_lets_nobody_in(door: InviteScreen, password: str) -> None:
    challenge = challenge_for(door, GLOBEX_NUMBER)
    authorization = answer(challenge, GLOBEX_NUMBER, username="globex-unmounted", password=password)
    refused = door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, authorization))
    assert isinstance(refused, Refused)
    assert refused.code == 403
    assert refused.denial is not None
    assert (refused.denial.tenant_id, refused.denial.action) == ("globex", "sip.credentials_denied")


def test_an_answer_to_a_stale_challenge_is_challenged_again_without_a_denial(router: AgentRouter,
                                                                            tenants: Tenants) -> None:
    """A user agent that kept a nonce past its life is routine: it gets a fresh one (stale=true)."""
    challenge = challenge_for(screen_of(router, tenants, NOW), GLOBEX_NUMBER)
    later = screen_of(router, tenants, NOW + NONCE_TTL_S + 1)
    refused = later.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(challenge, GLOBEX_NUMBER)))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.denial) == (401, None)
    fresh = parse_digest(refused.headers["WWW-Authenticate"])
    assert fresh["stale"] == "true"
    assert fresh["nonce"] != parse_digest(challenge)["nonce"]
    assert isinstance(later.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(refused.headers["WWW-Authenticate"],
                                                                            GLOBEX_NUMBER))), Routed)


def test_an_answer_to_another_gateways_challenge_is_challenged_again_without_a_denial(router: AgentRouter,
                                                                                     tenants: Tenants) -> None:
    """Behind a front, the INVITE that answers one gateway's challenge can reach another (the first did not
    answer the front in time): that gateway cannot check the nonce, so it asks anew (stale=true, a user
    agent answers without asking for the password) and lets the second answer in."""
    asked = InviteScreen(router, tenants, Secrets(environ=ENVIRON),
                         DigestAuthority(REALM, b"the first gateway's secret", clock=lambda: NOW))
    other = screen_of(router, tenants)
    refused = other.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(challenge_for(asked, GLOBEX_NUMBER),
                                                                    GLOBEX_NUMBER)))
    assert isinstance(refused, Refused)
    assert (refused.code, refused.denial) == (401, None)
    assert parse_digest(refused.headers["WWW-Authenticate"])["stale"] == "true"
    assert other.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, answer(refused.headers["WWW-Authenticate"],
                                                                 GLOBEX_NUMBER))) == \
        Routed(router.get("globex", "front-desk"), GLOBEX_NUMBER)


def test_a_replayed_answer_is_challenged_again_and_denied_to_the_credentials_tenant(door: InviteScreen,
                                                                                   router: AgentRouter) -> None:
    """The nonces are stateless: an INVITE copied off the wire would otherwise place calls on the trunk's
    credential for the nonce's five minutes."""
    authorization = answer(challenge_for(door, GLOBEX_NUMBER), GLOBEX_NUMBER)
    assert door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, authorization)) == \
        Routed(router.get("globex", "front-desk"), GLOBEX_NUMBER)
    replayed = door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, authorization))
    assert isinstance(replayed, Refused)
    assert replayed.code == 401
    assert parse_digest(replayed.headers["WWW-Authenticate"])["stale"] == "true"
    assert replayed.denial is not None
    assert (replayed.denial.tenant_id, replayed.denial.action) == ("globex", "sip.credentials_replayed")


def test_an_answer_for_one_number_does_not_call_another(door: InviteScreen) -> None:
    """The digest's uri is the Request-URI's: an answer seen on the wire cannot be sent to another number."""
    globex_second = "+15550201"
    authorization = answer(challenge_for(door, GLOBEX_NUMBER), GLOBEX_NUMBER)
    refused = door.screen(ELSEWHERE, *invite(globex_second, authorization))
    assert isinstance(refused, Refused)
    assert refused.code == 403
    assert refused.denial is not None
    assert (refused.denial.tenant_id, refused.denial.action) == ("globex", "sip.credentials_denied")
    assert globex_second in refused.denial.detail


@pytest.mark.parametrize("authorization", ["Basic Z2xvYmV4LXBieDpwYXNzd29yZA==", 'Digest username="globex-pbx', ""])
def test_an_unreadable_authorization_is_forbidden_not_an_error(door: InviteScreen, authorization: str) -> None:
    refused = door.screen(ELSEWHERE, *invite(GLOBEX_NUMBER, authorization))
    assert isinstance(refused, Refused)
    assert refused.code == 403
    assert refused.denial is not None
    assert (refused.denial.tenant_id, refused.denial.action) == ("platform", "sip.credentials_denied")


# -- behind a trusted proxy: the address it vouches for ---------------------------------------------

PROXIES = (ipaddress.ip_network("10.0.0.0/29"), ipaddress.ip_network("2001:db8::/64"))


def invite_with(*headers: str) -> str:
    return "\r\n".join(["INVITE sip:+15550100@gw SIP/2.0", "Via: SIP/2.0/UDP 10.0.0.2", *headers, "", ""])


@pytest.mark.parametrize(("claimed", "seen"), [
    ("198.51.100.7:5062", "198.51.100.7:5062"),
    (" 198.51.100.7:5060 ", "198.51.100.7:5060"),
    ("[2001:db8:1::5]:5060", "[2001:db8:1::5]:5060"),
    ("[::ffff:198.51.100.7]:5060", "198.51.100.7:5060"),
])
def test_a_trusted_proxy_is_taken_at_its_word(claimed: str, seen: str) -> None:
    assert vouched_source("10.0.0.2:5060", invite_with(f"{SOURCE_HEADER}: {claimed}"), PROXIES) == seen
    assert vouched_source("[2001:db8::7]:5060", invite_with(f"x-voxlog-source:{claimed}"), PROXIES) == seen


@pytest.mark.parametrize("claimed", [None, "", "gw.example", "gw.example:5060", "198.51.100.7", "2001:db8::5",
                                     "[2001:db8::5]", "198.51.100.7:99999", "198.51.100.7:0", "198.51.100.7:5o60",
                                     "[2001:db8::5", "[2001:db8::5]5060", "1.2.3.4:５０６０", "9" * 70])
def test_a_trusted_proxy_that_names_no_address_vouches_for_nobody(claimed: str | None) -> None:
    headers = () if claimed is None else (f"{SOURCE_HEADER}: {claimed}",)
    assert vouched_source("10.0.0.3:5060", invite_with(*headers), PROXIES) is None


@given(st.text(max_size=80))
def test_what_anyone_else_claims_is_ignored(claimed: str) -> None:
    message = invite_with(f"{SOURCE_HEADER}: {claimed}".replace("\r", " ").replace("\n", " "))
    assert vouched_source("203.0.113.9:5060", message, PROXIES) == "203.0.113.9:5060"
    assert vouched_source("10.0.0.9:5060", message, PROXIES) == "10.0.0.9:5060"  # just outside the /29
    assert vouched_source("10.0.0.9:5060", message, ()) == "10.0.0.9:5060"
