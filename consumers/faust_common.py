"""What every voxlog faust app shares: the Kafka broker, raw bytes in and out (voxlog decodes its
own Avro), no web server, in-memory tables (state lives in voxlog's own topics and stores), one
replica (a single-node broker is the smallest setup; production topics are made by voxlog), and a
new consumer group starting at the beginning of the log (everything is rebuildable from it)."""

from __future__ import annotations

from typing import Any

import faust

from producers.log_producer import LogRecord


def faust_record(message: Any) -> LogRecord:
    """A faust message as the log's record (its timestamp in milliseconds, as the log's)."""
    return LogRecord(message.topic, message.partition, message.offset, message.key, bytes(message.value),
                     tuple(message.headers or ()), round(message.timestamp * 1000))


def faust_app(app_id: str, bootstrap: str, **settings: Any) -> faust.App:
    """A faust app with voxlog's shared settings; `settings` adds to them."""
    return faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        **settings,
    )
