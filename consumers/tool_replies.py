"""Delivers tool workers' replies to the sessions of the calls they belong to.

One per gateway process: it reads `voxlog.tool_results` from the end (no consumer group: every
gateway instance sees every reply and keeps those of its own calls) and hands each decoded reply to
the queue its call registered.
"""

from __future__ import annotations

import asyncio
import logging

from consumers.backends import LogBackend
from consumers.event_reader import EventConsumer
from schemas.base import Event, EventPayload
from schemas.topics import TOOL_RESULTS

log = logging.getLogger(__name__)


class ToolReplies:
    def __init__(self, backend: LogBackend) -> None:
        self.backend = backend
        self._queues: dict[str, asyncio.Queue[Event[EventPayload]]] = {}
        self.ready = asyncio.Event()

    def register(self, call_id: str) -> asyncio.Queue[Event[EventPayload]]:
        queue: asyncio.Queue[Event[EventPayload]] = asyncio.Queue()
        self._queues[call_id] = queue
        return queue

    def unregister(self, call_id: str) -> None:
        self._queues.pop(call_id, None)

    async def run(self, stop: asyncio.Event) -> None:
        async with (
            self.backend.producer() as dead_letters,
            self.backend.consumer([TOOL_RESULTS], auto_offset_reset="latest") as consumer,
        ):
            events = EventConsumer(consumer, dead_letters, name="voxlog-tool-replies")
            self.ready.set()
            while not stop.is_set():
                for item in await events.poll(timeout_s=0.2):
                    queue = self._queues.get(item.event.call_id)
                    if queue is not None:
                        queue.put_nowait(item.event)
