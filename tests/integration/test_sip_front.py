"""More SIP calls than one gateway holds: Debian's Kamailio in front of two `voxlog serve` processes, with
deploy/kamailio/kamailio.cfg as it ships. Eight softphones (baresip) call the one front address; the
gateways, four calls each at most (docs/sip.md), take them all between them, a full one passing its
INVITEs on, and a ninth caller is told busy. The tenant allows only the callers' address, not the
proxy's: the gateways screen each INVITE by the address the proxy vouches for
(VOXLOG_SIP_TRUSTED_PROXIES), and a gateway that does not trust the proxy refuses it; an address a
caller writes in the header the proxy vouches with is not believed. And `voxlog bench calls --channel
sip` past one gateway's calls runs this way itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.sip_endpoint import PORT_HOLD_S
from streams.channels.sip_digest import parse_digest
from streams.channels.sip_screening import SOURCE_HEADER
from tests.baresip_peer import BaresipPeer, baresip_peer, require_baresip
from tests.integration.test_cli import bench
from tests.integration.test_gateway_hardship import eventually
from tests.sip_wire import SipWire, digest_answer
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.sip_caller import free_sip_port
from voxlog.sim.sip_front import FRONT_HOST, Front, kamailio_front, kamailio_missing
from voxlog.sim.stack import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AGENT = "+15550100"
PBX_PASSWORD = "pbx-secret-42"
PER_GATEWAY = 4
"""What one gateway's PJSIP holds (docs/sip.md)."""


def require_kamailio() -> None:
    missing = kamailio_missing()
    if missing:
        if os.environ.get("CI"):
            raise AssertionError(missing)
        pytest.skip(missing)


@dataclass
class SipGateway:
    """`voxlog serve` with SIP, as an operator runs one behind the front."""

    process: subprocess.Popen[bytes]
    base_url: str
    sip_port: int
    output: Path

    @classmethod
    def start(cls, home: Path, agents: Path, *, trusted: str) -> SipGateway:
        port, sip_port = free_port(), free_sip_port()
        environment = {**os.environ, "VOXLOG_HOME": str(home), "VOXLOG_AGENTS_DIR": str(agents),
                       "VOXLOG_RUN_PROJECTIONS": "false", "VOXLOG_SIP_BIND": f"127.0.0.1:{sip_port}",
                       "VOXLOG_SIP_TRUSTED_PROXIES": trusted, "VOXLOG_SIP_RTP_PORTS": f"{sip_port + 2}-{sip_port + 80}",
                       "VOXLOG_WEBHOOK_SECRET": secrets.token_hex(16)}  # (agents of our own: not the demo's secret)
        environment.pop("VOXLOG_KAFKA_BOOTSTRAP", None)
        home.mkdir(parents=True)
        output = home / "gateway.log"
        with output.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "voxlog.cli", "serve", "--port", str(port)],
                                       env=environment, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        return cls(process, f"http://127.0.0.1:{port}", sip_port, output)

    async def health(self) -> dict[str, object]:
        if self.process.poll() is not None:
            raise AssertionError(f"the gateway exited: {self.output.read_text()[-3000:]}")
        async with httpx.AsyncClient(timeout=5) as client:
            answer: dict[str, object] = (await client.get(f"{self.base_url}/healthz")).json()
            return answer

    async def ready(self) -> None:
        async def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await self.health()).get("sip", {}) != {}  # type: ignore[comparison-overlap]
            return False

        await eventually(answers, 90, f"gateway {self.base_url} ready")

    async def sip_calls(self) -> int:
        sip = (await self.health())["sip"]
        assert isinstance(sip, dict)
        return int(sip["calls"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


@pytest.fixture
async def front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Front, list[SipGateway]]]:
    """Two gateways behind the front; the tenant takes SIP from the callers' address, or from anywhere
    with its PBX's credential."""
    require_baresip()
    require_kamailio()
    monkeypatch.setenv("VOXLOG_TEST_SIP_PASSWORD", PBX_PASSWORD)  # (the gateways' environment inherits it)
    agents = demo_agents_with(tmp_path / "agents", tenant={"sip": {"inbound": {
        "allow": ["127.0.0.1/32"],
        "credentials": [{"username": "demo-pbx", "password": {"env": "VOXLOG_TEST_SIP_PASSWORD"}}]}}})
    gateways = [SipGateway.start(tmp_path / f"gateway-{i}", agents, trusted=f"{FRONT_HOST}/32") for i in range(2)]
    try:
        for gateway in gateways:
            await gateway.ready()
        with kamailio_front(tmp_path / "front", [("127.0.0.1", g.sip_port) for g in gateways]) as running:
            yield running, gateways
    finally:
        for gateway in gateways:
            gateway.stop()


async def test_two_gateways_behind_one_front_take_eight_calls_and_a_ninth_is_told_busy(
        front: tuple[Front, list[SipGateway]], tmp_path: Path) -> None:
    """Twice over: the second time, each gateway's calls take the media ports the first calls left. (A
    port destroyed as its call ended crashed a gateway in half of these runs: `SipEndpoint.port_for`.)"""
    proxy, gateways = front
    async with contextlib.AsyncExitStack() as stack:
        callers: list[BaresipPeer] = [await stack.enter_async_context(baresip_peer(tmp_path, user=f"caller{i}"))
                                      for i in range(2 * PER_GATEWAY + 1)]
        *taken, turned_away = callers
        for wave in range(2):
            for caller in taken:
                await caller.dial(proxy.uri(AGENT))
                await caller.wait_event("CALL_ESTABLISHED", timeout_s=30)
            assert [await g.sip_calls() for g in gateways] == [PER_GATEWAY, PER_GATEWAY]
            await turned_away.dial(proxy.uri(AGENT))  # each gateway full: 486 from both, the last one's reaches it
            closed = await turned_away.wait_event("CALL_CLOSED", timeout_s=30)
            assert "486" in str(closed.get("param")), closed
            for caller in taken:
                await caller.hangup()
                await caller.wait_event("CALL_CLOSED", timeout_s=20)

            async def all_over() -> bool:
                return [await g.sip_calls() for g in gateways] == [0, 0]

            await eventually(all_over, 30, f"every call of wave {wave} ended on its gateway")
            await asyncio.sleep(PORT_HOLD_S + 0.5)  # the ports rest before other calls take them
    assert [(await g.health())["sip"]["media_ports"] for g in gateways] == [PER_GATEWAY, PER_GATEWAY]  # type: ignore[index]


async def test_a_gateway_that_does_not_trust_the_front_refuses_what_it_relays(tmp_path: Path) -> None:
    require_baresip()
    require_kamailio()
    agents = demo_agents_with(tmp_path / "agents", tenant={"sip": {"inbound": {"allow": ["127.0.0.1/32"]}}})
    gateway = SipGateway.start(tmp_path / "gateway", agents, trusted="")
    try:
        await gateway.ready()
        with kamailio_front(tmp_path / "front", [("127.0.0.1", gateway.sip_port)]) as proxy:
            async with baresip_peer(tmp_path, user="caller") as caller:
                await caller.dial(proxy.uri(AGENT))
                closed = await caller.wait_event("CALL_CLOSED", timeout_s=30)
        assert "403" in str(closed.get("param")), closed
        assert await gateway.sip_calls() == 0
    finally:
        gateway.stop()


async def test_an_address_a_caller_claims_through_the_front_is_not_believed(
        front: tuple[Front, list[SipGateway]]) -> None:
    """From 127.0.0.3, which the tenant does not allow, claiming to be 127.0.0.1, which it does: the front
    removes the claim and vouches for 127.0.0.3, and the gateway asks for credentials."""
    proxy, gateways = front
    wire = SipWire(proxy.port, "127.0.0.3", host=FRONT_HOST)
    try:
        call_id = wire.invite(AGENT, headers={SOURCE_HEADER: "127.0.0.1:5060"})
        answer = await wire.final(call_id, timeout_s=20)
    finally:
        wire.close()
    assert answer.status == 401, answer.text
    assert [await g.sip_calls() for g in gateways] == [0, 0]


async def test_credentials_through_the_front_reach_the_gateway_that_asked(
        front: tuple[Front, list[SipGateway]]) -> None:
    """From an address nobody allows, with the PBX's credential: challenged by one gateway, the INVITE
    that answers the challenge (same Call-ID) goes to that gateway, which lets it in. (Or, where the
    front passed that gateway over, as a busy machine makes it do now and then, to the other, which
    cannot check the nonce and asks anew, stale=true: a user agent answers once more.)"""
    proxy, gateways = front
    wire = SipWire(proxy.port, "127.0.0.9", host=FRONT_HOST)
    try:
        call_id = wire.invite(AGENT)
        response = await wire.final(call_id, timeout_s=20)
        for answered_before in (False, True):
            assert response.status == 401, response.text
            challenge = parse_digest(response.headers["www-authenticate"])
            assert (challenge.get("stale") == "true") == answered_before, response.text
            authorization = digest_answer(challenge, "demo-pbx", PBX_PASSWORD,
                                          f"sip:{AGENT}@{FRONT_HOST}:{proxy.port}")
            wire.invite(AGENT, headers={"Authorization": authorization}, call_id=call_id)
            response = await wire.final(call_id, timeout_s=20)
            if response.status != 401:
                break
    finally:
        wire.close()
    assert response.status == 200, response.text
    assert sorted([await g.sip_calls() for g in gateways]) == [0, 1]


def test_bench_calls_past_one_gateway_starts_gateways_enough_behind_a_front(tmp_path: Path) -> None:
    """`voxlog bench calls --channel sip` with more calls than one gateway's PJSIP holds: two gateway
    processes behind Kamailio, every call answered, its turns timed, and hung up (each BYE answered 2xx
    through the front, else the call is reported failed)."""
    require_kamailio()
    figures, _ = bench("calls", "--channel", "sip", "--calls", "6", "--turns", "2", "--vad", "energy", home=tmp_path)
    assert (figures["gateways"], figures["capacity"], figures["admitted_calls"]) == (2, 8, 6)
    assert figures["failed_calls"] == []
    assert figures["turns_measured"] == 12
    assert figures["vad"] == ["energy"], "the gateways run the benchmark's agents"
    assert -25 < figures["added_latency_ms"]["p50"] <= figures["added_latency_ms"]["p99"]
    assert figures["gateway_cpu_s"] > 0
    # The busiest gateway's loop: part of one gateway's CPU, so under the gateways' sum.
    assert 0 < figures["gateway_loop_cpu_share"] < figures["gateway_cpu_share"]
    assert figures["front_cpu_s"] is not None
    assert figures["events"] > 6 * 50, "each gateway's log counted"
