"""Wakes this process's consumers of an embedded log file when another process appends to their topics.

Appends made in this process wake their consumers at once (`producers.notify`). Other processes
cannot reach them, so something must look at the file. Each consumer used to look for itself every
50 ms, and SQLite's `data_version` changes with every commit of any connection, audio included: six
idle workers on a gateway then read all their partitions twenty times a second, two thread hops a
look, about 9% of a core while calls were being written. One watch per file and event loop now looks
instead: a thread hop every `OTHER_WRITERS_POLL_S`, a statement for every partition's end only when
the file has changed, and a wake-up only for the consumers whose topics grew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from producers.embedded_log_file import LogFile
from producers.embedded_producer import open_log_file
from producers.notify import notifier_for

log = logging.getLogger(__name__)

OTHER_WRITERS_POLL_S = 0.05
"""How soon an append by another process reaches a waiting consumer here."""
FAILURE_LOG_EVERY_S = 60.0
"""While looks keep failing, how often that is logged again."""


class LogWatch:
    """The watch of one log file for the consumers of one event loop."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._log: LogFile | None = None
        self._waiters: dict[asyncio.Event, frozenset[str]] = {}
        self._version: int | None = None
        self._watched: frozenset[str] = frozenset()
        self._ends: dict[tuple[str, int], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._failure_logged_at = 0.0

    def subscribe(self, event: asyncio.Event, topics: Iterable[str]) -> None:
        self._waiters[event] = frozenset(topics)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"embedded-log-watch {self._path.name}")

    async def unsubscribe(self, event: asyncio.Event) -> None:
        self._waiters.pop(event, None)
        if self._waiters or self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._log is not None:
            await asyncio.to_thread(self._log.close)
            self._log = None

    @property
    def idle(self) -> bool:
        return self._task is None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(OTHER_WRITERS_POLL_S)
            topics = frozenset().union(*self._waiters.values())
            try:
                grew = await asyncio.to_thread(self._grown_topics, topics)
            except Exception as exc:  # their own reads will raise what is wrong: consumers must not sleep through it
                self._failed(exc)
                grew = set(topics)
            else:
                if self._failing_since is not None:
                    log.warning("embedded log %s: looking for other processes' appends works again after %.1f s",
                                self._path, time.monotonic() - self._failing_since)
                    self._failing_since = None
            for event, wanted in list(self._waiters.items()):
                if not wanted.isdisjoint(grew):
                    event.set()

    def _failed(self, exc: Exception) -> None:
        """A failed look is logged with its trace once, then once a minute while it goes on: a file that
        cannot be read must not write twenty errors a second."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._failure_logged_at = now
            log.exception("embedded log %s: looking for other processes' appends failed", self._path)
        elif now - self._failure_logged_at >= FAILURE_LOG_EVERY_S:
            self._failure_logged_at = now
            log.error("embedded log %s: looking for other processes' appends still fails after %.0f s: %s",
                      self._path, now - self._failing_since, exc)

    def _grown_topics(self, topics: frozenset[str]) -> set[str]:
        """The topics with an end offset that moved since the last look (or was never seen). In a thread."""
        if self._log is None:
            self._log = open_log_file(self._path)
        version = self._log.data_version()
        if version == self._version and topics <= self._watched:
            return set()  # no other connection committed anything
        self._version, self._watched = version, topics
        pairs = [(topic, p) for topic in sorted(topics) for p in range(self._log.partitions(topic) or 0)]
        ends = dict(zip(pairs, self._log.end_offsets(pairs), strict=True))
        # Read after the ends: what this process appended meanwhile has woken its consumers already.
        told = notifier_for(self._path).appended_ends()
        # Growth past both the last look and this process's own appends is another writer's. A
        # partition never looked at has no last look: its consumers may have read it before a
        # foreign append the look would now take for granted, so it wakes them once.
        grew = {topic for (topic, p), end in ends.items()
                if end > max(self._ends.get((topic, p), -1), told.get((topic, p), -1))}
        self._ends = ends
        return grew


_watches: dict[tuple[Path, asyncio.AbstractEventLoop], LogWatch] = {}


def log_watch(path: Path) -> LogWatch:
    """The running loop's watch of the file at `path`."""
    loop = asyncio.get_running_loop()
    for key in [key for key, watch in _watches.items() if key[1].is_closed() or watch.idle]:
        del _watches[key]
    key = (path.resolve(), loop)
    found = _watches.get(key)
    if found is None:
        found = _watches[key] = LogWatch(path)
    return found
