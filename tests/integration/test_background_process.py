"""The gateway's background process as the gateway keeps it (`gateway.background_process`): told what to
do on its standard input, ready or failed by its own word, started again when it dies, stopped by its
input's end, and gone with a gateway killed outright. Small stand-in modules here; `voxlog serve`'s
own in tests/integration/test_gateway_hardship.py ("its background process")."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.background_process import BackgroundFailed, BackgroundProcess
from tests.integration.test_gateway_hardship import eventually, running

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

_names = itertools.count()


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """A module of the test's own, run as the background process: its name, from its source."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p))

    def written(source: str) -> str:
        name = f"voxlog_stand_in_{next(_names)}"
        (folder / f"{name}.py").write_text(source)
        return name

    return written


def exposed(pid: int, secret: bytes) -> bool:
    """Whether other processes could read `secret` in the process's command line or environment."""
    return any(secret in Path(f"/proc/{pid}/{part}").read_bytes() for part in ("cmdline", "environ"))


async def test_it_is_told_on_its_input_and_stops_when_that_ends(
    tmp_path: Path, stand_in: Callable[[str], str]
) -> None:
    told = tmp_path / "told"
    config = f"{told} the secret\n".encode()
    process = BackgroundProcess(stand_in(FAITHFUL), config)
    await process.start()
    assert process.problem is None
    pid = process.pid
    assert pid is not None
    assert running(pid)
    assert told.read_bytes() == config
    assert not exposed(pid, b"the secret")
    await process.stop(30)
    assert told.with_suffix(".stopped").exists(), "it stopped on its own, not killed"
    assert process.pid is None


async def test_its_own_reason_for_failing_is_what_the_gateway_reports(stand_in: Callable[[str], str]) -> None:
    process = BackgroundProcess(stand_in('print("failed: the engine is open in another process")'), b"")
    with pytest.raises(BackgroundFailed, match="failed: the engine is open in another process"):
        await process.start()
    assert process.problem == "the background process failed: the engine is open in another process"
    silent = BackgroundProcess(stand_in("import sys; sys.exit(3)"), b"")
    with pytest.raises(BackgroundFailed, match=r"exited \(3\)"):
        await silent.start()


async def test_one_that_never_gets_ready_is_killed_after_the_timeout(stand_in: Callable[[str], str]) -> None:
    process = BackgroundProcess(stand_in("import time; time.sleep(600)"), b"")
    with pytest.raises(BackgroundFailed, match="did not get ready within 1 s"):
        await process.start(timeout_s=1)
    assert process.pid is None


async def test_it_is_started_again_when_it_dies(tmp_path: Path, stand_in: Callable[[str], str]) -> None:
    process = BackgroundProcess(stand_in(FAITHFUL), f"{tmp_path / 'told'}\n".encode())
    await process.start()
    first = process.pid
    assert first is not None
    stop = asyncio.Event()
    keeping = asyncio.create_task(process.run(stop))
    try:
        os.kill(first, signal.SIGKILL)
        async def replaced() -> bool:
            return process.pid not in (None, first) and process.problem is None

        await eventually(replaced, 60, "a new process, ready")
        assert process.restarts == 1
    finally:
        stop.set()
        await keeping
        await process.stop(30)


async def test_a_gateway_killed_outright_takes_it_along(tmp_path: Path, stand_in: Callable[[str], str]) -> None:
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
    assert running(background)
    gateway.kill()
    await gateway.wait()

    async def stopped() -> bool:
        return told.with_suffix(".stopped").exists()

    await eventually(stopped, 60, "the background process ended with its gateway")  # its input ended
