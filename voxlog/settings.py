"""Settings, from the environment (VOXLOG_*) or a .env file."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    twilio_account_sid: str | None = Field(None, validation_alias=AliasChoices("TWILIO_ACCOUNT_SID"))
    twilio_auth_token: SecretStr | None = Field(None, validation_alias=AliasChoices("TWILIO_AUTH_TOKEN"))
    twilio_api_base: str | None = Field(
        None, description="Override of Twilio's REST base URL (a local test server); unset: Twilio's own.")
    webhook_secret: SecretStr = Field(
        SecretStr("voxlog-dev-webhook-secret"), description="Signs outgoing tool webhooks (HMAC-SHA256).")
    run_workers: bool = Field(True, description="Run the tool worker and the dialer inside `voxlog serve` too.")
    run_projections: bool = Field(
        True, description="Run the ClickHouse projections inside `voxlog serve` (the embedded ClickHouse can be "
        "open in one process only; with a ClickHouse server run `voxlog projections run` apart instead).")

    @property
    def recordings_path(self) -> Path:
        """Where call recordings (stereo WAV) are assembled."""
        return self.home / "recordings"

    @property
    def log_path(self) -> Path:
        return self.home / "log.db"

    @property
    def log_backend_name(self) -> str:
        return "kafka" if self.kafka_bootstrap else "embedded"
