"""In-memory stand-ins for I/O edges, for unit tests of the logic above them."""

from __future__ import annotations

from producers.log_producer import Headers, LogProducer


class MemoryProducer(LogProducer):
    """Keeps what is sent, in order: (topic, key, value, headers)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, tuple[tuple[str, bytes], ...]]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> None:
        self.sent.append((topic, key, value, tuple(headers)))

    async def flush(self) -> None:
        pass

    def stalled_s(self) -> float:
        return 0.0
