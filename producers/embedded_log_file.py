"""The embedded log's file: topics, partitions, offsets and consumer groups in one SQLite file (WAL).

Record ids pack (topic-partition id, offset) into SQLite's rowid, `tp << 40 | offset`, so a
partition is a contiguous rowid range: appends go to the end of the table's B-tree and reading a
partition from an offset is a range scan with no secondary index. An index on the key serves
replay's "all of one call's records". Several processes may share the file: appends take SQLite's
write lock and read the partition's last offset inside the same transaction.

Compacted topics (a table rather than a history: the gateways' leases, the call registry, the
configuration) keep the latest record per key, as Kafka's log cleaner does: an append deletes the
key's earlier records of that partition in the same transaction, so the topic's size follows its
keys, not its age. Offsets keep their numbers (readers skip the gaps).

This module is synchronous; `producers.embedded_producer` and `consumers.embedded_consumer` run it off the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from producers.log_producer import LogRecord
from producers.partitioning import partition_for

T = TypeVar("T")

# Stored in the file (PRAGMA user_version): a newer format is refused with a clear error.
FORMAT_VERSION = 1

OFFSET_BITS = 40
OFFSET_MASK = (1 << OFFSET_BITS) - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL CHECK (partitions > 0)
);
CREATE TABLE IF NOT EXISTS topic_partitions (
    tp INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL REFERENCES topics(name),
    partition INTEGER NOT NULL,
    UNIQUE (topic, partition)
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,          -- tp << 40 | offset
    key BLOB,
    value BLOB NOT NULL,
    headers TEXT,                    -- JSON [[name, hex]], NULL when none
    timestamp_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_key ON records (key);
CREATE TABLE IF NOT EXISTS group_members (
    group_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    topics TEXT NOT NULL,            -- JSON list of subscribed topics
    expires_ms INTEGER NOT NULL,     -- last heartbeat + the member's own session timeout
    PRIMARY KEY (group_id, member_id)
);
CREATE TABLE IF NOT EXISTS group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
"""


Message = tuple[str, bytes, bytes, Sequence[tuple[str, bytes]]]  # topic, key, value, headers


class CommitRejected(RuntimeError):
    """A member committed a partition the group no longer assigns to it (it was rebalanced away)."""


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> str | None:
    return json.dumps([[name, value.hex()] for name, value in headers]) if headers else None


def decode_headers(text: str | None) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, bytes.fromhex(value)) for name, value in json.loads(text)) if text else ()


def assign_partitions(
    members: Sequence[str], partitions: Sequence[tuple[str, int]]
) -> dict[str, list[tuple[str, int]]]:
    """Round-robin over members sorted by id: every member computes the same answer on its own."""
    ordered = sorted(members)
    out: dict[str, list[tuple[str, int]]] = {m: [] for m in ordered}
    if ordered:
        for i, tp in enumerate(sorted(partitions)):
            out[ordered[i % len(ordered)]].append(tp)
    return out


class LogFile:
    """One connection to the log file. Thread-safe: calls are serialised on a lock."""

    def __init__(
        self, path: Path, default_partitions: Mapping[str, int] | None = None, fallback_partitions: int = 1,
        compacted: Collection[str] = (),
    ) -> None:
        self.path = path
        self._compacted = frozenset(compacted)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._default_partitions = dict(default_partitions or {})
        self._fallback_partitions = fallback_partitions
        self._partitions: dict[str, int] = {}
        self._tp_ids: dict[tuple[str, int], int] = {}
        with self._lock:
            self._use_wal()
            # NORMAL in WAL mode: a commit survives a process crash; only an OS crash or power loss
            # can lose the last transactions. Kafka's acks=all with page-cache writes is comparable.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()

    def _use_wal(self) -> None:
        # Switching the journal mode can answer "locked" at once, without waiting out the busy
        # timeout, while another connection is mid-transaction: only switch when needed, and retry.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                if str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > FORMAT_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer voxlog (log format {version}; this one reads {FORMAT_VERSION})"
            )
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # topics -------------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int) -> None:
        with self._lock:
            self._write(lambda: self._create_topic(name, partitions))

    def _create_topic(self, name: str, partitions: int) -> int:
        row = self._db.execute("SELECT partitions FROM topics WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        self._db.execute("INSERT INTO topics (name, partitions) VALUES (?, ?)", (name, partitions))
        self._db.executemany(
            "INSERT INTO topic_partitions (topic, partition) VALUES (?, ?)", [(name, p) for p in range(partitions)]
        )
        return partitions

    def ensure_topic(self, name: str) -> int:
        """The topic's partition count, creating it with its default count when missing."""
        found = self.partitions(name)
        if found is None:
            with self._lock:
                found = self._partitions[name] = self._write(
                    lambda: self._create_topic(name, self._default_partitions.get(name, self._fallback_partitions))
                )
        return found

    def topics(self) -> dict[str, int]:
        with self._lock:
            return {str(n): int(p) for n, p in self._db.execute("SELECT name, partitions FROM topics ORDER BY name")}

    def partitions(self, topic: str) -> int | None:
        found = self._partitions.get(topic)
        if found is None:
            with self._lock:
                row = self._db.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
            if row is None:
                return None
            found = self._partitions[topic] = int(row[0])
        return found

    def _tp(self, topic: str, partition: int) -> int:
        found = self._tp_ids.get((topic, partition))
        if found is None:
            row = self._db.execute(
                "SELECT tp FROM topic_partitions WHERE topic = ? AND partition = ?", (topic, partition)
            ).fetchone()
            if row is None:
                raise KeyError(f"no partition {partition} in topic {topic!r}")
            found = self._tp_ids[(topic, partition)] = int(row[0])
        return found

    def _write(self, body: Callable[[], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    # appends ------------------------------------------------------------------------------
    def append(self, messages: Iterable[Message]) -> dict[tuple[str, int], int]:
        """Appends in one transaction; returns the end offset it left each (topic, partition) written at."""
        with self._lock:
            return self._write(lambda: self._append(messages))

    def _append(self, messages: Iterable[Message]) -> dict[tuple[str, int], int]:
        # This loop holds the GIL while the producing session wants it: keep it lean.
        now_ms = int(time.time() * 1000)
        next_ids: dict[tuple[str, int], int] = {}
        rows = []
        latest: dict[tuple[bytes, int], int] = {}  # (key, tp) of a compacted topic: the id of its newest record
        for topic, key, value, headers in messages:
            partitions = self._partitions.get(topic)
            if partitions is None:
                partitions = self._partitions[topic] = self._create_topic(
                    topic, self._default_partitions.get(topic, self._fallback_partitions)
                )
            partition = partition_for(key, partitions)
            slot = (topic, partition)
            next_id = next_ids.get(slot)
            if next_id is None:
                tp = self._tp(topic, partition)
                last = self._db.execute(
                    "SELECT max(id) FROM records WHERE id >= ? AND id < ?", (tp << OFFSET_BITS, (tp + 1) << OFFSET_BITS)
                ).fetchone()[0]
                next_id = (tp << OFFSET_BITS) if last is None else last + 1
            next_ids[slot] = next_id + 1
            rows.append((next_id, key, value, encode_headers(headers) if headers else None, now_ms))
            if topic in self._compacted:
                latest[(key, next_id >> OFFSET_BITS)] = next_id
        self._db.executemany("INSERT INTO records (id, key, value, headers, timestamp_ms) VALUES (?, ?, ?, ?, ?)", rows)
        if latest:
            self._db.executemany("DELETE FROM records WHERE key = ? AND id >= ? AND id < ?",
                                 [(key, tp << OFFSET_BITS, rid) for (key, tp), rid in latest.items()])
        return {slot: next_id & OFFSET_MASK for slot, next_id in next_ids.items()}

    # reads --------------------------------------------------------------------------------
    def read(self, topic: str, partition: int, offset: int, limit: int) -> list[LogRecord]:
        with self._lock:
            tp = self._tp(topic, partition)
            cursor = self._db.execute(
                "SELECT id, key, value, headers, timestamp_ms FROM records"
                " WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                ((tp << OFFSET_BITS) + offset, (tp + 1) << OFFSET_BITS, limit),
            )
            return [
                LogRecord(topic, partition, rid & OFFSET_MASK, key, value, decode_headers(headers), ts)
                for rid, key, value, headers, ts in cursor
            ]

    def end_offset(self, topic: str, partition: int) -> int:
        return self.end_offsets([(topic, partition)])[0]

    def end_offsets(self, partitions: Sequence[tuple[str, int]]) -> list[int]:
        """Each (topic, partition)'s next offset, in one statement: a consumer woken by any commit to
        the file (most of them audio) learns which of its partitions have anything new without a read
        of each (a read is a statement and a Python round trip; this is one seek a partition in C)."""
        if not partitions:
            return []
        with self._lock:
            bounds: list[int] = []
            for topic, partition in partitions:
                tp = self._tp(topic, partition)
                bounds += (tp << OFFSET_BITS, (tp + 1) << OFFSET_BITS)
            one = "(SELECT max(id) FROM records WHERE id >= ? AND id < ?)"
            row = self._db.execute("SELECT " + ", ".join([one] * len(partitions)), bounds).fetchone()
            return [0 if last is None else (last & OFFSET_MASK) + 1 for last in row]

    def read_key(self, topics: Sequence[str], key: bytes) -> list[LogRecord]:
        with self._lock:
            wanted = {self._tp(t, partition_for(key, n)): t for t in topics if (n := self._partitions_locked(t))}
            out = []
            for rid, value, headers, ts in self._db.execute(
                "SELECT id, value, headers, timestamp_ms FROM records WHERE key = ? ORDER BY id", (key,)
            ):
                topic = wanted.get(rid >> OFFSET_BITS)
                if topic is not None:
                    out.append(
                        LogRecord(
                            topic,
                            partition_for(key, self._partitions[topic]),
                            rid & OFFSET_MASK,
                            key,
                            value,
                            decode_headers(headers),
                            ts,
                        )
                    )
            return out

    def _partitions_locked(self, topic: str) -> int | None:
        if topic not in self._partitions:
            row = self._db.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
            if row is None:
                return None
            self._partitions[topic] = int(row[0])
        return self._partitions[topic]

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap 'anything new?' across processes."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # consumer groups ----------------------------------------------------------------------
    def heartbeat(
        self, group_id: str, member_id: str, topics: Sequence[str], session_timeout_ms: int
    ) -> list[tuple[str, int]]:
        """Registers the member as alive, expires silent ones; returns this member's partitions."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            return self._write(lambda: self._heartbeat(group_id, member_id, topics, session_timeout_ms, now_ms))

    def _heartbeat(
        self, group_id: str, member_id: str, topics: Sequence[str], session_timeout_ms: int, now_ms: int
    ) -> list[tuple[str, int]]:
        # Each member is judged by its own session timeout, as the Kafka group coordinator does.
        self._db.execute("DELETE FROM group_members WHERE group_id = ? AND expires_ms < ?", (group_id, now_ms))
        self._db.execute(
            "INSERT INTO group_members (group_id, member_id, topics, expires_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (group_id, member_id)"
            " DO UPDATE SET expires_ms = excluded.expires_ms, topics = excluded.topics",
            (group_id, member_id, json.dumps(sorted(topics)), now_ms + session_timeout_ms),
        )
        return self._assignment(group_id, member_id, now_ms)

    def _assignment(self, group_id: str, member_id: str, now_ms: int) -> list[tuple[str, int]]:
        members = {
            str(m): json.loads(t)
            for m, t in self._db.execute(
                "SELECT member_id, topics FROM group_members WHERE group_id = ? AND expires_ms >= ?", (group_id, now_ms)
            )
        }
        mine: list[tuple[str, int]] = []
        for topic in members.get(member_id, []):
            partitions = self._partitions_locked(topic)
            if partitions is None:
                partitions = self._partitions[topic] = self._create_topic(
                    topic, self._default_partitions.get(topic, self._fallback_partitions)
                )
            subscribers = [m for m, ts in members.items() if topic in ts]
            mine += assign_partitions(subscribers, [(topic, p) for p in range(partitions)])[member_id]
        return mine

    def touch(self, group_id: str, member_id: str, session_timeout_ms: int) -> None:
        """Keeps a busy member alive between polls without changing what it is assigned."""
        expires_ms = int(time.time() * 1000) + session_timeout_ms
        with self._lock:
            self._db.execute(
                "UPDATE group_members SET expires_ms = ? WHERE group_id = ? AND member_id = ?",
                (expires_ms, group_id, member_id),
            )

    def leave(self, group_id: str, member_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM group_members WHERE group_id = ? AND member_id = ?", (group_id, member_id))

    def committed(self, group_id: str, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        with self._lock:
            out = {}
            for topic, partition in tps:
                row = self._db.execute(
                    "SELECT next_offset FROM group_offsets WHERE group_id = ? AND topic = ? AND partition = ?",
                    (group_id, topic, partition),
                ).fetchone()
                if row is not None:
                    out[(topic, partition)] = int(row[0])
            return out

    def commit(self, group_id: str, member_id: str | None, offsets: Mapping[tuple[str, int], int]) -> None:
        """Stores next offsets. With a member id, only for partitions the group assigns to it now;
        a rebalance that moved a partition away rejects the commit, as Kafka does."""
        with self._lock:

            def body() -> None:
                if member_id is not None:
                    owned = set(self._assignment(group_id, member_id, int(time.time() * 1000)))
                    lost = [tp for tp in offsets if tp not in owned]
                    if lost:
                        raise CommitRejected(f"member {member_id} of {group_id} no longer owns {sorted(lost)}")
                self._db.executemany(
                    "INSERT INTO group_offsets (group_id, topic, partition, next_offset) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                    [(group_id, t, p, o) for (t, p), o in offsets.items()],
                )

            self._write(body)
