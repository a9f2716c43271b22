"""A benchmark's result names the code and the processor that made it: figures from another commit or
another machine are not results (docs/performance.md compares runs only beside their commit)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from voxlog.bench import run_facts

ROOT = Path(__file__).resolve().parents[2]


def test_a_result_names_its_commit_and_whether_the_tree_differed() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout.strip())
    assert run_facts("log")["commit"] == (f"{head}+modified" if dirty else head)


def test_a_result_names_the_processor() -> None:
    cpu = run_facts("log")["machine"]["cpu"]
    assert isinstance(cpu, str)
    assert cpu, "Linux names its processor in /proc/cpuinfo"
