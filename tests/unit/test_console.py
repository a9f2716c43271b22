"""The QA console's pieces that need no gateway: a replay's divergence with its payloads redacted, agent
files as the what-if takes them, the call list's filters as SQL, transcript lines placed in a recording."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.console import parse_agent, payload_told
from projections.call_views import CallFilter, position_ms
from schemas.events import ToolRequested, TtsRequested
from streams.call.replay import Divergence
from streams.config.agents import AgentConfigError
from voxlog.settings import DEFAULT_AGENTS_DIR


def test_a_divergence_keeps_its_shape_and_loses_what_is_personal() -> None:
    said = TtsRequested(request_id="tts-1", text="I will call you at 415 555 0132, Ada", provider="flite",
                        voice="slt", codec="mulaw", sample_rate=8000)
    wording = "recorded {recorded}; the core now decides {decided}"
    plain = Divergence(4, "tts.requested", wording.format(recorded=said, decided=said), said,
                       replace(said, text="Goodbye {now}"), wording)
    shown = plain.told(payload_told)
    assert shown.startswith("recorded tts.requested {")
    assert "; the core now decides tts.requested {" in shown
    assert "0132" not in shown
    assert "<PHONE>" in shown
    assert "Goodbye {now}" in shown, "braces inside a string are the string's"
    outcome = Divergence(9, "call.ended", "recorded outcome booked; the core now decides resolved")
    assert outcome.told(payload_told) == "recorded outcome booked; the core now decides resolved"
    asked = ToolRequested(tool_call_id="t1", tool="book", arguments_json='{"customer": "Ada"}', idempotency_key="k")
    names = Divergence(5, "tool.requested", "", None, asked, "the core now decides {decided}").told(payload_told)
    assert "Ada" not in names


def test_agent_files_are_checked_before_a_what_if() -> None:
    text = (DEFAULT_AGENTS_DIR / "demo" / "front-desk.yaml").read_text()
    assert parse_agent(text).id == "front-desk"
    for bad, says in (("greeting: [unclosed", "not YAML"), ("- a list", "not a mapping"),
                      ("id: front-desk\n", "not a valid agent: tenant"),
                      ("a: &x [1, 2]\nb: *x\n", "aliases")):
        with pytest.raises(AgentConfigError, match=says):
            parse_agent(bad)


def test_the_call_filters_are_bound_parameters() -> None:
    where, parameters = CallFilter(agent="x' OR 1=1 --", errors=True, fallbacks=False, since_us=5).where("acme")
    assert "x' OR" not in where
    assert parameters == {"tenant": "acme", "agent_id": "x' OR 1=1 --", "since": 5}
    assert "errors > 0" in where
    assert "NOT (call_id IN (SELECT call_id FROM errors FINAL WHERE tenant_id = {tenant:String}" in where
    assert CallFilter().where("acme") == ("tenant_id = {tenant:String}", {"tenant": "acme"})


def test_transcript_lines_are_placed_where_the_recording_has_them() -> None:
    zero = 1_000_000_000
    assert position_ms({"speaker": "caller", "start_ms": 8_540, "at": zero + 11_000_000}, zero) == 8_540
    assert position_ms({"speaker": "agent", "start_ms": None, "at": zero + 11_150_000}, zero) == 11_150
    assert position_ms({"speaker": "agent", "start_ms": None, "at": zero - 5}, zero) == 0
    assert position_ms({"speaker": "agent", "start_ms": None, "at": zero}, None) is None
