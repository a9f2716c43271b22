"""The calls projection: a call's events folded into `calls`, `turns`, `transcripts`, `tool_calls`,
`errors` and `prompt_versions` rows.

The fold is pure: an event in, the rows it changes out, each row whole (ReplacingMergeTree keeps
the newest). It keeps a little state per live call (the turn being built, which request belongs to
which turn) and applies each event of a call once (by `seq`), so that a call picked up in the
middle, after a restart, can be folded from its history in the log without counting anything
twice. Text goes through PII redaction here: raw text never reaches ClickHouse. People's names
the call is told in fields meant for them (a `customer_name` among the call's parameters, in a
tool's arguments or result) are redacted wherever they are said after that; only events of
voxlog.calls tell them, so what a text is redacted with never depends on how far voxlog.commands
was read.

A row's `_version` is the highest `seq` among the events that changed it, never where the fold was
when it wrote the row: a call's events come from two topics read apart, interleaved differently
from run to run, and a run killed and restarted any number of times must end with the rebuild's
rows, versions included. Every event that can change a row writes it, so the row's last write
carries its highest version. An event read behind one with a higher `seq` (a `tool.requested` on
voxlog.commands read behind voxlog.calls) writes the row again at the same version, and of equal
versions ReplacingMergeTree keeps the last inserted: here the one folded from more. A run
restarted at a call's `call.started` after it had read the call's `tool.requested` folds the call
without it, and still writes the same rows: the `llm.decided` that asked for the tool says what
the request says (and where the request was a row's newest change, the row written with it keeps
the higher version). Not so for a request no `llm.decided` asked for: the tool's row and the
call's count of tool calls lose it, unless such a call is folded from the log first, which
`CallsProjection` does only for a call it first sees mid-way.

A call's events on voxlog.commands read before its `call.started` (the two topics are read apart:
in a rebuild the small commands topic runs far ahead) wait for it rather than read the call back
from the log, which would cost a read by key per call and grow with the log: they are folded right
after the start when it comes. A call's start is known not to come once its voxlog.calls partition
has been read past the waiting event's log time (`START_SETTLE_MS` past it on Kafka, whose timestamps
are the producers'), or the runner has read the whole log (`settle`), or too many calls wait
(`WAITING_CALLS_KEPT`): only then is the call folded from the log, as a call picked up mid-way. An
event of voxlog.calls for a call not known is such a call at once: its start is on the same
partition, before it. What waits holds its offset back (`held`), so a crash replays it.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from consumers.backends import LogBackend
from consumers.event_reader import call_start_bound_ms, read_call
from producers.log_producer import LogRecord, TopicPartition
from projections.audit import epoch_us
from projections.erasure import ErasedCallers, erasure_of_calls
from projections.projection import CallPartition, log_admin
from projections.store import AnalyticsStore
from projections.tables import (
    CALLS,
    ERASED_CALLS,
    ERASURES,
    ERRORS,
    PROMPT_VERSIONS,
    REFUSED_CALLS,
    TOOL_CALLS,
    TRANSCRIPTS,
    TURNS,
    Output,
    Row,
    Table,
    at,
)
from schemas.base import Event, EventPayload
from schemas.events import (
    BargeIn,
    CallEnded,
    CallerErased,
    CallRefused,
    CallStarted,
    ConsentGiven,
    ConsentRefused,
    ErrorRaised,
    GuardrailTriggered,
    HandoffOutcome,
    HandoffRequested,
    LlmDecided,
    LlmRequested,
    ProviderFallback,
    SpeechStopped,
    ToolFailed,
    ToolRequested,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
)
from schemas.topics import CALLS as CALLS_TOPIC  # the topic, beside the table of the same name
from schemas.topics import COMMANDS
from streams.config.agents import AgentRouter
from streams.config.consent import recorded_mode
from streams.memory import key_of_call
from streams.metrics import voice_to_voice_ms
from streams.redaction import Redactor, default_redactor, names_in_json, redact_field

ENDED_CALLS_KEPT = 1000
"""Ended calls whose state is kept for late events (a transfer's outcome, a carrier's last status)."""
WAITING_CALLS_KEPT = 5000
"""Calls whose voxlog.commands events wait for their `call.started`; beyond, the one waiting longest is
folded from the log."""
START_SETTLE_MS = 1000
"""A call's start is read, if it is to be, once its voxlog.calls partition is read this far (log time)
past an event of the call, on a log whose timestamps are the producers' (Kafka): slack for their clocks."""

_CALL_VALUES = itemgetter(*CALLS.column_names[:-1])
"""A call's row values from its state, in column order (all but the version)."""
_TOOL_VALUES = itemgetter(*TOOL_CALLS.column_names[2:])
"""A tool call's row values from its state, in column order (all but tenant and call)."""


@dataclass
class _Turn:
    index: int
    at_us: int
    speech_end_us: int
    caller_text: str
    """Redacted, once: a turn's row is written again as each of its steps arrives."""
    utterances: tuple[str, ...]
    version: int = 0
    """The highest seq of the events that changed the turn."""
    agent_texts: list[str] = field(default_factory=list)
    """Redacted, once each."""
    llm: dict[str, Any] = field(default_factory=dict)
    tts: dict[str, Any] = field(default_factory=dict)
    first_tts_request: str | None = None
    first_tts_us: int | None = None
    voice_to_voice_ms: float | None = None
    barge_in: bool = False
    guardrail: str = ""


@dataclass
class _Call:
    tenant_id: str
    call_id: str
    erased: bool = False
    """Its caller's data was erased: nothing more of it is written."""
    caller_key: str | None = None
    started_us: int = 0
    applied: set[int] = field(default_factory=set)
    row: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    """The highest seq of the events that changed the call's row."""
    utterances: dict[str, TranscriptFinal] = field(default_factory=dict)
    turns: dict[int, _Turn] = field(default_factory=dict)
    current_turn: int | None = None
    speech_stopped_us: int | None = None
    turn_of_request: dict[str, int] = field(default_factory=dict)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Tool call id -> its row's values, its version under "_version"."""
    decided: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    """Tool call id -> the seq of the `llm.decided` (on voxlog.calls) that asked for it, when, and its
    arguments (redacted)."""
    names: frozenset[str] = frozenset()
    """People's names the call was told (see the module's docstring)."""


class CallsFold:
    """Events in, rows out. `knows(call_id)` says whether a call's state is here (else fold its
    history first)."""

    tables = (CALLS, TURNS, TRANSCRIPTS, TOOL_CALLS, ERRORS, PROMPT_VERSIONS, ERASURES, ERASED_CALLS, REFUSED_CALLS)
    event_types = frozenset(t.EVENT_TYPE for t in (CallerErased, CallRefused,

        CallStarted, ConsentGiven, ConsentRefused, SpeechStopped, TranscriptFinal, TurnTaken, LlmRequested,
        LlmDecided, TtsRequested, TtsCompleted, BargeIn, GuardrailTriggered, ToolRequested, ToolSucceeded, ToolFailed,
        ErrorRaised, ProviderFallback, HandoffRequested, HandoffOutcome, CallEnded))
    """What the fold reads: a call's own events (not a dial's, a caller's memory, or audio), and erasures."""

    def __init__(self, redactor: Redactor, router: AgentRouter | None = None) -> None:
        self.redactor = redactor
        self.router = router
        self.calls: dict[str, _Call] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()
        """Calls that ended, oldest first: their state is kept a while for late events."""
        self.prompts: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        """(tenant, agent, prompt id, hash) -> (first, last use in epoch us)."""
        self.erasures = ErasedCallers()

    def knows(self, call_id: str) -> bool:
        return call_id in self.calls

    def seed_prompt(
        self, tenant: str, agent: str, prompt_id: str, prompt_hash: str, first_us: int, last_us: int
    ) -> None:
        """What `prompt_versions` already holds (first uses survive a restart)."""
        self.prompts[(tenant, agent, prompt_id, prompt_hash)] = (first_us, last_us)

    def _text(self, call: _Call, text: str) -> str:
        return self.redactor.redact(text, call.names)

    def _json(self, call: _Call, value: str | None) -> str:
        """A JSON field, redacted; the names in its name fields are known to the call from then on."""
        call.names |= frozenset(names_in_json(value))
        return redact_field("json", value, self.redactor, call.names) or ""

    def apply(self, event: Event[EventPayload]) -> list[Output]:
        if isinstance(event.payload, CallerErased):
            return self._erase(event)
        if isinstance(event.payload, CallRefused):  # a call that never was: a row of its own, nothing else
            p, envelope = event.payload, event.envelope
            return [(REFUSED_CALLS, (envelope.tenant_id, envelope.call_id, at(envelope.event_time_us), p.agent_id,
                                     p.channel, p.direction, p.reason, p.detail, p.live_calls, p.limit,
                                     envelope.seq))]
        envelope = event.envelope
        seq = envelope.seq
        call = self.calls.get(envelope.call_id)
        if call is None:
            call = self.calls[envelope.call_id] = _Call(envelope.tenant_id, envelope.call_id)
            self._new_call_row(call)
        if seq in call.applied:
            return []  # folded already (from the log's history, or a redelivery)
        call.applied.add(seq)
        rows: list[Output] = [] if call.erased else list(self._apply(call, event))
        if isinstance(event.payload, CallEnded):
            self.ended[call.call_id] = None
            while len(self.ended) > ENDED_CALLS_KEPT:
                self.calls.pop(self.ended.popitem(last=False)[0], None)
        return rows

    def _erase(self, event: Event[EventPayload]) -> list[Output]:
        """The erasure's row, then the deletion of what was written of the caller's erased calls; the
        ones still in memory write nothing more."""
        row = self.erasures.fold(event, self.redactor)
        for call in self.calls.values():
            if self.erasures.erased(call.tenant_id, call.caller_key, call.started_us):
                call.erased = True
        return [row, *erasure_of_calls(event, (TURNS, TRANSCRIPTS, TOOL_CALLS, ERRORS))]

    def _new_call_row(self, call: _Call) -> None:
        call.row = {
            "tenant_id": call.tenant_id, "call_id": call.call_id, "agent_id": "", "agent_version": "",
            "channel": "", "direction": "", "routed_by": "", "from_number": "", "to_number": "", "caller_key": "",
            "provider_call_id": "", "dial_id": "", "started_at": at(0), "ended_at": None, "duration_ms": None,
            "outcome": "", "end_reason": "", "handoff": 0, "handoff_outcome": "", "consent": "", "consent_mode": "",
            "consent_method": "", "recording_withheld": "", "turns": 0,
            "tool_calls": 0, "barge_ins": 0, "errors": 0}

    def _call_row(self, call: _Call, seq: int) -> Row:
        """The call's row, changed (or perhaps changed) by the event at `seq`."""
        call.version = max(call.version, seq)
        return CALLS, (*_CALL_VALUES(call.row), call.version)

    def _turn_row(self, call: _Call, turn: _Turn, seq: int) -> Row:
        """The turn's row, changed by the event at `seq`."""
        turn.version = max(turn.version, seq)
        llm, tts = turn.llm, turn.tts
        finals = [call.utterances[u] for u in turn.utterances if u in call.utterances]
        return TURNS, (
            call.tenant_id, call.call_id, call.row["agent_id"], turn.index, at(turn.at_us),
            turn.caller_text, " ".join(turn.agent_texts),
            finals[0].provider if finals else "", finals[0].model if finals else "",
            sum(f.confidence for f in finals) / len(finals) if finals else 0.0,
            max((f.latency_ms for f in finals), default=0),
            llm.get("provider", ""), llm.get("model", ""), llm.get("prompt_id", ""), llm.get("prompt_hash", ""),
            llm.get("calls", 0), llm.get("input_tokens", 0), llm.get("output_tokens", 0),
            llm.get("first_token_ms", 0), llm.get("total_ms", 0),
            tts.get("provider", ""), tts.get("voice", ""), tts.get("first_byte_ms", 0),
            turn.voice_to_voice_ms, int(turn.barge_in), turn.guardrail, turn.version)

    def _tool(self, call: _Call, tool_call_id: str, name: str) -> dict[str, Any]:
        """A tool call's row, made by its `tool.requested` (voxlog.commands) or by its result (voxlog.calls),
        whichever comes first: both topics are read apart, and a restart may resume voxlog.calls behind a
        `tool.requested` already read. So when and with what it was asked come from the `llm.decided` that
        asked for it, on voxlog.calls before the result: the row is the same whichever made it (an
        `llm.decided` read after the `tool.requested` corrects the row)."""
        tool = call.tools.get(tool_call_id)
        if tool is None:
            tool = call.tools[tool_call_id] = {
                "tool_call_id": tool_call_id, "tool": name, "requested_at": None, "arguments": "", "result": "",
                "outcome": "pending", "error": "", "attempts": 0, "latency_ms": 0, "connector": "",
                "remote_id": "", "failure": "", "_version": 0}
            decided = call.decided.get(tool_call_id)
            if decided is not None:
                self._asked(tool, *decided)
        return tool

    def _asked(self, tool: dict[str, Any], seq: int, decided_us: int, arguments: str) -> None:
        """What the `llm.decided` at `seq` says of the tool call: when and with what (redacted) it was asked."""
        tool.update(requested_at=at(decided_us), arguments=arguments, _version=max(tool["_version"], seq))

    def _tool_row(self, call: _Call, tool: dict[str, Any]) -> Row:
        return TOOL_CALLS, (call.tenant_id, call.call_id, *_TOOL_VALUES(tool))

    def _tool_rows(self, call: _Call, tool: dict[str, Any], seq: int) -> list[Row]:
        """The rows a tool's own event (request or result) at `seq` changes: the tool's, and the call's,
        whether or not the number of its tool calls changed: which of the two makes the tool count
        depends on the order the topics were read in, and the call row's version must not."""
        tool["_version"] = max(tool["_version"], seq)
        call.row["tool_calls"] = sum(1 for t in call.tools.values() if t["requested_at"] is not None)
        return [self._tool_row(call, tool), self._call_row(call, seq)]

    def _turn_for(self, call: _Call, request_id: str) -> _Turn | None:
        index = call.turn_of_request.get(request_id)
        return None if index is None else call.turns.get(index)

    def _apply(self, call: _Call, event: Event[EventPayload]) -> list[Row]:
        p, row, now = event.payload, call.row, event.envelope.event_time_us
        turn: _Turn | None
        match p:
            case CallStarted():
                call.caller_key, call.started_us = key_of_call(call.tenant_id, p), now
                call.names |= frozenset(names_in_json(json.dumps(p.parameters)))
                erasure = self.erasures.erasure_of(call.tenant_id, call.caller_key, now)
                if erasure is not None:  # read after its erasure: listed as erased, for the other projections
                    call.erased = True
                    return [(ERASED_CALLS, (call.tenant_id, call.call_id, call.caller_key, at(now), erasure, 1))]
                row.update(caller_key=call.caller_key or "", agent_id=p.agent_id, agent_version=p.agent_version,
                           channel=p.channel, direction=p.direction, routed_by=p.routed_by, started_at=at(now),
                           from_number=redact_field("phone", p.from_number, self.redactor) or "",
                           to_number=redact_field("phone", p.to_number, self.redactor) or "",
                           provider_call_id=p.provider_call_id or "", dial_id=p.parameters.get("dial_id", ""),
                           consent_mode=recorded_mode(p.parameters) or "")
                if row["consent_mode"] == "opt_in" and not row["consent"]:
                    row["recording_withheld"] = "consent_not_given"  # until the caller's yes
                return [self._call_row(call, event.seq)]
            case ConsentGiven() | ConsentRefused():
                if row["consent"] != "refused":  # a refusal stands for the rest of the call
                    refused = isinstance(p, ConsentRefused)
                    row.update(consent="refused" if refused else "given", consent_method=p.method)
                    if refused:
                        row["recording_withheld"] = "consent_refused"
                    elif row["recording_withheld"] == "consent_not_given":
                        row["recording_withheld"] = ""
                return [self._call_row(call, event.seq)]
            case SpeechStopped():
                call.speech_stopped_us = now
                return []
            case TranscriptFinal():
                call.utterances[p.utterance_id] = p
                heard = self._text(call, p.text)
                return [(TRANSCRIPTS, (call.tenant_id, call.call_id, event.seq, at(now), "caller", heard, p.start_ms,
                                       p.end_ms, p.confidence, event.seq))]
            case TurnTaken():
                taken = _Turn(p.turn_index, now, call.speech_stopped_us or now, self._text(call, p.caller_text),
                              tuple(p.utterance_ids))
                call.turns[p.turn_index] = taken
                call.current_turn = p.turn_index
                row["turns"] = len(call.turns)
                return [self._turn_row(call, taken, event.seq), self._call_row(call, event.seq)]
            case LlmRequested():
                call.turn_of_request[p.request_id] = p.turn_index
                rows = self._prompt_used(call.tenant_id, p.agent_id, p.prompt_id, p.prompt_hash, now)
                turn = call.turns.get(p.turn_index)
                if turn is None:
                    return rows
                turn.llm.update(provider=p.provider, model=p.model, prompt_id=p.prompt_id, prompt_hash=p.prompt_hash,
                                calls=turn.llm.get("calls", 0) + 1)
                return [*rows, self._turn_row(call, turn, event.seq)]
            case LlmDecided():
                asked_rows: list[Row] = []
                for asked in p.tool_calls:
                    arguments = self._json(call, asked.arguments_json)
                    call.decided[asked.id] = (event.seq, now, arguments)
                    tool = call.tools.get(asked.id)
                    if tool is not None:  # made by its tool.requested (voxlog.commands), read first: it counts already
                        self._asked(tool, event.seq, now, arguments)
                        asked_rows.append(self._tool_row(call, tool))
                turn = self._turn_for(call, p.request_id)
                if turn is None:
                    return asked_rows
                llm = turn.llm
                if "first_token_ms" not in llm:
                    llm["first_token_ms"] = p.time_to_first_token_ms
                for name, value in (("input_tokens", p.input_tokens), ("output_tokens", p.output_tokens),
                                    ("total_ms", p.total_ms)):
                    llm[name] = llm.get(name, 0) + value
                return [*asked_rows, self._turn_row(call, turn, event.seq)]
            case TtsRequested():
                agent_text = self._text(call, p.text)
                said: list[Row] = [(TRANSCRIPTS, (call.tenant_id, call.call_id, event.seq, at(now), "agent",
                                                  agent_text, None, None, None, event.seq))]
                turn = call.turns.get(call.current_turn) if call.current_turn is not None else None
                if turn is not None:
                    call.turn_of_request[p.request_id] = turn.index
                    turn.agent_texts.append(agent_text)
                    if turn.first_tts_request is None:
                        turn.first_tts_request, turn.first_tts_us = p.request_id, now
                        turn.tts.update(provider=p.provider, voice=p.voice)
                    said.append(self._turn_row(call, turn, event.seq))
                return said
            case TtsCompleted():
                turn = self._turn_for(call, p.request_id)
                if turn is None or turn.first_tts_request != p.request_id or turn.first_tts_us is None:
                    return []
                turn.tts["first_byte_ms"] = p.time_to_first_byte_ms
                if p.audio_ms > 0:
                    turn.voice_to_voice_ms = voice_to_voice_ms(turn.speech_end_us, turn.first_tts_us,
                                                               p.time_to_first_byte_ms)
                return [self._turn_row(call, turn, event.seq)]
            case BargeIn():
                row["barge_ins"] += 1
                turn = self._turn_for(call, p.interrupted_tts_request_id or "")
                if turn is None:
                    return [self._call_row(call, event.seq)]
                turn.barge_in = True
                return [self._turn_row(call, turn, event.seq), self._call_row(call, event.seq)]
            case GuardrailTriggered():
                turn = call.turns.get(p.turn_index)
                if turn is None:
                    return []
                turn.guardrail = p.rule
                return [self._turn_row(call, turn, event.seq)]
            case ToolRequested():
                tool = self._tool(call, p.tool_call_id, p.tool)
                if tool["requested_at"] is None:  # no llm.decided asked for it (not the core's request)
                    # Without the call's names: which it knows when this is read depends on the read order.
                    tool.update(requested_at=at(now),
                                arguments=redact_field("json", p.arguments_json, self.redactor) or "")
                return self._tool_rows(call, tool, event.seq)
            case ToolSucceeded():
                tool = self._tool(call, p.tool_call_id, p.tool)
                tool.update(outcome="succeeded", result=self._json(call, p.result_json),
                            attempts=p.attempt, latency_ms=p.latency_ms, error="", connector=p.connector,
                            remote_id=p.remote_id, failure="")
                return self._tool_rows(call, tool, event.seq)
            case ToolFailed():
                tool = self._tool(call, p.tool_call_id, p.tool)
                if tool["outcome"] != "succeeded":
                    tool.update(outcome="failed" if p.dead_lettered or not p.retryable else "pending",
                                error=self._text(call, p.error), attempts=p.attempt, latency_ms=p.latency_ms,
                                connector=p.connector, failure=p.failure)
                return self._tool_rows(call, tool, event.seq)
            case ErrorRaised():
                row["errors"] += 1
                return [(ERRORS, (call.tenant_id, call.call_id, event.seq, at(now), p.component, p.provider or "",
                                  p.kind, self._text(call, p.message), int(p.retryable), int(p.fatal), "", event.seq)),
                        self._call_row(call, event.seq)]
            case ProviderFallback():
                return [(ERRORS, (call.tenant_id, call.call_id, event.seq, at(now), p.capability, p.from_provider,
                                  "fallback", self._text(call, p.reason), 1, 0, p.to_provider, event.seq))]
            case HandoffRequested():
                row["handoff"] = 1
                return [self._call_row(call, event.seq)]
            case HandoffOutcome():
                row["handoff_outcome"] = p.outcome
                return [self._call_row(call, event.seq)]
            case CallEnded():
                row.update(ended_at=at(now), duration_ms=p.duration_ms, outcome=p.outcome or "", end_reason=p.reason)
                return [self._call_row(call, event.seq)]
        return []

    def _prompt_used(self, tenant: str, agent_id: str, prompt_id: str, prompt_hash: str, now: int) -> list[Row]:
        key = (tenant, agent_id, prompt_id, prompt_hash)
        first, last = self.prompts.get(key, (now, now))
        first, last = min(first, now), max(last, now)
        if self.prompts.get(key) == (first, last):
            return []
        self.prompts[key] = (first, last)
        text = self._prompt_text(tenant, agent_id, prompt_hash)
        return [(PROMPT_VERSIONS, (tenant, agent_id, prompt_id, prompt_hash, text, at(first), at(last), last))]

    def _prompt_text(self, tenant: str, agent_id: str, prompt_hash: str) -> str:
        agent = self.router.agents.get((tenant, agent_id)) if self.router else None
        if agent is None or agent.prompt_hash != prompt_hash:
            return ""
        return agent.prompt_text


class CallsProjection:
    name = "calls"
    topics: tuple[str, ...] = (CALLS_TOPIC, COMMANDS)
    tables: tuple[Table, ...] = CallsFold.tables
    event_types: frozenset[str] | None = CallsFold.event_types

    def __init__(self, router: AgentRouter | None = None) -> None:
        self.router = router
        self.fold = CallsFold(default_redactor(), router)
        self._calls_partition = CallPartition(CALLS_TOPIC)
        self.read_back = 0
        """Calls folded from the log (picked up mid-way, or their start waited for in vain)."""
        self._forget_waiting()

    def _forget_waiting(self) -> None:
        self.waiting: OrderedDict[str, list[tuple[LogRecord, Event[EventPayload]]]] = OrderedDict()
        """Per call, its events read before its start, oldest first; the call waiting longest first."""
        self.waits_on: dict[int, list[tuple[int, str]]] = {}
        """Per voxlog.calls partition, a heap of (log time past which the start will not come, call)."""
        self.calls_read: dict[int, int] = {}
        """Per voxlog.calls partition, the newest log time read."""

    def reset(self) -> None:
        self.fold = CallsFold(default_redactor(), self.router)
        self._forget_waiting()

    async def load(self, store: AnalyticsStore) -> None:
        result = await asyncio.to_thread(
            store.query, "SELECT tenant_id, agent_id, prompt_id, prompt_hash, first_used, last_used "
            f"FROM {PROMPT_VERSIONS.name} FINAL")
        for tenant, agent, prompt_id, prompt_hash, first, last in result.rows:
            self.fold.seed_prompt(tenant, agent, prompt_id, prompt_hash, epoch_us(first), epoch_us(last))
        await asyncio.to_thread(self.fold.erasures.load, store)

    def held(self) -> Mapping[TopicPartition, int]:
        """The offsets of the events waiting for their call's start: none past them is stored."""
        out: dict[TopicPartition, int] = {}
        for waited in self.waiting.values():
            for record, _ in waited:
                if record.offset < out.get(record.tp, record.offset + 1):
                    out[record.tp] = record.offset
        return out

    async def settle(self, backend: LogBackend, read: Mapping[TopicPartition, int] | None) -> list[Output]:
        """The whole log read (or a batch's end, for a runner that cannot tell): a start not read by now
        is not coming, and the calls still waiting are folded from the log."""
        out: list[Output] = []
        while self.waiting:
            out += await self._from_log(self.waiting.popitem(last=False)[1], backend)
        self.waits_on.clear()
        return out

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> list[Output]:
        out: list[Output] = []
        if record.topic == CALLS_TOPIC:
            out += await self._calls_read(record.partition, record.timestamp_ms, backend)
        waited = self.waiting.get(event.call_id)
        if waited is not None:
            if not isinstance(event.payload, CallStarted):
                waited.append((record, event))
                return out
            del self.waiting[event.call_id]
            out += self.fold.apply(event)
            for _, early in waited:
                out += self.fold.apply(early)
            return out
        if self.fold.knows(event.call_id) or isinstance(event.payload, CallStarted | CallerErased | CallRefused):
            return out + self.fold.apply(event)
        if record.topic == CALLS_TOPIC:  # its start is on this partition, before it: picked up mid-call
            return out + await self._from_log([(record, event)], backend)
        found = await self._calls_partition.of(event.call_id, backend)
        partition = -1 if found is None else found  # no voxlog.calls yet: waits for the runner to settle
        give_up_after = record.timestamp_ms + (0 if backend.stamps_in_append_order else START_SETTLE_MS)
        if self.calls_read.get(partition, -1) > give_up_after:
            return out + await self._from_log([(record, event)], backend)
        self.waiting[event.call_id] = [(record, event)]
        heapq.heappush(self.waits_on.setdefault(partition, []), (give_up_after, event.call_id))
        while len(self.waiting) > WAITING_CALLS_KEPT:
            out += await self._from_log(self.waiting.popitem(last=False)[1], backend)
        return out

    async def _calls_read(self, partition: int, stamped: int, backend: LogBackend) -> list[Output]:
        """Folds from the log the calls whose start has not come by this point of their partition."""
        out: list[Output] = []
        if stamped <= self.calls_read.get(partition, -1):
            return out
        self.calls_read[partition] = stamped
        heap = self.waits_on.get(partition)
        while heap and heap[0][0] < stamped:
            waited = self.waiting.pop(heapq.heappop(heap)[1], None)
            if waited is not None:  # else its start came, or it was folded from the log already
                out += await self._from_log(waited, backend)
        return out

    async def _from_log(self, waited: list[tuple[LogRecord, Event[EventPayload]]],
                        backend: LogBackend) -> list[Output]:
        """A call picked up mid-way, folded as the log has it first: all of it, not only what came
        before these events, for its other topic may have been read further (a late `tool.requested`
        on voxlog.commands after the call's end on voxlog.calls), and rows folded from less would lose
        to the newer ones already written. Then these events (those the log gave are skipped, by seq)."""
        first = waited[0][1]
        self.read_back += 1
        async with log_admin(backend) as admin:
            history = await read_call(admin, first.call_id, topics=self.topics, since_ms=call_start_bound_ms(first))
        out: list[Output] = []
        for earlier in history.events:
            if earlier.type in CallsFold.event_types:
                out += self.fold.apply(earlier)
        for _, event in waited:
            out += self.fold.apply(event)
        return out
