"""The webhook secret's default is published (voxlog/settings.py): a gateway serving agents other than
the demo's refuses it, since a tenant's webhook could not tell our signature from anyone's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr

from voxlog.serving import build_gateway
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings


def settings(home: Path, **fields: object) -> Settings:
    return Settings(_env_file=None, home=home, run_projections=False, run_workers=False, **fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_secret_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOXLOG_WEBHOOK_SECRET", raising=False)


def test_a_gateway_for_agents_of_your_own_refuses_the_published_secret(tmp_path: Path) -> None:
    agents = shutil.copytree(DEFAULT_AGENTS_DIR, tmp_path / "agents")
    with pytest.raises(ValueError, match="VOXLOG_WEBHOOK_SECRET"):
        build_gateway(settings(tmp_path / "home", agents_dir=agents))
    own = build_gateway(settings(tmp_path / "home", agents_dir=agents, webhook_secret=SecretStr("a secret of ours")))
    assert own.webhook_secret == b"a secret of ours"


def test_the_demo_serves_its_own_agents_with_the_published_secret(tmp_path: Path) -> None:
    assert build_gateway(settings(tmp_path / "home")).router.agents
