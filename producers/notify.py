"""Wakes consumers of an embedded log file in this process the moment a producer commits.

Consumers in other processes cannot be woken this way; they notice new data by polling SQLite's
`data_version` (see `consumers.embedded`).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path


class LogNotifier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def subscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters.add((asyncio.get_running_loop(), event))

    def unsubscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters = {(loop, e) for loop, e in self._waiters if e is not event}

    def notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            if loop.is_closed():
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
