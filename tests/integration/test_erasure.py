"""A caller's erasure, on both logs into real chDB: their data keys are destroyed, so nothing of theirs
can be read from the log's bytes any more; their memory and their earlier calls' rows leave every
table, another caller's stay, a later call of theirs stays, the erasure is audited, and a restart or a
rebuild from offset zero keeps them erased."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import uuid
from pathlib import Path
from typing import Any

from consumers.backends import EmbeddedBackend, LogBackend
from consumers.event_reader import read_call, records_until_now
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogRecord
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
from schemas.codec import UndecodableMessage
from schemas.events import (
    CallerAudioChunk,
    CallerErased,
    CallStarted,
    CallSummarized,
    TranscriptFinal,
    TurnTaken,
)
from schemas.topics import TOPICS
from streams.call.replay import verify_call
from streams.config.agents import load_agents
from streams.keystore.shredding import request_erasure
from streams.memory import caller_key
from tests.integration.test_cli import voxlog
from tests.integration.test_outbound_calls import api, stream_of
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings
from voxlog.sim.stack import local_stack
from voxlog.sim.synthetic_calls import synthetic_call

ERASED, KEPT = "+15557000001", "+15557000002"
PER_CALL_TABLES = (CALLS, TURNS, TRANSCRIPTS, TOOL_CALLS, ERRORS, RECORDINGS)


async def write_call(writer: EventWriter, tenant: str, number: str, index: int, *, said: str = "",
                     voice: bytes = b"") -> str:
    """A synthetic call of `number` (with tool calls, transcripts, turns), and its summary; the caller
    says `said` in every transcript, and speaks `voice` as their audio, where given."""
    call_id = f"call-{uuid.uuid4()}"
    recorder = CallRecorder(writer, tenant_id=tenant, call_id=call_id, producer="test", producer_version="0")
    for payload in synthetic_call(index * 3, turns=2, frames_per_utterance=2):  # index * 3: a phone call
        match payload:
            case CallStarted():
                payload = dataclasses.replace(payload, from_number=number, caller_key=caller_key(tenant, number))
            case TranscriptFinal() if said:
                payload = dataclasses.replace(payload, text=f"{payload.text} {said}")
            case TurnTaken() if said:
                payload = dataclasses.replace(payload, caller_text=f"{payload.caller_text} {said}")
            case CallerAudioChunk() if voice:
                payload = dataclasses.replace(payload, audio=voice)
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
        _, payload = await request_erasure(writer, backend.keys, tenant, ERASED, requested_by="cli:dpo",
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


async def every_record(backend: LogBackend) -> list[LogRecord]:
    """Every record of every topic, as any reader of the log (a replica, a backup) can have it."""
    return [record async for record in records_until_now(backend, list(TOPICS))]


def readable(backend: LogBackend, records: list[LogRecord], tenant: str) -> bytes:
    """What a reader with the keystore gets out of the tenant's records: each event's fields, as bytes
    (the test broker holds other tests' tenants, some with the same numbers)."""
    out = io.BytesIO()
    for record in records:
        try:
            event = backend.codec.decode(record.value)
        except UndecodableMessage:
            continue  # other tests' deliberately broken messages (dead letters)
        if event.tenant_id != tenant:
            continue
        out.write(repr(event).encode())
        for value in event.payload.to_avro().values():
            out.write(value if isinstance(value, bytes) else repr(value).encode())
    return out.getvalue()


def tables_text(store: AnalyticsStore, tenant: str) -> str:
    """Every row of every table of the tenant, as text."""
    text = []
    for (table,) in store.query("SELECT name FROM system.tables WHERE database = currentDatabase()").rows:
        columns = {c for (c,) in store.query(f"SELECT name FROM system.columns WHERE table = '{table}' "
                                             "AND database = currentDatabase()").rows}
        where = " WHERE tenant_id = {t:String}" if "tenant_id" in columns else ""
        text.append(repr(store.query(f"SELECT * FROM {table}{where}", {"t": tenant}).rows))
    return "\n".join(text)


async def test_after_an_erasure_nothing_of_the_caller_can_be_read_from_any_copy(
        backend: LogBackend, store: AnalyticsStore, tmp_path: Path) -> None:
    """The caller's number, words and voice: never in the log's bytes (sealed), readable with the keystore
    before the erasure and by nobody after it, in no table, no recording; another caller's stay readable."""
    tenant, recordings = f"t{uuid.uuid4().hex[:8]}", tmp_path / "recordings"
    # Letters only: a run of digits in a word is redacted from the tables as a possible number.
    erased_words, kept_words = (f"{animal}{''.join(chr(97 + int(c, 16)) for c in uuid.uuid4().hex[:12])}"
                                for animal in ("zebra", "okapi"))
    erased_voice, kept_voice = os.urandom(160), os.urandom(160)
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        erased_calls = [await write_call(writer, tenant, ERASED, i, said=erased_words, voice=erased_voice)
                        for i in range(2)]
        kept_calls = [await write_call(writer, tenant, KEPT, i, said=kept_words, voice=kept_voice) for i in range(2)]
    await project(backend, store, recordings)
    secrets = (ERASED.encode(), erased_words.encode(), erased_voice)

    records = await every_record(backend)
    ours = {c.encode() for c in erased_calls + kept_calls}
    ours |= {(caller_key(tenant, n) or "").encode() for n in (ERASED, KEPT)}

    def raw(of: list[LogRecord]) -> bytes:
        return b"".join(r.value + (r.key or b"") + b"".join(v for _, v in r.headers) for r in of)

    everything, this_test = raw(records), raw([r for r in records if r.key in ours])
    for secret in (erased_words.encode(), erased_voice, kept_words.encode(), kept_voice):
        assert secret not in everything, "personal data in the clear in the log's bytes"
    for number in (ERASED, KEPT):  # other tests' callers may have these numbers (the test broker is shared)
        assert number.encode() not in this_test, "a number in the clear in the log's bytes"
    before = readable(backend, await every_record(backend), tenant)
    assert all(secret in before for secret in secrets), "the keystore opens the caller's data before the erasure"
    assert erased_words in tables_text(store, tenant)

    async with backend.producer() as producer:
        _, erasure = await request_erasure(EventWriter(producer), backend.keys, tenant, ERASED, requested_by="cli:dpo",
                                           reason="data subject request", producer="test", producer_version="0")
    assert erasure.keys_destroyed == 2 * 2 + 1  # each call's personal and audio keys, and their memory's
    await project(backend, store, recordings)

    after = readable(backend, await every_record(backend), tenant)
    for secret in secrets:
        assert secret not in after, "the erased caller's data is still readable from the log"
    for kept in (KEPT.encode(), kept_words.encode(), kept_voice):
        assert kept in after, "another caller's data was lost"
    async with backend.admin() as admin:
        for call_id in erased_calls:
            events = (await read_call(admin, call_id)).events
            assert events, "the erased calls' events stay in the log, in order"
            assert [e.seq for e in events] == list(range(len(events)))
            assert verify_call(events, load_agents(DEFAULT_AGENTS_DIR)[0]).erased
    for _ in range(2):  # as projected, then rebuilt from offset zero
        text = tables_text(store, tenant)
        assert ERASED not in text
        assert erased_words not in text
        assert kept_words in text
        assert not any(recording_path(recordings, tenant, c).exists() for c in erased_calls)
        assert all(recording_path(recordings, tenant, c).exists() for c in kept_calls)
        await project(backend, store, recordings, rebuild=True)
