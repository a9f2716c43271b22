"""A process the gateway runs beside itself, for the work that reads the whole log (the projections,
the summariser): its CPU is not the calls' event loop's, and with the embedded ClickHouse it holds the
engine the gateway then asks (`projections.hosted_store`).

The gateway starts it, waits until it says it is ready, starts it again when it dies (after 1 s, then
twice as long each time it dies without having been ready for a minute, at most 30 s), and stops it
last. Its standard input is its lifeline: it stops when that closes, so a gateway killed outright
takes it along. What it is to do reaches it there too, first (`config`): never on its command line
or in its environment, which other processes can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from gateway.process_cpu import process_cpu_s
from streams.providers.worker_process import WorkerProcess

log = logging.getLogger(__name__)

NAME = "background process"
READY = b"ready"
"""The line the process writes on its standard output once it serves (before: `failed: <why>`)."""
READY_TIMEOUT_S = 60.0
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
EXIT_GRACE_S = 5.0
STABLE_S = 60.0
"""Up this long, a process that dies is started again after RESTART_FIRST_S, not after a longer wait."""


class BackgroundFailed(Exception):
    """The background process did not get ready (its own reason, or that it exited or took too long)."""


@dataclass
class BackgroundProcess:
    module: str
    """Run as `python -m MODULE` (`streams.providers.worker_process`), its standard error the gateway's."""
    config: bytes
    """What the process reads first on its standard input."""
    problem: str | None = "not started"
    """Why it does not serve now, or None while it does."""
    restarts: int = 0
    _worker: WorkerProcess | None = None
    _ready_at: float = 0.0
    _stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self._worker.process.pid if self._worker is not None and self._worker.running else None

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Starts it and waits until it is ready; BackgroundFailed when it is not (it is then stopped)."""
        worker = self._worker = await WorkerProcess.spawn(self.module, keep_stderr=False)
        try:
            worker.stdin.write(self.config)
            await worker.stdin.drain()
            line = await asyncio.wait_for(worker.stdout.readline(), timeout_s)
        except (TimeoutError, OSError) as exc:
            await worker.close(None)
            self.problem = f"the {NAME} did not get ready within {timeout_s:.0f} s" if isinstance(
                exc, TimeoutError) else f"the {NAME} could not be told what to do: {exc}"
            raise BackgroundFailed(self.problem) from exc
        if line.strip() != READY:
            await worker.close(b"", EXIT_GRACE_S)  # it exits of itself once it has said why
            said = line.decode(errors="replace").strip().removeprefix("failed: ")
            self.problem = f"the {NAME} failed: {said or f'it exited ({worker.process.returncode})'}"
            raise BackgroundFailed(self.problem)
        self.problem, self._ready_at = None, time.monotonic()
        log.info("the %s (pid %d) is ready", NAME, worker.process.pid)

    async def run(self, stop: asyncio.Event) -> None:
        """Keeps it running until `stop`: each time it exits, it is started again."""
        delay = RESTART_FIRST_S
        while not stop.is_set():
            if self._worker is not None and self._worker.running:
                exited = asyncio.create_task(self._worker.process.wait())
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait((exited, stopped), return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if stop.is_set() or self._stopping:
                    exited.cancel()
                    return
                self.problem = f"the {NAME} exited ({self._worker.process.returncode}); starting it again"
                log.error("%s in %.0f s", self.problem, delay)
                if time.monotonic() - self._ready_at >= STABLE_S:
                    delay = RESTART_FIRST_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            try:
                await self.start()
                self.restarts += 1
            except (BackgroundFailed, OSError) as exc:
                log.error("%s; trying again in %.0f s", exc, min(delay * 2, RESTART_MAX_S))
            delay = min(delay * 2, RESTART_MAX_S)

    async def stop(self, timeout_s: float) -> None:
        """Asks it to stop (its standard input closed) and waits `timeout_s` before killing it."""
        self._stopping = True
        if self._worker is not None and self._worker.running and not await self._worker.close(b"", timeout_s):
            log.error("the %s did not stop within %.0f s: killed", NAME, timeout_s)

    def cpu_s(self) -> float:
        """CPU seconds the running process has used, all its threads counted (0.0 when none runs)."""
        return process_cpu_s(self.pid) if self.pid is not None else 0.0

