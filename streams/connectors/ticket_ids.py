"""What the desks that number their tickets share: the idempotency key as a token any header, tag or text
carries intact, ticket ids read both ways, and the error for an answer that is not the desk's API."""

from __future__ import annotations

import hashlib

from streams.connectors.base import ConnectorError, FailureKind


def key_token(idempotency_key: str) -> str:
    """`voxlog-key-` and 96 bits of the key's hash, lowercase hex: ASCII, no quoting needed anywhere."""
    return "voxlog-key-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def ticket_number(ticket_id: str, vendor: str, desk: str) -> int:
    """A ticket id as the desk numbers it; an id that is not a number is INVALID before any request."""
    if not ticket_id.isascii() or not ticket_id.isdigit():
        raise ConnectorError(FailureKind.INVALID, f"{vendor}: {ticket_id[:40]!r} is not a {desk} ticket id")
    return int(ticket_id)


def numeric_id(value: object, what: str, vendor: str) -> str:
    """The id of something the desk answered with, which must be a number."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConnectorError(FailureKind.BAD_RESPONSE, f"{vendor}: {what} without a numeric id")
    return str(value)


def not_the_api(vendor: str, desk: str, what: str, detail: str) -> ConnectorError:
    return ConnectorError(FailureKind.BAD_RESPONSE, f"{vendor}: an answer that is not {desk}'s API while {what} "
                                                    f"({detail})")
