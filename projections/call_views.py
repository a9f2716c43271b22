"""A tenant's calls as QA browses them (the console, `GET /v1/calls`, `GET /v1/calls/{id}`): the list,
filtered and paged, and one call's rows of `calls`, `turns`, `transcripts`, `tool_calls`, `errors` and
`recordings`, each aligned to its recording.

Every query names the tenant as a bound parameter (`tenant_id = {tenant:String}`) and reads `FINAL`;
nothing a request says is spliced into SQL. The text is the tables' own, redacted by the calls
projection before it was written (docs/analytics.md), so nothing here is more personal than what the
tenant's analysts see through `POST /v1/sql`. Synchronous, like the store: callers on the event loop
go through `asyncio.to_thread`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from projections.audit import epoch_us
from projections.store import Analytics
from projections.tables import CALLS, ERRORS, RECORDINGS, TOOL_CALLS, TRANSCRIPTS, TURNS, Table

TABLES: tuple[Table, ...] = (CALLS, TURNS, TRANSCRIPTS, TOOL_CALLS, ERRORS, RECORDINGS)
"""What the views read; made where missing (a gateway that has not projected yet answers with none)."""
CHOICES_SHOWN = 500
"""Agents, versions and outcomes offered as filters, at most (the most frequent)."""

LIST_COLUMNS = ("call_id", "agent_id", "agent_version", "channel", "direction", "started_at", "ended_at",
                "duration_ms", "outcome", "end_reason", "turns", "tool_calls", "barge_ins", "errors", "handoff",
                "consent", "recording_withheld")
CALL_COLUMNS = (*LIST_COLUMNS, "routed_by", "from_number", "to_number", "handoff_outcome", "consent_mode",
                "consent_method")
TURN_COLUMNS = ("turn_index", "at", "caller_text", "agent_text", "asr_provider", "asr_model", "asr_confidence",
                "asr_latency_ms", "llm_provider", "llm_model", "llm_calls", "input_tokens", "output_tokens",
                "llm_first_token_ms", "llm_total_ms", "tts_provider", "tts_voice", "tts_first_byte_ms",
                "voice_to_voice_ms", "barge_in", "guardrail")
TRANSCRIPT_COLUMNS = ("seq", "at", "speaker", "text", "start_ms", "end_ms", "confidence")
TOOL_COLUMNS = ("tool_call_id", "tool", "requested_at", "arguments", "result", "outcome", "error", "attempts",
                "latency_ms")
ERROR_COLUMNS = ("seq", "at", "component", "provider", "kind", "message", "retryable", "fatal", "fallback_to")
RECORDING_COLUMNS = ("complete", "duration_ms", "started_at", "channels", "sample_rate")


@dataclass(frozen=True)
class CallFilter:
    """Which of a tenant's calls to list; None: any."""

    agent: str | None = None
    agent_version: str | None = None
    outcome: str | None = None
    since_us: int | None = None
    """Started at or after (microseconds since the epoch)."""
    until_us: int | None = None
    """Started before."""
    errors: bool | None = None
    """True: only calls with an error recorded; False: only calls without."""
    fallbacks: bool | None = None
    """True: only calls where a provider fell back to another; False: only calls without."""

    def where(self, tenant_id: str) -> tuple[str, dict[str, Any]]:
        """The WHERE clause over `calls` and its parameters."""
        clauses = ["tenant_id = {tenant:String}"]
        parameters: dict[str, Any] = {"tenant": tenant_id}
        for column, value in (("agent_id", self.agent), ("agent_version", self.agent_version),
                              ("outcome", self.outcome)):
            if value is not None:
                clauses.append(f"{column} = {{{column}:String}}")
                parameters[column] = value
        if self.since_us is not None:
            clauses.append("started_at >= fromUnixTimestamp64Micro({since:Int64}, 'UTC')")
            parameters["since"] = self.since_us
        if self.until_us is not None:
            clauses.append("started_at < fromUnixTimestamp64Micro({until:Int64}, 'UTC')")
            parameters["until"] = self.until_us
        if self.errors is not None:
            clauses.append("errors > 0" if self.errors else "errors = 0")
        if self.fallbacks is not None:
            fell_back = (f"call_id IN (SELECT call_id FROM {ERRORS.name} FINAL "
                         "WHERE tenant_id = {tenant:String} AND kind = 'fallback')")
            clauses.append(fell_back if self.fallbacks else f"NOT ({fell_back})")
        return " AND ".join(clauses), parameters


@dataclass(frozen=True)
class CallPage:
    calls: list[dict[str, Any]]
    total: int
    choices: dict[str, list[str]]
    """What the filters can be: `agents`, `agent_versions`, `outcomes` of the tenant's calls."""


@dataclass(frozen=True)
class CallRows:
    call: dict[str, Any] | None
    """Its `calls` row; None when the tables have none (not projected yet, erased, or not the tenant's):
    then the other rows are none either."""
    turns: list[dict[str, Any]]
    transcript: list[dict[str, Any]]
    """Each line with `position_ms`: where it is in the recording."""
    tool_calls: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    recording: dict[str, Any] | None


def _value(value: Any) -> Any:
    """A value as JSON carries it: times as microseconds since the epoch."""
    return epoch_us(value) if isinstance(value, datetime) else value


def _dicts(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [{name: _value(v) for name, v in zip(columns, row, strict=True)} for row in rows]


class CallViews:
    """The views over `store`'s tables (made there on first use if missing)."""

    def __init__(self, store: Analytics) -> None:
        self.store = store
        self._ready = False
        self._making = threading.Lock()

    def _query(self, sql: str, parameters: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        if not self._ready:
            with self._making:
                if not self._ready:
                    for table in TABLES:
                        self.store.create(table)
                    self._ready = True
        return self.store.query(sql, parameters).rows

    def list_calls(self, tenant_id: str, filters: CallFilter, *, limit: int, offset: int) -> CallPage:
        """The tenant's calls that pass `filters`, newest first, `limit` from `offset`, with how many pass
        in all, each with its fallbacks counted and whether it has a recording."""
        where, parameters = filters.where(tenant_id)
        rows = self._query(f"SELECT {', '.join(LIST_COLUMNS)} FROM {CALLS.name} FINAL WHERE {where} "
                           "ORDER BY started_at DESC, call_id DESC LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
                           {**parameters, "limit": limit, "offset": offset})
        total = int(self._query(f"SELECT count() FROM {CALLS.name} FINAL WHERE {where}", parameters)[0][0])
        calls = _dicts(LIST_COLUMNS, rows)
        ids = [c["call_id"] for c in calls]
        fallbacks: dict[str, int] = {}
        recorded: dict[str, int] = {}
        if ids:
            scope = {"tenant": tenant_id, "ids": ids}
            fallbacks = {str(cid): int(n) for cid, n in self._query(
                f"SELECT call_id, count() FROM {ERRORS.name} FINAL WHERE tenant_id = {{tenant:String}} "
                "AND call_id IN {ids:Array(String)} AND kind = 'fallback' GROUP BY call_id", scope)}
            recorded = {str(cid): int(complete) for cid, complete in self._query(
                f"SELECT call_id, complete FROM {RECORDINGS.name} FINAL WHERE tenant_id = {{tenant:String}} "
                "AND call_id IN {ids:Array(String)}", scope)}
        for call in calls:
            call["fallbacks"] = fallbacks.get(call["call_id"], 0)
            call["recording"] = bool(recorded.get(call["call_id"], 0))
        return CallPage(calls, total, self.choices(tenant_id))

    def choices(self, tenant_id: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name, column in (("agents", "agent_id"), ("agent_versions", "agent_version"), ("outcomes", "outcome")):
            rows = self._query(f"SELECT {column} FROM {CALLS.name} FINAL WHERE tenant_id = {{tenant:String}} "
                               f"AND {column} != '' GROUP BY {column} ORDER BY count() DESC, {column} "
                               "LIMIT {n:UInt32}", {"tenant": tenant_id, "n": CHOICES_SHOWN})
            found[name] = sorted(str(r[0]) for r in rows)
        return found

    def started_at(self, tenant_id: str, call_id: str) -> int | None:
        """When the tenant's call started (microseconds since the epoch); None: no such call of the tenant's."""
        rows = self._query(f"SELECT started_at FROM {CALLS.name} FINAL WHERE tenant_id = {{tenant:String}} "
                           "AND call_id = {call:String}", {"tenant": tenant_id, "call": call_id})
        return _value(rows[0][0]) if rows else None

    def call(self, tenant_id: str, call_id: str) -> CallRows:
        """One call's rows, the tenant's only."""
        scope = {"tenant": tenant_id, "call": call_id}
        where = "WHERE tenant_id = {tenant:String} AND call_id = {call:String}"

        def rows(table: Table, columns: Sequence[str], order: str) -> list[dict[str, Any]]:
            return _dicts(columns, self._query(
                f"SELECT {', '.join(columns)} FROM {table.name} FINAL {where} ORDER BY {order}", scope))

        found = rows(CALLS, CALL_COLUMNS, "call_id")
        if not found:
            return CallRows(call=None, turns=[], transcript=[], tool_calls=[], errors=[], recording=None)
        call = found[0]
        recordings = rows(RECORDINGS, RECORDING_COLUMNS, "call_id")
        recording = recordings[0] if recordings else None
        transcript = rows(TRANSCRIPTS, TRANSCRIPT_COLUMNS, "seq")
        zero_us = (recording or call).get("started_at")
        for line in transcript:
            line["position_ms"] = position_ms(line, zero_us)
        return CallRows(call=call, turns=rows(TURNS, TURN_COLUMNS, "turn_index"), transcript=transcript,
                        tool_calls=rows(TOOL_CALLS, TOOL_COLUMNS, "requested_at, tool_call_id"),
                        errors=rows(ERRORS, ERROR_COLUMNS, "seq"), recording=recording)


def position_ms(line: Mapping[str, Any], zero_us: int | None) -> int | None:
    """Where a transcript line is in the call's recording: a caller's utterance where it starts in the
    caller's audio (the recording's left channel is that stream); an agent's when it was sent to
    speech (the right channel places the agent's audio at its time since the call's start), which its
    audio follows by the synthesiser's first-byte time."""
    if line.get("speaker") == "caller" and line.get("start_ms") is not None:
        return int(line["start_ms"])
    if zero_us is None or line.get("at") is None:
        return None
    return max(0, (int(line["at"]) - int(zero_us)) // 1000)
