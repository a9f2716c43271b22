"""The read half of the log contract, implemented once per backend (`kafka.py`, `embedded.py`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

from producers.log_producer import AsyncService, CarriesEventCodec, LogRecord, TopicPartition


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: int
    messages: int


class LogConsumer(CarriesEventCodec, AsyncService):
    """Reads records from topics.

    With a `group_id` the consumer joins that consumer group: the topics' partitions are shared
    among the group's live members, each member resumes from the group's committed offsets, and a
    member that stops or dies has its partitions taken over. Without one it reads every partition
    of its topics from the start (or wherever `seek` puts it) and commits nothing.
    Offsets committed are the next offset to read, as in Kafka.
    """

    @abstractmethod
    async def poll(self, timeout_s: float = 1.0, max_records: int = 1000) -> list[LogRecord]:
        """Records after the current positions, in offset order per partition; [] on timeout."""

    @abstractmethod
    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commits the given next-offsets, or the positions after everything polled so far."""

    @abstractmethod
    async def seek(self, tp: TopicPartition, offset: int) -> None: ...

    @abstractmethod
    def assignment(self) -> set[TopicPartition]: ...


class LogAdmin(CarriesEventCodec, ABC):
    """Topic management and the point reads replay needs."""

    @abstractmethod
    async def create_topics(self, topics: Mapping[str, int], *, compacted: Collection[str] = ()) -> None:
        """Creates each missing topic with the given partition count; existing ones are left alone.
        Topics in `compacted` keep only the latest message per key where the backend can compact."""

    @abstractmethod
    async def topics(self) -> list[TopicInfo]: ...

    @abstractmethod
    async def end_offsets(self, topic: str) -> dict[int, int]: ...

    @abstractmethod
    def read_key(self, topics: Sequence[str], key: bytes, *, since_ms: int | None = None) -> AsyncIterator[LogRecord]:
        """Every record with this key in these topics, in offset order per topic; with `since_ms`,
        only those appended at or after that time (on Kafka this bounds the scan)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class CommitFailed(RuntimeError):
    """The group moved a partition to another member before this commit; its records will be
    delivered again to the new owner (at-least-once), so the caller need not retry."""
