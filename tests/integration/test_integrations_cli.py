"""`voxlog integrations check`, run as an operator runs it: a subprocess with the settings in its
environment, against the demo's own CalDAV server and a HubSpot that refuses or lacks the token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.connectors.fake_hubspot import FakeHubSpot


def check(tenant: str, home: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOG_")}
    env.update(VOXLOG_HOME=str(home), COLUMNS="200", **environ)
    return subprocess.run([sys.executable, "-m", "voxlog.cli", "integrations", "check", "--tenant", tenant],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_demo_tenants_calendar_and_desk_answer(tmp_path: Path) -> None:
    done = check("demo", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "calendar (caldav)" in done.stdout
    assert "tickets (voxlog)" in done.stdout
    assert "FAILED" not in done.stdout


def tenant_with_hubspot(agents: Path, base_url: str) -> None:
    (agents / "acme").mkdir(parents=True)
    (agents / "acme" / "tenant.yaml").write_text(yaml.safe_dump({"id": "acme", "integrations": {
        "crm": {"kind": "hubspot", "token": {"env": "ACME_HUBSPOT_TOKEN"}, "base_url": base_url}}}))


def test_a_secret_not_set_and_a_token_refused_are_said_plainly(tmp_path: Path) -> None:
    with FakeHubSpot("pat-the-right-token") as hubspot:
        tenant_with_hubspot(tmp_path / "agents", hubspot.base_url)
        agents = str(tmp_path / "agents")
        unset = check("acme", tmp_path, VOXLOG_AGENTS_DIR=agents)
        assert unset.returncode == 1
        assert "environment variable ACME_HUBSPOT_TOKEN is not set" in unset.stdout
        refused = check("acme", tmp_path, VOXLOG_AGENTS_DIR=agents, ACME_HUBSPOT_TOKEN="pat-a-wrong-token")
        assert refused.returncode == 1
        assert "401" in refused.stdout
        assert "pat-a-wrong-token" not in refused.stdout + refused.stderr
        good = check("acme", tmp_path, VOXLOG_AGENTS_DIR=agents, ACME_HUBSPOT_TOKEN="pat-the-right-token")
        assert good.returncode == 0, good.stdout
    assert check("nobody", tmp_path).returncode == 2
