"""A worker process: started as `python -m MODULE` with this project on its path, its standard error
kept (the last lines explain a crash) or left to be the parent's (its log lines then reach the
operator), stopped and reaped without hanging.

The recognisers decode in processes of their own (streams/providers/asr_pocketsphinx.py says why:
the decoders hold the GIL or the CPU long enough to stall every call's event loop), and speak a
length-prefixed protocol on the worker's stdin and stdout; the gateway's background process
(gateway/background_process.py) is one too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import BinaryIO

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The folder holding the `streams` package, put on the worker's PYTHONPATH."""


class WorkerProcess:
    """A started worker: its process, and the tail of what it wrote to standard error (if kept)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_task = asyncio.create_task(self._drain_stderr()) if process.stderr is not None else None

    @classmethod
    async def spawn(cls, module: str, *, keep_stderr: bool = True) -> WorkerProcess:
        """OSError where the process cannot start. `keep_stderr` False: its standard error is ours."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if keep_stderr else None, env=env,
        )
        return cls(process)

    @property
    def stdin(self) -> asyncio.StreamWriter:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def reap(self, timeout_s: float = 5.0) -> bool:
        """Waits for the worker to exit, reading and dropping what it still writes (asyncio stops
        reading a pipe whose buffer is full, and `wait` would then never return); False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while await self.stdout.read(65536):
                    pass
                await self.process.wait()
            return True
        except TimeoutError:
            return False

    async def last_words(self) -> str:
        """`: line | line` of the worker's last standard error lines (waiting briefly for a dying
        worker's to arrive), or "" when it wrote none (or they were not kept)."""
        if self._stderr_task is None:
            return ""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 0.5)
        return (": " + " | ".join(list(self._stderr)[-5:])) if self._stderr else ""

    async def close(self, goodbye: bytes | None, timeout_s: float = 5.0) -> bool:
        """Sends `goodbye` (the protocol's quit request; b"": its standard input's end alone) and waits
        `timeout_s` for the exit; kills the worker where it does not go, or where `goodbye` is None.
        True when it went of itself."""
        if goodbye is not None and self.running:
            with contextlib.suppress(Exception):
                self.stdin.write(goodbye)
                await self.stdin.drain()
                self.stdin.close()
            if await self.reap(timeout_s):
                await self._end_stderr()
                return True
        self.kill()
        await self.reap()
        await self._end_stderr()
        return False

    async def _end_stderr(self) -> None:
        if self._stderr_task is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stderr_task, 1.0)

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            text = line.decode(errors="replace").rstrip()
            if text:
                self._stderr.append(text)


def child_pipes() -> tuple[BinaryIO, BinaryIO]:
    """In the worker: its requests (stdin) and a private handle for its replies. The process's own
    stdout then goes to stderr, so that what C code prints cannot corrupt the protocol."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return sys.stdin.buffer, replies
