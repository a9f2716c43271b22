"""The gateway as the settings describe it: its runtime (log, agents, tenants, Twilio, ClickHouse,
recordings, limits) and its uvicorn server (`voxlog serve`, the local stack)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import certifi
import uvicorn
import uvloop

from gateway.app import GatewayServer, create_app
from gateway.background_process import BackgroundProcess
from gateway.runtime import GatewayRuntime
from gateway.sip_endpoint import SipEndpointConfig
from projections.hosted_store import HostedStore
from projections.store import Analytics, AnalyticsError, AnalyticsStore, embedded_dsn
from schemas.version import __version__
from streams.channels.twilio_rest import TwilioRest
from streams.config.agents import AgentRouter, load_agents
from streams.config.tenants import Tenants, load_tenants
from streams.connectors.secrets import Secrets
from voxlog.backends import log_backend, recording_store
from voxlog.background import BackgroundConfig
from voxlog.demo_calendar import DEMO_TENANT, demo_calendar
from voxlog.settings import DEFAULT_AGENTS_DIR, DEMO_WEBHOOK_SECRET, InsecureSettings, Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_on_serving_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs `coroutine` on the event loop `voxlog serve` serves on (uvloop, which uvicorn picks when it
    is installed), so that a benchmark measures the gateway as it runs in production."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def twilio_rest(settings: Settings) -> TwilioRest | None:
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    if not (settings.twilio_account_sid and token):
        return None
    return TwilioRest(settings.twilio_account_sid, token, base_url=settings.twilio_api_base)


def build_gateway(settings: Settings) -> GatewayRuntime:
    if settings.agents_dir is not None and settings.webhook_secret.get_secret_value() == DEMO_WEBHOOK_SECRET:
        # Anyone can sign with the published secret: a tenant's webhook could not tell us from a forger.
        raise InsecureSettings(
            f"VOXLOG_WEBHOOK_SECRET is not set, and its default is the demo's, published: set a secret of your own "
            f"to serve the agents in {settings.agents_dir} (their tool webhooks are signed with it)")
    agents_dir = settings.agents_dir or DEFAULT_AGENTS_DIR
    background, hosted = None, None
    if settings.background_process and (settings.run_projections or settings.run_workers):
        background, hosted = background_process(settings)
    analytics: Analytics | None = None
    analytics_error = None
    if hosted is not None:
        analytics = hosted
    elif settings.run_projections or settings.clickhouse_dsn:
        try:
            analytics = AnalyticsStore.open(settings.clickhouse_dsn, settings.home)
        except AnalyticsError as exc:
            log.error("analytics unavailable: %s", exc)
            analytics_error = str(exc)
    else:
        analytics_error = "this gateway runs without analytics (VOXLOG_RUN_PROJECTIONS=false, no VOXLOG_CLICKHOUSE_DSN)"
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    tenants = load_tenants(agents_dir)
    calendar = demo_calendar(settings.home, tenants)
    if calendar is not None:
        tenants[DEMO_TENANT] = calendar.tenant(tenants[DEMO_TENANT])
    return GatewayRuntime(backend=log_backend(settings), router=AgentRouter(load_agents(agents_dir)),
                   tenants=Tenants(tenants), home=settings.home,
                   secrets=Secrets(calendar.environ) if calendar is not None else Secrets(),
                   local_services=[calendar] if calendar is not None else [], run_workers=settings.run_workers,
                   webhook_secret=settings.webhook_secret.get_secret_value().encode(), rest=twilio_rest(settings),
                   public_url=settings.public_url, replica_url=settings.replica_url,
                   analytics=analytics, analytics_error=analytics_error,
                   run_projections=background is None and settings.run_projections and analytics is not None,
                   background=background, recording_store=recording_store(settings),
                   vcon_signing_key=settings.vcon_signing_key_path, capacity=settings.call_capacity,
                   drain_s=settings.drain_s, widget_calls_per_address=settings.widget_calls_per_address,
                   twilio_auth_token=token, sip=sip_config(settings))


SIP_ANSWERING = 16
"""INVITEs the SIP stack holds beyond the gateway's capacity while they are answered: a full gateway's
answer is its own (503, Retry-After), not the stack's 486."""


def trusted_cas() -> Path:
    """The CA bundle a TLS trunk's certificate is checked against when `VOXLOG_SIP_TLS_CA` names none: the
    system's (where the operator's own CAs are installed), else certifi's."""
    system = ssl.get_default_verify_paths().cafile
    return Path(system) if system and Path(system).is_file() else Path(certifi.where())


def sip_config(settings: Settings) -> SipEndpointConfig | None:
    """The SIP endpoint the settings ask for (`VOXLOG_SIP_BIND`), or None."""
    if settings.sip_bind is None:
        return None
    host, _, port = settings.sip_bind.rpartition(":")
    first, _, last = settings.sip_rtp_ports.partition("-")
    tls = settings.sip_tls_port is not None
    if tls and (settings.sip_tls_cert is None or settings.sip_tls_key is None):
        raise ValueError("VOXLOG_SIP_TLS_PORT needs VOXLOG_SIP_TLS_CERT and VOXLOG_SIP_TLS_KEY")
    if int(last) < int(first):
        raise ValueError(f"VOXLOG_SIP_RTP_PORTS {settings.sip_rtp_ports}: the last port is before the first")
    return SipEndpointConfig(host=host.strip("[]"), port=int(port), public_host=settings.sip_public_host,
                             tls_port=settings.sip_tls_port, tls_cert=settings.sip_tls_cert,
                             tls_key=settings.sip_tls_key, tls_ca=settings.sip_tls_ca or trusted_cas(),
                             rtp_port=int(first), rtp_port_range=int(last) - int(first),
                             max_calls=settings.call_capacity + SIP_ANSWERING, user_agent=f"voxlog/{__version__}",
                             rtp_timeout_s=settings.sip_rtp_timeout_s,
                             invites_per_minute=settings.sip_invites_per_minute,
                             codecs=tuple(name.upper() for name in settings.sip_codecs.split(",")),
                             trusted_proxies=tuple(cidr for cidr in settings.sip_trusted_proxies.split(",")
                                                   if cidr.strip()))


def background_process(settings: Settings) -> tuple[BackgroundProcess, HostedStore | None]:
    """The process that runs the settings' projections and workers (the summariser, the after-call
    worker) beside the gateway, and the gateway's connection to the embedded ClickHouse it then holds
    (None with a ClickHouse server, which the gateway reaches itself)."""
    address, hosted, authkey = None, None, secrets.token_bytes(32)
    if settings.run_projections and not settings.clickhouse_dsn:
        # A folder only this user can open (a Unix socket's path must be short: not under `home`).
        folder = Path(tempfile.mkdtemp(prefix="voxlog-analytics-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        address = folder / "clickhouse.sock"
        hosted = HostedStore(address, authkey, embedded_dsn(settings.home))
    config = BackgroundConfig(settings=settings, projections=settings.run_projections,
                              workers=settings.run_workers, host_address=address, authkey=authkey)
    return BackgroundProcess("voxlog.background", config.encoded()), hosted


def gateway_server(settings: Settings, host: str, port: int, *, gateway: GatewayRuntime | None = None,
                   log_level: str = "info") -> GatewayServer:
    runtime = gateway or build_gateway(settings)
    config = uvicorn.Config(create_app(runtime), host=host, port=port, log_level=log_level,
                            ws="websockets-sansio", lifespan="on",
                            timeout_graceful_shutdown=max(1, int(settings.drain_s)))
    return GatewayServer(config, runtime)
