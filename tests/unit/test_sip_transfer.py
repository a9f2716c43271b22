"""gateway.sip_media_transport's pure parts of a SIP transfer (a blind REFER): what a final status means
for the handoff (`transfer_outcome`), and where the caller is referred (`refer_target`): a SIP URI as
given, a number through the peer that sent the call."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sip_media_transport import refer_target, transfer_outcome

PEER = "pbx.example:5060"


@pytest.mark.parametrize(("code", "outcome"), [
    (200, "connected"), (202, "connected"), (299, "connected"),
    (486, "busy"), (600, "busy"),
    (408, "no_answer"), (480, "no_answer"), (487, "no_answer"),
    (199, "failed"), (300, "failed"), (403, "failed"), (404, "failed"), (488, "failed"), (500, "failed"),
    (503, "failed"), (603, "failed"), (0, "failed"),
])
def test_a_final_status_is_a_handoff_outcome(code: int, outcome: str) -> None:
    assert transfer_outcome(code) == outcome


@given(st.integers(min_value=-1000, max_value=10_000))
def test_any_status_is_one_of_the_outcomes_and_only_2xx_connects(code: int) -> None:
    outcome = transfer_outcome(code)
    assert outcome in ("connected", "busy", "no_answer", "failed")
    assert (outcome == "connected") == (200 <= code < 300)


@pytest.mark.parametrize("target", ["sip:alice@pbx.example", "sips:desk@carrier.example:5061;transport=tls",
                                    "SIP:+15550199@other.example", "Sips:bob@example.com"])
def test_a_sip_uri_is_referred_to_as_given(target: str) -> None:
    assert refer_target(target, PEER) == target


@pytest.mark.parametrize(("target", "uri"), [
    ("+15550199", "sip:+15550199@pbx.example:5060"),
    ("1000", "sip:1000@pbx.example:5060"),
    ("tel:+15550199", "sip:+15550199@pbx.example:5060"),
    ("TEL:+15550199;phone-context=+1", "sip:+15550199@pbx.example:5060"),
    ("%2B15550199", "sip:+15550199@pbx.example:5060"),
    (" +15550199 ", "sip:+15550199@pbx.example:5060"),
])
def test_a_number_is_referred_through_the_peer_that_sent_the_call(target: str, uri: str) -> None:
    assert refer_target(target, PEER) == uri


def test_a_number_through_an_ipv6_peer_keeps_its_brackets() -> None:
    assert refer_target("+15550199", "[2001:db8::1]:5060") == "sip:+15550199@[2001:db8::1]:5060"


@pytest.mark.parametrize("target", ["", "   ", "tel:", "tel:;phone-context=x", "@pbx.example"])
def test_neither_a_number_nor_a_sip_uri_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match="neither a number nor a SIP URI"):
        refer_target(target, PEER)


@pytest.mark.parametrize("target", ["front desk", "alice@elsewhere.example"])
def test_text_that_is_not_a_number_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match="neither a number nor a SIP URI"):
        refer_target(target, PEER)


def test_a_number_written_with_separators_is_dialled_without_them() -> None:
    assert refer_target("+1 (555) 010-0199", "pbx.example:5060") == "sip:+15550100199@pbx.example:5060"
