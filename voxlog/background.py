"""`voxlog serve`'s background process: the projections, the summariser and the after-call worker
(`gateway.log_readers`), apart from the calls' event loop, and, with the embedded ClickHouse, the
engine itself, which the gateway reads through it (`projections.hosted_store`).

The gateway starts it (`gateway.background_process`) as `python -m voxlog.background` and writes a
pickled `BackgroundConfig` on its standard input: the settings, secrets included, travel on that
pipe only. It answers `ready` on its standard output once the tables exist and the workers have
joined their groups, or `failed: <why>`; it stops when its standard input closes (the gateway stopped,
or died) or on SIGTERM, each reader finishing the batch it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import uvloop

from gateway.background_process import READY
from gateway.log_readers import ProjectionsTarget, WorkersTarget, start_log_readers, summary_llm_of
from projections.hosted_store import StoreHost
from projections.store import AnalyticsError, AnalyticsStore
from streams.config.agents import AgentRouter, load_agents
from streams.providers.registry import ProviderRegistry
from streams.providers.worker_process import child_pipes
from streams.startup_heap import freeze_startup_heap
from voxlog.backends import log_backend, recording_store
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings

log = logging.getLogger("voxlog.background")

STOP_S = 10.0
"""How long the readers get to write what they hold once asked to stop."""


@dataclass(frozen=True)
class BackgroundConfig:
    settings: Settings
    projections: bool
    workers: bool
    """The summariser and the after-call worker."""
    host_address: Path | None
    """Where to serve the embedded ClickHouse to the gateway (a Unix socket), or None."""
    authkey: bytes

    def encoded(self) -> bytes:
        return pickle.dumps(self)


async def run_background(config: BackgroundConfig, stdin: BinaryIO, stdout: BinaryIO) -> int:
    settings = config.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    gateway_gone = threading.Event()

    def lifeline() -> None:
        stdin.read()  # returns at its end: the gateway closed it, or died
        gateway_gone.set()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=lifeline, name="lifeline", daemon=True).start()

    def tell(line: bytes) -> None:
        stdout.write(line + b"\n")
        stdout.flush()

    target, host = None, None
    if config.projections:
        try:
            store = await asyncio.to_thread(AnalyticsStore.open, settings.clickhouse_dsn, settings.home)
        except AnalyticsError as exc:
            tell(b"failed: " + str(exc).encode())
            return 1
        target = ProjectionsTarget(store, settings.recordings_path, recording_store(settings))
        if config.host_address is not None:
            host = StoreHost(store.dsn, config.host_address, config.authkey)
    router = AgentRouter(load_agents(settings.agents_dir or DEFAULT_AGENTS_DIR))
    providers = ProviderRegistry()
    workers = WorkersTarget(settings.home, settings.public_url) if config.workers else None
    readers = await start_log_readers(log_backend(settings), router, summary_llm_of(router, lambda: providers), stop,
                                      projections=target, workers=workers)
    freeze_startup_heap()  # started: what it holds now stays for good
    tell(READY)
    try:
        await stop.wait()
        _done, late = await asyncio.wait(readers.tasks, timeout=STOP_S) if readers.tasks else (set(), set())
        for task in late:
            log.error("%s did not stop within %.0f s", task.get_name(), STOP_S)
            task.cancel()
    finally:
        if host is not None:
            host.close()
            if gateway_gone.is_set():  # no other process will be started there: the gateway's folder goes too
                with contextlib.suppress(OSError):
                    host.address.parent.rmdir()
        readers.close()
        await providers.aclose()
    return 0


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the gateway, draining, stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="voxlog-background %(levelname)s %(name)s: %(message)s")
    requests, replies = child_pipes()  # what C code prints goes to standard error, not into `ready`
    config = pickle.load(requests)
    if not isinstance(config, BackgroundConfig):
        raise SystemExit("voxlog.background reads a BackgroundConfig on its standard input (voxlog serve starts it)")
    sys.exit(uvloop.run(run_background(config, requests, replies)))  # as the gateway's loop


if __name__ == "__main__":
    # The configuration is unpickled as voxlog.background's class, not this __main__'s copy of it.
    from voxlog.background import main as imported_main
    imported_main()
