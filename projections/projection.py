"""What a projection is to the runners that drive it (`projection_runner`, `faust_projections`), and
what the projections share for reading the log beyond the records they are handed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from consumers.backends import LogBackend
from consumers.log_consumer import LogAdmin
from producers.log_producer import LogRecord, TopicPartition
from producers.partitioning import partition_for
from projections.store import AnalyticsStore
from projections.tables import Output, Table
from schemas.base import Event, EventPayload

PROJECTION_NAMES = ("calls", "audit", "memory", "recordings")
"""The projections voxlog runs (`default_projections`), by name: here, where the command line can
read them without importing the projections."""


class Projection(Protocol):
    name: str
    topics: tuple[str, ...]
    tables: tuple[Table, ...]
    event_types: frozenset[str] | None
    """The event types it folds (others are not even decoded); None: all of its topics'."""

    async def load(self, store: AnalyticsStore) -> None:
        """Restores what the projection keeps across events from its own tables."""

    def reset(self) -> None:
        """Forgets everything (a rebuild)."""

    async def rows(self, record: LogRecord, event: Event[EventPayload], backend: LogBackend) -> Sequence[Output]: ...


@runtime_checkable
class HoldsOffsets(Protocol):
    """A projection some of whose events' effects are not durable when their batch is written."""

    def held(self) -> Mapping[TopicPartition, int]:
        """Per topic-partition, the offset of the earliest record read whose effects are not durable
        yet: no offset past it is stored, so a crash replays it."""
        ...

    async def settle(self, backend: LogBackend, read: Mapping[TopicPartition, int] | None) -> Sequence[Output]:
        """Finish what waits on more of the log: called when every record of the log at a moment when
        the records below the offsets `read` were in it has been read (None: at the end of a batch,
        with nothing known of the rest of the log)."""
        ...


class HasAdmin(Protocol):
    """A log that gives admins (both backends do): all a projection's point reads need."""

    def admin(self) -> LogAdmin: ...


@contextlib.asynccontextmanager
async def log_admin(backend: HasAdmin) -> AsyncIterator[LogAdmin]:
    """An admin of the log, closed after use."""
    async with backend.admin() as admin:
        yield admin


class CallPartition:
    """Which partition of one topic holds a call's events: the topic's partition count asked of the
    log once, then the producers' own partitioner (a call's id is its events' key)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._partitions: int | None = None

    async def of(self, call_id: str, backend: HasAdmin) -> int | None:
        """The call's partition; None while the topic does not exist."""
        if self._partitions is None:
            async with log_admin(backend) as admin:
                self._partitions = len(await admin.end_offsets(self.topic))
        return partition_for(call_id.encode(), self._partitions) if self._partitions else None
