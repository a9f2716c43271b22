"""The QA console's pieces that need no gateway: a replay's divergence with its payloads redacted, agent
files as the what-if takes them, the call list's filters as SQL, transcript lines placed in a recording."""

from __future__ import annotations

import pytest

from gateway.console import parse_agent, redact_payloads
from projections.call_views import CallFilter, position_ms
from streams.config.agents import AgentConfigError
from voxlog.settings import DEFAULT_AGENTS_DIR


def test_a_divergence_keeps_its_shape_and_loses_what_is_personal() -> None:
    reason = ("recorded tts.requested {'request_id': 'tts-1', 'text': 'I will call you at 415 555 0132, Ada', "
              "'voice': 'slt'}; the core now decides tts.requested {'request_id': 'tts-1', 'text': 'Goodbye {now}', "
              "'voice': 'slt'}")
    shown = redact_payloads(reason)
    assert shown.startswith("recorded tts.requested {")
    assert "; the core now decides tts.requested {" in shown
    assert "0132" not in shown
    assert "<PHONE>" in shown
    assert "Goodbye {now}" in shown, "braces inside a string are the string's"
    assert redact_payloads("recorded outcome booked; the core now decides resolved") == (
        "recorded outcome booked; the core now decides resolved")
    names = redact_payloads("the core now decides tool.requested {'arguments_json': '{}', 'customer': 'Ada'}")
    assert "Ada" not in names
    assert redact_payloads("broken {'text': 'never closed") == "broken {…}"
    assert redact_payloads("odd {not python}") == "odd {…}"


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
