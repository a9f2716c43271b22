"""A caller that phones the gateway over SIP as a softphone does, for `voxlog bench calls --channel sip`:
an INVITE over UDP offering PCMU, the ACK, RTP both ways (its speech sent every 20 ms, the agent's
timed as it arrives), and a BYE. Thousands of lines of a real user agent are not needed to measure the
gateway; what it sends is what a softphone sends, and it answers the gateway's BYE."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

RTP_HEADER = struct.Struct("!BBHII")
PCMU = 0
FRAME_BYTES = 160
"""20 ms of 8 kHz mu-law."""


@dataclass
class AgentFrame:
    at: float
    """When it arrived, `time.monotonic()`."""
    payload: bytes


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, received: asyncio.Queue[tuple[bytes, float]]) -> None:
        self.received = received

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.received.put_nowait((data, time.monotonic()))


@dataclass
class SipCaller:
    gateway_host: str
    gateway_port: int
    to: str
    from_: str = "+15557770001"
    host: str = "127.0.0.1"
    agent_frames: list[AgentFrame] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """The gateway hung up (its BYE)."""
    status: int | None = None
    _sip: asyncio.DatagramTransport | None = None
    _rtp: asyncio.DatagramTransport | None = None
    _sip_in: asyncio.Queue[tuple[bytes, float]] = field(default_factory=asyncio.Queue)
    _rtp_in: asyncio.Queue[tuple[bytes, float]] = field(default_factory=asyncio.Queue)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _dialog: dict[str, str] = field(default_factory=dict)
    _far_rtp: tuple[str, int] | None = None
    _seq: int = field(default_factory=lambda: random.randrange(65536))
    _timestamp: int = field(default_factory=lambda: random.randrange(2**32))
    _ssrc: int = field(default_factory=lambda: random.randrange(2**32))
    _next_send: float = 0.0

    @property
    def agent_audio(self) -> bytes:
        return b"".join(frame.payload for frame in self.agent_frames)

    async def dial(self, timeout_s: float = 30.0) -> int:
        """INVITEs the agent's number; the final status (on 200, ACKed and the RTP running)."""
        loop = asyncio.get_running_loop()
        self._sip, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._sip_in), local_addr=(self.host, 0))
        self._rtp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._rtp_in), local_addr=(self.host, 0))
        sip_port, rtp_port = self._sip.get_extra_info("sockname")[1], self._rtp.get_extra_info("sockname")[1]
        call_id, tag = f"{uuid.uuid4()}@{self.host}", uuid.uuid4().hex[:10]
        sdp = (f"v=0\r\no=- 1 1 IN IP4 {self.host}\r\ns=-\r\nc=IN IP4 {self.host}\r\nt=0 0\r\n"
               f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
               "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")
        self._dialog = {"call-id": call_id, "from": f"<sip:{self.from_}@{self.host}>;tag={tag}",
                        "uri": f"sip:{self.to}@{self.gateway_host}:{self.gateway_port}", "via_port": str(sip_port)}
        invite = self._request("INVITE", 1, to=f"<sip:{self.to}@{self.gateway_host}>", body=sdp,
                               extra=[f"Contact: <sip:caller@{self.host}:{sip_port}>", "Content-Type: application/sdp"])
        deadline, interval, resend = loop.time() + timeout_s, 0.5, loop.time() + 0.5
        self._send_sip(invite)
        while True:
            try:
                data, _ = await asyncio.wait_for(self._sip_in.get(), max(0.01, min(resend, deadline) - loop.time()))
            except TimeoutError:
                if loop.time() >= deadline:
                    raise TimeoutError(f"no answer to the INVITE within {timeout_s} s") from None
                self._send_sip(invite)  # RFC 3261 timer A
                interval = min(interval * 2, 4.0)
                resend = loop.time() + interval
                continue
            status, headers, body = parse_sip(data)
            if status is None or status < 200 or headers.get("call-id") != call_id:
                continue
            self.status = status
            self._dialog["to"] = headers.get("to", "")
            if status >= 300:
                self._send_sip(self._request("ACK", 1, to=self._dialog["to"]))
                return status
            self._far_rtp = _rtp_address(body)
            self._send_sip(self._request("ACK", 1, to=self._dialog["to"]))
            self._tasks = [asyncio.create_task(self._read_rtp()), asyncio.create_task(self._read_sip())]
            self._next_send = loop.time()
            return status

    async def send_mulaw(self, mulaw: bytes) -> None:
        """Sends the caller's speech as RTP, one 20 ms packet every 20 ms (paced on this loop's clock)."""
        if self._rtp is None or self._far_rtp is None:
            raise RuntimeError("the call is not answered")
        loop = asyncio.get_running_loop()
        for start in range(0, len(mulaw), FRAME_BYTES):
            payload = mulaw[start:start + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff")
            delay = self._next_send - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_send = max(self._next_send + 0.02, loop.time() - 0.1)
            header = RTP_HEADER.pack(0x80, PCMU, self._seq, self._timestamp, self._ssrc)
            self._rtp.sendto(header + payload, self._far_rtp)
            self._seq = (self._seq + 1) % 65536
            self._timestamp = (self._timestamp + FRAME_BYTES) % 2**32
            if self.closed.is_set():
                return

    async def agent_quiet(self, quiet_s: float = 0.5, timeout_s: float = 30.0, *, beyond: int = 0) -> bool:
        """Until the agent has sent more than `beyond` loud bytes and then nothing loud for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.closed.is_set():
            sounding = [f for f in self.agent_frames if loud(f.payload)]
            heard = sum(len(f.payload) for f in sounding)
            if heard > beyond and time.monotonic() - sounding[-1].at >= quiet_s:
                return True
            await asyncio.sleep(0.02)
        return False

    def loud_bytes(self) -> int:
        return sum(len(f.payload) for f in self.agent_frames if loud(f.payload))

    async def hangup(self) -> None:
        if self._sip is not None and self.status == 200 and not self.closed.is_set():
            self._send_sip(self._request("BYE", 2, to=self._dialog["to"]))
            self.closed.set()
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in (self._sip, self._rtp):
            if transport is not None:
                transport.close()

    async def _read_rtp(self) -> None:
        while True:
            data, at = await self._rtp_in.get()
            if len(data) < RTP_HEADER.size or data[0] >> 6 != 2 or data[1] & 0x7F != PCMU:
                continue  # RTCP-ish, telephone-events, or not RTP at all
            offset = RTP_HEADER.size + 4 * (data[0] & 0x0F)
            if data[0] & 0x10 and len(data) >= offset + 4:  # a header extension
                offset += 4 + 4 * struct.unpack("!H", data[offset + 2:offset + 4])[0]
            self.agent_frames.append(AgentFrame(at, data[offset:]))

    async def _read_sip(self) -> None:
        while True:
            data, _ = await self._sip_in.get()
            text = data.decode("utf-8", "replace")
            if text.startswith("BYE "):
                _, headers, _ = parse_sip(data)
                self._send_sip(ok_to(headers))
                self.closed.set()

    def _request(self, method: str, cseq: int, *, to: str, body: str = "", extra: list[str] | None = None) -> str:
        lines = [f"{method} {self._dialog['uri']} SIP/2.0",
                 f"Via: SIP/2.0/UDP {self.host}:{self._dialog['via_port']};branch=z9hG4bK{uuid.uuid4().hex};rport",
                 "Max-Forwards: 70", f"From: {self._dialog['from']}", f"To: {to}",
                 f"Call-ID: {self._dialog['call-id']}",
                 f"CSeq: {cseq} {method}", *(extra or []), f"Content-Length: {len(body.encode())}"]
        return "\r\n".join(lines) + "\r\n\r\n" + body

    def _send_sip(self, message: str) -> None:
        assert self._sip is not None
        self._sip.sendto(message.encode(), (self.gateway_host, self.gateway_port))


def loud(mulaw: bytes) -> bool:
    """Mu-law codes near 0x7F/0xFF are silence."""
    return sum(1 for b in mulaw if (b & 0x7F) < 0x70) > len(mulaw) // 10


def ok_to(headers: dict[str, str]) -> str:
    """200 OK to the request with these headers (`parse_sip`'s)."""
    echoed = (f"{name}: {headers.get(name.lower(), '')}" for name in ("Via", "From", "To", "Call-ID", "CSeq"))
    return "\r\n".join(["SIP/2.0 200 OK", *echoed, "Content-Length: 0"]) + "\r\n\r\n"


def free_sip_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host`, for a SIP endpoint that binds both itself (it is free
    when looked up: a rare race with another process remains, as with any port handed to a server)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def parse_sip(data: bytes) -> tuple[int | None, dict[str, str], str]:
    """A SIP message's status (None for a request), its headers (first of each, names lower-cased) and body."""
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    first = lines[0].split(" ", 2)
    status = int(first[1]) if first[0] == "SIP/2.0" and len(first) > 1 and first[1].isdigit() else None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return status, headers, body


def _rtp_address(sdp: str) -> tuple[str, int]:
    host, port = "127.0.0.1", 0
    for line in sdp.splitlines():
        if line.startswith("c=IN IP4 "):
            host = line.split()[-1]
        elif line.startswith("m=audio "):
            port = int(line.split()[1])
    if not port:
        raise ValueError("the answer's SDP has no audio")
    return host, port
