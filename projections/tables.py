"""The analysts' tables: stable names, every column documented here (docs/analytics.md is made
from these definitions, and a test fails when it is stale).

Every table is a ReplacingMergeTree keyed by what identifies a row, with `_version` (the position
of the event that last changed the row in its call, or in its log partition) as the version: a row
written twice, after a projector crash and restart, collapses to one. Read with `FINAL` (or let
`voxlog sql` and `POST /v1/sql` do it: they set `final = 1`) to see each row once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TIME = "DateTime64(6, 'UTC')"
EARLIEST_US = -2_208_988_800_000_000  # 1900-01-01: ClickHouse's DateTime64 range
LATEST_US = 10_413_791_999_000_000  # 2299-12-31T23:59:59


def at(us: int) -> datetime:
    """An event time as a datetime, held within what ClickHouse's DateTime64 can store (a clock
    gone wrong must not stop a projection)."""
    return datetime.fromtimestamp(min(max(us, EARLIEST_US), LATEST_US) / 1e6, UTC)


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    doc: str


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]
    order_by: tuple[str, ...]
    example: str
    """An example query, for docs/analytics.md."""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def sanitize(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """The row with its unsigned numbers held within their type (an event with a negative or
        absurd number must not make a whole batch fail)."""
        out = list(values)
        for i, column in enumerate(self.columns):
            bits = _UNSIGNED_BITS.get(column.type.removeprefix("Nullable(").rstrip(")"))
            if bits is not None and isinstance(out[i], int):
                out[i] = min(max(out[i], 0), 2**bits - 1)
        return tuple(out)

    def ddl(self) -> str:
        columns = ",\n  ".join(f"`{c.name}` {c.type} COMMENT '{_quote(c.doc)}'" for c in self.columns)
        return (f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {columns}\n) "
                f"ENGINE = ReplacingMergeTree(_version) ORDER BY ({', '.join(self.order_by)}) "
                f"COMMENT '{_quote(self.doc)}'")


Row = tuple["Table", tuple[Any, ...]]
"""A row for a table, its values in the table's column order."""


@dataclass(frozen=True)
class Statement:
    """SQL a projection runs besides writing rows (an erasure's copies and deletions), its
    `parameters` bound to {name:Type} placeholders, after the rows of its batch that came before it."""

    sql: str
    parameters: tuple[tuple[str, Any], ...]


def deletion(table: Table, where: str, parameters: tuple[tuple[str, Any], ...]) -> Statement:
    """Rows removed at once (a lightweight DELETE: gone from every query that follows)."""
    return Statement(f"DELETE FROM {table.name} WHERE {where}", parameters)


Output = Row | Statement
"""What a projection makes of an event: rows to write, and (for an erasure) rows to delete."""


_UNSIGNED_BITS = {"UInt8": 8, "UInt16": 16, "UInt32": 32, "UInt64": 64}


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _c(name: str, type_: str, doc: str) -> Column:
    return Column(name, type_, doc)


TENANT = _c("tenant_id", "LowCardinality(String)", "The tenant the call belongs to.")
CALL = _c("call_id", "String", "The call (its id in the log).")
VERSION = _c("_version", "UInt64", "Position of the event that last changed this row: the newest wins.")

CALLS = Table(
    "calls",
    "One row per call: who, how, when, how it ended.",
    (
        TENANT, CALL,
        _c("agent_id", "LowCardinality(String)", "The agent that took the call."),
        _c("agent_version", "String", "Content hash of the agent's definition during the call."),
        _c("channel", "LowCardinality(String)", "phone, sip, widget."),
        _c("direction", "LowCardinality(String)", "inbound (the caller dialled) or outbound (the platform dialled)."),
        _c("routed_by", "LowCardinality(String)", "number, widget_key, outbound_request, handoff_return."),
        _c("from_number", "String", "Caller's number, masked but for its last 2 digits."),
        _c("to_number", "String", "Dialled number, masked but for its last 2 digits."),
        _c("caller_key", "String", "The person on the other end (the caller inbound, the called outbound) as a "
           "key: a hash of the tenant and the number, as in caller_memory; empty for the widget."),
        _c("provider_call_id", "String", "The carrier's id (Twilio CallSid); empty for the widget."),
        _c("dial_id", "String", "The dial request that placed an outbound call; empty otherwise."),
        _c("started_at", TIME, "When the call started."),
        _c("ended_at", f"Nullable({TIME})", "When it ended; NULL while it is live."),
        _c("duration_ms", "Nullable(UInt64)", "Length of the call; NULL while it is live."),
        _c("outcome", "LowCardinality(String)", "What the call achieved: booked, ticket_created, handed_off, ..."),
        _c("end_reason", "LowCardinality(String)",
           "caller_hangup, agent_hangup, handoff, timeout, socket_closed, error, ..."),
        _c("handoff", "UInt8", "1 when the call was handed to a human."),
        _c("handoff_outcome", "LowCardinality(String)",
           "What became of the handoff: connected, busy, no_answer, failed, canceled."),
        _c("consent", "LowCardinality(String)",
           "Recording consent: given, refused (a refusal stands, even after consent was given), or empty when "
           "not asked or not answered."),
        _c("consent_mode", "LowCardinality(String)",
           "How the caller was asked (docs/compliance.md): notice, opt_out or opt_in, the agent's own mode or "
           "the least the tenant's jurisdiction rule asks; empty for calls recorded before consent modes."),
        _c("consent_method", "LowCardinality(String)",
           "How consent was given or refused: implied_by_continuing, speech, dtmf; a refusal also silence "
           "(opt_in: no answer in time) or unclear (opt_in: an answer that was no yes)."),
        _c("recording_withheld", "LowCardinality(String)",
           "Why the call has no recording, when consent is why: consent_refused, or consent_not_given (opt_in "
           "and no yes); empty otherwise. Its caller audio after the refusal (opt_in: before the yes) is not in "
           "the log either."),
        _c("turns", "UInt32", "Caller turns taken."),
        _c("tool_calls", "UInt32", "Tool calls requested."),
        _c("barge_ins", "UInt32", "Times the caller spoke over the agent."),
        _c("errors", "UInt32", "Errors recorded (error.raised)."),
        VERSION,
    ),
    ("tenant_id", "call_id"),
    "SELECT outcome, count() AS calls, avg(duration_ms) / 1000 AS avg_s FROM calls FINAL GROUP BY outcome",
)

TURNS = Table(
    "turns",
    "One row per caller turn: what was said and answered, and what each step cost.",
    (
        TENANT, CALL,
        _c("agent_id", "LowCardinality(String)", "The agent."),
        _c("turn_index", "UInt32", "0-based turn number in the call."),
        _c("at", TIME, "When the turn was taken (the caller's turn detected as over)."),
        _c("caller_text", "String", "What the caller said, PII redacted."),
        _c("agent_text", "String", "What the agent said in answer, PII redacted."),
        _c("asr_provider", "LowCardinality(String)", "Speech recogniser."),
        _c("asr_model", "LowCardinality(String)", "Its model."),
        _c("asr_confidence", "Float64", "Mean confidence of the turn's final transcripts."),
        _c("asr_latency_ms", "UInt32", "Longest final-transcript latency of the turn."),
        _c("llm_provider", "LowCardinality(String)", "LLM (or the offline scripted policy)."),
        _c("llm_model", "LowCardinality(String)", "Its model."),
        _c("prompt_id", "LowCardinality(String)", "The agent's prompt id."),
        _c("prompt_hash", "String", "Content hash of the prompts used."),
        _c("llm_calls", "UInt32", "LLM requests in the turn (more than one after tool results)."),
        _c("input_tokens", "UInt32", "Tokens sent, all the turn's requests."),
        _c("output_tokens", "UInt32", "Tokens received, all the turn's requests."),
        _c("llm_first_token_ms", "UInt32", "Time to first token of the turn's first request."),
        _c("llm_total_ms", "UInt32", "Total LLM time of the turn."),
        _c("tts_provider", "LowCardinality(String)", "Speech synthesiser."),
        _c("tts_voice", "LowCardinality(String)", "Its voice."),
        _c("tts_first_byte_ms", "UInt32", "Time to first audio byte of the turn's first answer."),
        _c("voice_to_voice_ms", "Nullable(Float64)",
           "From the end of the caller's speech (the VAD's speech.stopped) to the agent's first audio byte: "
           "recognition, decision and synthesis; NULL when the agent did not speak."),
        _c("barge_in", "UInt8", "1 when the caller spoke over this turn's answer."),
        _c("guardrail", "String", "The guardrail rule that fired in this turn, if any."),
        VERSION,
    ),
    ("tenant_id", "call_id", "turn_index"),
    "SELECT agent_id, quantile(0.95)(voice_to_voice_ms) AS p95_ms FROM turns FINAL GROUP BY agent_id",
)

TRANSCRIPTS = Table(
    "transcripts",
    "Each utterance of a call, caller's and agent's, with timing; PII redacted.",
    (
        TENANT, CALL,
        _c("seq", "UInt64", "The utterance's event position in the call: orders the transcript."),
        _c("at", TIME, "When it was recognised (caller) or sent to speech (agent)."),
        _c("speaker", "LowCardinality(String)", "caller or agent."),
        _c("text", "String", "What was said, PII redacted."),
        _c("start_ms", "Nullable(UInt32)", "Caller utterances: start in the caller's audio stream."),
        _c("end_ms", "Nullable(UInt32)", "Caller utterances: end in the caller's audio stream."),
        _c("confidence", "Nullable(Float64)", "Caller utterances: the recogniser's confidence."),
        VERSION,
    ),
    ("tenant_id", "call_id", "seq"),
    "SELECT speaker, text FROM transcripts FINAL WHERE call_id = 'call-...' ORDER BY seq",
)

TOOL_CALLS = Table(
    "tool_calls",
    "Each tool call the agent made: arguments and result (PII redacted), latency, outcome.",
    (
        TENANT, CALL,
        _c("tool_call_id", "String", "The tool call."),
        _c("tool", "LowCardinality(String)", "The tool's name."),
        _c("requested_at", f"Nullable({TIME})", "When the model asked for it (its `llm.decided`)."),
        _c("arguments", "String", "Arguments (JSON), PII redacted."),
        _c("result", "String", "Result (JSON), PII redacted; empty unless it succeeded."),
        _c("outcome", "LowCardinality(String)", "pending, succeeded, failed."),
        _c("error", "String", "Why it failed."),
        _c("attempts", "UInt32", "Attempts the worker made."),
        _c("latency_ms", "UInt32", "The worker's time on the successful or last attempt."),
        _c("connector", "LowCardinality(String)", "The system that did it or failed: hubspot, salesforce, zendesk, "
           "freshdesk, caldav, google, calcom, webhook, voxlog (its own desk)."),
        _c("remote_id", "String", "The id of what it made or changed there (a contact, a ticket, a booking's UID)."),
        _c("failure", "LowCardinality(String)", "How it failed: auth, scope, not_found, conflict, invalid, "
           "rate_limited, unavailable, bad_response, configuration, deadline; empty unless it failed."),
        VERSION,
    ),
    ("tenant_id", "call_id", "tool_call_id"),
    "SELECT tool, countIf(outcome = 'failed') / count() AS failure_rate FROM tool_calls FINAL GROUP BY tool",
)

ERRORS = Table(
    "errors",
    "Errors and provider fallbacks, per call.",
    (
        TENANT, CALL,
        _c("seq", "UInt64", "The event's position in the call."),
        _c("at", TIME, "When."),
        _c("component", "LowCardinality(String)", "asr, llm, tts, gateway.twilio, tool, ..."),
        _c("provider", "LowCardinality(String)", "The provider involved, if any."),
        _c("kind", "LowCardinality(String)", "The error's kind (bad_input, timeout, ...) or 'fallback'."),
        _c("message", "String", "What happened, PII redacted."),
        _c("retryable", "UInt8", "1 when it may succeed if tried again."),
        _c("fatal", "UInt8", "1 when it ended the call."),
        _c("fallback_to", "LowCardinality(String)", "For fallbacks: the provider taken instead."),
        VERSION,
    ),
    ("tenant_id", "call_id", "seq"),
    "SELECT component, kind, count() FROM errors FINAL GROUP BY component, kind ORDER BY count() DESC",
)

PROMPT_VERSIONS = Table(
    "prompt_versions",
    "Each prompt id and hash the agents have used, with its text when the agent's file still has it, "
    "and first and last use.",
    (
        TENANT,
        _c("agent_id", "LowCardinality(String)", "The agent."),
        _c("prompt_id", "String", "The prompt's id in the agent's file."),
        _c("prompt_hash", "String", "Content hash of the persona, task and safety prompts."),
        _c("prompt_text", "String", "The prompts, when the agent's current file has this hash; else empty."),
        _c("first_used", TIME, "First LLM request with it (in the first call the projector saw it in)."),
        _c("last_used", TIME, "Latest LLM request with it."),
        VERSION,
    ),
    ("tenant_id", "agent_id", "prompt_id", "prompt_hash"),
    "SELECT prompt_id, prompt_hash, first_used, last_used FROM prompt_versions FINAL ORDER BY first_used",
)

AUDIT_LOG = Table(
    "audit_log",
    "Who or what did what, when, to which call: consents, handoffs, tool calls with side effects, API and "
    "SQL access, rejected webhooks, configuration changes (`config.agent_changed` and the like, naming the "
    "fields). Chained by hash per tenant and source partition: `voxlog audit verify` "
    "finds any change or deletion.",
    (
        TENANT,
        _c("source", "LowCardinality(String)",
           "The log partition the record was derived from (topic/partition): one chain per tenant and source."),
        _c("chain_index", "UInt64", "Position in its chain, from 0, gap-free."),
        _c("log_offset", "UInt64", "The record's event's offset in that partition."),
        _c("at", TIME, "When it happened."),
        _c("call_id", "String", "The call concerned, or '-'."),
        _c("actor", "String", "Who or what acted: api-key:ID, twilio-webhook, the agent, a tool worker."),
        _c("action", "LowCardinality(String)",
           "What was done: consent.given, handoff.requested, tool.requested, dial.requested, ..."),
        _c("resource", "String", "What it was done to."),
        _c("outcome", "LowCardinality(String)", "accepted, denied, failed, succeeded, ..."),
        _c("detail", "String", "More, PII redacted."),
        _c("remote_addr", "String", "Where a request came from, if it came over the network."),
        _c("event_id", "String", "The audit event's id in the log."),
        _c("prev_hash", "String", "The previous record's hash in this chain (64 zeros for the first)."),
        _c("hash", "String", "SHA-256 over prev_hash and this record's fields."),
        VERSION,
    ),
    ("tenant_id", "source", "chain_index"),
    "SELECT at, actor, action, resource, outcome FROM audit_log FINAL WHERE call_id = 'call-...' ORDER BY at",
)

CALLER_MEMORY = Table(
    "caller_memory",
    "Long-term memory: a summary of each finished call, per caller and tenant. A caller who calls again "
    "is greeted with the newest (recorded in the new call as memory.loaded).",
    (
        TENANT,
        _c("caller_key", "String", "The caller, as a key: a hash of the tenant and the number, never the number."),
        CALL,
        _c("agent_id", "LowCardinality(String)", "The agent that took the call."),
        _c("at", TIME, "When the summary was made."),
        _c("summary", "String", "What happened, PII redacted."),
        _c("outcome", "LowCardinality(String)", "The call's outcome."),
        _c("source", "LowCardinality(String)", "How the summary was made: offline-extractive, or the LLM used."),
        VERSION,
    ),
    ("tenant_id", "caller_key", "call_id"),
    "SELECT at, summary FROM caller_memory FINAL WHERE caller_key = 'caller-...' ORDER BY at DESC LIMIT 3",
)

ERASURES = Table(
    "erasures",
    "Callers whose data was erased (caller.erased): their memory, and the calls, turns, transcripts, tool "
    "calls, errors and recordings of their calls that started before `erased_before`, are gone from every "
    "table and stay gone through restarts and rebuilds.",
    (
        TENANT,
        _c("caller_key", "String", "The caller, as a key, never the number."),
        _c("erased_before", TIME, "Calls that started before this were erased; later calls are kept."),
        _c("requested_by", "String", "Who asked: api-key:ID or cli:USER."),
        _c("reason", "String", "Why, as given, PII redacted."),
        _c("erasure_id", "String", "The erasure's own stream id in the log (erasure-...)."),
        VERSION,
    ),
    ("tenant_id", "caller_key", "erasure_id"),
    "SELECT tenant_id, count() FROM erasures FINAL GROUP BY tenant_id",
)

ERASED_CALLS = Table(
    "erased_calls",
    "The calls an erasure removed (their rows in every other table are gone): which, whose, when they "
    "started, by which erasure.",
    (
        TENANT, CALL,
        _c("caller_key", "String", "The caller, as a key, never the number."),
        _c("started_at", TIME, "When the call started."),
        _c("erasure_id", "String", "The erasure that removed it (erasures.erasure_id)."),
        VERSION,
    ),
    ("tenant_id", "caller_key", "call_id"),
    "SELECT count() FROM erased_calls FINAL WHERE erasure_id = 'erasure-...'",
)

REFUSED_CALLS = Table(
    "refused_calls",
    "Calls the gateway did not take on (admission control): the caller heard busy. They have no row in "
    "`calls`.",
    (
        TENANT, CALL,
        _c("at", TIME, "When the call came."),
        _c("agent_id", "LowCardinality(String)", "The agent it was routed to."),
        _c("channel", "LowCardinality(String)", "phone, sip or widget."),
        _c("direction", "LowCardinality(String)", "inbound or outbound."),
        _c("reason", "LowCardinality(String)", "gateway_at_capacity, tenant_at_capacity, or not_ready (the "
           "gateway could not write its log, or was shutting down)."),
        _c("detail", "String", "The limit, in words."),
        _c("live_calls", "UInt32", "Calls counted against the limit when this one came."),
        _c("call_limit", "UInt32", "The limit that was reached."),
        VERSION,
    ),
    ("tenant_id", "call_id"),
    "SELECT toStartOfHour(at) AS hour, reason, count() FROM refused_calls FINAL GROUP BY hour, reason ORDER BY hour",
)

RECORDINGS = Table(
    "recordings",
    "One row per call recording: a stereo WAV, the caller on the left, the agent on the right. A call whose "
    "caller refused consent, or under opt_in never agreed, has none (`calls.recording_withheld` says why; "
    "its row while live is removed).",
    (
        TENANT, CALL,
        _c("path", "String", "Where the WAV is: <tenant_id>/<call_id>.wav under the recordings folder, or "
           "s3://<bucket>/<prefix><tenant_id>/<call_id>.wav when recordings are kept in S3."),
        _c("format", "LowCardinality(String)", "Container/encoding/rate/layout: wav/pcm_s16le/16000/stereo."),
        _c("channels", "UInt8", "2: left the caller, right the agent."),
        _c("sample_rate", "UInt32", "Samples per second of each channel."),
        _c("duration_ms", "UInt64", "Length of the recording (the longer channel); 0 while the call is live."),
        _c("bytes", "UInt64", "Size of the WAV file; 0 while the call is live."),
        _c("caller_audio_ms", "UInt64", "Caller audio received (its chunks' durations); 0 while the call is live."),
        _c("agent_audio_ms", "UInt64",
               "Agent audio played to the caller (its chunks' durations); 0 while the call is live."),
        _c("started_at", TIME, "When the call started: the recording's time zero."),
        _c("ended_at", f"Nullable({TIME})", "When the call ended; NULL while it is live."),
        _c("complete", "UInt8", "1 once the call ended and the file is final; 0 while it is being recorded."),
        VERSION,
    ),
    ("tenant_id", "call_id"),
    "SELECT tenant_id, count() AS recordings, sum(duration_ms) / 3600000 AS hours FROM recordings FINAL "
    "WHERE complete GROUP BY tenant_id",
)

OFFSETS = Table(
    "_projection_offsets",
    "How far each projection has written: the next log offset per topic partition.",
    (
        _c("projection_name", "LowCardinality(String)", "The projection."),
        _c("topic", "LowCardinality(String)", "The log topic."),
        _c("log_partition", "UInt32", "The partition."),
        _c("next_offset", "UInt64", "The next offset to read."),
        _c("_version", "UInt64", "Increases with every write: the newest wins."),
    ),
    ("projection_name", "topic", "log_partition"),
    "SELECT * FROM _projection_offsets FINAL",
)

ANALYST_TABLES = (CALLS, TURNS, TRANSCRIPTS, TOOL_CALLS, ERRORS, PROMPT_VERSIONS, CALLER_MEMORY, RECORDINGS, AUDIT_LOG,
                  ERASURES, ERASED_CALLS, REFUSED_CALLS)


def analytics_markdown() -> str:
    """The tables section of docs/analytics.md."""
    parts = []
    for table in ANALYST_TABLES:
        rows = "\n".join(f"| `{c.name}` | `{c.type}` | {c.doc} |" for c in table.columns)
        parts.append(f"### `{table.name}`\n\n{table.doc} Key: `({', '.join(table.order_by)})`.\n\n"
                     f"| column | type | meaning |\n| --- | --- | --- |\n{rows}\n\n```sql\n{table.example}\n```\n")
    return "\n".join(parts)
