"""What changed in the operators' configuration (agent files, tenant files) since it was last
recorded: pure, so that what the gateway records at start is decided apart from any I/O.

Each agent and each tenant is one configuration item, keyed `agent:<tenant>/<id>` or
`tenant:<id>`, with its content hash and its whole document (what the files say once validated:
API keys appear as the digests the tenant file holds, never as keys). The configuration log (a
compacted topic) keeps the last recorded document of each item; comparing it with what is loaded
now gives the changes, and each change names the fields that differ, for the audit trail.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from streams.config.agents import AgentSpec, canonical_json, content_hash
from streams.config.tenants import TenantSpec

ChangeKind = Literal["added", "changed", "removed"]
MAX_FIELDS_LISTED = 20


@dataclass(frozen=True)
class ConfigItem:
    key: str
    tenant_id: str
    document: dict[str, Any]

    @property
    def version(self) -> str:
        return content_hash(self.document)

    def to_json(self) -> bytes:
        return canonical_json({"key": self.key, "tenant_id": self.tenant_id, "document": self.document}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ConfigItem:
        """Raises ValueError on a value that is not a configuration item."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("document"), dict):
            raise ValueError("not a configuration item")
        return cls(str(raw["key"]), str(raw["tenant_id"]), raw["document"])


@dataclass(frozen=True)
class ConfigChange:
    item: ConfigItem
    """The item as it is now (for a removal: as it was)."""
    kind: ChangeKind
    old_version: str
    new_version: str
    fields: tuple[str, ...]
    """Dotted paths of what differs (`prompts.task`, `tools[2]`, ...); empty for added or removed."""

    @property
    def action(self) -> str:
        return f"config.{self.item.key.split(':', 1)[0]}_{self.kind}"

    @property
    def detail(self) -> str:
        listed = ", ".join(self.fields[:MAX_FIELDS_LISTED])
        more = f" and {len(self.fields) - MAX_FIELDS_LISTED} more" if len(self.fields) > MAX_FIELDS_LISTED else ""
        changed = f"; changed: {listed}{more}" if self.fields else ""
        return f"{self.old_version or '-'} -> {self.new_version or '-'}{changed}"


def config_items(agents: Iterable[AgentSpec], tenants: Iterable[TenantSpec]) -> dict[str, ConfigItem]:
    items = [ConfigItem(f"agent:{a.tenant}/{a.id}", a.tenant, a.versioned_document()) for a in agents]
    items += [ConfigItem(f"tenant:{t.id}", t.id, t.model_dump(mode="json")) for t in tenants]
    return {item.key: item for item in items}


def config_changes(recorded: Mapping[str, ConfigItem], current: Mapping[str, ConfigItem]) -> list[ConfigChange]:
    """From what was last recorded to what is loaded now, in key order."""
    changes: list[ConfigChange] = []
    for key in sorted(recorded.keys() | current.keys()):
        old, new = recorded.get(key), current.get(key)
        if old is None and new is not None:
            changes.append(ConfigChange(new, "added", "", new.version, ()))
        elif new is None and old is not None:
            changes.append(ConfigChange(old, "removed", old.version, "", ()))
        elif old is not None and new is not None and old.version != new.version:
            changes.append(ConfigChange(new, "changed", old.version, new.version,
                                        tuple(differing_fields(old.document, new.document))))
    return changes


def differing_fields(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON documents differ, as deep as both are the same kind of container."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for name in sorted(old.keys() | new.keys()):
            here = f"{path}.{name}" if path else str(name)
            if name not in old or name not in new:
                out.append(here)
            else:
                out += differing_fields(old[name], new[name], here)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [f for i, (a, b) in pairs for f in differing_fields(a, b, f"{path}[{i}]")]
    return [] if canonical_json(old) == canonical_json(new) else [path or "."]  # True == 1, "true" != "1"
