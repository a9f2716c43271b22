"""`voxlog serve`'s SIP endpoint as the settings ask for it (`voxlog.serving.sip_config`), and what it
refuses to start with: each mistake named after the variable that made it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sip_endpoint import NARROWBAND_RATE, WIDEBAND_RATE, SipEndpointConfig
from voxlog.serving import sip_config
from voxlog.settings import Settings


def settings(tmp_path: Path, **more: object) -> Settings:
    return Settings(home=tmp_path, sip_bind="127.0.0.1:5080", **more)  # type: ignore[arg-type]


def test_no_bind_no_endpoint(tmp_path: Path) -> None:
    assert sip_config(Settings(home=tmp_path)) is None


def test_g711_alone_keeps_the_bridge_at_8_khz(tmp_path: Path) -> None:
    config = sip_config(settings(tmp_path))
    assert config is not None
    assert (config.host, config.port, config.codecs) == ("127.0.0.1", 5080, ("PCMU", "PCMA"))
    assert config.bridge_rate == NARROWBAND_RATE


def test_g722_is_taken_in_the_order_given_and_widens_the_bridge(tmp_path: Path) -> None:
    config = sip_config(settings(tmp_path, sip_codecs="g722,PCMU"))
    assert config is not None
    assert config.codecs == ("G722", "PCMU")
    assert config.bridge_rate == WIDEBAND_RATE


@pytest.mark.parametrize("codecs", ["OPUS", "PCMU,PCMU", "PCMU,G729"])
def test_a_codec_the_endpoint_cannot_offer_is_refused_by_name(tmp_path: Path, codecs: str) -> None:
    with pytest.raises(ValueError, match="VOXLOG_SIP_CODECS"):
        sip_config(settings(tmp_path, sip_codecs=codecs))


def test_no_codec_at_all_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SipEndpointConfig(codecs=())


def test_an_rtp_range_backwards_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VOXLOG_SIP_RTP_PORTS"):
        sip_config(settings(tmp_path, sip_rtp_ports="30000-20000"))


def test_tls_without_its_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VOXLOG_SIP_TLS_CERT"):
        sip_config(settings(tmp_path, sip_tls_port=5081))


def test_trusted_proxies_are_networks(tmp_path: Path) -> None:
    config = sip_config(settings(tmp_path, sip_trusted_proxies="10.0.0.5/32, 2001:db8::/64"))
    assert config is not None
    assert [str(n) for n in config.proxy_networks()] == ["10.0.0.5/32", "2001:db8::/64"]
    with pytest.raises(ValueError, match="VOXLOG_SIP_TRUSTED_PROXIES"):
        sip_config(settings(tmp_path, sip_trusted_proxies="10.0.0.0/33"))
    with pytest.raises(ValueError, match="VOXLOG_SIP_TRUSTED_PROXIES"):
        sip_config(settings(tmp_path, sip_trusted_proxies="front.example"))


def test_a_tls_trunks_certificate_is_checked_against_the_cas_named_or_a_bundle_that_exists(tmp_path: Path) -> None:
    named = tmp_path / "cas.pem"
    config = sip_config(settings(tmp_path, sip_tls_ca=named))
    assert config is not None
    assert config.tls_ca == named
    default = sip_config(settings(tmp_path))
    assert default is not None
    assert default.tls_ca is not None
    assert default.tls_ca.is_file()
    assert "BEGIN CERTIFICATE" in default.tls_ca.read_text()
