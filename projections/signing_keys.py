"""Private keys that sign exports (the audit trail's, vCons'), each in a file of its own: made the first
time it is asked for, read every time after, and refused if others may read it."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

SigningKey = TypeVar("SigningKey", Ed25519PrivateKey, RSAPrivateKey)


def open_key_file(path: Path, make: Callable[[], SigningKey], error: type[Exception], *, what: str,
                  unusable: Callable[[object], str | None]) -> tuple[SigningKey, bool]:
    """The key in `path` (PEM, PKCS#8, unencrypted, mode 0600), made there with `make` the first time; and
    whether it was just made. A file that cannot be used raises `error` saying why, naming it `what`;
    `unusable` says why a key read is not one `make` would make (another kind, too short), or None."""
    try:
        return cast(SigningKey, _read(path, error, what, unusable)), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = make()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Written whole under another name, then linked into place: never a half-written key at `path`,
    # never readable by others for a moment, and of two processes making it at once one key wins.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return cast(SigningKey, _read(path, error, what, unusable)), False
    finally:
        os.unlink(temporary)
    return key, True


def _read(path: Path, error: type[Exception], what: str, unusable: Callable[[object], str | None]) -> object:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise error(f"the {what} {path} is open to others (mode {mode:04o}): chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: it is encrypted
        raise error(f"the {what} {path} is not an unencrypted PEM private key: {exc}") from None
    problem = unusable(key)
    if problem is not None:
        raise error(f"the {what} {path} {problem}")
    return key


def public_key_pem(key: Ed25519PrivateKey | RSAPrivateKey) -> str:
    """The signing key's public half, PEM (SubjectPublicKeyInfo): what verifies its exports, to keep apart."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def read_public_key(pem: bytes, error: type[Exception], *, command: str) -> object:
    """The public key in `pem`; `error` for a private key (with `command`, which prints its public half)
    or what is not a PEM public key. Its kind is the caller's to check."""
    if b"PRIVATE KEY" in pem:
        raise error(f"that is a private key: verify with its public key ({command}), and keep the private one "
                    "where it was")
    try:
        return serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise error(f"not a PEM public key: {exc}") from None
