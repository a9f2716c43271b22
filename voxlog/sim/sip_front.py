"""A SIP front before several gateways, as an operator runs one (docs/sip.md, "More calls than one gateway
holds"): Debian's Kamailio with deploy/kamailio/kamailio.cfg as it ships, its dispatcher list the gateways
given. For the tests that play callers through it and for `voxlog bench calls --channel sip` past what one
gateway holds."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.process_cpu import stat_cpu_s, stat_fields
from voxlog.sim.stack import free_port

KAMAILIO_CFG = Path(__file__).resolve().parents[2] / "deploy" / "kamailio" / "kamailio.cfg"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
FRONT_HOST = "127.0.0.2"
"""The front's own loopback address: not the callers' (127.0.0.1), so that a gateway screening by the
address the front vouches for is seen to."""


class KamailioMissing(RuntimeError):
    pass


def kamailio_missing() -> str | None:
    """Why no front can start here, or None."""
    if not Path(KAMAILIO).exists():
        return "kamailio is missing (tools/setup.sh --dev installs Debian's)"
    return None


@dataclass
class Front:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    output: Path

    def uri(self, number: str) -> str:
        return f"sip:{number}@{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until it answers an OPTIONS (it binds its ports a moment after it starts)."""
        deadline = time.monotonic() + timeout_s
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((self.host if self.host.startswith("127.") else "127.0.0.1", 0))
            probe.settimeout(0.2)
            local_port = probe.getsockname()[1]
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"kamailio exited ({self.process.returncode}): "
                                       f"{self.output.read_text(errors='replace')[-2000:]}")
                branch = uuid.uuid4().hex
                probe.sendto((f"OPTIONS sip:{self.host}:{self.port} SIP/2.0\r\n"
                              f"Via: SIP/2.0/UDP {probe.getsockname()[0]}:{local_port};branch=z9hG4bK{branch}\r\n"
                              f"Max-Forwards: 70\r\nFrom: <sip:probe@{self.host}>;tag={branch[:8]}\r\n"
                              f"To: <sip:{self.host}>\r\nCall-ID: {branch}\r\nCSeq: 1 OPTIONS\r\n"
                              "Content-Length: 0\r\n\r\n").encode(), (self.host, self.port))
                with contextlib.suppress(TimeoutError):
                    if probe.recv(4096).startswith(b"SIP/2.0 200"):
                        return
        raise TimeoutError(f"kamailio did not answer OPTIONS within {timeout_s:.0f} s")

    def cpu_s(self) -> float:
        """The CPU seconds its processes (a main one and its children, one process group) have used."""
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat_fields(stat)
                if int(fields[2]) == self.process.pid:  # its process group
                    total += stat_cpu_s(fields)
        return total




@contextlib.contextmanager
def kamailio_front(folder: Path, gateways: Sequence[tuple[str, int]], *,
                   host: str = FRONT_HOST) -> Iterator[Front]:
    """Kamailio on `host` (UDP and TCP, a free port), relaying to `gateways` ((host, SIP port) each);
    `folder` (made here) holds its dispatcher list, pid file and output. Yields once it answers OPTIONS."""
    missing = kamailio_missing()
    if missing:
        raise KamailioMissing(missing)
    folder.mkdir(parents=True)
    listed = folder / "dispatcher.list"
    listed.write_text("".join(f"1 sip:{gateway_host}:{port}\n" for gateway_host, port in gateways))
    port = free_port()
    output = folder / "kamailio.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [KAMAILIO, "-f", str(KAMAILIO_CFG), "-DD", "-E", "-l", f"udp:{host}:{port}", "-l", f"tcp:{host}:{port}",
             "-Y", str(folder), "-P", str(folder / "kamailio.pid"), "-w", str(folder), "-m", "64", "-M", "8",
             "-A", f'DISPATCHER_LIST="{listed}"'],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        front = Front(process, host, port, output)
        front.wait_ready()
        yield front
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(15)
