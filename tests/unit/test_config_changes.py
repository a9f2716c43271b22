"""What the gateway audits at start: the differences between recorded and loaded configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from streams.config.agents import content_hash, load_agents
from streams.config.config_changes import ConfigItem, config_changes, config_items, differing_fields
from streams.config.tenants import TenantSpec

AGENTS = Path(__file__).resolve().parents[2] / "voxlog" / "agents"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)
documents = st.dictionaries(st.text(max_size=4), json_values, max_size=4)


def item(document: dict[str, Any], key: str = "agent:t/a") -> ConfigItem:
    return ConfigItem(key, "t", document)


def test_an_agent_items_version_is_the_agent_version_its_calls_record() -> None:
    agents = load_agents(AGENTS)
    items = config_items(agents, [TenantSpec(id="demo")])
    for agent in agents:
        assert items[f"agent:{agent.tenant}/{agent.id}"].version == agent.version
    assert "tenant:demo" in items


def test_a_field_added_later_keeps_the_old_version_where_it_keeps_the_old_behaviour() -> None:
    """An agent recorded before `vad` existed took turns by the energy judge: set back to it, it keeps
    that version (its calls still replay as recorded). Silero, the default since, is a version of its own."""
    agent = next(a for a in load_agents(AGENTS) if a.id == "front-desk")
    assert agent.vad == "silero"
    assert agent.versioned_document()["vad"] == "silero"
    energy = agent.model_copy(update={"vad": "energy"})
    before_vad = {k: v for k, v in energy.model_dump(mode="json").items() if k != "vad"}
    assert energy.version == content_hash(before_vad)
    assert "vad" not in energy.versioned_document()
    assert agent.version != energy.version


def test_added_changed_and_removed_items_are_told_apart_with_the_fields_that_changed() -> None:
    recorded = {"agent:t/a": item({"prompts": {"task": "old", "persona": "p"}, "tools": [{"name": "x"}]}),
                "agent:t/gone": item({"id": "gone"}, "agent:t/gone")}
    current = {"agent:t/a": item({"prompts": {"task": "new", "persona": "p"}, "tools": [{"name": "y"}]}),
               "tenant:t": item({"id": "t"}, "tenant:t")}
    changes = {c.item.key: c for c in config_changes(recorded, current)}
    assert {k: c.kind for k, c in changes.items()} == {"agent:t/a": "changed", "agent:t/gone": "removed",
                                                       "tenant:t": "added"}
    changed = changes["agent:t/a"]
    assert changed.fields == ("prompts.task", "tools[0].name")
    assert changed.action == "config.agent_changed"
    assert changed.detail == f"{recorded['agent:t/a'].version} -> {current['agent:t/a'].version}; " \
                             "changed: prompts.task, tools[0].name"
    assert changes["agent:t/gone"].detail.endswith("-> -")
    assert changes["tenant:t"].action == "config.tenant_added"


def test_nothing_changed_is_no_change() -> None:
    items = config_items(load_agents(AGENTS), [TenantSpec(id="demo")])
    assert config_changes(items, dict(items)) == []


@given(documents, documents)
def test_fields_differ_exactly_when_versions_do(old: dict[str, Any], new: dict[str, Any]) -> None:
    changes = config_changes({"agent:t/a": item(old)}, {"agent:t/a": item(new)})
    fields = differing_fields(old, new)
    if item(old).version == item(new).version:
        assert changes == []
        assert fields == []
    else:
        assert [c.kind for c in changes] == ["changed"]
        assert fields
        assert changes[0].fields == tuple(fields)


@given(documents)
def test_an_item_survives_its_json(document: dict[str, Any]) -> None:
    original = item(document)
    assert ConfigItem.from_json(original.to_json()) == original


def test_values_equal_in_python_but_not_in_json_differ() -> None:
    assert differing_fields({"a": True}, {"a": 1}) == ["a"]
    assert differing_fields([0.0], [0]) == ["[0]"]
