"""One-line, human-readable renderings of events, for `voxlog events tail` and the demo."""

from __future__ import annotations

import datetime as dt
from typing import Any

from schemas.base import Event, EventPayload


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, tuple):
        return f"[{len(value)}]" if value and hasattr(value[0], "to_avro") else repr(list(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def describe(event: Event[EventPayload]) -> str:
    env = event.envelope
    when = dt.datetime.fromtimestamp(env.event_time_us / 1e6, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    fields = " ".join(f"{k}={_short(v)}" for k, v in event.payload.to_avro().items() if v not in (None, "", {}, []))
    erased = " [personal data erased]" if event.pii_withheld else ""
    return f"{env.seq:>6} {when} {env.type:<20} {fields}{erased}"
