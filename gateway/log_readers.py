"""The work of a gateway that reads the whole log rather than a call: the projections into ClickHouse
and the summariser. `voxlog serve` runs it in its background process (`gateway.background_process`,
`voxlog.background`), beside the calls' event loop; a gateway without one runs it on its own loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from consumers.backends import LogBackend
from consumers.workers.summariser import Summariser, SummaryStore
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

    def close(self) -> None:
        if self.summaries is not None:
            self.summaries.close()


@dataclass(frozen=True)
class ProjectionsTarget:
    """Where the projections write: the store, and where recordings are assembled and kept."""

    store: AnalyticsStore
    recordings_path: Path
    recording_store: RecordingStore


async def start_log_readers(backend: LogBackend, router: AgentRouter, providers: ProviderRegistry,
                            stop: asyncio.Event, *, projections: ProjectionsTarget | None,
                            summaries_path: Path | None) -> LogReaders:
    """Starts the projections (with a target) and the summariser (with a path for its state), each a
    task that ends once `stop` is set; returns when the tables exist (a call's start reads caller
    memory from one) and the summariser has joined its group."""
    readers = LogReaders()
    if summaries_path is not None:
        readers.summaries = SummaryStore(summaries_path)

        def summary_llm(tenant_id: str, agent_id: str) -> LlmProvider | None:
            agent = router.agents.get((tenant_id, agent_id))
            return providers.summary_llm(agent) if agent is not None else None

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
