"""Outbound calls on Twilio's side: the URLs a placed call brings back to the gateway.

When the dialer places a call it gives Twilio two URLs: the voice webhook, fetched when the person
answers, and the status callback. Both carry in their query what the gateway needs to route the
call without looking anything up: the dial, the call id it will have, the tenant, the agent and the
request's custom parameters. Twilio signs the full URL, query included, so none of it can be forged
by anyone without the auth token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

from streams.channels.twilio_webhook_protocol import STATUS_PATH, VOICE_PATH
from streams.config.consent import RESERVED_PARAMETERS

DIAL_ID = re.compile(r"^dial-[0-9a-f]{32}$")
CALL_ID = re.compile(r"^call-[0-9a-f-]{36}$")
PARAMETER_PREFIX = "p."
MAX_PARAMETERS = 16
MAX_PARAMETERS_CHARS = 2048
"""Custom parameters travel in the webhook URL; this keeps it far under Twilio's URL limit."""


class OutboundRouteError(ValueError):
    """A voice webhook query that claims to be an outbound call but does not say enough."""


@dataclass(frozen=True)
class OutboundRoute:
    dial_id: str
    call_id: str
    tenant_id: str
    agent_id: str
    parameters: dict[str, str] = field(default_factory=dict)

    def query(self) -> str:
        return urlencode({"dial_id": self.dial_id, "call_id": self.call_id, "tenant": self.tenant_id,
                          "agent": self.agent_id,
                          **{PARAMETER_PREFIX + k: v for k, v in sorted(self.parameters.items())}})


def check_parameters(parameters: Mapping[str, str]) -> None:
    """Raises ValueError for custom parameters that cannot travel with a call."""
    if len(parameters) > MAX_PARAMETERS:
        raise ValueError(f"at most {MAX_PARAMETERS} parameters")
    for name in parameters:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name):
            raise ValueError(f"parameter name {name!r} must be a letter then letters, digits or _ (64 at most)")
        if name in RESERVED_PARAMETERS:
            raise ValueError(f"parameter {name!r} is voxlog's own (the consent a call runs under)")
    if sum(len(k) + len(v) for k, v in parameters.items()) > MAX_PARAMETERS_CHARS:
        raise ValueError(f"parameters add up to more than {MAX_PARAMETERS_CHARS} characters")


def voice_url(public_url: str, route: OutboundRoute) -> str:
    return f"{public_url.rstrip('/')}{VOICE_PATH}?{route.query()}"


def status_url(public_url: str, dial_id: str, tenant_id: str, first_seq: int) -> str:
    """Status callbacks of a placed call; before it is answered they belong to the dial's stream,
    numbered from `first_seq` by Twilio's SequenceNumber (so a retried callback has the same seq)."""
    query = urlencode({"dial_id": dial_id, "tenant": tenant_id, "seq": str(first_seq)})
    return f"{public_url.rstrip('/')}{STATUS_PATH}?{query}"


def outbound_route(query: Mapping[str, str]) -> OutboundRoute | None:
    """The route of a voice webhook placed by the dialer, or None for a call someone dialled in."""
    if "dial_id" not in query:
        return None
    dial_id, call_id = query.get("dial_id", ""), query.get("call_id", "")
    tenant_id, agent_id = query.get("tenant", ""), query.get("agent", "")
    if not DIAL_ID.match(dial_id) or not CALL_ID.match(call_id) or not tenant_id or not agent_id:
        raise OutboundRouteError("outbound voice webhook needs dial_id, call_id, tenant and agent")
    parameters = {k[len(PARAMETER_PREFIX):]: v for k, v in query.items() if k.startswith(PARAMETER_PREFIX)}
    return OutboundRoute(dial_id, call_id, tenant_id, agent_id, parameters)


@dataclass(frozen=True)
class DialStatusRoute:
    dial_id: str
    tenant_id: str
    first_seq: int


def dial_status_route(query: Mapping[str, str]) -> DialStatusRoute | None:
    """Where a status callback of a placed, not yet answered call is recorded; None if not a dial's."""
    dial_id = query.get("dial_id")
    if dial_id is None:
        return None
    seq = query.get("seq", "")
    if not DIAL_ID.match(dial_id) or not query.get("tenant") or not seq.isdigit():
        raise OutboundRouteError("dial status callback needs dial_id, tenant and seq")
    return DialStatusRoute(dial_id, query["tenant"], int(seq))
