"""voxlog's own desk for the desk contract suite: a SQLite file in a temporary folder. It has no wire: the
suite runs its faults on the wire against the desks that have one (`WIRED` there)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streams.connectors.tickets_builtin import BuiltinDesk


@dataclass
class BuiltinDeskHarness:
    connector: BuiltinDesk

    def tickets(self) -> list[Mapping[str, str]]:
        return self.connector.tickets()

    def comments(self, ticket_id: str) -> list[str]:
        return self.connector.comments(ticket_id)


@contextmanager
def harness() -> Iterator[BuiltinDeskHarness]:
    with tempfile.TemporaryDirectory() as folder:
        desk = BuiltinDesk(Path(folder) / "desk.db", "demo")
        try:
            yield BuiltinDeskHarness(desk)
        finally:
            desk.close()
