"""Stateful processing over the event streams: processors, and the runners that host them
(in-process on any log backend, or as faust-streaming agents on Kafka)."""
