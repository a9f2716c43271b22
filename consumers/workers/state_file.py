"""The side-effect workers' own state: a SQLite file each (the tool results, the dialer's queue)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_state_db(path: Path) -> sqlite3.Connection:
    """A worker's own SQLite file: autocommit (transactions are explicit), WAL, shared by threads
    under the caller's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    return db
