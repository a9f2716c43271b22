"""`voxlog compliance report`: what voxlog keeps of a tenant's callers, for how long, and what it erased,
when and why: the keystore's keys and tombstones, and every `caller.erased` in the log (read by its
header alone, so the scan decodes only erasures)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from consumers.backends import LogBackend
from consumers.event_reader import records_until_now
from schemas.codec import UndecodableMessage
from schemas.events import CallerErased
from schemas.sealing import AUDIO_DATA, PERSONAL_DATA
from schemas.topics import CALLS
from streams.config.tenants import TenantSpec
from streams.keystore.data_keys import DataKeyStore
from streams.keystore.retention import retention_days


def _when(ms: int | None) -> str | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


@dataclass
class ComplianceReport:
    tenant_id: str
    keystore: str
    retention_days: dict[str, int]
    live_keys: Counter[str] = field(default_factory=Counter)
    oldest_live: dict[str, str | None] = field(default_factory=dict)
    erasures: list[dict[str, Any]] = field(default_factory=list)
    retention_runs: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant_id, "keystore": self.keystore, "retention_days": self.retention_days,
                "live_keys": dict(self.live_keys), "oldest_live": self.oldest_live, "erasures": self.erasures,
                "retention_runs": self.retention_runs}


async def _erasures(backend: LogBackend, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's `caller.erased` events, as far as the calls topic goes now, oldest first."""
    found = []
    async for record in records_until_now(backend, [CALLS]):
        try:
            if backend.codec.schema_of(record.value)[0] != CallerErased.EVENT_TYPE:
                continue
            event = backend.codec.decode(record.value)
        except UndecodableMessage:
            continue  # dead-lettered by the projections; nothing of an erasure to report
        p = event.payload
        if event.tenant_id == tenant_id and isinstance(p, CallerErased):
            found.append({"erasure_id": event.call_id, "at": _when(p.erased_before_us // 1000),
                          "caller_key": p.caller_key, "keys_destroyed": p.keys_destroyed,
                          "requested_by": p.requested_by, "reason": p.reason})
    return sorted(found, key=lambda e: str(e["at"]))


async def compliance_report(backend: LogBackend, keys: DataKeyStore, tenant: TenantSpec) -> ComplianceReport:
    report = ComplianceReport(tenant.id, str(keys.path.parent), retention_days(tenant))
    shredded: dict[str, list[int]] = {}
    for key in keys.keys(tenant.id):
        if key.destroyed_ms is None:
            report.live_keys[key.kind] += 1
            report.oldest_live.setdefault(key.kind, _when(key.created_ms))
        elif key.destroyed_by and key.destroyed_by.startswith("retention:"):
            shredded.setdefault(key.destroyed_by, []).append(key.destroyed_ms)
    report.retention_runs = [{"by": by, "keys_destroyed": len(times), "first": _when(min(times)),
                              "last": _when(max(times))} for by, times in sorted(shredded.items())]
    report.erasures = await _erasures(backend, tenant.id)
    return report


def describe_retention(report: ComplianceReport) -> list[str]:
    """The report's retention lines, in words."""
    days = report.retention_days
    lines = []
    for kind, what in ((AUDIO_DATA, "callers' voice (audio chunks)"),
                       (PERSONAL_DATA, "numbers, words, tool arguments and results, memory")):
        kept = f"{days[kind]} days, then shredded" if kind in days else "until the caller is erased"
        oldest = report.oldest_live.get(kind)
        lines.append(f"{what}: kept {kept}; {report.live_keys[kind]} calls' keys live"
                     + (f", the oldest from {oldest}" if oldest else ""))
    return lines
