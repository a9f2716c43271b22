"""CPU seconds of processes and threads from Linux's /proc, without a dependency: what the gateway's
`/healthz` says of its background process, and what the benchmarks count for the processes they start."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(stat: Path) -> list[str]:
    """A /proc/<pid>/stat's fields after the command name (which may hold spaces): the state is [0], the
    process group [2]."""
    return stat.read_text().rpartition(")")[2].split()


def stat_cpu_s(fields: list[str]) -> float:
    """User and system CPU seconds from `stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """A live process's CPU seconds so far, all its threads, or only `thread` (a thread id; the main
    thread's is the pid); 0.0 once it is gone."""
    path = Path(f"/proc/{pid}/stat") if thread is None else Path(f"/proc/{pid}/task/{thread}/stat")
    try:
        return stat_cpu_s(stat_fields(path))
    except OSError:
        return 0.0
