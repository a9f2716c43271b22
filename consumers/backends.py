"""The two event-log backends behind one factory interface: a backend makes producers, consumers and
admins of its kind (`EmbeddedBackend`: the SQLite file; `KafkaBackend`: a broker). `voxlog.backends`
picks one from the settings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumers.embedded_consumer import EmbeddedAdmin, EmbeddedConsumer
from consumers.kafka_consumer import KafkaAdmin, KafkaConsumer
from consumers.log_consumer import LogAdmin, LogConsumer
from producers.embedded_producer import EmbeddedProducer
from producers.kafka_producer import KafkaProducer
from producers.log_producer import LogProducer
from schemas.codec import EventCodec
from schemas.topics import TOPICS
from streams.keystore.data_keys import DataKeyStore


class LogBackend(ABC):
    name: str
    stamps_in_append_order: bool
    """Whether a record stamped later was appended later (the log stamps records itself, under one lock),
    so that a partition read past a time holds everything stamped before it. Kafka's records carry
    their producers' clocks: no."""

    def __init__(self, keys: DataKeyStore | None = None) -> None:
        self.keys = keys
        """The keystore its events' personal data is sealed with (None: written in the clear)."""
        self.codec = EventCodec(keys=keys)
        """What its producers, consumers and admins encode and decode events with."""

    @abstractmethod
    def producer(self, **options: Any) -> LogProducer: ...

    @abstractmethod
    def consumer(self, topics: Sequence[str], *, group_id: str | None = None, **options: Any) -> LogConsumer: ...

    @abstractmethod
    def admin(self) -> LogAdmin: ...

    @abstractmethod
    def describe(self) -> str: ...


class EmbeddedBackend(LogBackend):
    name = "embedded"
    stamps_in_append_order = True

    def __init__(self, path: Path, keys: DataKeyStore | None = None) -> None:
        super().__init__(keys)
        self.path = path

    def producer(self, **options: Any) -> LogProducer:
        return EmbeddedProducer(self.path, **options).using_codec(self.codec)

    def consumer(self, topics: Sequence[str], *, group_id: str | None = None, **options: Any) -> LogConsumer:
        return EmbeddedConsumer(self.path, topics, group_id=group_id, **options).using_codec(self.codec)

    def admin(self) -> LogAdmin:
        return EmbeddedAdmin(self.path).using_codec(self.codec)

    def describe(self) -> str:
        return f"embedded log {self.path}"


class KafkaBackend(LogBackend):
    name = "kafka"
    stamps_in_append_order = False

    def __init__(self, bootstrap: str, keys: DataKeyStore | None = None) -> None:
        super().__init__(keys)
        self.bootstrap = bootstrap

    def producer(self, **options: Any) -> LogProducer:
        return KafkaProducer(self.bootstrap, **options).using_codec(self.codec)

    def consumer(self, topics: Sequence[str], *, group_id: str | None = None, **options: Any) -> LogConsumer:
        return KafkaConsumer(self.bootstrap, topics, group_id=group_id, **options).using_codec(self.codec)

    def admin(self) -> LogAdmin:
        return KafkaAdmin(self.bootstrap).using_codec(self.codec)

    def describe(self) -> str:
        return f"kafka {self.bootstrap}"


async def ensure_topics(admin: LogAdmin) -> None:
    """Creates voxlog's topics (schemas.topics.TOPICS) where missing."""
    await admin.create_topics(
        {name: spec.partitions for name, spec in TOPICS.items()},
        compacted=[name for name, spec in TOPICS.items() if spec.compacted],
    )
