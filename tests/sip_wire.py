"""SIP spoken by hand over UDP, for the tests of what the gateway answers a broken or hostile peer:
an INVITE built line by line (any source address of 127.0.0.0/8, any SDP, any headers), the
responses read back, and datagrams of anything at all; the audit records the gateway keeps of it; and a
call to the agent by the benchmark's SIP caller, with what its log holds."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from consumers.event_reader import read_call
from schemas.base import EventPayload
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from voxlog.sim.sip_caller import SipCaller, ok_to, parse_sip
from voxlog.sim.stack import LocalStack

AGENT = "+15550100"
"""The demo agent's number."""

PCMU_SDP = ("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            "m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            "a=sendrecv\r\n")
G729_ONLY_SDP = ("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
                 "m=audio {port} RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\na=sendrecv\r\n")


def digest_answer(challenge: dict[str, str], username: str, password: str, uri: str) -> str:
    """An Authorization value answering `challenge` (its parameters) for an INVITE to `uri`, as a user
    agent computes it (RFC 2617, MD5, qop=auth, the first use of the nonce)."""
    ha1 = hashlib.md5(f"{username}:{challenge['realm']}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"INVITE:{uri}".encode()).hexdigest()
    answer = hashlib.md5(f"{ha1}:{challenge['nonce']}:00000001:abc:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="{username}", realm="{challenge["realm"]}", nonce="{challenge["nonce"]}", '
            f'uri="{uri}", response="{answer}", qop=auth, nc=00000001, cnonce="abc", algorithm=MD5')


_BRANCH = re.compile(r";\s*branch=([^;,\s]+)")


@dataclass
class SipResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""


def parse_response(data: bytes) -> SipResponse | None:
    status, headers, _ = parse_sip(data)
    if status is None:
        return None
    text = data.decode("utf-8", "replace")
    parts = text.split("\r\n", 1)[0].split(" ", 2)
    return SipResponse(status, parts[2] if len(parts) > 2 else "", headers, text)


class SipWire:
    """One UDP socket bound to `source_ip`, speaking to the gateway's SIP port (or a proxy's, at `host`)."""

    def __init__(self, gateway_port: int, source_ip: str = "127.0.0.1", host: str = "127.0.0.1") -> None:
        self.gateway = (host, gateway_port)
        self.ip = source_ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source_ip, 0))
        self.port = self.sock.getsockname()[1]
        self.sock.setblocking(False)
        self._finals: dict[str, SipResponse] = {}
        """Final responses read while waiting for another request's."""
        self._sent: dict[str, bytes] = {}
        """Requests by Call-ID, retransmitted as a UA does over UDP (RFC 3261 timer A) until answered."""
        self._asked: dict[str, tuple[str, str]] = {}
        """The latest request of each Call-ID (its Via branch and method): a final response is its only
        if it names both. (A peer repeats a final response until ACKed, and this wire does not ACK: the
        401 to a first INVITE is sent again while the INVITE that answers it waits for its own.)"""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.gateway)

    def invite(self, to_number: str, *, sdp: str = PCMU_SDP, headers: dict[str, str] | None = None,
               call_id: str | None = None, method: str = "INVITE") -> str:
        """Sends an INVITE (or another method) to `sip:to_number@gateway`; returns its Call-ID."""
        call_id = call_id or f"{uuid.uuid4()}@{self.ip}"
        host, port = self.gateway
        body = sdp.format(ip=self.ip, port=40000) if sdp else ""
        branch = f"z9hG4bK{uuid.uuid4().hex}"
        self._asked[call_id] = (branch, method)
        lines = [
            f"{method} sip:{to_number}@{host}:{port} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:+15557770001@{self.ip}>;tag={uuid.uuid4().hex[:8]}",
            f"To: <sip:{to_number}@{host}>",
            f"Call-ID: {call_id}",
            f"CSeq: 1 {method}",
            f"Contact: <sip:caller@{self.ip}:{self.port}>",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
            *(["Content-Type: application/sdp"] if body else []),
            f"Content-Length: {len(body.encode())}",
        ]
        self._sent[call_id] = ("\r\n".join(lines) + "\r\n\r\n" + body).encode()
        self.send(self._sent[call_id])
        return call_id

    def in_dialog(self, method: str, response: SipResponse, cseq: int | None = None) -> None:
        """Sends `method` (ACK, BYE, CANCEL) for the request `response` answered: its dialog's From, To
        (with the far end's tag, if any), Call-ID, and the INVITE's CSeq number (or `cseq`)."""
        number = cseq if cseq is not None else int(response.headers["cseq"].split()[0])
        host, port = self.gateway
        lines = [
            f"{method} sip:{host}:{port} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch=z9hG4bK{uuid.uuid4().hex};rport",
            "Max-Forwards: 70",
            f"From: {response.headers['from']}",
            f"To: {response.headers['to']}",
            f"Call-ID: {response.headers['call-id']}",
            f"CSeq: {number} {method}",
            "Content-Length: 0",
        ]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def cancel(self, call_id: str) -> None:
        """CANCELs the INVITE with this Call-ID (same branch, as RFC 3261 9.1 asks)."""
        invite = self._sent[call_id].decode()
        head = invite.split("\r\n\r\n", 1)[0].split("\r\n")
        copied = ("via", "from", "to", "call-id", "max-forwards")
        keep = [line for line in head[1:] if line.split(":", 1)[0].lower() in copied]
        request_uri = head[0].split(" ")[1]
        lines = [f"CANCEL {request_uri} SIP/2.0", *keep, "CSeq: 1 CANCEL", "Content-Length: 0"]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def request(self, method: str, timeout_s: float = 10.0) -> SipResponse:
        """The next request of `method` the gateway sends us (its headers in a `SipResponse`, status 0),
        answered 200 OK."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {method} within {timeout_s} s")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), remaining)
            except TimeoutError:
                continue
            text = data.decode("utf-8", "replace")
            if not text.startswith(f"{method} "):
                self._keep_final(data)
                continue
            _, headers, _ = parse_sip(data)
            self.send(ok_to(headers).encode())
            return SipResponse(0, method, headers, text)

    def _keep_final(self, data: bytes) -> None:
        """Keeps a final response to the latest request of its Call-ID, for whoever waits for it."""
        response = parse_response(data)
        if response is None or response.status < 200:
            return
        call_id = response.headers.get("call-id", "")
        branch = _BRANCH.search(response.headers.get("via", ""))
        method = response.headers.get("cseq", "").rpartition(" ")[2]
        if self._asked.get(call_id) == ((branch.group(1) if branch else ""), method):
            self._finals.setdefault(call_id, response)

    async def final(self, call_id: str, timeout_s: float = 10.0) -> SipResponse:
        """The final response (>= 200) to the request with this Call-ID; provisional ones are skipped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        interval = 0.5
        resend = loop.time() + interval
        while call_id not in self._finals:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no final response to {call_id} within {timeout_s} s")
            if loop.time() >= resend and call_id in self._sent:
                self.send(self._sent[call_id])  # a datagram lost in a full socket buffer, as on any network
                interval = min(interval * 2, 4.0)
                resend = loop.time() + interval
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), min(remaining, resend - loop.time()))
            except TimeoutError:
                continue
            self._keep_final(data)
        self._sent.pop(call_id, None)
        return self._finals.pop(call_id)


async def audits_of(stack: LocalStack, stream_id: str, timeout_s: float = 10.0) -> list[AuditRecorded]:
    """The audit records of this stream (an INVITE's `sip:<Call-ID>`, a call's id), once there are any."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with stack.gateway.backend.admin() as admin:
            records = [r async for r in admin.read_key([AUDIT], stream_id.encode())]
        payloads = [EventCodec().decode(r.value).payload for r in records]
        found = [p for p in payloads if isinstance(p, AuditRecorded)]
        if found or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


@asynccontextmanager
async def answered_call(stack: LocalStack, sdp_rtp_port: int | None = None) -> AsyncIterator[tuple[SipCaller, str]]:
    """A SIP call to the agent, its greeting over: the caller and the call's id; hung up after."""
    assert stack.gateway.sip is not None
    caller = SipCaller("127.0.0.1", stack.gateway.sip.port, AGENT, sdp_rtp_port=sdp_rtp_port)
    assert await caller.dial() == 200
    try:
        assert await caller.agent_quiet(0.5, 30), "the greeting never ended (or never reached the caller)"
        [session] = stack.gateway.sessions.values()
        yield caller, session.call.call_id
    finally:
        await caller.hangup()
        await caller.close()


async def payloads_of(stack: LocalStack, call_id: str) -> list[EventPayload]:
    """What the call's log holds, once the gateway has nothing left to write."""
    await stack.gateway.wait_idle(30)
    async with stack.gateway.backend.admin() as admin:
        return [e.payload for e in (await read_call(admin, call_id)).events]
