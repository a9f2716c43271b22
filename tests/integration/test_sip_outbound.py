"""Outbound calls through a tenant's SIP trunk (`sip.outbound`): `POST /v1/calls`, the dialer placing the
call through the gateway's SIP endpoint (PJSIP), its progress on the dial's stream as `call.status`.

A real softphone (Debian's baresip) as the person called, on both log backends: it rings, answers and
hears the agent, and the call is in the log as `channel: sip`, `direction: outbound`, and replays
identically. A trunk spoken by hand over UDP for what a softphone cannot do: a digest challenge (407)
answered with the tenant's credential, a busy line, and a ring nobody answers (CANCEL when the ring
timeout passes)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from consumers.event_reader import read_call
from schemas.base import Event, EventPayload
from schemas.events import CallDialFailed, CallDialPlaced, CallEnded, CallStarted, CallStatus
from streams.call.replay import agent_for, verify_call
from streams.channels.sip_digest import parse_digest
from tests.baresip_peer import baresip_peer, require_baresip
from tests.integration.test_outbound_calls import api, wait_for_stream
from tests.integration.test_sip_calls import fell_silent, loud_seconds, sip_settings, until
from voxlog.settings import Settings
from voxlog.sim.demo_agents import demo_agents_with
from voxlog.sim.sip_caller import free_sip_port, parse_sip
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow

CALLER_ID = "+15550100"
"""The demo tenant's caller id."""
PERSON = "+15557770100"
TRUNK_USER = "voxlog-out"
TRUNK_PASSWORD = "the trunk's password"
PASSWORD_VARIABLE = "VOXLOG_TEST_TRUNK_PASSWORD"


def agents_with_trunk(folder: Path, proxy: str, *, credential: bool = False) -> Path:
    outbound: dict[str, Any] = {"proxy": proxy}
    if credential:
        outbound |= {"username": TRUNK_USER, "password": {"env": PASSWORD_VARIABLE}}
    return demo_agents_with(folder, tenant={"sip": {"outbound": outbound}})


@asynccontextmanager
async def stack_with_trunk(tmp_path: Path, proxy: str, *, kafka: str | None = None,
                           credential: bool = False) -> AsyncIterator[LocalStack]:
    settings = sip_settings(tmp_path / "home", agents_with_trunk(tmp_path / "agents", proxy, credential=credential),
                            kafka=kafka)
    async with local_stack(settings) as running:
        yield running


async def ask_for_a_call(stack: LocalStack, **more: Any) -> tuple[str, str]:
    asked = await api(stack, "POST", "/v1/calls", json={"agent": "front-desk", "to": PERSON, **more})
    assert asked.status_code == 202, asked.text
    return asked.json()["dial_id"], asked.json()["call_id"]


def statuses(events: list[Event[EventPayload]]) -> list[tuple[str, int | None]]:
    return [(e.payload.status, e.payload.sip_response_code) for e in events if isinstance(e.payload, CallStatus)]


def has_status(*names: str) -> Callable[[list[Event[EventPayload]]], bool]:
    return lambda events: {name for name, _ in statuses(events)} >= set(names)


# A softphone answers.

async def test_a_softphone_called_through_the_trunk_hears_the_agent(log_bootstrap: str | None,
                                                                    tmp_path: Path) -> None:
    require_baresip()
    async with baresip_peer(tmp_path, user=PERSON, auto_answer=True) as person, \
            stack_with_trunk(tmp_path, f"127.0.0.1:{person.sip_port}", kafka=log_bootstrap) as stack:
        dial_id, call_id = await ask_for_a_call(stack, parameters={"customer": "Ada"})
        established = await person.wait_event("CALL_ESTABLISHED", timeout_s=60)  # Kafka's dialer, a busy machine
        assert PERSON in established["peeruri"] or CALLER_ID in established["peeruri"], established
        await until(lambda: fell_silent(person, 1.0), 60, "the agent heard, then silence")
        heard, rate = person.received_audio()
        await person.hangup()
        await person.wait_event("CALL_CLOSED")
        dial = await wait_for_stream(stack, dial_id, has_status("completed"), timeout_s=30)
        await stack.gateway.wait_idle(30)
        async with stack.gateway.backend.admin() as admin:
            events = (await read_call(admin, call_id)).events

    assert loud_seconds(heard, rate) >= 1.0, "the person heard the agent speak"
    [placed] = [e.payload for e in dial if isinstance(e.payload, CallDialPlaced)]
    assert (placed.provider, placed.provider_call_id) == ("sip", established["id"])
    assert [name for name, _ in statuses(dial)] == ["in-progress", "completed"] or \
        [name for name, _ in statuses(dial)] == ["ringing", "in-progress", "completed"], statuses(dial)
    started = events[0].payload
    assert isinstance(started, CallStarted)
    assert (started.channel, started.direction, started.routed_by) == ("sip", "outbound", "outbound_request")
    assert (started.from_number, started.to_number, started.provider_call_id) == (CALLER_ID, PERSON,
                                                                                   established["id"])
    assert started.parameters["customer"] == "Ada"
    assert started.parameters["dial_id"] == dial_id
    ended = events[-1].payload
    assert isinstance(ended, CallEnded)
    assert ended.reason == "caller_hangup"
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical
    assert stack.gateway.admission.live == 0


# A trunk spoken by hand.

@dataclass
class Request:
    method: str
    uri: str
    headers: dict[str, str]
    raw: bytes


class HandTrunk:
    """A SIP trunk on a UDP socket of the test's own: it reads the gateway's requests and answers them
    line by line."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.peer: tuple[str, int] | None = None
        self.tag = uuid.uuid4().hex[:8]
        self._seen: set[tuple[str, str]] = set()

    def close(self) -> None:
        self.sock.close()

    async def request(self, method: str, timeout_s: float = 30.0) -> Request:
        """The next `method` request (retransmissions of one already read, and other requests, skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            data, self.peer = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65536),
                                                     max(0.1, deadline - loop.time()))
            status, headers, _ = parse_sip(data)
            first = data.split(b"\r\n", 1)[0].decode().split(" ")
            if status is not None or len(first) != 3:
                continue
            key = (headers.get("cseq", ""), headers.get("via", ""))
            if first[0] == method and key not in self._seen:
                self._seen.add(key)
                return Request(first[0], first[1], headers, data)

    def answer(self, request: Request, status: int, reason: str, extra: dict[str, str] | None = None) -> None:
        """A response to `request`, with our tag on its To (a dialog's, for INVITE's responses past 100)."""
        assert self.peer is not None
        to = request.headers["to"] + ("" if ";tag=" in request.headers["to"] else f";tag={self.tag}")
        lines = [f"SIP/2.0 {status} {reason}", f"Via: {request.headers['via']}", f"From: {request.headers['from']}",
                 f"To: {to}", f"Call-ID: {request.headers['call-id']}", f"CSeq: {request.headers['cseq']}",
                 *(f"{name}: {value}" for name, value in (extra or {}).items()), "Content-Length: 0"]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), self.peer)


@pytest.fixture
async def trunk() -> AsyncIterator[HandTrunk]:
    made = HandTrunk()
    yield made
    made.close()


async def test_the_trunks_challenge_is_answered_with_the_tenants_credential_and_busy_is_said(
        trunk: HandTrunk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, TRUNK_PASSWORD)
    async with stack_with_trunk(tmp_path, trunk.address, credential=True) as stack:
        dial_id, call_id = await ask_for_a_call(stack)
        first = await trunk.request("INVITE")
        assert first.uri == f"sip:{PERSON}@{trunk.address}"
        assert first.headers["from"].startswith(f"sip:{CALLER_ID}@127.0.0.1;tag="), first.headers["from"]
        assert "proxy-authorization" not in first.headers
        trunk.answer(first, 407, "Proxy Authentication Required", {
            "Proxy-Authenticate": 'Digest realm="trunk.test", nonce="4f2a9c", algorithm=MD5, qop="auth"'})
        await trunk.request("ACK")
        second = await trunk.request("INVITE")
        answer = parse_digest(second.headers["proxy-authorization"])
        ha1 = hashlib.md5(f"{TRUNK_USER}:trunk.test:{TRUNK_PASSWORD}".encode()).hexdigest()
        ha2 = hashlib.md5(f"INVITE:{answer['uri']}".encode()).hexdigest()
        expected = hashlib.md5(f"{ha1}:4f2a9c:{answer['nc']}:{answer['cnonce']}:auth:{ha2}".encode()).hexdigest()
        assert (answer["username"], answer["realm"], answer["uri"]) == (TRUNK_USER, "trunk.test", second.uri)
        assert answer["response"] == expected, "the password proved is the tenant's, from its secret"
        trunk.answer(second, 486, "Busy Here")
        await trunk.request("ACK")

        # The trunk says busy at once: its status may be written before the dialer records the placing.
        dial = await wait_for_stream(stack, dial_id, lambda events: has_status("busy")(events) and any(
            isinstance(e.payload, CallDialPlaced) for e in events), timeout_s=30)
        assert statuses(dial) == [("busy", 486)]
        [placed] = [e.payload for e in dial if isinstance(e.payload, CallDialPlaced)]
        assert (placed.provider, placed.provider_call_id) == ("sip", first.headers["call-id"])
        async with stack.gateway.backend.admin() as admin:
            assert (await read_call(admin, call_id)).events == [], "nobody answered: the call never started"
        assert stack.gateway.admission.live == 0, "its seat is given back"


async def test_a_ring_nobody_answers_is_cancelled_at_the_ring_timeout(trunk: HandTrunk, tmp_path: Path) -> None:
    async with stack_with_trunk(tmp_path, trunk.address) as stack:
        dial_id, _ = await ask_for_a_call(stack, ring_timeout_s=5)
        invite = await trunk.request("INVITE")
        trunk.answer(invite, 180, "Ringing")
        trunk.answer(invite, 183, "Session Progress")  # still ringing: one status, not two
        started = asyncio.get_running_loop().time()
        cancel = await trunk.request("CANCEL", timeout_s=60)
        assert asyncio.get_running_loop().time() - started >= 4.0, "not before the ring timeout"
        trunk.answer(cancel, 200, "OK")
        trunk.answer(invite, 487, "Request Terminated")
        await trunk.request("ACK")

        dial = await wait_for_stream(stack, dial_id, has_status("no-answer"), timeout_s=30)
        assert statuses(dial) == [("ringing", 180), ("no-answer", 487)]
        assert stack.gateway.admission.live == 0


async def test_a_redirect_is_not_followed_and_fails_the_dial(trunk: HandTrunk, tmp_path: Path) -> None:
    """A 3xx from the trunk (or a callee behind it) does not send the call elsewhere: it goes where the API said."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as elsewhere:
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.setblocking(False)
        async with stack_with_trunk(tmp_path, trunk.address) as stack:
            dial_id, _ = await ask_for_a_call(stack)
            invite = await trunk.request("INVITE")
            trunk.answer(invite, 302, "Moved Temporarily",
                         {"Contact": f"<sip:+19005550123@127.0.0.1:{elsewhere.getsockname()[1]}>"})
            await trunk.request("ACK")
            dial = await wait_for_stream(stack, dial_id, lambda events: any(
                isinstance(e.payload, CallStatus) and e.payload.status in ("failed", "busy", "no-answer")
                for e in events), timeout_s=30)
            with pytest.raises(BlockingIOError):
                elsewhere.recv(4096)
            assert [status for status, _ in statuses(dial)][-1] == "failed", statuses(dial)
            assert stack.gateway.admission.live == 0


async def test_a_trunk_that_says_nothing_fails_the_call_at_the_ring_timeout(trunk: HandTrunk, tmp_path: Path) -> None:
    """No response at all, not even 100 Trying: a trunk that is down, not a person who did not answer."""
    async with stack_with_trunk(tmp_path, trunk.address) as stack:
        dial_id, _ = await ask_for_a_call(stack, ring_timeout_s=5)
        await trunk.request("INVITE")
        dial = await wait_for_stream(stack, dial_id, has_status("failed"), timeout_s=30)
        assert statuses(dial) == [("failed", None)]
        [failed] = [e.payload for e in dial if isinstance(e.payload, CallStatus)]
        assert failed.raw == {"reason": "the trunk sent no response by the ring timeout"}
        assert stack.gateway.admission.live == 0


async def test_a_trunk_credential_whose_secret_is_missing_fails_the_dial_and_sends_nothing(
        trunk: HandTrunk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    async with stack_with_trunk(tmp_path, trunk.address, credential=True) as stack:
        dial_id, _ = await ask_for_a_call(stack)
        dial = await wait_for_stream(stack, dial_id, lambda events: any(
            isinstance(e.payload, CallDialFailed) and e.payload.final for e in events))
        [failed] = [e.payload for e in dial if isinstance(e.payload, CallDialFailed)]
        assert (failed.provider, failed.retryable) == ("sip", False)
        assert PASSWORD_VARIABLE in failed.error, failed.error
        with pytest.raises(TimeoutError):
            await trunk.request("INVITE", timeout_s=1)
        assert stack.gateway.admission.live == 0


async def test_a_tenant_with_a_trunk_is_never_dialled_through_twilio_instead(tmp_path: Path) -> None:
    """A gateway serving no SIP (but with a Twilio account) fails the dial, saying why: another caller id
    and another bill would be worse than no call."""
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_trunk(tmp_path / "agents", "127.0.0.1:5060"))
    async with local_stack(settings) as stack:
        dial_id, _ = await ask_for_a_call(stack)
        dial = await wait_for_stream(stack, dial_id, lambda events: any(
            isinstance(e.payload, CallDialFailed) for e in events))
        [failed] = [e.payload for e in dial if isinstance(e.payload, CallDialFailed)]
        assert (failed.provider, failed.final) == ("none", True)
        assert "needs a gateway serving SIP (VOXLOG_SIP_BIND)" in failed.error, failed.error
        assert stack.twilio.calls == {}, "nothing placed through Twilio"


# A trunk over TLS.

def certificate(folder: Path, name: str, *, names_the_address: bool = True) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (and 127.0.0.1, unless not), and its key: files in `folder`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    alternatives: list[x509.GeneralName] = [x509.DNSName(name)]
    if names_the_address:
        alternatives.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    made = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .sign(key, hashes.SHA256()))
    cert, private = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(made.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, private


@pytest.mark.parametrize(("trusted", "names_the_address", "reached"), [
    (True, True, True),
    (False, True, False),  # a certificate nobody told the gateway to trust
    (True, False, False),  # trusted, but for another name than the trunk's address
], ids=["trusted", "untrusted", "another-name"])
async def test_a_tls_trunk_is_sent_the_call_only_when_its_certificate_checks_out(
        tmp_path: Path, trusted: bool, names_the_address: bool, reached: bool) -> None:
    """PJSIP's default trusted any certificate a server showed: the INVITE, and the digest answered to a
    challenge, went to whoever sat between the gateway and its trunk."""
    trunk_cert, trunk_key = certificate(tmp_path, "trunk.test", names_the_address=names_the_address)
    gateway_cert, gateway_key = certificate(tmp_path, "gateway.test")
    first_bytes: list[bytes] = []
    connected = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first_bytes.append(await asyncio.wait_for(reader.read(200), 10))
        except (TimeoutError, OSError, ssl.SSLError):
            first_bytes.append(b"")
        connected.set()
        writer.close()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(trunk_cert, trunk_key)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        proxy = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        agents = agents_with_trunk(tmp_path / "agents", proxy)
        tenant_file = agents / "demo" / "tenant.yaml"
        tenant = yaml.safe_load(tenant_file.read_text())
        tenant["sip"]["outbound"]["transport"] = "tls"
        tenant_file.write_text(yaml.safe_dump(tenant))
        settings = sip_settings(tmp_path / "home", agents).model_copy(update={
            "sip_tls_port": free_sip_port(), "sip_tls_cert": gateway_cert, "sip_tls_key": gateway_key,
            "sip_tls_ca": trunk_cert if trusted else None})
        async with local_stack(settings) as stack:
            dial_id, _ = await ask_for_a_call(stack)
            if reached:
                await asyncio.wait_for(connected.wait(), 30)
                assert first_bytes[0].startswith(b"INVITE sip:+15557770100@"), first_bytes
            else:
                dial = await wait_for_stream(stack, dial_id, has_status("failed"), timeout_s=60)
                assert [name for name, _ in statuses(dial)] == ["failed"]
                assert not any(data.startswith(b"INVITE") for data in first_bytes), first_bytes
    finally:
        server.close()
