"""A caller's erasure, on both logs into real chDB: their memory and their earlier calls' rows leave
every table, another caller's stay, a later call of theirs stays, the erasure is audited, and a
restart or a rebuild from offset zero keeps them erased."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path
from typing import Any

from consumers.backends import EmbeddedBackend, LogBackend
from consumers.event_reader import read_call
from producers.event_writer import CallRecorder, EventWriter
from projections.audit import AuditProjection
from projections.caller_memory import MemoryProjection
from projections.calls import CallsProjection
from projections.projection_runner import ProjectionRunner
from projections.recordings import RecordingsProjection, recording_path
from projections.store import AnalyticsStore
from projections.tables import (
    AUDIT_LOG,
    CALLER_MEMORY,
    CALLS,
    ERASURES,
    ERRORS,
    RECORDINGS,
    TOOL_CALLS,
    TRANSCRIPTS,
    TURNS,
)
from schemas.events import CallerErased, CallStarted, CallSummarized
from streams.keystore.shredding import request_erasure
from streams.memory import caller_key
from tests.integration.test_cli import voxlog
from tests.integration.test_outbound_calls import api, stream_of
from voxlog.settings import Settings
from voxlog.sim.stack import local_stack
from voxlog.sim.synthetic_calls import synthetic_call

ERASED, KEPT = "+15557000001", "+15557000002"
PER_CALL_TABLES = (CALLS, TURNS, TRANSCRIPTS, TOOL_CALLS, ERRORS, RECORDINGS)


async def write_call(writer: EventWriter, tenant: str, number: str, index: int) -> str:
    """A synthetic call of `number` (with tool calls, transcripts, turns), and its summary."""
    call_id = f"call-{uuid.uuid4()}"
    recorder = CallRecorder(writer, tenant_id=tenant, call_id=call_id, producer="test", producer_version="0")
    for payload in synthetic_call(index * 3, turns=2, frames_per_utterance=2):  # index * 3: a phone call
        if isinstance(payload, CallStarted):
            payload = dataclasses.replace(payload, from_number=number)
        await recorder.record(payload)
    key = caller_key(tenant, number)
    assert key is not None
    memory = CallRecorder(writer, tenant_id=tenant, call_id=key, producer="test", producer_version="0",
                          next_seq=index)
    await memory.record(CallSummarized(call_id=call_id, agent_id="front-desk", summary=f"call {index}",
                                       outcome="resolved", source="offline-extractive"))
    await writer.flush()
    return call_id


async def project(log: LogBackend, store: AnalyticsStore, recordings: Path, *, rebuild: bool = False) -> None:
    # The calls first: the recordings projection finds an erased caller's calls in `calls`.
    for projection in (CallsProjection(), MemoryProjection(), AuditProjection(), RecordingsProjection(recordings)):
        runner = ProjectionRunner(log, store, projection)
        await (runner.rebuild() if rebuild else runner.run(asyncio.Event(), until_caught_up=True))


def rows_of(store: AnalyticsStore, tenant: str) -> dict[str, set[str]]:
    """Which calls each per-call table holds for the tenant, and whose memory is kept."""
    found = {table.name: {r[0] for r in store.query(
        f"SELECT DISTINCT call_id FROM {table.name} FINAL WHERE tenant_id = {{t:String}}", {"t": tenant}).rows}
        for table in PER_CALL_TABLES}
    found["caller_memory"] = {r[0] for r in store.query(
        f"SELECT call_id FROM {CALLER_MEMORY.name} FINAL WHERE tenant_id = {{t:String}}", {"t": tenant}).rows}
    return found


async def test_an_erased_caller_is_gone_from_every_table_and_stays_gone(backend: LogBackend, store: AnalyticsStore,
                                                                         tmp_path: Path) -> None:
    tenant, recordings = f"t{uuid.uuid4().hex[:8]}", tmp_path / "recordings"
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        erased_calls = [await write_call(writer, tenant, ERASED, i) for i in range(2)]
        kept_calls = [await write_call(writer, tenant, KEPT, i) for i in range(2)]
    await project(backend, store, recordings)
    before = rows_of(store, tenant)
    for table in ("calls", "turns", "transcripts", "tool_calls", "caller_memory", "recordings"):
        assert set(erased_calls) <= before[table], table
    assert all(recording_path(recordings, tenant, c).exists() for c in erased_calls + kept_calls)

    async with backend.producer() as producer:
        writer = EventWriter(producer)
        _, payload = await request_erasure(writer, tenant, ERASED, requested_by="cli:dpo",
                                           reason="data subject request", producer="test", producer_version="0")
        later = await write_call(writer, tenant, ERASED, 2)  # after the erasure: remembered anew
    await project(backend, store, recordings)

    def check() -> None:
        after = rows_of(store, tenant)
        for table, calls in after.items():
            assert not calls & set(erased_calls), f"{table} still holds an erased call"
        for table, calls in before.items():
            assert calls & set(kept_calls) <= after[table], f"{table} lost another caller's rows"
        for table in ("calls", "turns", "transcripts", "caller_memory", "recordings"):
            assert later in after[table], f"{table} lost the call after the erasure"
        assert not any(recording_path(recordings, tenant, c).exists() for c in erased_calls), "a WAV is left"
        assert all(recording_path(recordings, tenant, c).exists() for c in [*kept_calls, later])
        (erasure_row,) = store.query(f"SELECT caller_key, requested_by, reason FROM {ERASURES.name} FINAL "
                                     "WHERE tenant_id = {t:String}", {"t": tenant}).rows
        assert erasure_row == (payload.caller_key, "cli:dpo", "data subject request")
        audit: list[Any] = store.query(f"SELECT actor, resource, outcome FROM {AUDIT_LOG.name} FINAL "
                                       "WHERE tenant_id = {t:String} AND action = 'caller.erased'", {"t": tenant}).rows
        assert audit == [("cli:dpo", payload.caller_key, "erased")]

    check()
    await project(backend, store, recordings)  # a restart: the erasure is known from `erasures`, nothing comes back
    check()
    await project(backend, store, recordings, rebuild=True)  # from offset zero: the calls come before their erasure
    check()


async def test_a_tenant_asks_for_an_erasure_through_the_api(tmp_path: Path) -> None:
    async with local_stack(Settings(home=tmp_path)) as stack:
        refused = await api(stack, "POST", "/v1/erasures", key=None, json={"number": ERASED})
        assert refused.status_code == 401
        assert (await api(stack, "POST", "/v1/erasures", json={"number": "555-0100"})).status_code == 422
        accepted = await api(stack, "POST", "/v1/erasures", json={"number": ERASED, "reason": "asked by phone"})
        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        assert body["caller_key"] == caller_key("demo", ERASED)
        (event,) = await stream_of(stack, body["erasure_id"])
    assert isinstance(event.payload, CallerErased)
    assert (event.tenant_id, event.payload.caller_key, event.payload.reason) == ("demo", body["caller_key"],
                                                                                   "asked by phone")
    assert event.payload.requested_by.startswith("api-key:")
    assert event.payload.erased_before_us == body["erased_before_us"]


def test_an_operator_erases_a_caller_from_the_command_line(embedded_backend: EmbeddedBackend, tmp_path: Path) -> None:
    refused = voxlog("erase", "--tenant", "demo", "--number", "5550100", home=tmp_path)
    assert refused.returncode == 2
    assert "not an E.164 number" in refused.stderr
    done = voxlog("erase", "--tenant", "demo", "--number", ERASED, "--reason", "retention", home=tmp_path)
    assert done.returncode == 0, done.stderr
    erasure_id = done.stdout.split(":")[0].strip()

    async def read() -> list[Any]:
        async with embedded_backend.admin() as admin:
            return (await read_call(admin, erasure_id)).events

    (event,) = asyncio.run(read())
    assert isinstance(event.payload, CallerErased)
    assert event.payload.caller_key == caller_key("demo", ERASED)
    assert event.payload.requested_by.startswith("cli:")
