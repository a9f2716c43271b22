"""The gateway's background process as the gateway keeps it (`gateway.background_process`): told what to
do on its standard input, ready or failed by its own word, started again when it dies, stopped by its
input's end, and gone with a gateway killed outright. Small stand-in processes here; `voxlog serve`'s
own in tests/integration/test_serve_background.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.background_process import BackgroundFailed, BackgroundProcess

# Reads its configuration (one line), writes it to the file it names, says ready, and lives until its
# standard input ends.
FAITHFUL = """
import sys
line = sys.stdin.buffer.readline()
path = line.strip().split(b" ", 1)[0].decode()
open(path, "wb").write(line)
print("ready", flush=True)
sys.stdin.buffer.read()
print("stopped", file=open(path + ".stopped", "w"))
"""


def stand_in(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


def exposed(pid: int, secret: bytes) -> bool:
    """Whether other processes could read `secret` in the process's command line or environment."""
    return any(secret in Path(f"/proc/{pid}/{part}").read_bytes() for part in ("cmdline", "environ"))


async def until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


async def test_it_is_told_on_its_input_and_stops_when_that_ends(tmp_path: Path) -> None:
    told = tmp_path / "told"
    config = f"{told} the secret\n".encode()
    process = BackgroundProcess(stand_in(FAITHFUL), config)
    await process.start()
    assert process.problem is None
    pid = process.pid
    assert pid is not None
    assert alive(pid)
    assert told.read_bytes() == config
    assert not exposed(pid, b"the secret")
    await process.stop(30)
    assert told.with_suffix(".stopped").exists(), "it stopped on its own, not killed"
    assert process.pid is None


async def test_its_own_reason_for_failing_is_what_the_gateway_reports() -> None:
    process = BackgroundProcess(stand_in('print("failed: the engine is open in another process")'), b"")
    with pytest.raises(BackgroundFailed, match="failed: the engine is open in another process"):
        await process.start()
    assert process.problem == "the background process failed: the engine is open in another process"
    silent = BackgroundProcess(stand_in("import sys; sys.exit(3)"), b"")
    with pytest.raises(BackgroundFailed, match=r"exited \(3\)"):
        await silent.start()


async def test_one_that_never_gets_ready_is_killed_after_the_timeout() -> None:
    process = BackgroundProcess(stand_in("import time; time.sleep(600)"), b"")
    with pytest.raises(BackgroundFailed, match="did not get ready within 1 s"):
        await process.start(timeout_s=1)
    assert process.pid is None


async def test_it_is_started_again_when_it_dies(tmp_path: Path) -> None:
    process = BackgroundProcess(stand_in(FAITHFUL), f"{tmp_path / 'told'}\n".encode())
    await process.start()
    first = process.pid
    assert first is not None
    stop = asyncio.Event()
    keeping = asyncio.create_task(process.run(stop))
    try:
        os.kill(first, signal.SIGKILL)
        await until(lambda: process.pid not in (None, first) and process.problem is None)
        assert process.restarts == 1
    finally:
        stop.set()
        await keeping
        await process.stop(30)


async def test_a_gateway_killed_outright_takes_it_along(tmp_path: Path) -> None:
    # A stand-in gateway: it starts the background process, says its pid, and is then killed with -9.
    told = tmp_path / "told"
    script = ("import asyncio\n"
              "from gateway.background_process import BackgroundProcess\n"
              "async def main():\n"
              f"    p = BackgroundProcess({stand_in(FAITHFUL)!r}, {f'{told}{chr(10)}'.encode()!r})\n"
              "    await p.start()\n"
              "    print(p.pid, flush=True)\n"
              "    await asyncio.sleep(600)\n"
              "asyncio.run(main())\n")
    gateway = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                   cwd=Path(__file__).parents[2])
    assert gateway.stdout is not None
    background = int(await asyncio.wait_for(gateway.stdout.readline(), 60))
    assert alive(background)
    gateway.kill()
    await gateway.wait()
    await until(told.with_suffix(".stopped").exists)  # its input ended with the gateway
