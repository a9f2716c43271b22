"""The side-effect workers' own state: a SQLite file each (the tool results, the dialer's queue)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

FORGET_UNFINISHED_AFTER_S = 24 * 3600
"""How long a worker keeps what it folded of a call that never finished (no summary, no end): longer than
any call, and nothing personal kept beyond it."""


def open_state_db(path: Path) -> sqlite3.Connection:
    """A worker's own SQLite file: autocommit (transactions are explicit), WAL, shared by threads
    under the caller's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    return db
