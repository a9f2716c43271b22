"""The topic map: which events go on which topic. Every topic is keyed by call id.

Audio is heavy and hot (50 chunks a second per direction per call), so it has a topic of its own:
projections that never look at audio never read it, and its retention can differ. Commands to
side-effect workers are apart too, so a worker group consumes only what it acts on. A call's events
across topics are ordered by the envelope's per-call `seq`. An outbound dial is a stream of its own,
keyed by its dial id (`dial-...`): its request on the commands topic, the dialer's outcomes and the
carrier's status callbacks until the call is answered on the calls topic.
"""

from __future__ import annotations

from dataclasses import dataclass

CALLS = "voxlog.calls"
AUDIO = "voxlog.audio"
COMMANDS = "voxlog.commands"
DEADLETTER = "voxlog.deadletter"
CALL_REGISTRY = "voxlog.call_registry"
TOOL_RESULTS = "voxlog.tool_results"
AUDIT = "voxlog.audit"
CONFIG = "voxlog.config"
GATEWAYS = "voxlog.gateways"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    doc: str
    compacted: bool = False
    """Keeps the latest message per key (Kafka cleanup.policy=compact): a table, not a history."""


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec(CALLS, 12, "Every call event but audio and commands: lifecycle, transcripts, decisions, results."),
        TopicSpec(AUDIO, 12, "Caller and agent audio chunks."),
        TopicSpec(COMMANDS, 6, "Requests for side effects, consumed by idempotent workers (tool.requested, "
                  "call.dial_requested)."),
        TopicSpec(DEADLETTER, 1, "Messages no consumer could decode, with the reason and their origin in headers."),
        TopicSpec(CALL_REGISTRY, 12, "One JSON entry per call, kept current by streams.call_registry.", compacted=True),
        TopicSpec(
            AUDIT, 3, "Audit records (audit.recorded): who or what did what, to which call (the key; - for none)."
        ),
        TopicSpec(GATEWAYS, 1, "Each gateway instance's lease (key: the instance): the calls it owns, renewed every "
                  "few seconds, so that a reaper can end the calls of a gateway that died (consumers.call_leases).",
                  compacted=True),
        TopicSpec(CONFIG, 1, "The operators' configuration as last recorded: one JSON document per agent and "
                  "tenant (key `agent:<tenant>/<id>` or `tenant:<id>`), written with each change's audit record.",
                  compacted=True),
        TopicSpec(
            TOOL_RESULTS,
            6,
            "Tool workers' replies (tool.succeeded / tool.failed, seq = the request's); the call's session "
            "records them into the call.",
        ),
    )
}

# Topics that hold a call's own events (replay reads these, merged by seq).
CALL_TOPICS = (CALLS, AUDIO, COMMANDS)

_COMMAND_TYPES = frozenset({"tool.requested", "call.dial_requested"})
_AUDIT_TYPES = frozenset({"audit.recorded"})


def topic_for(event_type: str) -> str:
    if event_type.startswith("audio."):
        return AUDIO
    if event_type in _COMMAND_TYPES:
        return COMMANDS
    if event_type in _AUDIT_TYPES:
        return AUDIT
    return CALLS
