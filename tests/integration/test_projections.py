"""Projections into real ClickHouse (chDB), from both log backends: the tables hold what the log
says, once each; killing the projector at random points while calls flow loses and doubles
nothing; a rebuild gives identical tables, `_version` included; the audit chain finds tampering."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from consumers.backends import EmbeddedBackend, LogBackend
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogRecord, TopicPartition
from projections.audit import AuditProjection, verify_chain
from projections.calls import CallsFold, CallsProjection
from projections.default_projections import default_projections
from projections.projection_runner import ProjectionRunner, RowBatch
from projections.store import AnalyticsStore
from projections.tables import ANALYST_TABLES, AUDIT_LOG, TURNS
from schemas.base import Event, EventPayload
from schemas.events import (
    AuditRecorded,
    CallEnded,
    CallStarted,
    ErrorRaised,
    ToolRequested,
    ToolSucceeded,
    TranscriptFinal,
    TtsRequested,
    TurnTaken,
)
from schemas.topics import CALLS as CALLS_TOPIC
from schemas.topics import COMMANDS, DEADLETTER
from tests.projection_runs import snapshot, write_calls
from tests.unit.test_redaction import SEEDED
from voxlog.sim.synthetic_calls import synthetic_call

pytestmark = pytest.mark.slow


async def project(log: LogBackend, store: AnalyticsStore) -> None:
    for projection in default_projections(recordings=Path(tempfile.mkdtemp(prefix="voxlog-recordings-"))):
        await ProjectionRunner(log, store, projection).run(asyncio.Event(), until_caught_up=True)


async def test_the_tables_hold_what_the_log_says(backend: LogBackend, store: AnalyticsStore) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    ids = await write_calls(backend, tenant, 6)
    await project(backend, store)
    tables = {name: [r for r in rows if r[0] == tenant] for name, rows in (await snapshot(store)).items()}
    calls = tables["calls"]
    assert sorted(r[1] for r in calls) == sorted(ids)
    assert all(r[CALL_COLUMN["end_reason"]] == "caller_hangup" for r in calls)
    assert all(r[CALL_COLUMN["turns"]] == 2 for r in calls)
    assert all(r[CALL_COLUMN["from_number"]].count("*") >= 6 or r[CALL_COLUMN["from_number"]] == "" for r in calls), \
        "numbers are masked"
    turns = tables["turns"]
    assert len(turns) == 12
    v2v = [r[TURN_COLUMN["voice_to_voice_ms"]] for r in turns]
    assert all(v is not None and v >= 0 for v in v2v)
    assert sum(r[TURN_COLUMN["barge_in"]] for r in turns) == sum(1 for i in range(6) if i % 4 == 1)
    speakers = [r[4] for r in tables["transcripts"]]
    assert speakers.count("caller") == 12
    assert speakers.count("agent") == 12
    tools = tables["tool_calls"]
    assert tools
    assert all(r[TOOL_COLUMN["outcome"]] == "succeeded" for r in tools)
    assert all(r[TOOL_COLUMN["requested_at"]] is not None for r in tools), "request (commands) and result merged"
    audit = tables["audit_log"]
    assert sum(1 for r in audit if r[AUDIT_COLUMN["action"]] == "consent.given") == 6


CALL_COLUMN = {name: i for i, name in enumerate(ANALYST_TABLES[0].column_names)}
TURN_COLUMN = {name: i for i, name in enumerate(ANALYST_TABLES[1].column_names)}
TOOL_COLUMN = {name: i for i, name in enumerate(ANALYST_TABLES[3].column_names)}
AUDIT_COLUMN = {name: i for i, name in enumerate(AUDIT_LOG.column_names)}


async def test_killing_the_projector_loses_and_doubles_nothing(embedded_backend: EmbeddedBackend,
                                                               store: AnalyticsStore) -> None:
    log = embedded_backend
    rng = random.Random(11)
    writing = asyncio.create_task(write_calls(log, "demo", 40, pause_every=50))
    kills = 0
    while kills < 24:
        stop = asyncio.Event()
        runner = ProjectionRunner(log, store, CallsProjection(), batch_rows=rng.choice([50, 200, 1000]),
                                  flush_s=rng.choice([0.05, 0.2]))
        running = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        running.cancel()  # a crash: wherever it was, no flush, no goodbye
        with pytest.raises(asyncio.CancelledError):
            await running
        kills += 1
    await writing
    await ProjectionRunner(log, store, CallsProjection()).run(asyncio.Event(), until_caught_up=True)
    after_kills = await snapshot(store, CallsProjection.tables)
    versions_after_kills = await snapshot(store, CallsProjection.tables, versions=True)

    assert len(after_kills["calls"]) == 40
    assert len(after_kills["turns"]) == 80
    assert len(after_kills["transcripts"]) == 160
    keys = [(r[0], r[1], r[2]) for r in after_kills["transcripts"]]
    assert len(keys) == len(set(keys)), "no row twice"

    told: list[tuple[int, int | None]] = []  # what `voxlog projections rebuild` shows as progress
    runner = ProjectionRunner(log, store, CallsProjection(), on_progress=lambda read, total: told.append((read, total)))
    await runner.rebuild()
    assert await snapshot(store, CallsProjection.tables) == after_kills, "a rebuild from offset zero gives the same"
    assert [read for read, _ in told] == sorted(read for read, _ in told), "told after each batch read"
    assert told[-1] == (runner.events, runner.events), "at the end, all the records the log held"
    assert await snapshot(store, CallsProjection.tables, versions=True) == versions_after_kills, "versions too"


async def test_projecting_as_calls_are_written_gives_the_rebuilds_rows_versions_included(
    backend: LogBackend, store: AnalyticsStore
) -> None:
    """The calls projection started again after every few events of each call (a restart from the
    stored offsets, calls picked up mid-way, voxlog.calls and voxlog.commands read apart) ends with
    the rows a rebuild from offset zero gives, `_version` included."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    streams = [list(synthetic_call(i, turns=2, frames_per_utterance=5)) for i in range(6)]
    runs = 0
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        recorders = [CallRecorder(writer, tenant_id=tenant, call_id=f"call-{uuid.uuid4()}", producer="test",
                                  producer_version="0") for _ in streams]
        while any(streams):
            for index, (recorder, payloads) in enumerate(zip(recorders, streams, strict=True)):
                for _ in range(5 + index):  # calls at different points when the projector runs
                    if payloads:
                        await recorder.record(payloads.pop(0))
            await producer.flush()
            await ProjectionRunner(backend, store, CallsProjection(), batch_rows=50).run(asyncio.Event(),
                                                                                    until_caught_up=True)
            runs += 1
    stepped = await snapshot(store, CallsProjection.tables, versions=True, tenant=tenant)
    assert runs > 5
    assert len(stepped["calls"]) == 6
    assert len(stepped["tool_calls"]) >= 6

    await ProjectionRunner(backend, store, CallsProjection()).rebuild()
    assert await snapshot(store, CallsProjection.tables, versions=True, tenant=tenant) == stepped


async def test_changing_or_removing_an_audit_record_is_detected(backend: LogBackend, store: AnalyticsStore) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        for i in range(12):
            recorder = CallRecorder(writer, tenant_id=tenant, call_id="-", producer="test", producer_version="0")
            payload: EventPayload = AuditRecorded(actor=f"api-key:k{i}", action="sql.query", resource="calls",
                                                  outcome="accepted", detail=f"query {i}", remote_addr="10.0.0.1")
            await recorder.record(payload)
        await producer.flush()
    await ProjectionRunner(backend, store, AuditProjection()).run(asyncio.Event(), until_caught_up=True)

    def rows() -> list[tuple[Any, ...]]:
        return store.query(f"SELECT * EXCEPT _version FROM {AUDIT_LOG.name} FINAL WHERE tenant_id = {{t:String}} "
                           "ORDER BY source, chain_index", {"t": tenant}).rows

    intact = rows()
    assert len(intact) == 12
    assert verify_chain([(*r, 0) for r in intact]) == []
    victim = intact[5]
    store.command(f"ALTER TABLE {AUDIT_LOG.name} UPDATE detail = 'nothing to see' WHERE event_id = {{e:String}} "
                  "SETTINGS mutations_sync = 1", {"e": victim[AUDIT_COLUMN["event_id"]]})
    (problem,) = verify_chain([(*r, 0) for r in rows()])
    assert (problem.source, problem.chain_index) == (victim[1], victim[2])
    assert "altered" in problem.problem

    store.command(f"ALTER TABLE {AUDIT_LOG.name} DELETE WHERE event_id = {{e:String}} SETTINGS mutations_sync = 1",
                  {"e": victim[AUDIT_COLUMN["event_id"]]})
    (problem,) = verify_chain([(*r, 0) for r in rows()])
    assert "missing" in problem.problem


async def test_no_seeded_pii_reaches_clickhouse(backend: LogBackend, store: AnalyticsStore) -> None:
    """Every corpus sentence is said by a caller, echoed by the agent, passed to a tool, returned by
    it, put in an error and in an audit record; no seeded value may be found in any table."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        for index, item in enumerate(SEEDED):
            text = item["text"]
            recorder = CallRecorder(writer, tenant_id=tenant, call_id=f"call-{uuid.uuid4()}", producer="test",
                                    producer_version="0")
            for payload in pii_call(index, text):
                await recorder.record(payload)
        await producer.flush()
    await project(backend, store)

    found: list[str] = []
    for table in ANALYST_TABLES:
        # The columns carrying what people said or typed (ids and hashes are digits by nature).
        text_columns = [c.name for c in table.columns if "redacted" in c.doc or c.name.endswith("_number")]
        if not text_columns:
            continue
        rows = store.query(f"SELECT {', '.join(text_columns)} FROM {table.name} FINAL "
                           "WHERE tenant_id = {t:String}", {"t": tenant}).rows
        found += [" ".join(str(v) for v in row) for row in rows]
    everything = "\n".join(found)
    assert len(found) > 5 * len(SEEDED), "every table got its rows"
    leaks = []
    for item in SEEDED:
        for pii in item["pii"]:
            value = pii["value"]
            if re.search(r"[a-z]", value, re.IGNORECASE):
                if value.lower() in everything.lower():
                    leaks.append(value)
            elif re.search(rf"(?<!\d){re.escape(digits(value))}(?!\d)", digits_only_runs(everything)):
                leaks.append(value)
    assert leaks == []


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def digits_only_runs(text: str) -> str:
    """Each run of digits and separators, its separators dropped: '212 555-0100' -> '2125550100'."""
    return re.sub(r"(?<=\d)[ ().-]+(?=\d)", "", text)


def pii_call(index: int, text: str) -> list[EventPayload]:
    return [
        CallStarted(channel="phone", direction="inbound", agent_id="front-desk", agent_version="v",
                    from_number=f"+1212555{index:04d}", to_number="+15550100", routed_by="number"),
        TranscriptFinal(utterance_id="u0", text=text, confidence=0.9, provider="p", model="m", start_ms=0,
                        end_ms=1000, latency_ms=100),
        TurnTaken(turn_index=0, caller_text=text, utterance_ids=("u0",), end_of_turn_ms=1000),
        ToolRequested(tool_call_id="t0", tool="create_ticket", arguments_json=json.dumps({"summary": text}),
                      idempotency_key="k"),
        ToolSucceeded(tool_call_id="t0", tool="create_ticket", result_json=json.dumps({"echo": text}), attempt=1,
                      latency_ms=3),
        TtsRequested(request_id="r0", text=f"You said: {text}", provider="p", voice="v", codec="pcm_s16le",
                     sample_rate=16000),
        ErrorRaised(component="tool", provider=None, kind="echo", message=text, retryable=False, fatal=False),
        AuditRecorded(actor="test", action="echo", resource="r", outcome="accepted", detail=text, remote_addr=None),
        CallEnded(reason="caller_hangup", duration_ms=1000, outcome=None),
    ]


class _Refuses(CallsProjection):
    """The calls projection, failing on turns: stands for any event a projection cannot take."""

    async def rows(self, record: Any, event: Any, backend: LogBackend) -> list[Any]:
        if event.type == "turn.taken":
            raise ValueError("cannot take this turn")
        return await super().rows(record, event, backend)


async def test_an_event_a_projection_cannot_take_is_dead_lettered_and_the_rest_projected(
    embedded_backend: EmbeddedBackend, store: AnalyticsStore
) -> None:
    log = embedded_backend
    async with log.producer() as producer:
        far_future = CallRecorder(EventWriter(producer), tenant_id="demo", call_id="call-future", producer="test",
                                  producer_version="0", clock_us=lambda: 9 * 10**18)
        for payload in list(synthetic_call(0, turns=1, frames_per_utterance=2)):
            if isinstance(payload, CallEnded):  # a number no unsigned column can hold
                payload = CallEnded(reason="caller_hangup", duration_ms=-5, outcome="resolved")
            await far_future.record(payload)
    runner = ProjectionRunner(log, store, _Refuses())
    await runner.run(asyncio.Event(), until_caught_up=True)
    assert runner.dead_lettered == 1
    (started,) = store.query("SELECT started_at, duration_ms FROM calls FINAL WHERE call_id = 'call-future'").rows
    assert started[0].year == 2299, "a clock gone wrong is held within what ClickHouse stores"
    assert started[1] == 0, "so is a negative duration"
    async with log.admin() as admin:
        dead = [r async for r in admin.read_key([DEADLETTER], b"call-future")]
    assert len(dead) == 1
    assert b"cannot take this turn" in dict(dead[0].headers)["vx-dlq-reason"]


async def _calls_and_commands(log: EmbeddedBackend) -> tuple[list[tuple[LogRecord, Event[EventPayload]]],
                                                             list[tuple[LogRecord, Event[EventPayload]]]]:
    """Every record of voxlog.calls and of voxlog.commands in the log, decoded, apart."""
    async with log.admin() as admin:
        ends = {TopicPartition(topic, p): end for topic in CallsProjection.topics
                for p, end in (await admin.end_offsets(topic)).items()}
    read: dict[str, list[tuple[LogRecord, Event[EventPayload]]]] = {topic: [] for topic in CallsProjection.topics}
    async with log.consumer(list(CallsProjection.topics)) as consumer:
        while sum(len(records) for records in read.values()) < sum(ends.values()):
            for record in await consumer.poll(timeout_s=0.5):
                read[record.topic].append((record, log.codec.decode(record.value)))
    return read[CALLS_TOPIC], read[COMMANDS]


async def _fold(projection: CallsProjection, log: EmbeddedBackend, records: list[tuple[LogRecord, Event[EventPayload]]],
                into: RowBatch) -> None:
    for record, event in records:
        if event.type in CallsFold.event_types:
            into.add(await projection.rows(record, event, log))


def _tables(batch: RowBatch) -> dict[str, list[tuple[Any, ...]]]:
    """The rows a batch would write (the newest of each key), by table, in a stable order."""
    return {table.name: sorted(rows, key=repr) for table, rows in batch.per_table()}


async def test_commands_read_ahead_of_their_calls_wait_for_the_start_not_for_the_log(
        embedded_backend: EmbeddedBackend) -> None:
    """A rebuild's commands topic runs ahead of voxlog.calls: each call's `tool.requested` waits for its
    `call.started` (its offset held back meanwhile) instead of reading the call back from the log, and
    the rows are those of the log read in order."""
    log = embedded_backend
    await write_calls(log, "demo", 6)
    calls, commands = await _calls_and_commands(log)
    assert commands, "the synthetic calls ask for tools"

    in_order, ahead = RowBatch(), RowBatch()
    await _fold(CallsProjection(), log, calls + commands, in_order)
    projection = CallsProjection()
    await _fold(projection, log, commands, ahead)
    assert len(projection.waiting) == len({event.call_id for _, event in commands})
    assert projection.held() == {TopicPartition(COMMANDS, p): min(r.offset for r, _ in commands if r.partition == p)
                                 for p in {r.partition for r, _ in commands}}
    await _fold(projection, log, calls, ahead)
    ahead.add(await projection.settle(log, None))

    assert projection.read_back == 0, "no call read back from the log"
    assert not projection.waiting
    assert not projection.held()
    assert _tables(ahead) == _tables(in_order)


async def test_a_call_whose_start_is_not_coming_is_folded_from_the_log_once(embedded_backend: EmbeddedBackend) -> None:
    """A `tool.requested` of a call whose start was read before a restart: once the call's voxlog.calls
    partition is read past it, or the whole log is read, the call is folded from the log, once."""
    log = embedded_backend
    [call_id] = await write_calls(log, "demo", 1)
    calls, commands = await _calls_and_commands(log)
    rows = RowBatch()
    projection = CallsProjection()
    await _fold(projection, log, commands[:1], rows)
    assert list(projection.waiting) == [call_id]
    rows.add(await projection.settle(log, None))
    assert projection.read_back == 1
    assert not projection.waiting
    [(_, [call_row])] = [(t, r) for t, r in rows.per_table() if t.name == "calls"]
    assert call_row[1] == call_id
    assert call_row[CALL_COLUMN["turns"]] == 2, "the whole call, from the log"

    projection = CallsProjection()  # the call's partition read past the request: no need to wait for the end
    ended, ended_event = calls[-1]
    read_later = dataclasses.replace(ended, timestamp_ms=commands[0][0].timestamp_ms + 1)
    await _fold(projection, log, [commands[0], (read_later, ended_event)], RowBatch())
    assert projection.read_back == 1
    assert not projection.waiting


async def test_a_rebuild_makes_the_tables_this_voxlog_defines_whatever_was_there(
        embedded_backend: EmbeddedBackend, store: AnalyticsStore) -> None:
    """A rebuild drops the projection's tables and makes them anew, so a table an older voxlog made, with
    other columns and another key, comes out as this one defines it, holding the log's rows only (the
    rebuild looks no columns up: its CREATE must make the table whole)."""
    log = embedded_backend
    await write_calls(log, "demo", 2)
    store.command("CREATE TABLE turns (tenant_id String, call_id String, retired_column String, _version UInt64) "
                  "ENGINE = ReplacingMergeTree(_version) ORDER BY (call_id)")
    store.command("INSERT INTO turns VALUES ('demo', 'not-in-the-log', 'old', 1)")
    await ProjectionRunner(log, store, CallsProjection()).rebuild()
    columns = [name for (name,) in store.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'turns' ORDER BY position"
    ).rows]
    assert columns == list(TURNS.column_names)
    key = store.query("SELECT sorting_key FROM system.tables WHERE database = currentDatabase() AND name = 'turns'")
    assert key.rows == [(", ".join(TURNS.order_by),)]
    calls = {call for (call,) in store.query("SELECT DISTINCT call_id FROM turns FINAL").rows}
    assert len(calls) == 2
    assert "not-in-the-log" not in calls
