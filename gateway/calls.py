"""The gateway's runtime: the shared producer, the agents, the tool replies, and one session per call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from consumers.dialer import DialStore, DialWorker
from consumers.summariser import Summariser
from consumers.tools import ToolRunner, ToolStore, ToolWorker, WebhookSigner
from gateway.config_audit import record_config_changes
from gateway.twilio_rest import TwilioRest
from producers.base import LogProducer
from producers.events import CallRecorder, EventWriter, standalone_event
from projections.audit import epoch_us
from projections.recording_store import LocalRecordingStore, RecordingStore
from projections.runner import ProjectionRunner, default_projections
from projections.store import AnalyticsError, AnalyticsStore
from projections.tables import CALLER_MEMORY
from projections.tenant_sql import TenantSql
from schemas.events import AuditRecorded, ErrorRaised, MemoryLoaded, MemorySummary
from streams.agents import AgentRouter, AgentSpec
from streams.config_changes import config_items
from streams.memory import caller_key
from streams.metrics import CallMetrics
from streams.providers.base import LlmProvider
from streams.providers.registry import ProviderRegistry
from streams.session import CallSession, Providers, SessionReport
from streams.tenants import Tenants
from streams.tool_replies import ToolReplies
from streams.transport import InboundCall, MediaTransport
from voxlog import __version__
from voxlog.backends import LogBackend, ensure_topics

log = logging.getLogger(__name__)

PRODUCER = "voxlog.gateway"
MEMORY_SUMMARIES = 3
MEMORY_TIMEOUT_S = 0.5
MEMORY_SOURCE = "clickhouse:caller_memory"


def new_call_id() -> str:
    return f"call-{uuid.uuid4()}"


@dataclass
class Gateway:
    backend: LogBackend
    router: AgentRouter
    home: Path
    tenants: Tenants = field(default_factory=lambda: Tenants({}))
    run_workers: bool = True
    """Run the tool worker and the dialer in this process too (one machine); with Kafka they usually run apart."""
    webhook_secret: bytes = b""
    rest: TwilioRest | None = None
    """Twilio's REST API, when an account is configured: transfers, hang-ups, outbound calls."""
    public_url: str | None = None
    analytics: AnalyticsStore | None = None
    """ClickHouse, for the tenant SQL API (and the projections, with `run_projections`)."""
    analytics_error: str | None = None
    """Why there is no `analytics` (it could not be opened), for the API to say."""
    run_projections: bool = False
    _tenant_sql: TenantSql | None = None
    metrics: CallMetrics = field(default_factory=CallMetrics)

    recording_store: RecordingStore | None = None
    """Where finished call recordings are kept; None: the folder `recordings_path`."""

    @property
    def recordings_path(self) -> Path:
        return self.home / "recordings"

    @property
    def recordings(self) -> RecordingStore:
        return self.recording_store or LocalRecordingStore(self.recordings_path)
    provider_registry: ProviderRegistry = field(default_factory=ProviderRegistry)
    """One per gateway, so that circuit breakers and rate limits span its calls."""
    providers_factory: Callable[[AgentSpec], Providers] | None = None
    """An agent's providers, where not the registry's (benchmarks' scripted timelines)."""
    """How a call's providers are made (benchmarks swap in scripted timelines)."""
    sessions: dict[str, CallSession] = field(default_factory=dict)
    reports: list[SessionReport] = field(default_factory=list)
    _producer: LogProducer | None = None
    _writer: EventWriter | None = None
    _replies: ToolReplies | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _http: httpx.AsyncClient | None = None
    _store: ToolStore | None = None
    _dials: DialStore | None = None
    dialer: DialWorker | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> None:
        admin = self.backend.admin()
        try:
            await ensure_topics(admin)
        finally:
            await admin.close()
        if self.providers_factory is None:
            for agent in self.router.agents.values():
                for problem in self.provider_registry.problems(agent):
                    log.error("%s: its calls will fail until this is mended", problem)
        self._producer = self.backend.producer()
        await self._producer.start()
        self._writer = EventWriter(self._producer, observers=(self.metrics.observe,))
        await record_config_changes(self.backend, self._writer,
                                    config_items(self.router.agents.values(), self.tenants.tenants.values()),
                                    actor=f"config-files@{socket.gethostname()}")
        self._replies = ToolReplies(self.backend)
        self._tasks.append(asyncio.create_task(self._replies.run(self._stop), name="tool-replies"))
        await asyncio.wait_for(self._replies.ready.wait(), 60)
        if self.run_workers:
            self._http = httpx.AsyncClient(timeout=10)
            self._store = ToolStore(self.home / "tools.db")
            worker = ToolWorker(self.backend, ToolRunner(self._store, self.router, WebhookSigner(self.webhook_secret),
                                                         self._http))
            self._tasks.append(asyncio.create_task(worker.run(self._stop), name="tool-worker"))
            await asyncio.wait_for(worker.ready.wait(), 60)
            if self.rest is not None and self.public_url:
                self._dials = DialStore(self.home / "dials.db")
                self.dialer = DialWorker(self.backend, self.rest, self.tenants, self.public_url, self._dials)
                self._tasks.append(asyncio.create_task(self.dialer.run(self._stop), name="dialer"))
                await asyncio.wait_for(self.dialer.ready.wait(), 60)
            else:
                log.info("no dialer: outbound calls need a Twilio account and VOXLOG_PUBLIC_URL")
            summariser = Summariser(self.backend, llm_for=self._summary_llm)
            self._tasks.append(asyncio.create_task(summariser.run(self._stop), name="summariser"))
            await asyncio.wait_for(summariser.ready.wait(), 60)
        if self.analytics is not None and self.run_projections:
            for projection in default_projections(self.router, recordings=self.recordings_path,
                                                  recording_store=self.recordings):
                runner = ProjectionRunner(self.backend, self.analytics, projection)
                self._tasks.append(asyncio.create_task(runner.run(self._stop), name=f"projection-{projection.name}"))

    async def stop(self) -> None:
        self._stop.set()
        for session in list(self.sessions.values()):
            session.closed("shutdown")
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        await self.provider_registry.aclose()
        if self._producer is not None:
            await self._producer.stop()
        if self._http is not None:
            await self._http.aclose()
        if self._store is not None:
            self._store.close()
        if self._dials is not None:
            self._dials.close()

    @property
    def writer(self) -> EventWriter:
        if self._writer is None:
            raise RuntimeError("gateway not started")
        return self._writer

    def _providers(self, agent: AgentSpec) -> Providers:
        return (self.providers_factory or self.provider_registry.providers_for)(agent)

    def _summary_llm(self, tenant_id: str, agent_id: str) -> LlmProvider | None:
        agent = self.router.agents.get((tenant_id, agent_id))
        return self.provider_registry.summary_llm(agent) if agent is not None else None

    def tenant_sql(self) -> TenantSql:
        """Tenant-scoped SQL over `analytics`; AnalyticsError when there is none."""
        if self.analytics is None:
            raise AnalyticsError(f"analytics unavailable: {self.analytics_error}")
        if self._tenant_sql is None or self._tenant_sql.store is not self.analytics:
            self._tenant_sql = TenantSql(self.analytics)
        return self._tenant_sql

    async def recall(self, call: InboundCall) -> MemoryLoaded | None:
        """What the tenant remembers of this caller (newest first), from `caller_memory`; None when
        the caller has no key (no number) or there is no ClickHouse. Bounded in time: a slow lookup
        costs the caller a greeting without memory, not a wait."""
        number = call.to_number if call.direction == "outbound" else call.from_number
        key = caller_key(call.tenant_id, number)
        if key is None or self.analytics is None:
            return None
        query = (f"SELECT call_id, summary, at FROM {CALLER_MEMORY.name} FINAL "
                 "WHERE tenant_id = {t:String} AND caller_key = {k:String} ORDER BY at DESC LIMIT {n:UInt32}")
        try:
            result = await asyncio.wait_for(asyncio.to_thread(
                self.analytics.query, query, {"t": call.tenant_id, "k": key, "n": MEMORY_SUMMARIES}), MEMORY_TIMEOUT_S)
        except (TimeoutError, AnalyticsError) as exc:
            log.warning("caller memory for %s unavailable: %s", call.call_id, exc or "timed out")
            return MemoryLoaded(caller_key=key, summaries=(), source=f"{MEMORY_SOURCE} (unavailable)")
        return MemoryLoaded(caller_key=key, source=MEMORY_SOURCE, summaries=tuple(
            MemorySummary(call_id=str(cid), summary=str(text), created_us=epoch_us(when))
            for cid, text, when in result.rows))

    def open_session(self, call: InboundCall, agent: AgentSpec, transport: MediaTransport,
                     providers: Providers | None = None, memory: MemoryLoaded | None = None) -> CallSession:
        assert self._replies is not None
        recorder = CallRecorder(self.writer, tenant_id=call.tenant_id, call_id=call.call_id, producer=PRODUCER,
                                producer_version=__version__)
        session = CallSession(call, agent, transport, recorder, providers or self._providers(agent),
                              tool_replies=self._replies.register(call.call_id), memory=memory)
        self.sessions[call.call_id] = session
        return session

    async def run_session(self, session: CallSession) -> SessionReport:
        try:
            report = await session.run()
            self.reports.append(report)
            return report
        finally:
            self.sessions.pop(session.call.call_id, None)
            if self._replies is not None:
                self._replies.unregister(session.call.call_id)
            async with self._changed:
                self._changed.notify_all()

    async def wait_idle(self, timeout_s: float) -> None:
        """Until no call is in progress (or the timeout passes)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: not self.sessions), timeout_s)

    async def audit(self, *, tenant_id: str, call_id: str, actor: str, action: str, resource: str, outcome: str,
                    detail: str, remote_addr: str | None) -> None:
        payload = AuditRecorded(actor=actor, action=action, resource=resource, outcome=outcome, detail=detail,
                                remote_addr=remote_addr)
        await self.writer.append(standalone_event(payload, tenant_id=tenant_id, stream_id=call_id, producer=PRODUCER,
                                                  producer_version=__version__))
        await self.writer.flush()

    def bad_input(self, session: CallSession, component: str, message: str) -> None:
        """A malformed frame or message from a channel: recorded, skipped, the call goes on."""
        session.observe(ErrorRaised(component=component, provider=None, kind="bad_input", message=message[:500],
                                         retryable=False, fatal=False))
