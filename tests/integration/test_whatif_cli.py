"""`voxlog replay whatif` as QA runs it: recorded calls on the log (both backends) re-run with an agent file."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import yaml

from consumers.backends import LogBackend
from producers.event_writer import EventWriter
from streams.config.agents import load_agents
from tests.integration.test_cli import voxlog
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.core_calls import CallerStep, play_call

DEMO = next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")
INJECTION = "<script>alert(1)</script> my internet is down"


def test_replay_whatif_reports_unchanged_calls_changed_ones_and_gates_on_change(
    backend: LogBackend, log_bootstrap: str | None, tmp_path: Path
) -> None:
    # A tenant of this test's own: on the shared broker, --all must find these calls and no others.
    agent = DEMO.model_copy(update={"tenant": f"qa{uuid.uuid4().hex[:10]}"})
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(agent.model_dump(mode="json")))
    reworded = tmp_path / "reworded.yaml"
    reworded.write_text(yaml.safe_dump({**agent.model_dump(mode="json"), "greeting": "Acme here. What broke?"}))
    steps = {"booking": (CallerStep("say", "i would like to book an appointment for tomorrow at 10 am"),
                         CallerStep("say", "no that's all thank you")),
             "ticket": (CallerStep("say", INJECTION), CallerStep("say", "goodbye")),
             "human": (CallerStep("say", "can i speak to a person"),)}
    prefix = uuid.uuid4().hex[:8]

    async def write() -> None:
        async with backend.producer() as producer:
            writer = EventWriter(producer)
            for name, said in steps.items():
                call = await play_call(agent, said, call_id=f"{prefix}-{name}", audio=True)
                for event in call.events:
                    await writer.append(event)
            await writer.flush()

    asyncio.run(write())
    unchanged = voxlog("replay", "whatif", "--all", "--agent", str(same), "--fail-on-change", home=tmp_path,
                       kafka=log_bootstrap)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert unchanged.stdout.strip().endswith("compared 3 calls, 0 changed")
    assert f"{prefix}-ticket: unchanged over 3 turns" in unchanged.stdout

    html = tmp_path / "report.html"
    changed = voxlog("replay", "whatif", "--all", "--agent", str(reworded), "--fail-on-change", "--out", str(html),
                     home=tmp_path, kafka=log_bootstrap)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert changed.stdout.strip().endswith("compared 3 calls, 3 changed")
    assert "turn 0 [FIRST DIFFERENCE]" in changed.stdout
    assert "after the first difference: the caller spoke to the old agent" in changed.stdout
    page = html.read_text()
    assert "compared 3 calls, 3 changed" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page

    report = tmp_path / "report.json"
    one = voxlog("replay", "whatif", f"{prefix}-booking", "--agent", str(reworded), "--out", str(report),
                 home=tmp_path, kafka=log_bootstrap)
    assert one.returncode == 0, one.stdout + one.stderr  # a change fails only with --fail-on-change
    document = json.loads(report.read_text())
    assert (document["compared"], document["changed"]) == (1, 1)
    call = document["calls"][0]
    assert call["first_difference"] == 0
    assert call["turns"][0]["now"][0]["text"].endswith("Acme here. What broke?")
    assert [turn["after_difference"] for turn in call["turns"]] == [False, True, True]

    other_tenant = voxlog("replay", "whatif", f"{prefix}-booking", "--agent", str(DEFAULT_AGENTS_DIR / "demo" /
                                                                                 "front-desk.yaml"),
                          home=tmp_path, kafka=log_bootstrap)
    assert "not compared: another tenant's call" in other_tenant.stdout
    assert other_tenant.stdout.strip().endswith("compared 0 calls, 0 changed, 1 not compared")

    bad = voxlog("replay", "whatif", "--all", "--agent", str(same), "--out", str(tmp_path / "r.txt"), home=tmp_path)
    assert bad.returncode == 2
    assert "--out must end in .json or .html" in bad.stderr
