"""Upcasters: meaning-level changes between schema versions, beside the schemas they bridge.

Avro schema resolution already turns data written with an older version into the newest shape
(new fields take their defaults). An upcaster runs after that, when a new field's value can be
derived from what the old writer did record. Keyed by (event type, version it upgrades from).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Record = dict[str, Any]

# Reasons that, before call.ended v2 recorded an outcome, implied one.
_OUTCOME_BY_V1_REASON = {"handoff": "handed_off", "caller_hangup_before_answer": "abandoned"}


def upcast_call_ended_v1_v2(record: Record) -> Record:
    """v1 had no outcome; a handoff or an abandoned call says what it was."""
    if record.get("outcome") is None:
        record["outcome"] = _OUTCOME_BY_V1_REASON.get(record["reason"])
    return record


UPCASTERS: dict[tuple[str, int], Callable[[Record], Record]] = {
    ("call.ended", 1): upcast_call_ended_v1_v2,
}


def upcast(event_type: str, from_version: int, to_version: int, record: Record) -> Record:
    for version in range(from_version, to_version):
        step = UPCASTERS.get((event_type, version))
        if step is not None:
            record = step(record)
    return record
