"""Retention by crypto-shredding: each tenant's data keys older than its retention destroyed, each run
that destroyed any an audit record. Run hourly by the gateway's workers, and by `voxlog compliance
retention`. A key is as old as its call (its stream's first personal data)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from producers.event_writer import EventWriter, standalone_event
from schemas.events import AuditRecorded
from schemas.sealing import AUDIO_DATA, PERSONAL_DATA
from streams.config.tenants import TenantSpec
from streams.keystore.data_keys import DataKeyStore

DAY_MS = 86_400_000
RETENTION_INTERVAL_S = 3600.0
AUDIT_ACTION = "retention.shredded"


@dataclass(frozen=True)
class Shredded:
    tenant_id: str
    kind: str
    days: int
    created_before_ms: int
    keys: int


def retention_days(tenant: TenantSpec) -> dict[str, int]:
    """Days each kind of data key lives, where the tenant set a limit; personal data's covers audio too."""
    personal, audio = tenant.retention.personal_days, tenant.retention.audio_days
    days = {PERSONAL_DATA: personal} if personal else {}
    shortest_audio = min(d for d in (audio, personal) if d) if (audio or personal) else None
    if shortest_audio:
        days[AUDIO_DATA] = shortest_audio
    return days


async def enforce_retention(keys: DataKeyStore, tenants: Iterable[TenantSpec], writer: EventWriter, *, now_ms: int,
                            producer: str, producer_version: str) -> list[Shredded]:
    done = []
    for tenant in tenants:
        for kind, days in sorted(retention_days(tenant).items()):
            cutoff = now_ms - days * DAY_MS
            destroyed = keys.destroy_older(tenant.id, kind, created_before_ms=cutoff, by=f"retention:{kind}:{days}d")
            if not destroyed:
                continue
            done.append(Shredded(tenant.id, kind, days, cutoff, destroyed))
            when = dt.datetime.fromtimestamp(cutoff / 1000, dt.UTC).isoformat(timespec="seconds")
            payload = AuditRecorded(actor="retention", action=AUDIT_ACTION, resource=f"{kind} data keys",
                                    outcome="shredded", detail=f"{destroyed} keys of calls before {when} ({days} days)",
                                    remote_addr=None)
            await writer.append(standalone_event(payload, tenant_id=tenant.id, stream_id=f"retention-{uuid.uuid4()}",
                                                 producer=producer, producer_version=producer_version))
    await writer.flush()
    return done
