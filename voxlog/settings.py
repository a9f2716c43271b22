"""Settings, from the environment (VOXLOG_*) or a .env file."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from projections.recording_store import parse_s3_url

DEFAULT_AGENTS_DIR = Path(__file__).resolve().parent / "agents"
"""The demo tenant's agent files, shipped with voxlog: the agents when `VOXLOG_AGENTS_DIR` is not set."""
CALLS_PER_CORE = 10
"""The default capacity's measure (docs/performance.md, 'Admission')."""
DEMO_WEBHOOK_SECRET = "voxlog-dev-webhook-secret"
"""The default webhook secret, published here: good for the demo's own agents, refused for any others."""


class InsecureSettings(ValueError):
    """Settings a gateway must not serve with (a published secret guarding real agents)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXLOG_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".voxlog"), description="Data folder: the embedded log, embedded ClickHouse, recordings.")
    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers; unset means the embedded log in `home`."
    )
    clickhouse_dsn: str | None = Field(
        None, description="ClickHouse DSN (http://user:pass@host:8123/db); unset means embedded chDB in `home`."
    )

    agents_dir: Path | None = Field(
        None, description="Folder of agent definitions (YAML/TOML, a folder per tenant); unset: the demo agents.")
    public_url: str | None = Field(
        None, description="Public base URL Twilio reaches us at (TwiML stream URLs, webhook signatures); "
        "unset: the URL each request came to.")
    replica_url: str | None = Field(
        None, description="This gateway's own public base URL, when several share VOXLOG_PUBLIC_URL behind a load "
        "balancer: each call's media stream and transfer outcome come back to the gateway that answered it; "
        "unset: the public URL (one gateway).")
    twilio_account_sid: str | None = Field(None, validation_alias=AliasChoices("TWILIO_ACCOUNT_SID"))
    twilio_auth_token: SecretStr | None = Field(None, validation_alias=AliasChoices("TWILIO_AUTH_TOKEN"))
    twilio_api_base: str | None = Field(
        None, description="Override of Twilio's REST base URL (a local test server); unset: Twilio's own.")
    webhook_secret: SecretStr = Field(
        SecretStr(DEMO_WEBHOOK_SECRET), description="Signs outgoing tool webhooks (HMAC-SHA256); unset: the "
        "demo's published secret, which `voxlog serve` refuses for agents of your own (VOXLOG_AGENTS_DIR).")
    run_workers: bool = Field(True, description="Run the tool worker and the dialer inside `voxlog serve` too, and "
                              "the summariser and the after-call worker (in its background process).")
    max_calls: int | None = Field(
        None, ge=1, description="Calls one gateway serves at once; more are told busy. Unset: "
        f"{CALLS_PER_CORE} per CPU core (docs/performance.md, 'Admission').")
    widget_calls_per_address: int = Field(
        3, ge=1, description="Widget calls one client address may have at once (the widget's key is public); more "
        "are refused. Behind a proxy, list it in FORWARDED_ALLOW_IPS so that each caller has an address of their own.")
    drain_s: float = Field(
        15.0, gt=0, description="On SIGTERM, how long live calls get to end (they are told the gateway is shutting "
        "down) and the log to take their last events, before the process exits anyway.")
    run_projections: bool = Field(
        True, description="Run the ClickHouse projections with `voxlog serve` (the embedded ClickHouse can be "
        "open in one process only; with a ClickHouse server they may run apart instead: `voxlog projections run`).")
    background_process: bool = Field(
        True, description="Run the projections, the summariser and the after-call worker in a process of their "
        "own beside `voxlog serve`'s, which holds the embedded ClickHouse and answers the gateway's queries of it: "
        "their work is then not on the calls' event loop. False: all in one process.")

    sip_bind: str | None = Field(
        None, description="host:port where `voxlog serve` takes SIP calls (UDP and TCP) from the tenants' trunks and "
        "PBXs (`sip:` in tenant.yaml); unset: no SIP.")
    sip_public_host: str | None = Field(
        None, description="The address SIP peers reach this gateway at, put in Contact and SDP (behind NAT); unset: "
        "the host of VOXLOG_SIP_BIND.")
    sip_tls_port: int | None = Field(None, ge=1, le=65535, description="SIP over TLS on this port too (with "
                                     "VOXLOG_SIP_TLS_CERT and VOXLOG_SIP_TLS_KEY).")
    sip_tls_cert: Path | None = Field(None, description="The TLS certificate chain (PEM) for SIP over TLS.")
    sip_tls_key: Path | None = Field(None, description="Its private key (PEM).")
    sip_tls_ca: Path | None = Field(
        None, description="The CA certificates (PEM) a TLS trunk's certificate must chain to, for calls placed "
        "through it; unset: the system's (or certifi's) bundle.")
    sip_rtp_ports: str = Field("20000-29999", pattern=r"^[0-9]{1,5}-[0-9]{1,5}$",
                               description="The UDP ports RTP (and RTCP) of SIP calls use, first-last.")
    sip_rtp_timeout_s: float = Field(30.0, gt=0, description="A SIP call that brings no RTP for this long "
                                     "(and is not on hold) is ended, reason rtp_timeout.")
    sip_invites_per_minute: float = Field(120.0, gt=0, description="INVITEs one source address may send; more are "
                                          "answered 503 with Retry-After.")
    sip_trusted_proxies: str = Field("", description="Comma-separated CIDRs of SIP proxies in front of several "
                                     "gateways (deploy/kamailio: Kamailio's dispatcher): an INVITE from one is taken "
                                     "to come from the address it names in X-Voxlog-Source. Unset: none.")
    sip_codecs: str = Field("PCMU,PCMA", pattern=r"^[A-Za-z0-9]+(,[A-Za-z0-9]+)*$",
                            description="The codecs SIP calls may use, in order of preference, of PCMU, PCMA and "
                            "G722 (e.g. G722,PCMU,PCMA for PBXs and softphones that speak it): on G.722 the caller "
                            "is heard at 16 kHz, which the recogniser reads better than G.711's 8 kHz; with G722 "
                            "listed, G.711 calls pass through PJSIP's resampler (to 16 kHz and back).")

    keystore: Path | None = Field(
        None, description="Folder of the keystore that seals callers' personal data in the log (data keys per "
        "call, wrapped by per-tenant key-encryption keys; docs/compliance.md). Every process that reads or writes "
        "the log must share it, and losing it loses every caller's data: back it up apart from the log. Unset: "
        "`keystore` under `home`.")
    audit_signing_key: Path | None = Field(
        None, description="The Ed25519 private key (PEM, mode 0600) `voxlog audit export --signed` signs with, made "
        "there on first use; unset: audit-signing-key.pem in `home`. Hand its public half (`voxlog audit "
        "public-key`) to whoever verifies exports, and keep it apart from here.")
    vcon_signing_key: Path | None = Field(
        None, description="The RSA private key (PEM, mode 0600) vCon exports of calls are signed with (JWS RS256, "
        "what the vcon library signs with), made there on first use; unset: vcon-signing-key.pem in `home`. Hand "
        "its public half (`voxlog export public-key`) to whoever verifies them.")

    recordings_s3_url: str | None = Field(
        None, description="s3://bucket/prefix where finished call recordings are kept (AWS S3 or any S3-compatible "
        "store); unset: the recordings folder under `home`. Recordings are assembled under `home` either way.")
    recordings_s3_endpoint_url: str | None = Field(
        None, description="The S3-compatible store's URL (MinIO, Ceph: http://minio:9000); unset: AWS S3.")
    recordings_s3_region: str | None = Field(None, description="The bucket's region; unset: boto3's default.")
    recordings_s3_access_key_id: SecretStr | None = Field(
        None, description="Access key for the recordings bucket; unset: boto3's own chain (AWS_* variables, "
        "~/.aws, an instance role).")
    recordings_s3_secret_access_key: SecretStr | None = Field(None, description="Its secret key.")

    @field_validator("recordings_s3_url")
    @classmethod
    def _an_s3_url(cls, url: str | None) -> str | None:
        if url is not None:
            parse_s3_url(url)
        return url

    @field_validator("public_url", "replica_url")
    @classmethod
    def _a_base_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"a public URL is http(s)://host[:port][/prefix], not {url!r}")
        return url

    @field_validator("sip_bind")
    @classmethod
    def _host_and_port(cls, bind: str | None) -> str | None:
        if bind is not None:
            host, _, port = bind.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"VOXLOG_SIP_BIND is host:port, not {bind!r}")
        return bind

    @property
    def call_capacity(self) -> int:
        return self.max_calls or CALLS_PER_CORE * (os.cpu_count() or 1)

    @property
    def recordings_path(self) -> Path:
        """Where call recordings (stereo WAV) are assembled."""
        return self.home / "recordings"

    @property
    def keystore_path(self) -> Path:
        return self.keystore or self.home / "keystore"

    @property
    def audit_signing_key_path(self) -> Path:
        return self.audit_signing_key or self.home / "audit-signing-key.pem"

    @property
    def vcon_signing_key_path(self) -> Path:
        return self.vcon_signing_key or self.home / "vcon-signing-key.pem"

    @property
    def log_path(self) -> Path:
        return self.home / "log.db"

    @property
    def log_backend_name(self) -> str:
        return "kafka" if self.kafka_bootstrap else "embedded"
