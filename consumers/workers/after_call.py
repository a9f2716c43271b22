"""The after-call worker: once a call is over and summarised, its record goes where the tenant keeps
its customers: the call on the contact in the CRM (summary, outcome, duration, the recording's link),
and the summary on the ticket the call opened, as each agent's `after_call` names the tools.

It folds what it needs from the calls topic as the events pass, in its own consumer group (no call is
read back by key: the cost of a call does not grow with the log's history): the call's start (agent,
direction, the other party's number, when), the tickets it opened and the contact its lookup found,
its end, and then its summary (`call.summarized`, the summariser's). With the summary it writes the
commands, `tool.requested` on the commands topic, as the call's next events after `call.ended`; the
tool worker runs them like any tool call: once per idempotency key (`<call>/after/<tool>`), retried
when safe, audited. A redelivered summary finds the commands written and writes nothing.

What it holds of a call (the other party's number among it) lives in its state file only until the
commands are written, and a call never summarised is forgotten after a day.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent
from consumers.group_loop import run_in_group
from consumers.workers.state_file import FORGET_UNFINISHED_AFTER_S, open_state_db
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogProducer
from schemas.base import Event, EventPayload
from schemas.events import CallEnded, CallStarted, CallSummarized, ToolRequested, ToolSucceeded
from schemas.topics import CALLS
from schemas.version import __version__
from streams.config.agents import AgentRouter, AgentSpec

log = logging.getLogger(__name__)

WORKER = "voxlog.after_call"
GROUP = "voxlog-after-call"
FOLDED_TYPES = frozenset(t.EVENT_TYPE for t in (CallStarted, ToolSucceeded, CallEnded, CallSummarized))
"""What the worker decodes of the calls topic (the rest is passed over undecoded)."""


class AfterCallStore:
    """Each call's fold, in the worker's own SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = open_state_db(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("""CREATE TABLE IF NOT EXISTS after_calls (
                call_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, agent_id TEXT NOT NULL, direction TEXT NOT NULL,
                party TEXT NOT NULL, started_us INTEGER NOT NULL, contact_id TEXT NOT NULL DEFAULT '',
                ticket_id TEXT NOT NULL DEFAULT '', ended_seq INTEGER, outcome TEXT NOT NULL DEFAULT '',
                duration_ms INTEGER NOT NULL DEFAULT 0, written INTEGER NOT NULL DEFAULT 0,
                seen_at REAL NOT NULL)""")
            # Each call's start forgets what is a day old: by index, not a scan of a day of calls.
            self._db.execute("CREATE INDEX IF NOT EXISTS after_calls_by_age ON after_calls (seen_at)")

    def started(self, call_id: str, tenant_id: str, agent_id: str, direction: str, party: str,
                started_us: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM after_calls WHERE seen_at < ?", (time.time() - FORGET_UNFINISHED_AFTER_S,))
            self._db.execute(
                "INSERT OR IGNORE INTO after_calls (call_id, tenant_id, agent_id, direction, party, started_us, "
                "seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (call_id, tenant_id, agent_id, direction, party, started_us, time.time()))

    def update(self, call_id: str, **values: str | int) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)  # names are this module's own, never input
        with self._lock:
            self._db.execute(f"UPDATE after_calls SET {columns} WHERE call_id = ?", (*values.values(), call_id))

    def row(self, call_id: str) -> dict[str, str | int | None] | None:
        with self._lock:
            cursor = self._db.execute("SELECT * FROM after_calls WHERE call_id = ?", (call_id,))
            found = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        return None if found is None else dict(zip(names, found, strict=True))

    def written(self, call_id: str) -> None:
        """The commands are on the log: nothing personal is kept beyond this."""
        self.update(call_id, written=1, party="")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class AfterCallWorker:
    def __init__(self, backend: LogBackend, router: AgentRouter, store: AfterCallStore,
                 recording_url: Callable[[str], str]) -> None:
        self.backend = backend
        self.router = router
        self.store = store
        self.recording_url = recording_url
        """The link to a call's recording in the tenant API, or "" where the gateway has no public URL."""
        self.ready = asyncio.Event()
        self.written = 0

    def _agent(self, tenant_id: str, agent_id: str) -> AgentSpec | None:
        return self.router.agents.get((tenant_id, agent_id))

    async def run(self, stop: asyncio.Event) -> None:
        writers: list[EventWriter] = []

        async def start(producer: LogProducer) -> None:
            writers.append(EventWriter(producer))

        async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
            try:
                await self.fold(writers[0], item.event)
            except Exception:  # one call's record must not stop the others'
                log.exception("after-call: call %s", item.event.call_id)

        await run_in_group(self.backend, [CALLS], GROUP, stop, handle, ready=self.ready, start=start,
                           types=FOLDED_TYPES)

    async def fold(self, writer: EventWriter, event: Event[EventPayload]) -> None:
        p = event.payload
        match p:
            case CallStarted():
                agent = self._agent(event.tenant_id, p.agent_id)
                if agent is None or not (agent.after_call.log_call_tool or agent.after_call.comment_tool):
                    return  # nothing to write for this agent's calls: nothing kept
                party = (p.to_number if p.direction == "outbound" else p.from_number) or ""
                await asyncio.to_thread(self.store.started, event.call_id, event.tenant_id, p.agent_id, p.direction,
                                        party, event.envelope.event_time_us)
            case ToolSucceeded():
                await self._tool_result(event.call_id, event.tenant_id, p)
            case CallEnded():
                if await asyncio.to_thread(self.store.row, event.call_id) is not None:
                    await asyncio.to_thread(self.store.update, event.call_id, ended_seq=event.seq,
                                            outcome=p.outcome or "", duration_ms=p.duration_ms)
            case CallSummarized():
                await self._write(writer, event, p)

    async def _tool_result(self, call_id: str, tenant_id: str, p: ToolSucceeded) -> None:
        row = await asyncio.to_thread(self.store.row, call_id)
        if row is None:
            return
        agent = self._agent(tenant_id, str(row["agent_id"]))
        tool = agent.tool(p.tool) if agent is not None else None
        if tool is None or not p.remote_id:
            return
        if tool.operation == "tickets.create":
            await asyncio.to_thread(self.store.update, call_id, ticket_id=p.remote_id)
        elif tool.operation in ("crm.find_contact", "crm.upsert_contact"):
            await asyncio.to_thread(self.store.update, call_id, contact_id=p.remote_id)

    async def _write(self, writer: EventWriter, summarised: Event[EventPayload], p: CallSummarized) -> None:
        row = await asyncio.to_thread(self.store.row, p.call_id)
        if row is None or row["ended_seq"] is None or row["written"]:
            return  # not ours, not over yet (a summary comes after the end), or written already
        agent = self._agent(str(row["tenant_id"]), str(row["agent_id"]))
        if agent is None:
            return
        party = str(row["party"])
        commands: list[ToolRequested] = []
        if agent.after_call.log_call_tool and party:
            arguments: dict[str, str | int] = {"summary": p.summary, "outcome": str(row["outcome"]),
                         "duration_s": int(row["duration_ms"] or 0) // 1000, "direction": str(row["direction"]),
                         "started_at": datetime.fromtimestamp(int(row["started_us"] or 0) / 1e6, UTC).isoformat(),
                         "recording_url": self.recording_url(p.call_id), "ticket_id": str(row["ticket_id"]),
                         "call_id": p.call_id}
            if row["contact_id"]:
                arguments["contact_id"] = str(row["contact_id"])
            commands.append(self._command(agent, agent.after_call.log_call_tool, p.call_id, party, arguments))
        if agent.after_call.comment_tool and row["ticket_id"]:
            body = f"Call {p.call_id} ({row['outcome']}): {p.summary}"
            commands.append(self._command(agent, agent.after_call.comment_tool, p.call_id, party,
                                          {"ticket_id": str(row["ticket_id"]), "body": body}))
        if commands:
            recorder = CallRecorder(writer, tenant_id=str(row["tenant_id"]), call_id=p.call_id, producer=WORKER,
                                    producer_version=__version__, next_seq=int(row["ended_seq"]) + 1)
            for command in commands:
                await recorder.record(command, causation_id=summarised.envelope.event_id, correlation_id=p.call_id)
            await writer.flush()
            self.written += len(commands)
        await asyncio.to_thread(self.store.written, p.call_id)

    @staticmethod
    def _command(agent: AgentSpec, tool_name: str, call_id: str, party: str,
                 arguments: dict[str, str | int]) -> ToolRequested:
        tool = agent.tool(tool_name)
        assert tool is not None  # the agent file's validation holds it
        return ToolRequested(tool_call_id=f"after/{tool.name}", tool=tool.name,
                             arguments_json=json.dumps(arguments, sort_keys=True),
                             idempotency_key=f"{call_id}/after/{tool.name}", operation=tool.operation,
                             caller_number=party, deadline_us=0)
