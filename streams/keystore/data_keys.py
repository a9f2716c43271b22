"""Data keys: one per call (stream) and kind of data, bound to the person it concerns.

A data key seals the personal fields of its stream's events (`schemas.sealing`). It is created when
the stream first writes personal data, wrapped by the tenant's current key-encryption key, and kept
in a SQLite file (mode 0600) beside the KEKs. The person (the data subject: the caller's key,
`streams.memory.caller_key`) is learnt from the event that starts the stream. Destroying a key
(erasure of its subject, or retention) deletes the key material and keeps a tombstone: who, when,
why, so that readers can tell erased data (withheld) from a lost keystore (`KeyUnavailable`).

Keys are cached, bounded, for `CACHE_TTL_S`: a process that held a key before another process
destroyed it can read with it for at most that long.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from schemas.base import Event, EventPayload
from schemas.events import CallDialRequested, CallRefused, CallStarted
from schemas.sealing import AUDIO_DATA, PERSONAL_DATA, KeyUnavailable, SealingKey
from streams.keystore.key_encryption import KeyEncryptionKeys
from streams.keystore.local_key_encryption import private_sqlite
from streams.memory import caller_key, key_of_call

KINDS = (PERSONAL_DATA, AUDIO_DATA)
CACHE_TTL_S = 5.0
CACHE_ENTRIES = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS data_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    generation INTEGER NOT NULL,
    subject TEXT,
    created_ms INTEGER NOT NULL,
    kek_id TEXT,
    wrapped BLOB,
    destroyed_ms INTEGER,
    destroyed_by TEXT,
    UNIQUE (tenant_id, stream_id, kind, generation)
);
CREATE INDEX IF NOT EXISTS data_keys_by_subject ON data_keys (tenant_id, subject);
CREATE INDEX IF NOT EXISTS data_keys_by_age ON data_keys (tenant_id, kind, created_ms);
"""


def subject_of(event: Event[EventPayload]) -> str | None:
    """The person a stream's personal data is about, from the event that starts the stream."""
    p, tenant = event.payload, event.tenant_id
    match p:
        case CallStarted():
            return key_of_call(tenant, p)
        case CallDialRequested():
            return caller_key(tenant, p.to_number)
        case CallRefused():
            return caller_key(tenant, p.to_number if p.direction == "outbound" else p.from_number)
    # A caller's memory stream is keyed by the caller's key itself.
    return event.call_id if event.call_id.startswith("caller-") else None


@dataclass(frozen=True)
class KeyRecord:
    """A data key as the keystore lists it (never its material)."""

    key_id: str
    tenant_id: str
    stream_id: str
    kind: str
    subject: str | None
    created_ms: int
    destroyed_ms: int | None
    destroyed_by: str | None


class _Cache:
    """Bounded, expiring: least recently used out first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[object, tuple[float, object]] = OrderedDict()

    def get(self, key: object) -> tuple[bool, object]:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def expired(self, key: object) -> object | None:
        """What was cached under `key` until its time ran out (None if nothing, or if its time is not up)."""
        entry = self._entries.get(key)
        return None if entry is None or entry[0] >= time.monotonic() else entry[1]

    def put(self, key: object, value: object) -> None:
        self._entries[key] = (time.monotonic() + CACHE_TTL_S, value)
        self._entries.move_to_end(key)
        while len(self._entries) > CACHE_ENTRIES:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class DataKeyStore:
    """The keystore the codec seals and opens with (`schemas.sealing.DataKeys`), and what erasure,
    retention and rotation act on."""

    def __init__(self, path: Path, keks: KeyEncryptionKeys) -> None:
        self.path = path
        self.keks = keks
        self._db = private_sqlite(path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        # Lookups on the event loop read through a connection of their own: in WAL a reader never waits for
        # a writer, and a call's keys are made (a durable commit) in a thread holding `_lock`.
        self._reader = private_sqlite(path)
        self._reader_lock = threading.Lock()
        self._sealing = _Cache()
        self._opening = _Cache()

    def close(self) -> None:
        self._db.close()
        self._reader.close()
        self.keks.close()

    @staticmethod
    def _context(tenant_id: str, key_id: str) -> bytes:
        return f"voxlog-data-key\x1f{tenant_id}\x1f{key_id}".encode()

    def _cipher(self, tenant_id: str, key_id: str, kek_id: str, wrapped: bytes) -> AESSIV:
        return AESSIV(self.keks.unwrap(tenant_id, kek_id, wrapped, self._context(tenant_id, key_id)))

    def sealing_key(self, event: Event[EventPayload], kind: str) -> SealingKey:
        hit, cached = self._sealing.get((event.tenant_id, event.call_id, kind))
        if hit and isinstance(cached, SealingKey):  # every event but a stream's first: nothing more to work out
            return cached
        subject = subject_of(event)
        # A live call's key is looked up again every CACHE_TTL_S: checked with one read while it is still the
        # stream's, rather than read, unwrapped and made a cipher again (a burst of calls' turns pays it at once).
        was = self._sealing.expired((event.tenant_id, event.call_id, kind))
        if isinstance(was, SealingKey) and self._still_current(event.tenant_id, event.call_id, kind, was, subject):
            self._sealing.put((event.tenant_id, event.call_id, kind), was)
            return was
        # A call's keys of both kinds are made together, when it starts: one durable write per call.
        kinds = (kind, *(k for k in KINDS if k != kind)) if isinstance(event.payload, CallStarted) else (kind,)
        return self._stream_key(event.tenant_id, event.call_id, kinds, subject)

    def _still_current(self, tenant: str, stream: str, kind: str, key: SealingKey, subject: str | None) -> bool:
        """Whether `key` is live and still the stream's newest of its kind, with no subject to note on it:
        then `_stream_key` would give the same key, and write nothing."""
        if key.cipher is None:
            return False  # destroyed: a subject's own stream makes a new one (`_stream_key`)
        with self._reader_lock:
            row = self._reader.execute(
                "SELECT key_id, wrapped IS NULL, subject FROM data_keys WHERE tenant_id = ? AND stream_id = ? AND "
                "kind = ? ORDER BY generation DESC LIMIT 1", (tenant, stream, kind)).fetchone()
        return row is not None and row[0] == key.key_id and not row[1] and (subject is None or row[2] is not None)

    def prepare_call(self, tenant_id: str, call_id: str, subject: str | None) -> None:
        """A call's keys, made (a durable commit) and cached before its first event needs them. The
        gateway calls this in a thread, so that sealing a call's events never waits for the disk on the
        event loop every call shares."""
        self._stream_key(tenant_id, call_id, KINDS, subject)
        self._stream_key(tenant_id, call_id, KINDS[1:], subject)

    def _stream_key(self, tenant: str, stream: str, kinds: tuple[str, ...], subject: str | None) -> SealingKey:
        """The stream's key of `kinds[0]`, made (with the others of `kinds`) where it has none."""
        kind = kinds[0]
        hit, cached = self._sealing.get((tenant, stream, kind))
        if hit and isinstance(cached, SealingKey):
            return cached
        with self._lock:
            if subject is None:  # the stream's other kind of key may know it (call.started came first)
                known = self._db.execute(
                    "SELECT subject FROM data_keys WHERE tenant_id = ? AND stream_id = ? AND subject IS NOT NULL "
                    "LIMIT 1", (tenant, stream)).fetchone()
                subject = None if known is None else known[0]
            row = self._db.execute(
                "SELECT key_id, kek_id, wrapped, generation, subject FROM data_keys "
                "WHERE tenant_id = ? AND stream_id = ? AND kind = ? ORDER BY generation DESC LIMIT 1",
                (tenant, stream, kind),
            ).fetchone()
            # A subject's own stream (its memory) outlives an erasure: later calls start a new key.
            # Any other stream whose key was destroyed keeps nothing more of its personal data.
            if row is None or (row[2] is None and stream == subject):
                row = self._create(tenant, stream, kinds, subject, 0 if row is None else row[3] + 1)
            elif row[4] is None and subject is not None:
                self._db.execute("UPDATE data_keys SET subject = ? WHERE tenant_id = ? AND stream_id = ? AND "
                                 "subject IS NULL", (subject, tenant, stream))
        key_id, kek_id, wrapped = str(row[0]), row[1], row[2]
        key = SealingKey(key_id, None if wrapped is None else self._cipher(tenant, key_id, kek_id, bytes(wrapped)))
        self._sealing.put((tenant, stream, kind), key)
        return key

    def _create(self, tenant: str, stream: str, kinds: tuple[str, ...], subject: str | None,
                generation: int) -> tuple[object, ...]:
        """The stream's keys of these kinds (the first is the one asked for, and its row is returned)."""
        kek_id = self.keks.current(tenant)
        made = []
        for each in kinds:
            key_id, key = f"dk-{secrets.token_hex(12)}", AESSIV.generate_key(512)
            made.append((each, key_id, key, self.keks.wrap(tenant, kek_id, key, self._context(tenant, key_id))))
        # Another process may create the stream's keys at the same moment: the first insert wins.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR IGNORE INTO data_keys (key_id, tenant_id, stream_id, kind, generation, subject, created_ms, "
                "kek_id, wrapped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(key_id, tenant, stream, each, generation, subject, time.time_ns() // 1_000_000, kek_id, wrapped)
                 for each, key_id, _, wrapped in made])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        kind, key_id, key, wrapped = made[0]
        row = self._db.execute(
            "SELECT key_id, kek_id, wrapped, generation, subject FROM data_keys "
            "WHERE tenant_id = ? AND stream_id = ? AND kind = ? AND generation = ?",
            (tenant, stream, kind, generation),
        ).fetchone()
        assert row is not None
        if row[0] != key_id:
            return tuple(row)
        try:
            self.keks.unwrap(tenant, kek_id, wrapped, self._context(tenant, key_id))
        except KeyUnavailable:
            # A rotation retired the KEK between our reading it and our insert: wrap with the new one.
            kek_id = self.keks.current(tenant)
            for _, made_id, made_key, _ in made:
                rewrapped = self.keks.wrap(tenant, kek_id, made_key, self._context(tenant, made_id))
                self._db.execute("UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE key_id = ?",
                                 (kek_id, rewrapped, made_id))
            rewritten = self._db.execute("SELECT key_id, kek_id, wrapped, generation, subject FROM data_keys "
                                         "WHERE key_id = ?", (key_id,)).fetchone()
            return tuple(rewritten)
        return tuple(row)

    def opening_cipher(self, tenant_id: str, key_id: str) -> AESSIV | None:
        hit, cached = self._opening.get(key_id)
        if hit:
            return cached if isinstance(cached, AESSIV) else None
        with self._reader_lock:
            row = self._reader.execute(
                "SELECT tenant_id, kek_id, wrapped FROM data_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None or row[0] != tenant_id:
            raise KeyUnavailable(
                f"data key {key_id} of tenant {tenant_id} is not in the keystore {self.path}: the keystore was lost "
                "or replaced (erased keys leave a tombstone, this one left none); nothing was read as erased"
            )
        cipher = None if row[2] is None else self._cipher(tenant_id, key_id, row[1], bytes(row[2]))
        self._opening.put(key_id, cipher)
        return cipher

    def destroy_subject(self, tenant_id: str, subject: str, *, created_before_ms: int, by: str) -> int:
        """Destroys every key of the person created before that time; how many."""
        return self._destroy("subject = ? AND created_ms < ?", (subject, created_before_ms), tenant_id, by)

    def destroy_call(self, tenant_id: str, stream_id: str, kind: str, *, by: str) -> int:
        """Destroys one call's key of one kind (a caller who refused to be recorded: its audio); how many."""
        return self._destroy("stream_id = ? AND kind = ?", (stream_id, kind), tenant_id, by)

    def destroy_older(self, tenant_id: str, kind: str, *, created_before_ms: int, by: str) -> int:
        """Destroys the tenant's keys of that kind created before that time (retention); how many."""
        return self._destroy("kind = ? AND created_ms < ?", (kind, created_before_ms), tenant_id, by)

    def _destroy(self, where: str, args: tuple[object, ...], tenant_id: str, by: str) -> int:
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE data_keys SET wrapped = NULL, kek_id = NULL, destroyed_ms = ?, destroyed_by = ? "
                f"WHERE tenant_id = ? AND wrapped IS NOT NULL AND {where}",
                (time.time_ns() // 1_000_000, by, tenant_id, *args),
            )
            self._sealing.clear()
            self._opening.clear()
        return cursor.rowcount

    def rotate(self, tenant_id: str) -> tuple[str, int]:
        """A new KEK for the tenant; every live data key re-wrapped with it, the old KEKs retired.
        The log is not touched: events name data keys, and data keys stay the same."""
        new = self.keks.rotate(tenant_id)
        rewrapped = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, kek_id, wrapped FROM data_keys WHERE tenant_id = ? AND wrapped IS NOT NULL "
                "AND kek_id != ?",
                (tenant_id, new),
            ).fetchall()
            old = {str(r[1]) for r in rows}
            for key_id, kek_id, wrapped in rows:
                context = self._context(tenant_id, key_id)
                key = self.keks.unwrap(tenant_id, kek_id, bytes(wrapped), context)
                self._db.execute(
                    "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE key_id = ?",
                    (new, self.keks.wrap(tenant_id, new, key, context), key_id),
                )
                rewrapped += 1
            still_used = {str(r[0]) for r in self._db.execute(
                "SELECT DISTINCT kek_id FROM data_keys WHERE tenant_id = ? AND kek_id IS NOT NULL", (tenant_id,))}
            for kek_id in old - still_used:
                self.keks.retire(tenant_id, kek_id)
        return new, rewrapped

    def keys(self, tenant_id: str) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, tenant_id, stream_id, kind, subject, created_ms, destroyed_ms, destroyed_by "
                "FROM data_keys WHERE tenant_id = ? ORDER BY created_ms, key_id",
                (tenant_id,),
            ).fetchall()
        return [KeyRecord(*row) for row in rows]
