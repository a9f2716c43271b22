"""Strict RTP: once a call's RTP has come from one address, the kernel drops what any other sends to its port.

Why: PJSIP's symmetric RTP (for callers behind NAT, whose packets come from another address than their
SDP names) sends a call's audio wherever ten RTP packets in a row last came from, and drops nothing
once it has switched. A stranger who reaches a call's RTP port and sends ten packets between two of the
caller's (12 every 20 ms did it, measured) is sent the agent's side of the call, and the agent hears
the stranger instead of the caller. PJSIP's count is fixed when it is built (`PJMEDIA_RTP_NAT_PROBATION_CNT`)
and pjsua2 has no setting for it, so the gateway latches, as Asterisk's `strictrtp` does: once the
media is up, the call's RTP is the address its SDP names as soon as a packet comes from it, or else (a
peer behind NAT) wherever ten packets have come from (`gateway.sip_endpoint`); and a socket filter
(classic BPF, Linux's `SO_ATTACH_FILTER`) on the call's RTP socket passes its packets and no others. PJSIP never sees
the stranger's, so it neither switches nor hears them.

What it costs: a caller whose address changes mid-call (a NAT that rebinds) is not heard from the new
one, and its call ends when its RTP stops (`rtp_timeout_s`); a re-INVITE (hold, resume, a peer that moves
its media) unlatches until RTP comes again. A stranger who floods the port before a peer behind NAT has
sent ten packets (and knows the port) is latched instead: the caller is then not heard and the call ends
the same way, with nothing of it sent to the stranger that PJSIP's own switching would not have sent.
RTCP is left to PJSIP: its reports carry no audio.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import stat
import struct
import sys

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
"""Linux's (asm-generic/socket.h); Python's socket module has neither."""
SUPPORTED = sys.platform.startswith("linux")

_SKF_NET_OFF = -0x100000
"""Loads from here on read the packet's IP header; a UDP socket's filter otherwise starts at its UDP header."""
_LD_W_ABS, _LD_H_ABS, _JEQ_K, _RET_K = 0x20, 0x28, 0x15, 0x06
_PASS, _DROP = 0xFFFFFFFF, 0


def _instruction(code: int, k: int, jump_true: int = 0, jump_false: int = 0) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k & 0xFFFFFFFF)


def source_filter(host: str, port: int) -> list[bytes]:
    """The filter program (one `struct sock_filter` each) that passes UDP from `host`:`port` and drops the
    rest. IPv4 compares the header's source address; IPv6 its four words."""
    packed = ipaddress.ip_address(host).packed
    offset = 12 if len(packed) == 4 else 8  # the source address in the IPv4 / IPv6 header
    words = struct.unpack(f"!{len(packed) // 4}I", packed)
    program = []
    for index, word in enumerate(words):  # a word that differs jumps past the rest to the drop at the end
        program += [_instruction(_LD_W_ABS, _SKF_NET_OFF + offset + 4 * index),
                    _instruction(_JEQ_K, word, 0, 2 * (len(words) - index) + 1)]
    program += [_instruction(_LD_H_ABS, 0), _instruction(_JEQ_K, port, 0, 1),
                _instruction(_RET_K, _PASS), _instruction(_RET_K, _DROP)]
    return program


def host_port(name: str) -> tuple[str, int] | None:
    """PJSIP's "host:port" ("[v6]:port" for IPv6) as a pair; None for "" (no packet yet) or anything else."""
    host, _, port = name.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    return (host, number) if 0 <= number < 65536 else None


def udp_socket_at(host: str, port: int) -> int | None:
    """The descriptor of this process's UDP socket on `port` (PJSIP's, for a call's RTP), if any. `host` is
    what PJSIP names, which behind NAT is the published address, not the bound one: it only picks among
    sockets on the same port bound to different addresses."""
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    found: list[tuple[int, str]] = []
    for name in descriptors:
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile, or not ours to read
        with probe:
            if probe.type == socket.SOCK_DGRAM and probe.family in (socket.AF_INET, socket.AF_INET6):
                bound_host, bound_port = probe.getsockname()[:2]
                if bound_port == port:
                    found.append((fd, bound_host))
    if len(found) > 1:
        found = [(fd, bound) for fd, bound in found if _answers_at(bound, host)]
    return found[0][0] if len(found) == 1 else None


def _answers_at(bound: str, host: str) -> bool:
    """Whether a socket bound to `bound` takes packets for `host` (the same address, or every address)."""
    try:
        address = ipaddress.ip_address(bound)
        return address.is_unspecified or address == ipaddress.ip_address(host)
    except ValueError:
        return False


def lock_to(fd: int, host: str, port: int) -> None:
    """From now on the socket `fd` takes UDP from `host`:`port` alone (raises OSError where the kernel refuses)."""
    program = source_filter(host, port)
    code = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))  # struct sock_fprog: the kernel copies it
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def unlock(fd: int) -> None:
    """The socket `fd` takes UDP from anyone again (nothing happens where it had no filter)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # there was none
                raise
