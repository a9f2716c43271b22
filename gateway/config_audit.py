"""Configuration changes into the audit trail: when a gateway starts, every agent and tenant whose
definition differs from what the configuration log last recorded gets an audit record
(`config.agent_added|changed|removed`, `config.tenant_...`, naming the fields that changed), and
then its new document in the configuration log (a compacted topic).

The audit record goes first and is flushed before the document: a crash in between records the
change again at the next start (a repeated record) rather than never (a lost one).
"""

from __future__ import annotations

import logging

from consumers.backends import LogBackend
from consumers.processor_runner import read_to_end
from producers.event_writer import EventWriter, standalone_event
from producers.log_producer import LogRecord
from schemas.events import AuditRecorded
from schemas.topics import CONFIG
from schemas.version import __version__
from streams.config.config_changes import ConfigChange, ConfigItem, config_changes

log = logging.getLogger(__name__)

PRODUCER = "voxlog.config"
NO_CALL = "-"  # the audit topic's key for records about no call
REMOVED = b'{"removed":true}'


async def recorded_config(backend: LogBackend) -> dict[str, ConfigItem]:
    """The last recorded document of every configuration item (removed items left out)."""
    recorded: dict[str, ConfigItem] = {}

    def take(record: LogRecord) -> None:
        if record.key is None:
            return
        key = record.key.decode(errors="replace")
        if record.value == REMOVED:
            recorded.pop(key, None)
            return
        try:
            recorded[key] = ConfigItem.from_json(record.value)
        except (ValueError, KeyError) as exc:  # never written by voxlog: say so, and compare without it
            log.warning("configuration log: %s@%s (%s) is not a configuration item: %s", record.topic, record.offset,
                        key, exc)

    await read_to_end(backend, CONFIG, take, what="reading the configuration log")
    return recorded


async def record_config_changes(backend: LogBackend, writer: EventWriter, current: dict[str, ConfigItem], *,
                                actor: str) -> list[ConfigChange]:
    """Audits and records what changed since the configuration log's last record; returns it."""
    changes = config_changes(await recorded_config(backend), current)
    for change in changes:
        payload = AuditRecorded(actor=actor, action=change.action, resource=change.item.key, outcome=change.kind,
                                detail=change.detail, remote_addr=None)
        await writer.append(standalone_event(payload, tenant_id=change.item.tenant_id, stream_id=NO_CALL,
                                             producer=PRODUCER, producer_version=__version__))
    await writer.flush()
    for change in changes:
        value = REMOVED if change.kind == "removed" else change.item.to_json()
        await writer.producer.send(CONFIG, change.item.key.encode(), value)
    await writer.producer.flush()
    for change in changes:
        log.info("configuration %s %s: %s", change.item.key, change.kind, change.detail)
    return changes

