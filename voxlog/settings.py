"""Settings, from the environment (VOXLOG_*) or a .env file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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

    @property
    def log_path(self) -> Path:
        return self.home / "log.db"

    @property
    def log_backend_name(self) -> str:
        return "kafka" if self.kafka_bootstrap else "embedded"
