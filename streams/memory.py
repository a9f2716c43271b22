"""Long-term memory of callers: who a caller is (a key, never the number) and what a finished call
leaves behind (an extractive summary: what was booked, opened, asked for).

Pure functions of a call's events, so the offline summary is the same whenever it is made; a
summary an LLM makes instead is recorded as an event (`call.summarized`) all the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from schemas.base import Event, EventPayload
from schemas.events import CallStarted, HandoffRequested, ToolSucceeded, TtsRequested, TurnTaken
from streams.config.agents import LOOKUP_ID
from streams.providers.base import ChatMessage, LlmRequest

OFFLINE_SOURCE = "offline-extractive"
SUMMARY_INSTRUCTIONS = (
    "You keep a voice agent's long-term memory of its callers. Read the transcript of a call that "
    "just ended and write what the agent should remember for the caller's next call: one short "
    "clause or two joined by 'and', addressed to the caller in the second person, starting in lower "
    "case, as it would follow 'Last time' (for example: 'you booked a visit for tomorrow at ten "
    "(confirmation A1001)'). Keep bookings, tickets, confirmation numbers and unresolved requests; "
    "leave out phone numbers, email addresses, card numbers and anything said only in passing. "
    "Answer with the clause alone, without quotes."
)
SUMMARY_MAX_CHARS = 400
TRANSCRIPT_MAX_CHARS = 12_000
"""The newest part of a very long call's transcript is what is sent."""


def caller_key(tenant_id: str, number: str | None) -> str | None:
    """A stable key for the person on the other end, within a tenant; None when there is no number
    (a web widget visitor)."""
    if not number:
        return None
    digest = hashlib.sha256(f"{tenant_id}\x1f{number}".encode()).hexdigest()
    return f"caller-{digest[:24]}"


def person_number(started: CallStarted) -> str | None:
    """The person's number: the caller's on an inbound call, the called one's on an outbound one."""
    return started.to_number if started.direction == "outbound" else started.from_number


def key_of_call(tenant_id: str, started: CallStarted) -> str | None:
    """Whose call it is: recorded since call.started v2 (readable after the numbers were erased),
    derived from the numbers before."""
    return started.caller_key or caller_key(tenant_id, person_number(started))


def _tool_clause(tool: str, result_json: str) -> str:
    try:
        result = json.loads(result_json)
    except ValueError:
        result = {}
    if not isinstance(result, dict):
        result = {}
    if "when" in result and "confirmation" in result:
        return f"you booked a visit for {result['when']} (confirmation {result['confirmation']})"
    if "ticket_id" in result:
        return f"we opened ticket {result['ticket_id']} for you"
    return f"we ran {tool.replace('_', ' ')} for you"


NoteKind = Literal["caller", "agent", "tool", "lookup", "handoff"]


@dataclass(frozen=True)
class CallNote:
    """What a summary reads of one event: the caller's words (`turn.taken`), the agent's (`tts.requested`),
    a tool's result (`tool.succeeded`; `lookup` for the caller lookup's, which is no deed of the call's),
    a handoff. A call's notes are small beside its events, and a worker folds them as the events pass."""

    kind: NoteKind
    text: str = ""
    tool: str = ""


NOTED_TYPES = frozenset(t.EVENT_TYPE for t in (TurnTaken, TtsRequested, ToolSucceeded, HandoffRequested))
"""The event types `note_of` reads."""


def note_of(payload: EventPayload) -> CallNote | None:
    """The note a summary takes of this event, or None: it reads nothing of it."""
    match payload:
        case TurnTaken() if payload.caller_text.strip():
            return CallNote("caller", payload.caller_text.strip())
        case TtsRequested() if payload.text.strip():
            return CallNote("agent", payload.text.strip())
        case ToolSucceeded():
            return CallNote("lookup" if payload.tool_call_id == LOOKUP_ID else "tool", payload.result_json,
                            payload.tool)
        case HandoffRequested():
            return CallNote("handoff")
    return None


def notes_of(events: Iterable[Event[EventPayload]]) -> list[CallNote]:
    return [note for event in events if (note := note_of(event.payload)) is not None]


def summarize(notes: Sequence[CallNote]) -> str | None:
    """What the call did, as clauses the agent can say back ("you booked a visit for tomorrow at ten
    (confirmation A1001)"); None for a call where nothing was said."""
    clauses: list[str] = []
    first_words: str | None = None
    for note in notes:
        if note.kind == "tool":
            clauses.append(_tool_clause(note.tool, note.text))
        elif note.kind == "handoff":
            clauses.append("you asked to speak with a person")
        elif note.kind == "caller" and first_words is None:
            first_words = note.text
    if not clauses and first_words is None:
        return None
    if not clauses:
        return f'you told us "{first_words}"'
    return " and ".join(dict.fromkeys(clauses))


def transcript(notes: Sequence[CallNote]) -> str:
    """The call as lines (`Caller: ...`, `Agent: ...`, `Tool ...: result`), for an LLM to summarise."""
    lines: list[str] = []
    for note in notes:
        if note.kind == "caller":
            lines.append(f"Caller: {note.text}")
        elif note.kind == "agent":
            lines.append(f"Agent: {note.text}")
        elif note.kind in ("tool", "lookup"):
            lines.append(f"Tool {note.tool} result: {note.text}")
    return "\n".join(lines)[-TRANSCRIPT_MAX_CHARS:]


def summary_request(notes: Sequence[CallNote], *, request_id: str, model: str) -> LlmRequest | None:
    """What to ask an LLM for the call's summary; None for a call where nothing was said."""
    text = transcript(notes)
    if not text:
        return None
    return LlmRequest(request_id=request_id, model=model,
                      messages=(ChatMessage("system", SUMMARY_INSTRUCTIONS), ChatMessage("user", text)),
                      parameters={"temperature": "0.2", "max_tokens": "120"})


def clean_summary(text: str) -> str | None:
    """An LLM's answer as a summary clause: one line, unquoted, bounded; None when it is empty."""
    line = " ".join(text.split()).strip().strip('"').strip()
    if line.lower().startswith("last time"):
        line = line[len("last time"):].lstrip(" ,:")
    line = line.rstrip(".")
    return line[:SUMMARY_MAX_CHARS] or None
