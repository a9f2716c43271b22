"""More SIP calls than one gateway process holds, for `voxlog bench calls --channel sip`: gateways enough
for them, each a process of its own serving with the benchmark's scripted providers (`python -m
voxlog.bench_calls gateway`), behind the SIP front (voxlog/sim/sip_front.py, Kamailio with
deploy/kamailio/kamailio.cfg), as an operator runs them (docs/sip.md, "More calls than one gateway
holds"). The callers dial the front; RTP goes straight to the gateway that answered.

Each gateway gets its settings on its standard input (pickled: its secrets are never on a command line),
reports on its standard output (its SIP port once it serves, its figures once its calls have ended; what
else writes there, PJSIP's own lines, goes to its log file instead), and ends when its standard input
closes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import pickle
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.process_cpu import process_cpu_s
from voxlog.settings import Settings
from voxlog.sim.sip_caller import free_sip_port
from voxlog.sim.sip_front import FRONT_HOST, Front, kamailio_front

SIP_CALLS_PER_GATEWAY = 4
"""What one gateway process holds: the PJSIP build's compiled-in PJSUA_MAX_CALLS (docs/sip.md)."""
GATEWAY_START_S = 300.0
"""For all the gateways to serve: they start at once, each importing the whole stack, on a machine of two
cores."""
GATEWAY_FINISH_S = 120.0
RTP_PORTS_PER_GATEWAY = 40
"""Each gateway's own RTP ports (two a call, and room for a port another process took meanwhile)."""


@dataclass
class FleetGateway:
    process: asyncio.subprocess.Process
    settings: Settings
    output: Path
    sip_port: int = 0
    cpu_at_start_s: float = 0.0
    loop_cpu_at_start_s: float = 0.0  # its main thread's, which runs its event loop

    async def report(self, timeout_s: float) -> dict[str, Any]:
        """Its next report line."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"gateway {self.settings.home.name} said nothing in {timeout_s:.0f} s: "
                               f"{self.tail()}") from None
        if not line:
            await self.process.wait()
            raise RuntimeError(f"gateway {self.settings.home.name} exited ({self.process.returncode}): {self.tail()}")
        report: dict[str, Any] = json.loads(line)
        return report

    def tail(self) -> str:
        return self.output.read_text(errors="replace")[-3000:] if self.output.exists() else ""

    async def finish(self) -> dict[str, Any]:
        """Closes its standard input; its figures once its calls have ended (CPU from the run's start)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        figures = await self.report(GATEWAY_FINISH_S)
        await asyncio.wait_for(self.process.wait(), GATEWAY_FINISH_S)
        figures["cpu_s"] -= self.cpu_at_start_s
        figures["loop_cpu_s"] -= self.loop_cpu_at_start_s
        return figures

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


@dataclass
class SipFleet:
    front: Front
    gateways: list[FleetGateway]

    def start_clock(self) -> None:
        """The run starts now: each gateway's CPU is counted from here."""
        for gateway in self.gateways:
            gateway.cpu_at_start_s = process_cpu_s(gateway.process.pid)
            gateway.loop_cpu_at_start_s = process_cpu_s(gateway.process.pid, thread=gateway.process.pid)


def fleet_settings(settings: Settings, folder: Path, calls: int) -> list[Settings]:
    """One gateway's settings for each `SIP_CALLS_PER_GATEWAY` calls: a home and ports of its own, its
    capacity what its PJSIP holds, and the front's address trusted to say who called. `folder` (emptied
    here) holds their homes and what they and the front write."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gateways = []
    for index in range(math.ceil(calls / SIP_CALLS_PER_GATEWAY)):
        port = free_sip_port()
        gateways.append(settings.model_copy(update={
            "home": folder / f"gateway-{index}", "sip_bind": f"127.0.0.1:{port}", "max_calls": SIP_CALLS_PER_GATEWAY,
            "sip_trusted_proxies": f"{FRONT_HOST}/32",
            "sip_rtp_ports": f"{port + 2}-{port + 2 + RTP_PORTS_PER_GATEWAY}"}))
    return gateways


@contextlib.asynccontextmanager
async def sip_fleet(gateways: list[Settings], plan: dict[str, Any], folder: Path) -> AsyncIterator[SipFleet]:
    """The gateways (`fleet_settings`) serving `plan` (what `voxlog.bench_calls gateway` reads), and the
    front before them, their files in `folder`. On the way out, any gateway not finished is killed."""
    started: list[FleetGateway] = []
    try:
        for settings in gateways:
            output = folder / f"{settings.home.name}.log"
            with output.open("wb") as sink:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "voxlog.bench_calls", "gateway", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=sink)
            started.append(FleetGateway(process, settings, output))
            assert process.stdin is not None
            process.stdin.write(pickle.dumps((settings, plan)))
            await process.stdin.drain()
        for gateway in started:
            gateway.sip_port = int((await gateway.report(GATEWAY_START_S))["sip_port"])
        with kamailio_front(folder / "front", [("127.0.0.1", g.sip_port) for g in started]) as front:
            yield SipFleet(front, started)
    finally:
        await asyncio.gather(*(gateway.stop() for gateway in started))
