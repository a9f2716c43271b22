"""The whole of voxlog on this machine, in-process: the gateway served by uvicorn on a free port,
with a local stand-in for Twilio's REST API, on whatever log backend the settings name."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import uvicorn
from pydantic import SecretStr
from starlette.types import ASGIApp

from gateway.runtime import GatewayRuntime
from streams.call.session import Providers
from streams.config.agents import AgentSpec
from streams.providers.registry import ProviderRegistry
from streams.providers.settings import ProviderSettings
from voxlog.serving import build_gateway, gateway_server
from voxlog.settings import Settings
from voxlog.sim.fake_twilio import FakeTwilio, RecordedRequest, new_account_sid
from voxlog.sim.twilio_caller import TwilioCaller

AUTH_TOKEN = "voxlog-local-auth-token"
WEBHOOK_SECRET = "voxlog-local-webhook-secret"
"""The local stack's own: its tool webhooks go nowhere but to the caller's test servers."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalStack:
    base_url: str
    settings: Settings
    gateway: GatewayRuntime
    twilio: FakeTwilio

    @property
    def auth_token(self) -> str:
        return AUTH_TOKEN

    def caller(self, *, from_: str = "+15550001111", to: str = "+15550100") -> TwilioCaller:
        """A caller Twilio knows about: its call exists in Twilio's REST API for transfers and hang-ups."""
        caller = TwilioCaller(self.base_url, AUTH_TOKEN, account_sid=self.settings.twilio_account_sid or "",
                              from_=from_, to=to, public_url=self.settings.public_url)
        self.twilio.add_call(from_, to, sid=caller.call_sid)
        return caller

    async def placed_calls(
        self, count: int, timeout_s: float = 15.0, *, to: str | None = None
    ) -> list[RecordedRequest]:
        """Waits until the dialer has asked Twilio for `count` calls (to `to`, if given); returns them."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(created := [r for r in self.twilio.requests_for("create_call")
                              if r.call_sid and to in (None, r.params.get("To"))]) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{len(created)} of {count} calls placed within {timeout_s} s")
            await asyncio.sleep(0.05)
        return created

    def callee(self, placed: RecordedRequest) -> TwilioCaller:
        """The person who answers a call the dialer placed: Twilio then fetches the voice URL the dialer
        gave (signed, Direction outbound-api) and posts status callbacks to its status callback URL."""
        params = placed.params
        voice, status = urlsplit(params["Url"]), urlsplit(params["StatusCallback"])
        return TwilioCaller(self.base_url, AUTH_TOKEN, account_sid=self.settings.twilio_account_sid or "",
                            call_sid=placed.call_sid or "", from_=params["From"], to=params["To"],
                            voice_path=f"{voice.path}?{voice.query}", status_path=f"{status.path}?{status.query}",
                            direction="outbound-api")


@asynccontextmanager
async def running(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> AsyncIterator[None]:
    """`server` serving in this event loop until the block ends."""
    serving = asyncio.create_task(server.serve(sockets))
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped it
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await serving


def _listening_socket() -> socket.socket:
    """A socket bound to a free port of 127.0.0.1, for uvicorn to serve on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """`app` under uvicorn on a free port of 127.0.0.1, with the WebSocket implementation `voxlog
    serve` uses and without its lifespan; yields its base URL."""
    sock = _listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                           ws="websockets-sansio", timeout_graceful_shutdown=2))
    async with running(server, [sock]):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@asynccontextmanager
async def local_stack(
    settings: Settings, providers_factory: Callable[[AgentSpec], Providers] | None = None, *,
    analytics: bool = False, provider_settings: ProviderSettings | None = None, behind: str | None = None,
) -> AsyncIterator[LocalStack]:
    """`analytics`: run the projections and the summariser as `voxlog serve` does, in the gateway's
    background process, which holds the embedded ClickHouse (`stack.gateway.analytics` reads it; with
    `settings.background_process` off, on the gateway's own loop);
    without, the summariser runs on the gateway's own loop and nothing projects (tests hand the gateway
    a store of this process's own). `provider_settings`: the providers' own (else from the
    environment; the background process's always are). `behind`: the public URL this gateway shares with
    other replicas (a load balancer's), its own address then its VOXLOG_REPLICA_URL; else its own address
    is its public URL."""
    account_sid = new_account_sid()
    # Bound here and handed to uvicorn: a port only looked up would be free for anyone until it binds.
    with FakeTwilio(account_sid, AUTH_TOKEN) as twilio, _listening_socket() as sock:
        port = int(sock.getsockname()[1])
        base_url = f"http://127.0.0.1:{port}"
        settings = settings.model_copy(update={
            "twilio_account_sid": account_sid, "twilio_auth_token": SecretStr(AUTH_TOKEN),
            "twilio_api_base": twilio.base_url, "public_url": behind or base_url,
            "replica_url": base_url if behind else None, "run_projections": analytics,
            "background_process": analytics and settings.background_process,
            "webhook_secret": SecretStr(WEBHOOK_SECRET)})
        gateway = build_gateway(settings)
        if provider_settings is not None:
            gateway.provider_registry = ProviderRegistry(provider_settings)
        if providers_factory is not None:
            gateway.providers_factory = providers_factory
        async with running(gateway_server(settings, "127.0.0.1", port, gateway=gateway, log_level="warning"),
                           [sock]):
            yield LocalStack(base_url, settings, gateway, twilio)

