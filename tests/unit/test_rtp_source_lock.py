"""The socket filter that latches a call's RTP to one address (`gateway.rtp_source_lock`), on real UDP
sockets over loopback: what it lets through, what it drops, and finding PJSIP's socket by its address."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import rtp_source_lock
from gateway.rtp_source_lock import host_port, lock_to, udp_socket_at, unlock

pytestmark = pytest.mark.skipif(not rtp_source_lock.SUPPORTED, reason="socket filters are Linux's")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
            pytest.param(socket.AF_INET6, "::1", id="ipv6",
                         marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here"))]


class Sockets:
    def __init__(self, family: int, host: str) -> None:
        self.made: list[socket.socket] = []
        self.family, self.host = family, host
        self.receiver = self.bound()
        self.receiver.setblocking(False)

    def bound(self, host: str | None = None) -> socket.socket:
        made = socket.socket(self.family, socket.SOCK_DGRAM)
        made.bind((host or self.host, 0))
        self.made.append(made)
        return made

    def delivered(self, senders: dict[str, socket.socket]) -> set[str]:
        """Which senders' datagrams reach the receiver (each sends its name; then a marker from the first
        sender, once it has come, says everything sent before it has arrived or been dropped; a moment more
        is allowed for a datagram another CPU's backlog delivers later)."""
        for name, sender in senders.items():
            sender.sendto(name.encode(), self.receiver.getsockname()[:2])
        next(iter(senders.values())).sendto(b"end", self.receiver.getsockname()[:2])
        got: set[str] = set()
        marked = False
        until = time.monotonic() + 5
        while time.monotonic() < until:
            try:
                data = self.receiver.recv(64)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            if data == b"end":
                marked, until = True, time.monotonic() + 0.05
            else:
                got.add(data.decode())
        assert marked, f"the marker never came; got {got}"
        return got

    def close(self) -> None:
        for made in self.made:
            made.close()


@pytest.mark.parametrize(("family", "host"), FAMILIES)
def test_a_latched_socket_takes_its_peer_alone_and_everyone_again_once_unlocked(family: int, host: str) -> None:
    sockets = Sockets(family, host)
    try:
        peer, stranger = sockets.bound(), sockets.bound()
        senders = {"peer": peer, "stranger": stranger}
        fd = sockets.receiver.fileno()
        lock_to(fd, host, peer.getsockname()[1])
        # The marker comes from the peer, so it passes: the stranger's datagram, sent before it, was dropped.
        assert sockets.delivered(senders) == {"peer"}
        unlock(fd)
        assert sockets.delivered(senders) == {"peer", "stranger"}
        unlock(fd)  # a socket without a filter: nothing to remove, no error
    finally:
        sockets.close()


def test_another_address_on_the_same_port_is_a_stranger() -> None:
    sockets = Sockets(socket.AF_INET, "127.0.0.1")
    try:
        peer = sockets.bound()
        elsewhere = sockets.bound("127.0.0.5")
        lock_to(sockets.receiver.fileno(), "127.0.0.1", peer.getsockname()[1])
        assert sockets.delivered({"peer": peer, "elsewhere": elsewhere}) == {"peer"}
    finally:
        sockets.close()


def test_latching_anew_replaces_the_old_peer() -> None:
    sockets = Sockets(socket.AF_INET, "127.0.0.1")
    try:
        old, new = sockets.bound(), sockets.bound()
        fd = sockets.receiver.fileno()
        lock_to(fd, "127.0.0.1", old.getsockname()[1])
        lock_to(fd, "127.0.0.1", new.getsockname()[1])
        assert sockets.delivered({"new": new, "old": old}) == {"new"}
    finally:
        sockets.close()


def test_the_socket_bound_to_an_address_is_found_and_a_port_nobody_holds_is_not() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream:
        held.bind(("127.0.0.1", 0))
        stream.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert udp_socket_at("127.0.0.1", port) == held.fileno()
        assert udp_socket_at("127.0.0.1", stream.getsockname()[1]) is None  # TCP is not RTP
    assert udp_socket_at("127.0.0.1", port) is None  # closed


def test_a_socket_is_found_by_its_port_whatever_address_pjsip_publishes_for_it() -> None:
    """Behind NAT, PJSIP names the published address (VOXLOG_SIP_PUBLIC_HOST), not the one bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        assert udp_socket_at("203.0.113.5", held.getsockname()[1]) == held.fileno()


def test_of_two_sockets_on_one_port_the_one_at_the_address_named_is_found() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second.bind(("127.0.0.5", port))
        assert udp_socket_at("127.0.0.5", port) == second.fileno()
        assert udp_socket_at("203.0.113.5", port) is None  # neither: not a guess


def test_a_socket_bound_to_every_address_is_found_by_any() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("0.0.0.0", 0))
        assert udp_socket_at("127.0.0.1", held.getsockname()[1]) == held.fileno()


@pytest.mark.parametrize(("name", "pair"), [
    ("127.0.0.1:20000", ("127.0.0.1", 20000)),
    ("[::1]:4000", ("::1", 4000)),
    ("[2001:db8::7]:65535", ("2001:db8::7", 65535)),
    ("", None),
    ("127.0.0.1", None),
    ("example.com:5060", None),
    ("127.0.0.1:70000", None),
    ("127.0.0.1:-1", None),
])
def test_host_port_reads_pjsips_addresses(name: str, pair: tuple[str, int] | None) -> None:
    assert host_port(name) == pair


@given(st.text(max_size=60))
def test_host_port_never_raises(name: str) -> None:
    parsed = host_port(name)
    assert parsed is None or 0 <= parsed[1] < 65536
