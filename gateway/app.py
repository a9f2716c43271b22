"""The FastAPI application: Twilio's calls, the web widget, the tenant API, the QA console, health and
metrics.

`create_app(runtime)` puts the gateway runtime (`gateway.runtime.GatewayRuntime`) behind the routes of
each channel and API; the runtime starts and stops with the app's lifespan. `voxlog serve` runs it
with uvicorn (`GatewayServer`).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api import AnalyticsReads, api_router
from gateway.api_docs import add_api_docs
from gateway.console import AGENT_FILE_MAX, call_views_router, console_router
from gateway.runtime import GatewayRuntime

if TYPE_CHECKING:
    from gateway.sip_call_flow import SipCallFlow
from gateway.twilio_call_flow import TwilioCallFlow
from gateway.widget import widget_router

REQUEST_BODY_MAX_BYTES = 12 * AGENT_FILE_MAX + 64 * 1024
"""The largest request body the app reads: a what-if's agent file (the largest body of any route), each
character up to 12 bytes in JSON (an astral one escaped as two `\\uXXXX`), and room for the rest. A larger
one is answered 413 before it is read, so before its API key is looked at (Twilio's webhooks keep their 64 KiB)."""
VALIDATION_TEXT_MAX = 200
"""Characters kept of each part of a validation error's location and of its message: a key the schema does
not know is a part of the location, and a validator's message may quote what was sent."""


class GatewayServer(uvicorn.Server):
    """uvicorn, telling the gateway first when it is asked to stop (SIGTERM, SIGINT): its calls end with
    reason `shutdown` (the callers are hung up) before uvicorn closes their sockets, and everything is
    over within about `drain_s`, whatever the log or the carrier does."""

    def __init__(self, config: uvicorn.Config, gateway: GatewayRuntime) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.begin_drain()
        await super().shutdown(sockets)


def operations_router(runtime: GatewayRuntime, sip: SipCallFlow | None = None) -> APIRouter:
    """`GET /metrics` and `GET /healthz`, for the operators' scrapers and load balancers."""
    router = APIRouter()

    @router.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus' text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus: calls, turns, voice-to-voice and provider latencies, errors, fallbacks, tool calls."""
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz", responses={503: {"description": "not ready: the log cannot be written, or the gateway "
                                                           "is starting or shutting down",
                                            "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def health() -> JSONResponse:
        """Readiness: 200 when the gateway takes calls, 503 (with the reason) when it does not; and how its
        background process (projections, summariser) is, which calls do not wait for."""
        problem = runtime.not_ready()
        body: dict[str, object] = {
            "status": "ok" if problem is None else "unavailable", "log": runtime.backend.describe(),
            "live_calls": len(runtime.sessions), "capacity": runtime.capacity, "instance": runtime.instance_id}
        if problem is not None:
            body["problem"] = problem
        if runtime.background is not None:  # calls are taken without it: said, not a reason to be unready
            background = runtime.background
            body["background"] = {"status": "ok" if background.problem is None else "unavailable",
                                  "restarts": background.restarts,
                                  **({"problem": background.problem} if background.problem else {})}
        if sip is not None:  # SIP's state is said; its calls are what `live_calls` counts with the others'
            body["sip"] = sip.health()
        return JSONResponse(body, status_code=200 if problem is None else 503)

    return router


def unechoed(error: Mapping[str, Any]) -> dict[str, Any]:
    """A validation error's type, location and message, their text clipped (`VALIDATION_TEXT_MAX`)."""
    return {"type": error["type"],
            "loc": [part if isinstance(part, int) else str(part)[:VALIDATION_TEXT_MAX] for part in error["loc"]],
            "msg": str(error["msg"])[:VALIDATION_TEXT_MAX]}


def create_app(runtime: GatewayRuntime) -> FastAPI:
    sip: SipCallFlow | None = None
    if runtime.sip is not None:
        from gateway.sip_call_flow import SipCallFlow  # PJSIP loads only where SIP is served

        sip = SipCallFlow(runtime, runtime.sip)
        runtime.sip_placer = sip  # the dialer places the calls of tenants with a SIP trunk through it

    analytics_reads = AnalyticsReads()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            if sip is not None:  # after the runtime: a call is taken only once it can be recorded
                await sip.start()
            yield
        finally:
            await runtime.stop()  # its calls end first, SIP's with a BYE from the endpoint still running
            if sip is not None:
                await sip.stop()
            analytics_reads.close()

    app = FastAPI(title="voxlog gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  max_body_size=REQUEST_BODY_MAX_BYTES)

    @app.exception_handler(RequestValidationError)
    async def validation_refusal(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with each error's type, location and message, never its input or context: FastAPI's own
        answer echoes what was sent, whatever its size."""
        return JSONResponse({"detail": [unechoed(error) for error in exc.errors()]}, status_code=422)

    add_api_docs(app)  # /docs and /redoc with their assets served here: no CDN (gateway/api_docs.py)
    app.state.gateway = runtime
    app.state.sip = sip
    app.include_router(operations_router(runtime, sip))
    app.include_router(TwilioCallFlow(runtime).router())
    app.include_router(widget_router(runtime))
    app.include_router(api_router(runtime, analytics_reads))
    app.include_router(call_views_router(runtime, analytics_reads))
    app.include_router(console_router())
    return app
