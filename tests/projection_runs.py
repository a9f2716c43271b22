"""What the projection suites share: calls written into the log as a gateway writes them, and what
projections made of them read back (tables, the files beside them)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

from consumers.backends import LogBackend
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import TopicPartition
from projections.store import AnalyticsStore
from projections.tables import ANALYST_TABLES, OFFSETS, Table
from voxlog.sim.synthetic_calls import synthetic_call


async def write_calls(log: LogBackend, tenant: str, count: int, *, first: int = 0,
                      pause_every: int = 0) -> list[str]:
    """Synthetic calls written as a gateway would, their events interleaved; returns the call ids."""
    ids = [f"call-{uuid.uuid4()}" for _ in range(count)]
    async with log.producer() as producer:
        writer = EventWriter(producer)
        recorders = [CallRecorder(writer, tenant_id=tenant, call_id=cid, producer="test", producer_version="0")
                     for cid in ids]
        streams = [list(synthetic_call(first + i, turns=2, frames_per_utterance=5)) for i in range(count)]
        written = 0
        while any(streams):
            for recorder, payloads in zip(recorders, streams, strict=True):
                if payloads:
                    await recorder.record(payloads.pop(0))
                    written += 1
                    if pause_every and written % pause_every == 0:
                        await producer.flush()
                        await asyncio.sleep(0.01)
        await producer.flush()
    return ids


async def snapshot(store: AnalyticsStore, tables: tuple[Table, ...] = ANALYST_TABLES, *,
                   versions: bool = False, tenant: str | None = None) -> dict[str, list[Any]]:
    """Each table's rows (FINAL), without `_version` unless `versions`; only `tenant`'s if given."""
    out = {}
    for table in tables:
        columns = [c for c in table.column_names if versions or c != "_version"]
        where = "WHERE tenant_id = {tenant:String} " if tenant is not None else ""
        result = await asyncio.to_thread(
            store.query, f"SELECT {', '.join(columns)} FROM {table.name} FINAL {where}"
            f"ORDER BY {', '.join(table.order_by)}", {"tenant": tenant} if tenant is not None else None)
        out[table.name] = result.rows
    return out


async def stored_offsets(store: AnalyticsStore, name: str) -> dict[TopicPartition, int]:
    """Where the projection `name` stored it is, per topic partition."""
    result = await asyncio.to_thread(store.query, f"SELECT topic, log_partition, next_offset FROM {OFFSETS.name} "
                                     "FINAL WHERE projection_name = {name:String}", {"name": name})
    return {TopicPartition(topic, int(partition)): int(offset) for topic, partition, offset in result.rows}


def another_store(store: AnalyticsStore) -> AnalyticsStore:
    """A database of its own beside `store`'s, in the same ClickHouse."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    store.command(f"CREATE DATABASE {database}")
    return AnalyticsStore(store.dsn, database=database)


def files(root: Path) -> dict[str, str]:
    """Every file under the folder, by path, with a digest of its bytes."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file()}
