"""Secrets by reference: a tenant's configuration names where a secret is (an environment variable,
or a file under `VOXLOG_SECRETS_DIR`, as Docker and Kubernetes mount them), never the secret itself.
Only the worker that uses a secret resolves it, into a `SecretStr` that prints as stars."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from streams.connectors.base import ConnectorError, FailureKind


class SecretRef(BaseModel):
    """`{env: HUBSPOT_TOKEN}` or `{file: hubspot-token}` (under VOXLOG_SECRETS_DIR)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    file: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    """A file name, not a path: nothing outside the secrets folder can be named."""

    @model_validator(mode="after")
    def _one_place(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret is named by exactly one of env or file")
        return self

    def __str__(self) -> str:
        return f"env {self.env}" if self.env is not None else f"file {self.file}"


class Secrets:
    """Resolves references against an environment and a secrets folder (the worker's own)."""

    def __init__(self, environ: Mapping[str, str] | None = None, folder: Path | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        configured = self._environ.get("VOXLOG_SECRETS_DIR")
        self._folder = folder if folder is not None else (Path(configured) if configured else None)

    def resolve(self, ref: SecretRef, what: str) -> SecretStr:
        """The secret's value, or a CONFIGURATION error that names the reference (never a value)."""
        if ref.env is not None:
            value = self._environ.get(ref.env)
            if not value:
                raise ConnectorError(FailureKind.CONFIGURATION, f"{what}: environment variable {ref.env} is not set")
            return SecretStr(value)
        assert ref.file is not None
        if self._folder is None:
            raise ConnectorError(FailureKind.CONFIGURATION,
                                 f"{what}: names secret file {ref.file}, but VOXLOG_SECRETS_DIR is not set")
        path = self._folder / ref.file
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConnectorError(FailureKind.CONFIGURATION,
                                 f"{what}: secret file {ref.file} cannot be read ({exc.strerror})") from None
        value = re.sub(r"[\r\n]+\Z", "", value)  # mounted secrets often end in a newline; keys inside stay
        if not value:
            raise ConnectorError(FailureKind.CONFIGURATION, f"{what}: secret file {ref.file} is empty")
        return SecretStr(value)
