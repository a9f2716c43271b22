"""The gateway's runtime: the shared producer, the agents, the tool replies, and one session per call.

It keeps itself honest about what it can serve: calls are admitted against its capacity and the
tenants' limits (`gateway.admission`); its lease lists the calls it owns and its reaper ends the
calls of gateways that died (`consumers.workers.call_leases`); while its log cannot be written it takes no
calls, and after `LOG_OUTAGE_END_S` it ends the ones it can no longer record; on shutdown it ends
its calls with a reason and gives the log `drain_s` to take their last events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import SecretStr

from consumers.backends import LogBackend, ensure_topics
from consumers.log_consumer import LogConsumer
from consumers.tool_replies import ToolReplies
from consumers.workers.call_leases import CallReaper, LeasedCall, LeaseKeeper, new_instance_id
from consumers.workers.dialer import CallPlacer, DialStore, DialWorker, TwilioPlacer
from consumers.workers.tools import ToolRunner, ToolStore, ToolWorker
from gateway.admission import Admission, RateLimits, Refusal
from gateway.background_process import BackgroundFailed, BackgroundProcess
from gateway.config_audit import record_config_changes
from gateway.log_readers import LogReaders, ProjectionsTarget, WorkersTarget, start_log_readers, summary_llm_of
from gateway.loop_lag import GATEWAY_PERIOD_S, loop_lag_histogram, watch_loop_lag
from gateway.whatif_isolation import WhatIfChildren
from producers.event_writer import CallRecorder, EventWriter, standalone_event
from producers.log_producer import LogProducer
from projections.call_views import CallViews
from projections.recording_store import LocalRecordingStore, RecordingStore
from projections.store import Analytics, AnalyticsError, AnalyticsStore
from projections.tenant_sql import TenantSql
from schemas.base import Event, EventPayload
from schemas.events import AuditRecorded, CallRefused, ConsentRefused, MemoryLoaded
from schemas.sealing import AUDIO_DATA
from schemas.topics import GATEWAYS
from schemas.version import __version__
from streams.audio.vad import make_judge
from streams.call.session import CallSession, Providers, SessionReport
from streams.call.transport import InboundCall, MediaTransport
from streams.channels.twilio_rest import TwilioRest
from streams.config.agents import AgentRouter, AgentSpec
from streams.config.config_changes import config_items
from streams.config.consent import consent_parameters
from streams.config.tenants import Tenants
from streams.connectors.integrations import TenantConnectors
from streams.connectors.secrets import Secrets
from streams.keystore.data_keys import DataKeyStore
from streams.keystore.retention import RETENTION_INTERVAL_S, enforce_retention
from streams.metrics import CallMetrics
from streams.providers.registry import ProviderRegistry
from streams.startup_heap import freeze_startup_heap

if TYPE_CHECKING:  # its module loads PJSIP, which a gateway without SIP does without
    from gateway.sip_endpoint import SipEndpointConfig

log = logging.getLogger(__name__)
AnalyticsReader = TypeVar("AnalyticsReader", TenantSql, CallViews)
T = TypeVar("T")

PRODUCER = "voxlog.gateway"
LOG_STALL_S = 3.0
"""The log has not taken a write for this long: the gateway is not ready and takes no calls."""
LOG_OUTAGE_END_S = 15.0
"""For this long: the calls in progress are ended (a call that cannot be recorded is not served), their
last events wait in the producer's bounded buffer for the log to come back."""
LEASE_HOLD_TIMEOUT_S = 5.0
"""A call whose owner cannot be put on record within this long is not started."""
REPORTS_KEPT = 1000
"""The ended calls' reports a gateway keeps (the newest): the demo reads its few, and a gateway that serves for
months must not keep one for every call it ever ran."""


def new_call_id() -> str:
    return f"call-{uuid.uuid4()}"


async def while_running(running: asyncio.Task[Any],
                        receive: Callable[[], Awaitable[T | None]]) -> AsyncIterator[T | None]:
    """What a channel's `receive` gives, one after another, while its call's session (`running`) goes on:
    it ends when the session does (the pending receive cancelled), and after a None (the far end gone)."""
    while not running.done():
        receiving = asyncio.ensure_future(receive())
        done, _ = await asyncio.wait({receiving, running}, return_when=asyncio.FIRST_COMPLETED)
        if receiving not in done:
            receiving.cancel()
            return
        item = receiving.result()
        yield item
        if item is None:
            return


class LocalService(Protocol):
    """A server the gateway's process runs beside it (started before the gateway, stopped after)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class GatewayRuntime:
    backend: LogBackend
    router: AgentRouter
    home: Path
    tenants: Tenants = field(default_factory=lambda: Tenants({}))
    run_workers: bool = True
    """Run the tool worker and the dialer for this gateway, and the summariser and after-call worker (in
    its background process, if it has one) too (one machine); with Kafka they usually run apart."""
    webhook_secret: bytes = b""
    twilio_auth_token: str = ""
    """Checks Twilio's signatures on webhooks and media streams; empty: none are checked (no Twilio account)."""
    rest: TwilioRest | None = None
    """Twilio's REST API, when an account is configured: transfers, hang-ups, outbound calls."""
    public_url: str | None = None
    replica_url: str | None = None
    """This gateway's own public URL when several share `public_url` (a load balancer before them): Twilio's
    media stream and a transfer's outcome come to the gateway that holds the call."""
    analytics: Analytics | None = None
    """ClickHouse, for the tenant SQL API, the console and caller memory (and the projections, with
    `run_projections`): a `HostedStore` where the background process holds the embedded engine."""
    analytics_error: str | None = None
    """Why there is no `analytics` (it could not be opened), for the API to say."""
    run_projections: bool = False
    """Run the projections on this gateway's event loop, into `analytics` (an `AnalyticsStore`)."""
    background: BackgroundProcess | None = None
    """Where the projections, the summariser and the after-call worker run instead, when given: a
    process of their own, which the gateway starts with itself and again whenever it dies."""
    _tenant_sql: TenantSql | None = None
    _call_views: CallViews | None = None
    metrics: CallMetrics = field(default_factory=CallMetrics)
    recording_store: RecordingStore | None = None
    """Where finished call recordings are kept; None: the folder `recordings_path`."""
    vcon_signing_key: Path | None = None
    """The key file vCon exports are signed with (`VOXLOG_VCON_SIGNING_KEY`); None: vcon-signing-key.pem in `home`."""
    provider_registry: ProviderRegistry = field(default_factory=ProviderRegistry)
    whatif_children: WhatIfChildren = field(default_factory=WhatIfChildren)
    """The what-ifs the tenant API asks for, each in a child process, a few at once."""
    """One per gateway, so that circuit breakers and rate limits span its calls."""
    secrets: Secrets = field(default_factory=Secrets)
    """What the tool worker resolves the tenants' integration secrets against (the environment, VOXLOG_SECRETS_DIR)."""
    sip: SipEndpointConfig | None = None
    """Where and how the gateway takes SIP calls (`VOXLOG_SIP_BIND`); None: no SIP."""
    sip_placer: CallPlacer | None = None
    """What places the calls of tenants with a SIP trunk (`sip.outbound`): the gateway's SIP side, if any."""
    local_services: list[LocalService] = field(default_factory=list)
    """Servers this process runs for its tenants and stops with them (the demo's CalDAV calendar)."""
    providers_factory: Callable[[AgentSpec], Providers] | None = None
    """An agent's providers, where not the registry's (benchmarks' scripted timelines)."""
    sessions: dict[str, CallSession] = field(default_factory=dict)
    reports: deque[SessionReport] = field(default_factory=lambda: deque(maxlen=REPORTS_KEPT))
    capacity: int = 20
    """Calls this gateway serves at once (`VOXLOG_MAX_CALLS`)."""
    drain_s: float = 15.0
    widget_calls_per_address: int = 3
    """Widget calls one client address may have at once (`VOXLOG_WIDGET_CALLS_PER_ADDRESS`)."""
    instance_id: str = field(default_factory=new_instance_id)
    draining: bool = False
    admission: Admission = field(init=False)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    """The tenant API's, per API key and per address presenting invalid keys."""
    reaper: CallReaper | None = None
    _leases: LeaseKeeper | None = None
    _lease_producer: LogProducer | None = None
    _drain_deadline: float | None = None
    _producer: LogProducer | None = None
    _writer: EventWriter | None = None
    _replies: ToolReplies | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _store: ToolStore | None = None
    _readers: LogReaders | None = None
    _dials: DialStore | None = None
    dialer: DialWorker | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.admission = Admission(self.capacity, tenant_limit=self._tenant_limit, not_ready=self.not_ready)
        self.loop_lag = loop_lag_histogram(self.metrics.registry)

    @property
    def recordings_path(self) -> Path:
        return self.home / "recordings"

    @property
    def recordings(self) -> RecordingStore:
        return self.recording_store or LocalRecordingStore(self.recordings_path)

    def placer_for(self, tenant_id: str, twilio: CallPlacer | None) -> CallPlacer | None:
        """How a tenant's calls go out: its SIP trunk where it has one (never Twilio instead: another caller
        id, another bill; None where this gateway serves no SIP), else Twilio."""
        if self.tenants.get(tenant_id).sip.outbound is not None:
            return self.sip_placer
        return twilio

    def _tenant_limit(self, tenant_id: str) -> int | None:
        return self.tenants.get(tenant_id).limits.max_concurrent_calls

    def not_ready(self) -> str | None:
        """Why this gateway takes no calls now, or None when it does."""
        if self.draining:
            return "the gateway is shutting down"
        if self._producer is None:
            return "the gateway is starting"
        stalled = self._producer.stalled_s()
        if stalled > LOG_STALL_S:
            return f"the log ({self.backend.describe()}) has not taken a write for {stalled:.0f} s"
        return None

    async def start(self) -> None:
        for service in self.local_services:
            await asyncio.to_thread(service.start)
        async with self.backend.admin() as admin:
            await ensure_topics(admin)
        self._lease_producer = self.backend.producer()
        await self._lease_producer.start()
        self._leases = LeaseKeeper(self._lease_producer, self.instance_id)
        await self._leases.renew()
        self._tasks.append(asyncio.create_task(self._leases.run(self._stop), name="lease"))
        self._tasks.append(asyncio.create_task(watch_loop_lag(GATEWAY_PERIOD_S, self.loop_lag.observe, self._stop),
                                               name="loop-lag"))
        if self.providers_factory is None:
            for agent in self.router.agents.values():
                for problem in self.provider_registry.problems(agent):
                    log.error("%s: its calls will fail until this is mended", problem)
        for vad in sorted({agent.vad for agent in self.router.agents.values()}):
            # Its library (and Silero's model) loaded now, off the loop, not in the first call's frames.
            await asyncio.to_thread(make_judge, vad)
        self._producer = self.backend.producer()
        await self._producer.start()
        self._writer = EventWriter(self._producer, observers=(self.metrics.observe, self._on_consent_refused))
        await record_config_changes(self.backend, self._writer,
                                    config_items(self.router.agents.values(), self.tenants.tenants.values()),
                                    actor=f"config-files@{socket.gethostname()}")
        self._replies = ToolReplies(self.backend)
        self._tasks.append(asyncio.create_task(self._replies.run(self._stop), name="tool-replies"))
        await asyncio.wait_for(self._replies.ready.wait(), 60)
        if self.run_workers:
            self._store = ToolStore(self.home / "tools.db")
            connectors = TenantConnectors(lambda tenant: self.tenants.get(tenant).integrations, self.secrets, self.home)
            worker = ToolWorker(self.backend, ToolRunner(self._store, self.router, connectors,
                                                         SecretStr(self.webhook_secret.decode())))
            self._tasks.append(asyncio.create_task(worker.run(self._stop), name="tool-worker"))
            await asyncio.wait_for(worker.ready.wait(), 60)
            twilio = TwilioPlacer(self.rest, self.public_url) if self.rest is not None and self.public_url else None
            if twilio is not None or self.sip_placer is not None:
                self._dials = DialStore(self.home / "dials.db")
                self.dialer = DialWorker(self.backend, lambda tenant: self.placer_for(tenant, twilio), self.tenants,
                                         self._dials)
                self._tasks.append(asyncio.create_task(self.dialer.run(self._stop), name="dialer"))
                await asyncio.wait_for(self.dialer.ready.wait(), 60)
            else:
                log.info("no dialer: outbound calls need a Twilio account and VOXLOG_PUBLIC_URL, or SIP served "
                         "(VOXLOG_SIP_BIND) for tenants with a SIP trunk")
            if self.backend.keys is not None:
                self._tasks.append(asyncio.create_task(self._run_retention(self.backend.keys), name="retention"))
        reaper_consumer = self.backend.consumer([GATEWAYS], auto_offset_reset="earliest")
        await reaper_consumer.start()
        self.reaper = CallReaper(reaper_consumer, self.backend.admin, self.writer, self.instance_id, __version__)
        self._tasks.append(asyncio.create_task(self._run_reaper(reaper_consumer), name="reaper"))
        self._tasks.append(asyncio.create_task(self._watch_log(), name="log-watch"))
        if self.background is not None:
            try:  # before the first call: a call's start reads caller memory from its tables
                await self.background.start()
            except BackgroundFailed as exc:  # calls come first: they are taken without it meanwhile
                log.error("%s; the gateway takes calls without it, and starts it again", exc)
            self._tasks.append(asyncio.create_task(self.background.run(self._stop), name="background"))
        else:
            target = None
            if self.run_projections and self.analytics is not None:
                if not isinstance(self.analytics, AnalyticsStore):
                    raise TypeError("projections run in this process write to a store it holds (AnalyticsStore)")
                target = ProjectionsTarget(self.analytics, self.recordings_path, self.recordings)
            self._readers = await start_log_readers(
                self.backend, self.router, summary_llm_of(self.router, lambda: self.provider_registry), self._stop,
                projections=target,
                workers=WorkersTarget(self.home, self.public_url) if self.run_workers else None)
            self._tasks.extend(self._readers.tasks)
        freeze_startup_heap()  # started (its judges' models loaded): what it holds now stays for good

    def _on_consent_refused(self, event: Event[EventPayload]) -> None:
        """A caller who refused to be recorded: the call's audio key destroyed, so that what they said
        before refusing (already on the log, sealed) is unreadable too, in every copy of it."""
        if isinstance(event.payload, ConsentRefused) and self.backend.keys is not None:
            self.backend.keys.destroy_call(event.tenant_id, event.call_id, AUDIO_DATA, by="consent.refused")

    async def _run_retention(self, keys: DataKeyStore) -> None:
        """The tenants' retention, now and every hour (docs/compliance.md)."""
        while not self._stop.is_set():
            try:
                for done in await enforce_retention(keys, self.tenants.tenants.values(), self.writer,
                                                    now_ms=time.time_ns() // 1_000_000, producer=PRODUCER,
                                                    producer_version=__version__):
                    log.info("retention: %d %s keys of %s shredded (older than %d days)", done.keys, done.kind,
                             done.tenant_id, done.days)
            except Exception:  # a keystore or log hiccup: logged, tried again next time
                log.exception("the retention run failed; it runs again in %.0f s", RETENTION_INTERVAL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RETENTION_INTERVAL_S)

    async def _run_reaper(self, consumer: LogConsumer) -> None:
        assert self.reaper is not None
        try:
            await self.reaper.run(self._stop)
        finally:
            await consumer.stop()

    async def _watch_log(self) -> None:
        """Ends the calls in progress once the log has been away for LOG_OUTAGE_END_S."""
        while not self._stop.is_set():
            await asyncio.sleep(0.5)
            assert self._producer is not None
            stalled = self._producer.stalled_s()
            if stalled <= LOG_OUTAGE_END_S:
                continue
            told = [s for s in self.sessions.values() if not s.ending]
            if told:
                log.error("the log has taken no write for %.0f s: ending %d calls", stalled, len(told))
            for session in told:
                session.end_now("log_unavailable", f"the log took no write for {stalled:.0f} s")

    def begin_drain(self) -> None:
        """Takes no more calls and ends those in progress (reason `shutdown`); `stop` finishes within
        `drain_s` of this."""
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self.drain_s
        self.draining = True
        for session in list(self.sessions.values()):
            session.end_now("shutdown", "the gateway is shutting down")

    async def stop(self) -> None:
        """Ends the calls in progress (reason `shutdown`) and stops, within `drain_s` whatever the log does."""
        loop = asyncio.get_running_loop()
        self.begin_drain()
        assert self._drain_deadline is not None
        deadline = self._drain_deadline
        with contextlib.suppress(TimeoutError):
            await self.wait_idle(max(0.1, deadline - loop.time() - 1.0))
        self._stop.set()
        if self._tasks:
            _done, late = await asyncio.wait(self._tasks, timeout=max(0.1, deadline - loop.time() - 1.0))
            for task in late:
                task.cancel()
        await self.provider_registry.aclose()
        if self._leases is not None and self._producer is not None and self._producer.stalled_s() <= LOG_STALL_S:
            # (with the log away there is no last lease: the reaper ends what is left once it lapses)
            await self._stop_bounded("the last lease", self._leases.close(), deadline)
        await asyncio.gather(*(self._stop_bounded("the log's producer", producer.stop(), deadline)
                               for producer in (self._producer, self._lease_producer) if producer is not None))
        if self._store is not None:
            self._store.close()
        if self._readers is not None:
            self._readers.close()
        if self.background is not None:
            await self.background.stop(max(1.0, deadline - loop.time()))
        for service in self.local_services:
            await asyncio.to_thread(service.stop)
        if self._dials is not None:
            self._dials.close()

    async def _stop_bounded(self, what: str, stopping: Coroutine[Any, Any, None], deadline: float) -> None:
        remaining = max(1.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(stopping, remaining)
        except TimeoutError:
            log.error("%s did not finish within the drain time: what it had not written to %s is lost; the "
                      "calls it concerns are ended by a reaper once their lease lapses", what, self.backend.describe())
        except Exception as exc:
            log.error("%s failed while stopping: %s", what, exc)

    @property
    def writer(self) -> EventWriter:
        if self._writer is None:
            raise RuntimeError("gateway not started")
        return self._writer

    def _providers(self, agent: AgentSpec) -> Providers:
        return (self.providers_factory or self.provider_registry.providers_for)(agent)

    def tenant_sql(self) -> TenantSql:
        """Tenant-scoped SQL over `analytics`; AnalyticsError when there is none."""
        self._tenant_sql = self._over_analytics(self._tenant_sql, TenantSql)
        return self._tenant_sql

    def call_views(self) -> CallViews:
        """The call views (the console's, the vCon's bounds) over `analytics`; AnalyticsError when there is none."""
        self._call_views = self._over_analytics(self._call_views, CallViews)
        return self._call_views

    def _over_analytics(self, held: AnalyticsReader | None,
                        make: Callable[[Analytics], AnalyticsReader]) -> AnalyticsReader:
        """`held` while it reads the `analytics` store of now (which may have been opened again), else a new one."""
        if self.analytics is None:
            raise AnalyticsError(f"analytics unavailable: {self.analytics_error}")
        return held if held is not None and held.store is self.analytics else make(self.analytics)

    async def admit(self, call: InboundCall) -> Refusal | None:
        """Takes the call on, or refuses it (recorded as `call.refused`) and says why."""
        refusal = self.admission.admit(call.call_id, call.tenant_id)
        if refusal is None:
            return None
        log.info("call %s (%s) refused: %s", call.call_id, call.tenant_id, refusal.detail)  # counted in metrics
        started = call.started
        payload = CallRefused(reason=refusal.reason, detail=refusal.detail, channel=started.channel,
                              direction=started.direction, agent_id=started.agent_id, live_calls=refusal.live_calls,
                              limit=refusal.limit, from_number=started.from_number, to_number=started.to_number,
                              provider_call_id=started.provider_call_id)
        recorder = CallRecorder(self.writer, tenant_id=call.tenant_id, call_id=call.call_id, producer=PRODUCER,
                                producer_version=__version__)
        if self._producer is not None and self._producer.stalled_s() <= LOG_STALL_S:
            await recorder.record(payload)  # buffered, not waited for: a refusal must be quick
        else:  # the log is away: a full buffer would hold the refusal up; the metric still counts it
            self.metrics.observe(recorder.make(payload))
        return refusal

    def open_session(self, call: InboundCall, agent: AgentSpec, transport: MediaTransport,
                     providers: Providers | None = None, memory: MemoryLoaded | None = None) -> CallSession:
        assert self._replies is not None
        # The consent the call runs under, the tenant's rule applied, is a fact of its start (docs/compliance.md),
        # over whatever a channel or an API client passed under those names.
        rule = self.tenants.get(call.tenant_id).consent.rule
        started = call.started
        call = replace(call, started=replace(started, parameters={
            **started.parameters, **consent_parameters(agent.consent.mode, rule)}))
        recorder = CallRecorder(self.writer, tenant_id=call.tenant_id, call_id=call.call_id, producer=PRODUCER,
                                producer_version=__version__)
        session = CallSession(call, agent, transport, recorder, providers or self._providers(agent),
                              tool_replies=self._replies.register(call.call_id), memory=memory)
        self.sessions[call.call_id] = session
        return session

    async def run_session(self, session: CallSession) -> SessionReport:
        call = session.call
        try:
            if not self.admission.connected(call.call_id):
                # Not admitted through the voice webhook (the widget) or its place expired: admit now.
                refusal = await self.admit(call)
                if refusal is not None:
                    await session.refused(refusal.detail)
                    return session.report
            assert self._leases is not None
            try:
                async with asyncio.timeout(LEASE_HOLD_TIMEOUT_S):
                    await self._leases.hold(LeasedCall(call.call_id, call.tenant_id, time.time_ns() // 1_000_000,
                                                       call.started.provider_call_id))
            except Exception as exc:  # the log is away: the call never starts (nothing of it is in the log)
                log.error("call %s not started: its owner could not be put on record: %s", call.call_id, exc)
                await session.refused("the gateway cannot record calls now")
                return session.report
            if self.backend.keys is not None:
                await asyncio.to_thread(self.backend.keys.prepare_call, call.tenant_id, call.call_id,
                                        call.started.caller_key)
            report = await session.run()
            self._leases.release(call.call_id)  # its call.ended is durable (else the lease keeps it for a reaper)
            self.reports.append(report)
            return report
        finally:
            self.admission.release(call.call_id)
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
        """A malformed frame or message from a channel: skipped, the call goes on (`CallSession.bad_input`)."""
        session.bad_input(component, message)
