"""Key-encryption keys in a local SQLite file (mode 0600): the default, for one machine or a shared
volume. A production deployment across machines keeps them in a KMS instead (docs/compliance.md)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.sealing import KeyUnavailable
from streams.keystore.key_encryption import KeyEncryptionKeys

_NONCE_BYTES = 12


def private_sqlite(path: Path) -> sqlite3.Connection:
    """A SQLite file only its owner can read, in a folder only its owner can enter. A file that exists is
    left to SQLite alone: SQLite's locks are POSIX locks, which closing any descriptor of the file drops
    for the whole process, and a process whose locks are gone may have the WAL deleted under it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    return db


class LocalKeyEncryptionKeys(KeyEncryptionKeys):
    """AES-256-GCM KEKs, random 96-bit nonces; a wrapped key is the nonce and the ciphertext."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = private_sqlite(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS keks (kek_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, "
            "material BLOB NOT NULL, created_ms INTEGER NOT NULL)"
        )
        self._lock = threading.Lock()
        self._ciphers: dict[tuple[str, str], AESGCM] = {}

    def current(self, tenant_id: str) -> str:
        with self._lock:
            row = self._db.execute(
                "SELECT kek_id FROM keks WHERE tenant_id = ? ORDER BY created_ms DESC, rowid DESC LIMIT 1", (tenant_id,)
            ).fetchone()
        return str(row[0]) if row else self.rotate(tenant_id)

    def rotate(self, tenant_id: str) -> str:
        kek_id = f"kek-{secrets.token_hex(8)}"
        with self._lock:
            self._db.execute(
                "INSERT INTO keks (kek_id, tenant_id, material, created_ms) VALUES (?, ?, ?, ?)",
                (kek_id, tenant_id, AESGCM.generate_key(256), time.time_ns() // 1_000_000),
            )
        return kek_id

    def retire(self, tenant_id: str, kek_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM keks WHERE kek_id = ? AND tenant_id = ?", (kek_id, tenant_id))
            self._ciphers.pop((tenant_id, kek_id), None)

    def _cipher(self, tenant_id: str, kek_id: str) -> AESGCM:
        cipher = self._ciphers.get((tenant_id, kek_id))
        if cipher is None:
            with self._lock:
                row = self._db.execute(
                    "SELECT material FROM keks WHERE kek_id = ? AND tenant_id = ?", (kek_id, tenant_id)
                ).fetchone()
            if row is None:
                raise KeyUnavailable(
                    f"key-encryption key {kek_id} of tenant {tenant_id} is not in {self.path}: "
                    "the KEK file was lost or replaced, so the data keys it wrapped cannot be opened"
                )
            cipher = self._ciphers[(tenant_id, kek_id)] = AESGCM(bytes(row[0]))
        return cipher

    def wrap(self, tenant_id: str, kek_id: str, key: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._cipher(tenant_id, kek_id).encrypt(nonce, key, context)

    def unwrap(self, tenant_id: str, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._cipher(tenant_id, kek_id).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], context)
        except InvalidTag as exc:
            raise KeyUnavailable(f"a data key wrapped by {kek_id} of tenant {tenant_id} does not unwrap") from exc

    def close(self) -> None:
        self._db.close()
