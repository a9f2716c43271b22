"""What every event is: the shared envelope plus one typed payload."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from schemas.envelope import Envelope
from schemas.slot_init import slot_init


class EventPayload:
    """Base of the generated payload classes (`schemas.events`): one per event type."""

    __slots__ = ()
    EVENT_TYPE: ClassVar[str]
    EVENT_VERSION: ClassVar[int]

    def to_avro(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_avro(cls, record: Mapping[str, Any]) -> Self:
        raise NotImplementedError


P = TypeVar("P", bound=EventPayload, covariant=True)


@slot_init
@dataclass(frozen=True, slots=True)
class Event(Generic[P]):
    """An immutable fact about a call: who/when/where (envelope) and what (payload)."""

    envelope: Envelope
    payload: P

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def call_id(self) -> str:
        return self.envelope.call_id

    @property
    def tenant_id(self) -> str:
        return self.envelope.tenant_id

    @property
    def seq(self) -> int:
        return self.envelope.seq

    @property
    def pii_withheld(self) -> bool:
        """Its personal fields are blank because their key was destroyed (erasure, retention)."""
        return self.envelope.pii_sealed is not None
