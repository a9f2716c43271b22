"""Erasure of a caller: their data keys destroyed (crypto-shredding), then `caller.erased` recorded.

Destroying the keys is what reaches every copy of the log: the personal data of the caller's calls
stays in the log's bytes, sealed, and no longer opens. The event that follows is what the
projections fold (rows and recordings removed) and what the audit trail keeps: who asked, when,
why, how many keys, never the number itself (it names the caller by key)."""

from __future__ import annotations

import re
import time
import uuid

from producers.event_writer import EventWriter, standalone_event
from schemas.events import CallerErased
from streams.config.tenants import E164
from streams.keystore.data_keys import DataKeyStore
from streams.memory import caller_key


async def request_erasure(writer: EventWriter, keys: DataKeyStore | None, tenant_id: str, number: str, *,
                          requested_by: str, reason: str, producer: str,
                          producer_version: str) -> tuple[str, CallerErased]:
    """Forgets a caller (the command line's and the API's way): every data key of theirs created before
    now destroyed, and their `caller.erased` event, durable, on a stream of its own (`erasure-` and a
    random UUID); returns that id and the event. `keys` None: a log whose events are not sealed.

    Raises ValueError for a number that is not E.164 (it would match nobody), before anything is done."""
    key = caller_key(tenant_id, number)
    if key is None or not re.fullmatch(E164, number):
        raise ValueError(f"{number!r} is not an E.164 number (+ and up to 15 digits), as calls record them")
    now_us = time.time_ns() // 1000
    erasure_id = f"erasure-{uuid.uuid4()}"
    destroyed = 0 if keys is None else keys.destroy_subject(tenant_id, key, created_before_ms=now_us // 1000 + 1,
                                                            by=erasure_id)
    payload = CallerErased(caller_key=key, erased_before_us=now_us, requested_by=requested_by, reason=reason,
                           keys_destroyed=destroyed)
    await writer.append(standalone_event(payload, tenant_id=tenant_id, stream_id=erasure_id, producer=producer,
                                         producer_version=producer_version))
    await writer.flush()
    return erasure_id, payload
