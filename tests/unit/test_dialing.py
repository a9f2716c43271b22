"""The pure parts of outbound dialling and transfers: the token bucket, the URLs a placed call
carries, the tenant file, Twilio's Dial action, and the core's greeting for a returned caller."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.api import dial_time_ms, new_dial_id
from gateway.runtime import new_call_id
from streams.channels.twilio_outbound import (
    OutboundRoute,
    OutboundRouteError,
    check_parameters,
    dial_status_route,
    outbound_route,
    status_url,
    voice_url,
)
from streams.channels.twilio_webhook_protocol import dial_outcome_payload
from streams.config.agents import AgentConfigError, load_agents
from streams.config.tenants import Tenants, load_tenants
from streams.rate_limit import TokenBucket
from voxlog.settings import DEFAULT_AGENTS_DIR


def test_a_bucket_lets_a_burst_through_then_paces() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=2, now=100.0)
    for _ in range(2):
        assert bucket.delay(100.0) == 0
        bucket.take(100.0)
    assert bucket.delay(100.0) == pytest.approx(1.0)
    assert bucket.delay(100.5) == pytest.approx(0.5)
    bucket.take(101.0)
    assert bucket.delay(101.0) == pytest.approx(1.0)
    assert bucket.delay(1000.0) == 0
    assert bucket.tokens <= 2, "saving up stops at the burst"


@given(st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=50))
def test_a_bucket_never_allows_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    bucket, now = TokenBucket(rate_per_s=2.0, burst=3, now=0.0), 0.0
    for taken, gap in enumerate(gaps, start=1):
        now += gap + bucket.delay(now + gap)
        bucket.take(now)
        assert taken <= 3 + 2.0 * now + 1e-6


names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,15}", fullmatch=True)
values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(st.dictionaries(names, values, max_size=8))
def test_an_outbound_route_survives_its_trip_through_twilio(parameters: dict[str, str]) -> None:
    route = OutboundRoute(new_dial_id(), new_call_id(), "demo", "front-desk", parameters)
    url = voice_url("https://voice.example.com/", route)
    assert url.startswith("https://voice.example.com/twilio/voice?")
    assert outbound_route(dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))) == route


def test_routes_that_do_not_say_enough_are_refused() -> None:
    assert outbound_route({"To": "+1555"}) is None, "an inbound call"
    with pytest.raises(OutboundRouteError):
        outbound_route({"dial_id": "dial-x", "call_id": new_call_id(), "tenant": "t", "agent": "a"})
    dial_id = new_dial_id()
    query = dict(parse_qsl(urlsplit(status_url("http://h", dial_id, "demo", 2)).query))
    route = dial_status_route(query)
    assert route is not None
    assert (route.dial_id, route.tenant_id, route.first_seq) == (dial_id, "demo", 2)
    with pytest.raises(OutboundRouteError):
        dial_status_route({**query, "seq": "-1"})


def test_parameters_that_cannot_travel_are_refused() -> None:
    check_parameters({"customer": "Ada"})
    for bad, why in (({"1st": "x"}, "must be a letter"), ({f"p{i}": "" for i in range(17)}, "at most 16"),
                     ({"note": "x" * 3000}, "more than 2048"),
                     ({"consent_mode": "notice"}, "voxlog's own"), ({"consent_rule": "one_party"}, "voxlog's own")):
        with pytest.raises(ValueError, match=why):
            check_parameters(bad)


def test_a_dial_id_carries_its_time() -> None:
    assert dial_time_ms(new_dial_id(1_764_000_000_123)) == 1_764_000_000_123
    assert new_dial_id() != new_dial_id()


def test_the_demo_tenant_file_loads_and_its_key_is_found(tmp_path: Path) -> None:
    tenants = Tenants(load_tenants(DEFAULT_AGENTS_DIR))
    found = tenants.by_api_key("demo-api-key")
    assert found is not None
    assert (found[0].id, found[1]) == ("demo", "demo-key")
    assert tenants.by_api_key("demo-api-key ") is None
    assert tenants.by_api_key("") is None
    assert tenants.get("nobody").api_keys == (), "a tenant without a file has no API access"
    assert all(a.id != "demo" or a.tenant == "demo" for a in load_agents(DEFAULT_AGENTS_DIR)), "not read as an agent"

    (tmp_path / "a").mkdir()
    digest = hashlib.sha256(b"k").hexdigest()
    (tmp_path / "a" / "tenant.yaml").write_text(f"id: a\napi_keys: [{{id: k, sha256: {digest}}}]\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tenant.toml").write_text(f'id = "b"\napi_keys = [{{id = "k", sha256 = "{digest}"}}]\n')
    with pytest.raises(AgentConfigError, match="also one of"):
        Tenants(load_tenants(tmp_path))
    (tmp_path / "b" / "tenant.toml").write_text('id = "b"\n[dialing]\ncalls_per_minute = 0\n')
    with pytest.raises(AgentConfigError, match="calls_per_minute"):
        load_tenants(tmp_path)


@pytest.mark.parametrize(("status", "outcome"), [
    ("completed", "connected"), ("answered", "connected"), ("busy", "busy"), ("no-answer", "no_answer"),
    ("failed", "failed"), ("canceled", "canceled"), ("something-new", "failed")])
def test_twilio_dial_statuses_become_handoff_outcomes(status: str, outcome: str) -> None:
    payload = dial_outcome_payload("call-1/handoff", {"DialCallStatus": status, "DialCallSid": "CA1",
                                                      "DialCallDuration": "12"})
    assert (payload.outcome, payload.provider_status, payload.dialed_call_id) == (outcome, status, "CA1")
    assert payload.duration_s == 12
    with pytest.raises(ValueError, match="DialCallStatus"):
        dial_outcome_payload("h", {"CallSid": "CA1"})
