"""A benchmark's result names the code and the processor that made it: figures from another commit or
another machine are not results (docs/performance.md compares runs only beside their commit)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from voxlog.bench import cpu_model, run_facts

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
    assert cpu, "a model name, a board, an ARM core's numbers, or at least the architecture"


@pytest.mark.parametrize(("cpuinfo", "named"), [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\n"
     "model name\t: AMD EPYC 7B13\n", "AMD EPYC 7B13"),
    # An ARM server's Linux names no model: its cores' implementer and part numbers say which it is.
    ("processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
     "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n", "implementer 0x41 part 0xd0c"),
    ("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\n"
     "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n", "Raspberry Pi 4 Model B Rev 1.4"),
])
def test_the_processor_is_named_on_x86_and_on_arm(cpuinfo: str, named: str) -> None:
    cpu = cpu_model(cpuinfo)
    assert cpu is not None
    assert named in cpu


def test_without_cpuinfo_the_architecture_is_named() -> None:
    assert cpu_model("") == (platform.machine() or None)
