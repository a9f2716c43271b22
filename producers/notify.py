"""Wakes consumers of an embedded log file in this process the moment a producer commits.

Consumers in other processes cannot be woken this way; they notice new data by polling SQLite's
`data_version` (see `consumers.embedded_consumer`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path


class LogNotifier:
    """Consumers subscribe with the topics they read; a commit wakes only those whose topics it
    wrote to (audio appends, most of them, wake no worker that reads commands)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, frozenset[str]]] = []

    def subscribe(self, event: asyncio.Event, topics: Iterable[str]) -> None:
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), event, frozenset(topics)))

    def unsubscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters = [w for w in self._waiters if w[1] is not event]

    def notify(self, topics: AbstractSet[str]) -> None:
        with self._lock:
            waiters = list(self._waiters)
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
