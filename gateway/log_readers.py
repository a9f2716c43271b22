"""The work of a gateway that reads the whole log rather than a call: the projections into ClickHouse,
the summariser and the after-call worker (which writes each call to the CRM once it is summarised).
`voxlog serve` runs it in its background process (`gateway.background_process`, `voxlog.background`),
beside the calls' event loop; a gateway without one runs it on its own loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from consumers.backends import LogBackend
from consumers.workers.after_call import AfterCallStore, AfterCallWorker
from consumers.workers.summariser import Summariser, SummaryLlm, SummaryStore
from projections.default_projections import default_projections
from projections.projection_runner import ProjectionRunner
from projections.recording_store import RecordingStore
from projections.store import AnalyticsStore
from projections.tables import OFFSETS
from streams.config.agents import AgentRouter
from streams.providers.base import LlmProvider
from streams.providers.registry import ProviderRegistry

READY_TIMEOUT_S = 60.0


@dataclass
class LogReaders:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    summaries: SummaryStore | None = None
    after_calls: AfterCallStore | None = None

    def close(self) -> None:
        for state in (self.summaries, self.after_calls):
            if state is not None:
                state.close()


@dataclass(frozen=True)
class ProjectionsTarget:
    """Where the projections write: the store, and where recordings are assembled and kept."""

    store: AnalyticsStore
    recordings_path: Path
    recording_store: RecordingStore


@dataclass(frozen=True)
class WorkersTarget:
    """Where the summariser and the after-call worker keep their state, and the gateway's public URL
    (the recordings' links the CRM is given; None: no link)."""

    home: Path
    public_url: str | None

    def recording_url(self, call_id: str) -> str:
        """Where the tenant API serves a call's recording (to its API keys), for the CRM's call record."""
        return f"{self.public_url.rstrip('/')}/v1/calls/{call_id}/recording" if self.public_url else ""


def summary_llm_of(router: AgentRouter, providers: Callable[[], ProviderRegistry]) -> SummaryLlm:
    """Who summarises an agent's calls, asked of the registry `providers` gives at the time (a gateway's
    may be replaced after it starts)."""

    def summary_llm(tenant_id: str, agent_id: str) -> LlmProvider | None:
        agent = router.agents.get((tenant_id, agent_id))
        return providers().summary_llm(agent) if agent is not None else None

    return summary_llm


async def start_log_readers(backend: LogBackend, router: AgentRouter, summary_llm: SummaryLlm,
                            stop: asyncio.Event, *, projections: ProjectionsTarget | None,
                            workers: WorkersTarget | None) -> LogReaders:
    """Starts the projections (with a target) and the summariser and after-call worker (with theirs),
    each a task that ends once `stop` is set; returns when the tables exist (a call's start reads
    caller memory from one) and the workers have joined their groups."""
    readers = LogReaders()
    if workers is not None:
        readers.after_calls = AfterCallStore(workers.home / "after_call.db")
        after_call = AfterCallWorker(backend, router, readers.after_calls, workers.recording_url)
        readers.tasks.append(asyncio.create_task(after_call.run(stop), name="after-call"))
        await asyncio.wait_for(after_call.ready.wait(), READY_TIMEOUT_S)
        readers.summaries = SummaryStore(workers.home / "summaries.db")
        summariser = Summariser(backend, readers.summaries, llm_for=summary_llm)
        readers.tasks.append(asyncio.create_task(summariser.run(stop), name="summariser"))
        await asyncio.wait_for(summariser.ready.wait(), READY_TIMEOUT_S)
    if projections is not None:
        found = default_projections(router, recordings=projections.recordings_path,
                                    recording_store=projections.recording_store)
        for table in {table.name: table for p in found for table in (OFFSETS, *p.tables)}.values():
            await asyncio.to_thread(projections.store.create, table)
        for projection in found:
            runner = ProjectionRunner(backend, projections.store, projection)
            readers.tasks.append(asyncio.create_task(runner.run(stop), name=f"projection-{projection.name}"))
    return readers
