"""The whole of voxlog on this machine, in-process: the gateway served by uvicorn on a free port,
with a local stand-in for Twilio's REST API, on whatever log backend the settings name."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from pydantic import SecretStr

from gateway.app import build_gateway, create_app
from gateway.calls import Gateway
from streams.agents import AgentSpec
from streams.session import Providers
from voxlog.settings import Settings
from voxlog.sim.fake_twilio import FakeTwilio, new_account_sid
from voxlog.sim.twilio_caller import TwilioCaller

AUTH_TOKEN = "voxlog-local-auth-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalStack:
    base_url: str
    settings: Settings
    gateway: Gateway
    twilio: FakeTwilio

    @property
    def auth_token(self) -> str:
        return AUTH_TOKEN

    def caller(self, *, from_: str = "+15550001111", to: str = "+15550100") -> TwilioCaller:
        """A caller Twilio knows about: its call exists in Twilio's REST API for transfers and hang-ups."""
        caller = TwilioCaller(self.base_url, AUTH_TOKEN, account_sid=self.settings.twilio_account_sid or "",
                              from_=from_, to=to)
        self.twilio.add_call(from_, to, sid=caller.call_sid)
        return caller


@asynccontextmanager
async def local_stack(
    settings: Settings, providers_factory: Callable[[AgentSpec], Providers] | None = None
) -> AsyncIterator[LocalStack]:
    account_sid = new_account_sid()
    with FakeTwilio(account_sid, AUTH_TOKEN) as twilio:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        settings = settings.model_copy(update={
            "twilio_account_sid": account_sid, "twilio_auth_token": SecretStr(AUTH_TOKEN),
            "twilio_api_base": twilio.base_url, "public_url": base_url})
        gateway = build_gateway(settings)
        if providers_factory is not None:
            gateway.providers_factory = providers_factory
        server = uvicorn.Server(uvicorn.Config(create_app(settings, gateway=gateway), host="127.0.0.1", port=port,
                                               log_level="warning", ws="websockets", lifespan="on"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it
            await asyncio.sleep(0.05)
        try:
            yield LocalStack(base_url, settings, gateway, twilio)
        finally:
            server.should_exit = True
            await serving

