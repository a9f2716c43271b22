"""Wakes consumers of an embedded log file in this process the moment a producer commits.

Consumers in other processes cannot be woken this way; they notice new data by polling SQLite's
`data_version` (see `consumers.embedded_log_watch`), and the ends this process's appends left tell
that poll which growth it has already been told of.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path


class LogNotifier:
    """Consumers subscribe with the topics they read; a commit wakes only those whose topics it
    wrote to (audio appends, most of them, wake no worker that reads commands)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, frozenset[str]]] = []
        self._ends: dict[tuple[str, int], int] = {}  # (topic, partition): the end this process's appends left

    def subscribe(self, event: asyncio.Event, topics: Iterable[str]) -> None:
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), event, frozenset(topics)))

    def unsubscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters = [w for w in self._waiters if w[1] is not event]

    def appended_ends(self) -> dict[tuple[str, int], int]:
        """The end offset of each partition as this process's last append to it left it."""
        with self._lock:
            return dict(self._ends)

    def notify(self, ends: Mapping[tuple[str, int], int]) -> None:
        """An append committed, leaving these partitions at these end offsets."""
        with self._lock:
            waiters = list(self._waiters)
            for pair, end in ends.items():
                self._ends[pair] = max(end, self._ends.get(pair, 0))
        topics = {topic for topic, _ in ends}
        for loop, event, wanted in waiters:
            if loop.is_closed() or wanted.isdisjoint(topics):
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)


_notifiers: dict[Path, LogNotifier] = {}
_registry_lock = threading.Lock()


def notifier_for(path: Path) -> LogNotifier:
    key = path.resolve()
    with _registry_lock:
        found = _notifiers.get(key)
        if found is None:
            found = _notifiers[key] = LogNotifier()
        return found
