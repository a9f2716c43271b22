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
CATCH_UP_S = 0.06


@dataclass
class AgentFrame:
    at: float
    """When it arrived, `time.monotonic()`."""
    payload: bytes
    loud: bool


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
    sdp_rtp_port: int | None = None
    """The RTP port its SDP names; None: the one it sends from (a phone behind NAT names one its packets do
    not come from, and is answered where they do)."""
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
    _routes: list[str] = field(default_factory=list)
    _answers: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    """The final status of each request sent within the dialog, by its CSeq ("2 BYE")."""
    _cseq: int = 1
    """The dialog's last CSeq (the INVITE's is 1)."""
    _far_rtp: tuple[str, int] | None = None
    _seq: int = field(default_factory=lambda: random.randrange(65536))
    _timestamp: int = field(default_factory=lambda: random.randrange(2**32))
    _ssrc: int = field(default_factory=lambda: random.randrange(2**32))
    _outgoing: bytearray = field(default_factory=bytearray)
    _sent: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when what was queued has all been sent."""
    _loud_bytes: int = 0
    _last_loud_at: float = 0.0

    @property
    def agent_audio(self) -> bytes:
        return b"".join(frame.payload for frame in self.agent_frames)

    @property
    def gateway_rtp(self) -> tuple[str, int] | None:
        """Where the gateway's answer said to send RTP (None before an answer)."""
        return self._far_rtp

    def replaces(self) -> str:
        """A Replaces header's value naming this dialog (RFC 3891), as a second INVITE would to take it over."""
        from_tag = self._dialog["from"].rpartition("tag=")[2]
        to_tag = self._dialog["to"].rpartition("tag=")[2]
        return f"{self._dialog['call-id']};to-tag={to_tag};from-tag={from_tag}"

    async def dial(self, timeout_s: float = 30.0) -> int:
        """INVITEs the agent's number; the final status (on 200, ACKed and the RTP running)."""
        loop = asyncio.get_running_loop()
        self._sip, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._sip_in), local_addr=(self.host, 0))
        self._rtp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._rtp_in), local_addr=(self.host, 0))
        sip_port, rtp_port = self._sip.get_extra_info("sockname")[1], self._rtp.get_extra_info("sockname")[1]
        call_id, tag = f"{uuid.uuid4()}@{self.host}", uuid.uuid4().hex[:10]
        sdp = self._offer(self.sdp_rtp_port or rtp_port, 1)
        self._dialog = {"call-id": call_id, "from": f"<sip:{self.from_}@{self.host}>;tag={tag}",
                        "uri": f"sip:{self.to}@{self.gateway_host}:{self.gateway_port}", "via_port": str(sip_port)}
        invite_branch = f"z9hG4bK{uuid.uuid4().hex}"
        invite = self._request("INVITE", 1, to=f"<sip:{self.to}@{self.gateway_host}>", body=sdp, branch=invite_branch,
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
            if status >= 300:  # its ACK is the INVITE transaction's own (the same branch), hop by hop
                self._send_sip(self._request("ACK", 1, to=self._dialog["to"], branch=invite_branch))
                return status
            self._far_rtp = _rtp_address(body)
            # The dialog's requests go to the gateway's Contact along the Record-Route a front put in (RFC
            # 3261 12.1.2: the UAC's route set is the Record-Route reversed), through that front.
            self._dialog["uri"] = _uri_in(headers.get("contact", "")) or self._dialog["uri"]
            self._routes = list(reversed(header_values(data, "record-route")))
            self._send_sip(self._request("ACK", 1, to=self._dialog["to"]))
            self._tasks = [asyncio.create_task(self._read_rtp()), asyncio.create_task(self._read_sip()),
                           asyncio.create_task(self._send_rtp())]
            return status

    async def send_mulaw(self, mulaw: bytes) -> None:
        """Queues the caller's speech and returns once its last packet is sent (or the call ended)."""
        if self._rtp is None or self._far_rtp is None:
            raise RuntimeError("the call is not answered")
        self._outgoing += mulaw
        self._sent.clear()
        waits = [asyncio.create_task(self._sent.wait()), asyncio.create_task(self.closed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _send_rtp(self) -> None:
        """RTP all the call long, one 20 ms packet every 20 ms on this loop's clock, as a phone sends it:
        the speech queued, silence between. (A stream that stopped between turns and came back with a
        catch-up burst would fill the gateway's jitter buffer, which no phone does.) A loop held up sends
        at most `CATCH_UP_S` of what it owes at once, the rest late."""
        assert self._rtp is not None
        assert self._far_rtp is not None
        loop = asyncio.get_running_loop()
        next_send = loop.time()
        while True:
            delay = next_send - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_send = max(next_send + 0.02, loop.time() - CATCH_UP_S)
            payload = bytes(self._outgoing[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\xff")
            del self._outgoing[:FRAME_BYTES]
            header = RTP_HEADER.pack(0x80, PCMU, self._seq, self._timestamp, self._ssrc)
            self._rtp.sendto(header + payload, self._far_rtp)
            self._seq = (self._seq + 1) % 65536
            self._timestamp = (self._timestamp + FRAME_BYTES) % 2**32
            if not self._outgoing:
                self._sent.set()

    async def agent_quiet(self, quiet_s: float = 0.5, timeout_s: float = 30.0, *, beyond: int = 0) -> bool:
        """Until the agent has sent more than `beyond` loud bytes and then nothing loud for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.closed.is_set():
            if self._loud_bytes > beyond and time.monotonic() - self._last_loud_at >= quiet_s:
                return True
            await asyncio.sleep(0.02)
        return False

    def loud_bytes(self) -> int:
        """The agent's loud audio so far (kept as the frames arrive: fifty callers polling this every 20 ms
        must not rescan their calls)."""
        return self._loud_bytes

    async def hangup(self, timeout_s: float = 8.0) -> None:
        """Sends BYE (unless the gateway hung up first) and waits for its answer, resending it as RFC 3261's
        timer E does; a BYE that no one answers 2xx raises: the dialog's route is wrong, and the gateway
        would keep the call until its RTP timeout."""
        if self._sip is None or self.status != 200 or self.closed.is_set():
            return
        self.closed.set()
        status = await self.request("BYE", timeout_s=timeout_s)
        if not 200 <= status < 300:
            raise RuntimeError(f"the BYE was answered {status}")

    async def request(self, method: str, *, extra: list[str] | None = None, body: str = "",
                      timeout_s: float = 10.0) -> int:
        """A request within the dialog, resent as RFC 3261's timers A and E do until it is answered: its final
        status (raises TimeoutError without one)."""
        self._cseq += 1
        cseq = f"{self._cseq} {method}"
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._answers[cseq] = answer
        message = self._request(method, self._cseq, to=self._dialog["to"], body=body, extra=extra)
        deadline, interval = time.monotonic() + timeout_s, 0.5
        try:
            while not answer.done() and time.monotonic() < deadline:
                self._send_sip(message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(answer), min(interval, deadline - time.monotonic()))
                interval = min(interval * 2, 4.0)
            if not answer.done():
                raise TimeoutError(f"no answer to the {method} within {timeout_s:.0f} s")
            return answer.result()
        finally:
            del self._answers[cseq]

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
            frame = AgentFrame(at, data[offset:], loud(data[offset:]))
            self.agent_frames.append(frame)
            if frame.loud:
                self._loud_bytes += len(frame.payload)
                self._last_loud_at = at

    async def _read_sip(self) -> None:
        while True:
            data, _ = await self._sip_in.get()
            status, headers, _ = parse_sip(data)
            if data.startswith(b"BYE "):
                self._send_sip(ok_to(headers))
                self.closed.set()
            elif status is not None and status >= 200:
                answer = self._answers.get(headers.get("cseq", ""))
                if answer is not None and not answer.done():
                    answer.set_result(status)

    async def move_media(self, timeout_s: float = 10.0) -> int:
        """A re-INVITE naming a new RTP port, as a PBX moving a call's media to a phone does: from its answer
        on, the caller's RTP comes from that port and the old one falls silent. The re-INVITE's final status."""
        loop = asyncio.get_running_loop()
        moved, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._rtp_in), local_addr=(self.host, 0))
        status = await self.request(
            "INVITE", body=self._offer(moved.get_extra_info("sockname")[1], self._cseq + 1), timeout_s=timeout_s,
            extra=[f"Contact: <sip:caller@{self.host}:{self._dialog['via_port']}>", "Content-Type: application/sdp"])
        if not 200 <= status < 300:
            moved.close()
            return status
        self._send_sip(self._request("ACK", self._cseq, to=self._dialog["to"]))
        old, self._rtp = self._rtp, moved
        if old is not None:
            old.close()
        return status

    def _offer(self, rtp_port: int, version: int) -> str:
        return (f"v=0\r\no=- 1 {version} IN IP4 {self.host}\r\ns=-\r\nc=IN IP4 {self.host}\r\nt=0 0\r\n"
                f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
                "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")

    def _request(self, method: str, cseq: int, *, to: str, body: str = "", extra: list[str] | None = None,
                 branch: str | None = None) -> str:
        lines = [f"{method} {self._dialog['uri']} SIP/2.0",
                 f"Via: SIP/2.0/UDP {self.host}:{self._dialog['via_port']};"
                 f"branch={branch or f'z9hG4bK{uuid.uuid4().hex}'};rport",
                 "Max-Forwards: 70", *(f"Route: {route}" for route in self._routes), f"From: {self._dialog['from']}",
                 f"To: {to}", f"Call-ID: {self._dialog['call-id']}",
                 f"CSeq: {cseq} {method}", *(extra or []), f"Content-Length: {len(body.encode())}"]
        return "\r\n".join(lines) + "\r\n\r\n" + body

    def _send_sip(self, message: str) -> None:
        assert self._sip is not None
        self._sip.sendto(message.encode(), (self.gateway_host, self.gateway_port))


_LOUD_CODES = bytes(1 if (code & 0x7F) < 0x70 else 0 for code in range(256))


def loud(mulaw: bytes) -> bool:
    """Mu-law codes near 0x7F/0xFF are silence; more than a tenth of the others is sound."""
    return mulaw.translate(_LOUD_CODES).count(1) > len(mulaw) // 10


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


def header_values(data: bytes, name: str) -> list[str]:
    """Every value of a header, in order, whether on lines of their own or comma-separated (for headers
    whose values hold no commas of their own, as Record-Route's and Via's do not in what peers here send)."""
    head = data.decode("utf-8", "replace").partition("\r\n\r\n")[0]
    values: list[str] = []
    for line in head.split("\r\n")[1:]:
        header, _, value = line.partition(":")
        if header.strip().lower() == name:
            values += [part.strip() for part in value.split(",") if part.strip()]
    return values


def _uri_in(name_addr: str) -> str | None:
    """The URI of a `<sip:...>` name-addr (a Contact's), or None."""
    start, end = name_addr.find("<"), name_addr.find(">")
    return name_addr[start + 1:end] if 0 <= start < end else None


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
