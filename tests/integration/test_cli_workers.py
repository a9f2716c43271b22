"""`voxlog workers` on the embedded log runs the processors in-process: it needs no broker and never
loads faust (the review found it built a faust app for localhost:9092 at import time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def test_workers_on_the_embedded_log_run_in_process_without_faust(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOG_") or k == "VOXLOG_KEYSTORE"}
    env.update(VOXLOG_HOME=str(tmp_path), COLUMNS="200", PYTHONUNBUFFERED="1")
    # -X importtime lists every module the process imports, on stderr: into a file, which never fills
    # as a pipe nobody reads yet would (and block the process before its first line)
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        worker = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "voxlog.cli", "workers"], env=env,
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            assert worker.stdout is not None
            first = worker.stdout.readline()  # printed once SIGTERM stops them cleanly
            assert "stream processors on" in first, first
            worker.send_signal(signal.SIGTERM)
            worker.communicate(timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    imports = stderr_path.read_text()
    assert worker.returncode == 0, imports[-3000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines() if line.startswith("import time:")}
    assert "consumers.processor_runner" in modules
    assert not {m for m in modules if m in ("faust", "mode") or m.startswith(("faust.", "mode."))}
