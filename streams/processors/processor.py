"""What a stream processor is, independent of where it runs.

A processor folds the events of its topics into state and says what to emit. It does no I/O: its
runner (`consumers.processor_runner` in-process, `consumers.faust_processors` on Kafka) reads, decodes, dead-letters,
sends what it emits, and commits only after the emitted messages are durable (at-least-once). Its
state survives restarts through its output topic, which is keyed and keeps the latest value per key:
at start the runner feeds that topic back through `restore`, as a changelog.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.base import Event, EventPayload


@dataclass(frozen=True, slots=True)
class Emit:
    topic: str
    key: bytes
    value: bytes


class EventProcessor(ABC):
    name: str
    """Consumer group id: instances with one name share the partitions of its topics."""
    topics: tuple[str, ...]
    """Topics it consumes."""
    output_topic: str | None = None
    """Its keyed output, also its changelog for `restore`."""

    @abstractmethod
    def process(self, event: Event[EventPayload]) -> Sequence[Emit]: ...

    def restore(self, key: bytes, value: bytes) -> None:  # noqa: B027 - stateless processors need none
        """Takes back state from a message it emitted before a restart; later messages win."""
