"""The same processors as faust-streaming agents on Kafka (`voxlog workers` runs `faust -A voxlog.faust_worker
worker`).

Each processor becomes an agent over its topics. Faust consumes in the app's group, acks an event
once the agent has handled it, and flushes its producer before committing acked offsets, so what a
processor emits is durable before its input is marked done: the same at-least-once contract as
`consumers.processor_runner`. A processor's state is restored from its output topic when the worker starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faust

from consumers.backends import KafkaBackend
from consumers.event_reader import dead_letter_headers
from consumers.faust_common import faust_app, faust_record
from consumers.processor_runner import restore
from schemas.codec import UndecodableMessage
from schemas.topics import DEADLETTER, TOPICS
from streams.processors.processor import EventProcessor

APP_ID = "voxlog-streams"


def build_app(backend: KafkaBackend, processors: Sequence[EventProcessor]) -> faust.App:
    app = faust_app(APP_ID, backend.bootstrap, producer_acks=-1)
    codec = backend.codec
    dead_letters = app.topic(DEADLETTER, key_type=bytes, value_type=bytes, partitions=TOPICS[DEADLETTER].partitions)
    outputs = {
        name: app.topic(name, key_type=bytes, value_type=bytes, partitions=spec.partitions)
        for name, spec in TOPICS.items()
    }

    def make_agent(processor: EventProcessor) -> Any:
        async def agent(stream: Any) -> None:
            await restore(backend, processor)
            async for event in stream.events():
                record = faust_record(event.message)
                try:
                    decoded = codec.decode(record.value)
                except UndecodableMessage as exc:
                    await dead_letters.send(key=record.key or b"", value=record.value,
                                            headers=dead_letter_headers(record, str(exc), processor.name))
                    continue
                for emit in processor.process(decoded):
                    await outputs[emit.topic].send(key=emit.key, value=emit.value)

        return agent

    for processor in processors:
        source = app.topic(*processor.topics, key_type=bytes, value_type=bytes)
        app.agent(source, name=processor.name)(make_agent(processor))
    return app
