"""The write half of the log contract, implemented once per backend (`kafka.py`, `embedded.py`), and what
both halves share: a record as the log holds it, a topic partition."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, Self

from schemas.codec import EventCodec
from schemas.slot_init import slot_init
from schemas.topics import DEADLETTER

Headers = Sequence[tuple[str, bytes]]

# Kafka's default message.max.bytes is 1 MiB including record overhead; both backends refuse
# larger messages the same way, so nothing works on one machine that fails on many.
MAX_MESSAGE_BYTES = 1_000_000
# A dead letter is the original message plus headers saying why and whence; this much more is
# allowed on the dead-letter topic (still under the broker's 1,048,588), so any message the log
# accepted can also be dead-lettered.
DEAD_LETTER_HEADROOM = 16 * 1024


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@slot_init  # one a record read
@dataclass(frozen=True, slots=True)
class LogRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)



class LogWriteError(RuntimeError):
    """Messages handed to a producer could not be made durable; raised, never swallowed."""


class MessageTooLarge(LogWriteError):
    """Refused at `send`, before buffering; the message was not written."""


def check_message_size(topic: str, key: bytes, value: bytes, headers: Headers) -> None:
    """Refuses, before buffering, what the broker would refuse: key, value and headers count."""
    limit = MAX_MESSAGE_BYTES + (DEAD_LETTER_HEADROOM if topic == DEADLETTER else 0)
    size = len(key) + len(value) + sum(len(name.encode()) + len(v) for name, v in headers)
    if size > limit:
        raise MessageTooLarge(f"message of {size} bytes (key, value and headers) exceeds the {limit}-byte limit")


class CarriesEventCodec:
    """The codec this log's events are written and read with. A backend hands its clients its own,
    which seals personal data with the keystore; a client made alone has one without keys."""

    _event_codec: EventCodec | None = None

    @property
    def event_codec(self) -> EventCodec:
        if self._event_codec is None:
            self._event_codec = EventCodec()
        return self._event_codec

    def using_codec(self, codec: EventCodec) -> Self:
        self._event_codec = codec
        return self


class AsyncService(ABC):
    """Something with `start` and `stop`, usable as `async with`."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class LogProducer(CarriesEventCodec, AsyncService):
    """Appends messages to topics, batched and asynchronously.

    `send` returns once the message is buffered; it waits only when the bounded buffer is full
    (back-pressure), so the caller is slowed rather than a message dropped. `flush` returns once
    every message sent before it is durable in the log, and raises `LogWriteError` if any failed.
    """

    @abstractmethod
    async def stop(self) -> None:
        """Flushes, then releases resources."""

    @abstractmethod
    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> None: ...

    @abstractmethod
    async def flush(self) -> None: ...

    @abstractmethod
    def stalled_s(self) -> float:
        """How long the oldest message not yet durable has waited (0: none waits). Seconds here mean
        the log cannot be written (a broker away, a full disk): the gateway stops taking calls."""
