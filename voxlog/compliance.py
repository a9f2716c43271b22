"""`voxlog compliance report`: what voxlog keeps of a tenant's callers, for how long, and what it erased,
when and why, from the keystore (every data key and tombstone) and the erasures' own events in the log."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from consumers.backends import LogBackend
from consumers.event_reader import read_call
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


async def compliance_report(backend: LogBackend, keys: DataKeyStore, tenant: TenantSpec) -> ComplianceReport:
    report = ComplianceReport(tenant.id, str(keys.path.parent), retention_days(tenant))
    destroyed: dict[str, list[int]] = {}
    for key in keys.keys(tenant.id):
        if key.destroyed_ms is None:
            report.live_keys[key.kind] += 1
            report.oldest_live.setdefault(key.kind, _when(key.created_ms))
        else:
            destroyed.setdefault(key.destroyed_by or "?", []).append(key.destroyed_ms)
    async with backend.admin() as admin:
        for by, times in sorted(destroyed.items(), key=lambda item: max(item[1])):
            if by.startswith("erasure-"):
                events = (await read_call(admin, by, topics=(CALLS,))).events
                erased = next((e.payload for e in events if isinstance(e.payload, CallerErased)), None)
                report.erasures.append({
                    "erasure_id": by, "keys_destroyed": len(times), "at": _when(max(times)),
                    "caller_key": erased.caller_key if erased else None,
                    "requested_by": erased.requested_by if erased else None,
                    "reason": erased.reason if erased else "(its caller.erased event is not in the log)"})
            else:
                report.retention_runs.append({"by": by, "keys_destroyed": len(times), "first": _when(min(times)),
                                              "last": _when(max(times))})
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
