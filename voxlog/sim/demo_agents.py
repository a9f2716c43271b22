"""The demo tenant's agent files copied elsewhere with some settings changed: for tests and benchmarks
that need other limits or consent rules than the demo's own."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from voxlog.settings import DEFAULT_AGENTS_DIR


def demo_agents_with(folder: Path, *, tenant: dict[str, Any] | None = None,
                     front_desk: dict[str, Any] | None = None) -> Path:
    """The demo agents in `folder` (replaced), with the tenant's and the front desk's sections updated
    key by key (`{"limits": {"max_concurrent_calls": 200}}`) and their other fields set (`{"vad": "silero"}`);
    answers `folder`, a VOXLOG_AGENTS_DIR."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(DEFAULT_AGENTS_DIR, folder)
    for name, changes in (("tenant.yaml", tenant), ("front-desk.yaml", front_desk)):
        if not changes:
            continue
        path = folder / "demo" / name
        document: dict[str, Any] = yaml.safe_load(path.read_text())
        for section, values in changes.items():
            if isinstance(values, dict):
                document.setdefault(section, {}).update(values)
            else:
                document[section] = values
        path.write_text(yaml.safe_dump(document))
    return folder
