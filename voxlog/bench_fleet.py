"""More calls than one gateway process serves, for `voxlog bench calls`: gateway processes, each serving with
the benchmark's scripted providers (`python -m voxlog.bench_calls gateway`), as an operator runs them.
- Over SIP, gateways enough for the calls (one gateway's PJSIP holds `SIP_CALLS_PER_GATEWAY`), behind the
  SIP front (voxlog/sim/sip_front.py, Kamailio with deploy/kamailio/kamailio.cfg; docs/sip.md, "More calls
  than one gateway holds"). The callers dial the front; RTP goes straight to the gateway that answered.
- By phone, `--gateways N` replicas behind one public address, as a load balancer spreads Twilio's webhooks
  over them (docs/architecture.md, "Channels"): each call's webhook goes to the next replica in turn, signed
  over the shared address, and its media stream to the replica that answered, at the address its TwiML names.
  Each replica's fake Twilio knows the calls that will ring it.

Each gateway gets its settings and plan on its standard input (pickled: its secrets are never on a command
line), reports on its standard output (where it serves, once it does; its figures once its calls have ended;
what else writes there, PJSIP's own lines, goes to its log file instead), and ends when its standard input
closes. Each has a home of its own, so on the embedded log each has a log of its own; on Kafka they share the
broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import pickle
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.process_cpu import process_cpu_s
from voxlog.settings import Settings
from voxlog.sim.sip_caller import free_sip_port
from voxlog.sim.sip_front import FRONT_HOST, Front, kamailio_front

SIP_CALLS_PER_GATEWAY = 4
"""What one gateway process holds: the PJSIP build's compiled-in PJSUA_MAX_CALLS (docs/sip.md)."""
REPLICAS_PUBLIC_URL = "https://voice.bench.invalid"
"""The address Twilio would be configured with for the phone replicas: a load balancer's, none of theirs."""
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
    serving: dict[str, Any] = field(default_factory=dict)
    """Where it serves: its first report (`sip_port`; or `base_url`, `auth_token` and `account_sid`)."""
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
class Fleet:
    gateways: list[FleetGateway]
    front: Front | None = None
    """The SIP front before the gateways; by phone, none (the callers play the load balancer)."""

    def start_clock(self) -> None:
        """The run starts now: each gateway's CPU is counted from here."""
        for gateway in self.gateways:
            gateway.cpu_at_start_s = process_cpu_s(gateway.process.pid)
            gateway.loop_cpu_at_start_s = process_cpu_s(gateway.process.pid, thread=gateway.process.pid)


def _emptied(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def sip_fleet_settings(settings: Settings, folder: Path, calls: int) -> list[Settings]:
    """One gateway's settings for each `SIP_CALLS_PER_GATEWAY` calls: a home and ports of its own, its
    capacity what its PJSIP holds, and the front's address trusted to say who called. `folder` (emptied
    here) holds their homes and what they and the front write."""
    _emptied(folder)
    gateways = []
    for index in range(math.ceil(calls / SIP_CALLS_PER_GATEWAY)):
        port = free_sip_port()
        gateways.append(settings.model_copy(update={
            "home": folder / f"gateway-{index}", "sip_bind": f"127.0.0.1:{port}", "max_calls": SIP_CALLS_PER_GATEWAY,
            "sip_trusted_proxies": f"{FRONT_HOST}/32",
            "sip_rtp_ports": f"{port + 2}-{port + 2 + RTP_PORTS_PER_GATEWAY}"}))
    return gateways


def phone_fleet_settings(settings: Settings, folder: Path, replicas: int) -> list[Settings]:
    """`replicas` gateways' settings, each with a home of its own; a capacity set for all of them
    (`VOXLOG_MAX_CALLS`, `--max-calls`) is shared out between them, as a balancer's even spread would use it.
    `folder` (emptied here) holds their homes and what they write."""
    _emptied(folder)
    share = None if settings.max_calls is None else math.ceil(settings.max_calls / replicas)
    return [settings.model_copy(update={"home": folder / f"gateway-{index}", "max_calls": share})
            for index in range(replicas)]


@contextlib.asynccontextmanager
async def gateway_fleet(gateways: list[Settings], plans: list[dict[str, Any]], folder: Path) -> AsyncIterator[Fleet]:
    """The gateways, each serving its plan (what `voxlog.bench_calls gateway` reads), their files in
    `folder`. On the way out, any gateway not finished is killed."""
    started: list[FleetGateway] = []
    try:
        for settings, plan in zip(gateways, plans, strict=True):
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
            gateway.serving = await gateway.report(GATEWAY_START_S)
        yield Fleet(started)
    finally:
        await asyncio.gather(*(gateway.stop() for gateway in started))


@contextlib.asynccontextmanager
async def sip_fleet(gateways: list[Settings], plan: dict[str, Any], folder: Path) -> AsyncIterator[Fleet]:
    """The gateways (`sip_fleet_settings`) serving `plan`, and the SIP front before them."""
    async with gateway_fleet(gateways, [plan] * len(gateways), folder) as fleet:
        with kamailio_front(folder / "front", [("127.0.0.1", int(g.serving["sip_port"])) for g in fleet.gateways]
                            ) as front:
            fleet.front = front
            yield fleet
