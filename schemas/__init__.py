"""The Avro contracts of voxlog's events: schemas, generated classes, codec, evolution."""

from schemas.base import Event, EventPayload
from schemas.codec import EventCodec, SchemaViolation, UndecodableMessage
from schemas.envelope import Envelope

__all__ = ["Envelope", "Event", "EventCodec", "EventPayload", "SchemaViolation", "UndecodableMessage"]
