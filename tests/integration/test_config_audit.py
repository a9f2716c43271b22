"""Configuration changes reach the audit trail: a gateway that starts with agents or tenants that
differ from what the configuration log last recorded audits each difference, once, on both logs."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumers.backends import LogBackend, ensure_topics
from gateway.config_audit import record_config_changes, recorded_config
from producers.event_writer import EventWriter
from projections.audit import AuditProjection, verify_chain
from projections.projection_runner import ProjectionRunner
from projections.store import AnalyticsStore
from projections.tables import AUDIT_LOG
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from streams.config.agents import load_agents
from streams.config.config_changes import ConfigItem, config_items
from streams.config.tenants import load_tenants
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings
from voxlog.sim.stack import local_stack

pytestmark = pytest.mark.slow


def tenant_agents(folder: Path, tenant: str) -> Path:
    """The demo agents and tenant file, as tenant `tenant` (so that a shared broker's other tests'
    configuration never mixes with this test's)."""
    shutil.copytree(DEFAULT_AGENTS_DIR / "demo", folder / tenant)
    for path in (folder / tenant).glob("*.yaml"):
        document = yaml.safe_load(path.read_text())
        document["tenant" if path.name != "tenant.yaml" else "id"] = tenant
        document.pop("routing", None)  # the demo's numbers and widget keys belong to the demo
        document.pop("api_keys", None)
        path.write_text(yaml.safe_dump(document))
        if path.name == "front-desk.yaml":  # a second agent, for a test to remove
            (folder / tenant / "night-desk.yaml").write_text(yaml.safe_dump({**document, "id": "night-desk"}))
    return folder


def items_of(folder: Path) -> dict[str, ConfigItem]:
    return config_items(load_agents(folder), load_tenants(folder).values())


async def audit_records(log: LogBackend, tenant: str) -> list[AuditRecorded]:
    codec, found = EventCodec(), []
    async with log.consumer([AUDIT], auto_offset_reset="earliest") as consumer:
        ends = await _ends(log)
        seen: dict[int, int] = {}
        while any(seen.get(p, 0) < end for p, end in ends.items()):
            for record in await consumer.poll(timeout_s=1.0, max_records=5000):
                seen[record.partition] = record.offset + 1
                event = codec.decode(record.value)
                if event.tenant_id == tenant and isinstance(event.payload, AuditRecorded):
                    found.append(event.payload)
    return found


async def _ends(log: LogBackend) -> dict[int, int]:
    async with log.admin() as admin:
        return await admin.end_offsets(AUDIT)


async def test_each_change_is_audited_once_and_chained(backend: LogBackend, store: AnalyticsStore,
                                                       tmp_path: Path) -> None:
    tenant = f"cfg{uuid.uuid4().hex[:8]}"
    folder = tenant_agents(tmp_path / "agents", tenant)
    mine = lambda items: {k: v for k, v in items.items() if v.tenant_id == tenant}  # noqa: E731

    async with backend.admin() as admin:
        await ensure_topics(admin)  # as the gateway does before it audits its configuration
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        first = await record_config_changes(backend, writer, items_of(folder), actor="test")
        assert sorted((c.item.key, c.kind) for c in first if c.item.tenant_id == tenant) == sorted(
            [(f"agent:{tenant}/{a.id}", "added") for a in load_agents(folder)] + [(f"tenant:{tenant}", "added")])
        assert mine(await recorded_config(backend)) == mine(items_of(folder))

        again = await record_config_changes(backend, writer, items_of(folder), actor="test")
        assert [c for c in again if c.item.tenant_id == tenant] == [], "an unchanged configuration is not audited"

        agent_file = folder / tenant / "front-desk.yaml"
        agent: dict[str, Any] = yaml.safe_load(agent_file.read_text())
        agent["prompts"]["task"] += " Always confirm the caller's postcode."
        agent_file.write_text(yaml.safe_dump(agent))
        before = set(mine(items_of(folder)))
        for path in (folder / tenant).glob("*.yaml"):
            if path.name not in ("tenant.yaml", "front-desk.yaml"):
                path.unlink()
        removed = before - set(mine(items_of(folder)))
        assert removed == {f"agent:{tenant}/night-desk"}
        changed = [c for c in await record_config_changes(backend, writer, items_of(folder), actor="test")
                   if c.item.tenant_id == tenant]
        assert sorted((c.item.key, c.kind) for c in changed) == sorted(
            [(f"agent:{tenant}/front-desk", "changed"), *((key, "removed") for key in removed)])
        assert mine(await recorded_config(backend)) == mine(items_of(folder)), "removed items are gone from the log"
        (edit,) = [c for c in changed if c.kind == "changed"]
        assert edit.fields == ("prompts.task",)

    records = await audit_records(backend, tenant)
    actions = [(r.action, r.resource, r.outcome) for r in records]
    assert (("config.agent_changed", f"agent:{tenant}/front-desk", "changed") in actions)
    assert sum(1 for a in actions if a[2] == "added") == len([c for c in first if c.item.tenant_id == tenant])
    assert len(records) == len([c for c in first if c.item.tenant_id == tenant]) + len(changed)
    assert any("prompts.task" in r.detail for r in records)

    await ProjectionRunner(backend, store, AuditProjection()).run(asyncio.Event(), until_caught_up=True)
    rows = store.query(f"SELECT * EXCEPT _version FROM {AUDIT_LOG.name} FINAL WHERE tenant_id = {{t:String}} "
                       "ORDER BY source, chain_index", {"t": tenant}).rows
    assert len(rows) == len(records)
    assert verify_chain([(*r, 0) for r in rows]) == []


async def test_a_gateway_audits_the_configuration_it_starts_with(log_bootstrap: str | None, tmp_path: Path) -> None:
    tenant = f"cfg{uuid.uuid4().hex[:8]}"
    folder = tenant_agents(tmp_path / "agents", tenant)
    settings = Settings(home=tmp_path / "home", agents_dir=folder,
                        kafka_bootstrap=log_bootstrap)
    async with local_stack(settings) as stack:
        backend = stack.gateway.backend
    records = await audit_records(backend, tenant)
    assert {(r.action, r.outcome) for r in records} == {("config.agent_added", "added"),
                                                         ("config.tenant_added", "added")}
    assert all(r.actor.startswith("config-files@") for r in records)
    async with local_stack(settings):
        pass
    assert len(await audit_records(backend, tenant)) == len(records), "a restart with the same files audits nothing"

