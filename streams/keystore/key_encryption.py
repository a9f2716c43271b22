"""The tenants' key-encryption keys (KEKs): what wraps every data key, so that a data key at rest is
useless without its tenant's KEK. One interface, one module per kind of key service (the local file
is `local_key_encryption.py`); docs/compliance.md says how AWS KMS or Vault Transit plug in."""

from __future__ import annotations

from abc import ABC, abstractmethod


class KeyEncryptionKeys(ABC):
    """A tenant's KEKs by id. `context` is bound to the wrapped key (associated data, or a KMS's
    encryption context): a wrapped key moved to another data key or tenant does not unwrap."""

    @abstractmethod
    def current(self, tenant_id: str) -> str:
        """The id of the KEK new data keys are wrapped with (created on the tenant's first use)."""

    @abstractmethod
    def wrap(self, tenant_id: str, kek_id: str, key: bytes, context: bytes) -> bytes: ...

    @abstractmethod
    def unwrap(self, tenant_id: str, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Raises `schemas.sealing.KeyUnavailable` when the KEK is unknown or the wrapped key does not open."""

    @abstractmethod
    def rotate(self, tenant_id: str) -> str:
        """Makes a new KEK the current one and returns its id; older ones still unwrap until retired."""

    @abstractmethod
    def retire(self, tenant_id: str, kek_id: str) -> None:
        """Destroys a KEK that no data key is wrapped with any more."""

    @abstractmethod
    def close(self) -> None: ...
