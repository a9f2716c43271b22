"""The gateway's OpenAPI document says what it does: schemathesis runs every phase of its CLI (examples,
coverage, fuzzing, stateful) with all its default checks against the real app, in-process over ASGI,
on the embedded log and the process's chDB, and finds nothing.

Twilio's webhooks are signed as Twilio signs them (the URL and the form exactly as sent) and the tenant
API gets the demo tenant's key, so the requests reach past authentication; schemathesis's own probes
without them, or with wrong ones, must be refused. The run is deterministic: a fixed seed, derandomized,
a bounded number of examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import schemathesis
from pydantic import SecretStr
from schemathesis import AuthContext, Case
from schemathesis.config import SchemathesisConfig
from schemathesis.core import NOT_SET
from schemathesis.engine import Status, events, from_schema
from schemathesis.python.asgi import HOST, shutdown_lifespans

from gateway.admission import RateLimits
from gateway.app import create_app
from projections.store import AnalyticsStore
from streams.channels.twilio_webhook_protocol import SIGNATURE_HEADER, compute_twilio_signature
from streams.config.tenants import Limits, Tenants
from voxlog.serving import build_gateway
from voxlog.settings import Settings

AUTH_TOKEN = "openapi-test-auth-token"
DEMO_KEY = "demo-api-key"
"""The demo tenant's published key (voxlog/agents/demo/tenant.yaml)."""
SEMANTIC_REFUSALS = {
    # Schemas cannot say which SQL is valid ClickHouse, nor which numbers are the tenant's caller ids:
    # schema-valid requests the gateway answers 400 / 422 for, as documented.
    "/v1/sql": "400",
    "/v1/calls": "422",
}
POSITIVE_DATA_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
"""schemathesis's default for positive_data_acceptance, which SEMANTIC_REFUSALS extend."""

ANSWERED = {
    "POST /twilio/voice", "POST /twilio/status", "POST /twilio/dial-action", "POST /v1/calls", "POST /v1/erasures",
    "GET /healthz", "GET /metrics", "GET /widget", "GET /widget/voxlog-widget.js", "GET /widget/capture-worklet.js",
    "GET /console", "GET /console/console.js", "GET /console/console.css", "GET /v1/console/calls"}
"""Operations the run must get a 2xx from: else the signatures or the key were wrong and every request was
refused, which the document allows too. (No SQL table and no finished call exist here.)"""
CURL_SHOWN = 600
"""Of each failure's reproducing command: bodies can be long."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def form_as_sent(body: object) -> dict[str, Any] | str | bytes | None:
    """The `data` schemathesis hands `requests` for a form body (its urlencoded serializer)."""
    if body is NOT_SET or body is None:
        return None
    if isinstance(body, Mapping):
        return dict(body)
    if isinstance(body, str | bytes):
        return body
    return json.dumps(body).encode()


def twilio_signature(case: Case[Any]) -> str:
    """Twilio's signature of this request: over the URL and the form as `requests` will encode them."""
    prepared = requests.Request("POST", f"http://{HOST}{case.formatted_path}", params=case.query,
                                data=form_as_sent(case.body)).prepare()
    body = prepared.body or ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    return compute_twilio_signature(AUTH_TOKEN, str(prepared.url), parse_qsl(text, keep_blank_values=True))


class Credentials:
    """What a real client sends: Twilio's signature on its webhooks, a tenant key on the tenant API."""

    def get(self, case: Case[Any], ctx: AuthContext) -> dict[str, str] | None:
        if case.operation.path.startswith("/twilio/"):
            return {SIGNATURE_HEADER: twilio_signature(case)}
        if case.operation.path.startswith("/v1/"):
            return {"Authorization": f"Bearer {DEMO_KEY}"}
        return None

    def set(self, case: Case[Any], data: dict[str, str], ctx: AuthContext) -> None:
        case.headers.update(data)


def run(stream: Iterator[events.EngineEvent]) -> tuple[list[str], set[str]]:
    """Every failed check and engine error, once each; and the requests ("METHOD /path") answered 2xx."""
    found: dict[str, None] = {}
    answered: set[str] = set()
    for event in stream:
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            answered.update(f"{i.request.method} {urlsplit(i.request.uri).path}"
                            for i in event.recorder.interactions.values()
                            if i.response is not None and 200 <= i.response.status_code < 300)
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    if node.status == Status.FAILURE and node.failure_info is not None:
                        failure, curl = node.failure_info.failure, node.failure_info.code_sample
                        found[f"{event.recorder.label}: {node.name}: {failure.title}\n{failure.message}\n"
                              f"{curl[:CURL_SHOWN]}"] = None
        elif isinstance(event, events.NonFatalError):
            found[f"{event.label}: error: {event.value!r}"] = None
        elif isinstance(event, events.FatalError):
            found[f"fatal: {event.exception!r}"] = None
    return list(found), answered


def test_the_gateway_does_what_its_openapi_document_says(tmp_path: Path, store: AnalyticsStore) -> None:
    settings = Settings(_env_file=None, home=tmp_path / "home", twilio_auth_token=SecretStr(AUTH_TOKEN),
                        twilio_account_sid="AC" + "0" * 32, public_url=None, run_workers=False,
                        run_projections=False)
    gateway = build_gateway(settings)
    gateway.analytics, gateway.analytics_error = store, None  # the tenant SQL API on this test's database
    # Rate limits apart: schemathesis sends hundreds of requests from one address in seconds, and a 429
    # would answer its checks before the behaviour they look at (the limits have tests of their own).
    gateway.rate_limits = RateLimits(stranger_burst=1_000_000)
    gateway.tenants = Tenants({t.id: t.model_copy(update={"limits": Limits(api_burst=1_000_000)})
                               for t in gateway.tenants.tenants.values()})
    config: dict[str, Any] = {
        "seed": 20251204,
        "generation": {"deterministic": True, "max-examples": 40, "database": "none"},
        "cache": {"enabled": False},
        "operations": [
            {"include-path": path, "checks": {"positive_data_acceptance": {
                "expected-statuses": [*POSITIVE_DATA_ACCEPTED, status]}}}
            for path, status in SEMANTIC_REFUSALS.items()],
    }
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(gateway),
                                            config=SchemathesisConfig.from_dict(config))
    schema.auth(refresh_interval=None)(Credentials)  # signatures differ per request: nothing to cache
    try:
        found, answered = run(from_schema(schema).execute())
    finally:
        shutdown_lifespans()  # the gateway, started by the ASGI client on its own event loop
    assert not found, "\n\n".join(found)
    assert answered >= ANSWERED, f"never answered 2xx: {sorted(ANSWERED - answered)}"
