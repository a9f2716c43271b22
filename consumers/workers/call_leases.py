"""Calls outlive their gateway: leases say who owns each live call, and a reaper ends the calls whose
owner is gone.

A call has one writer, the session in the gateway process that holds its media socket. If that
process dies (kill -9, an OOM, a lost machine) nothing would ever write the call's `call.ended`: its
row stays open for ever and Twilio's final status callback finds nobody who knows it. So:

- **Leases.** Each gateway process (an *instance*: host, pid and a random suffix) keeps a lease on
  `voxlog.gateways` (compacted, keyed by instance): the calls it owns, renewed every `renew_s`. A call
  is in a durable lease *before* its `call.started` is written, so no call can be in the log without
  an owner on record. A gateway that stops cleanly writes a last lease, `stopped`, listing the calls
  it could not end (none, normally).
- **The reaper.** Every gateway also runs a reaper over the leases. An instance whose lease has not
  been renewed for `lease_s` (by the reaper's own monotonic clock since it saw the last renewal, so
  no two machines' clocks are compared) is lost; each call of its last lease is read back from the
  log and, unless it has ended, gets a `call.ended` with reason `gateway_lost`; then the lease is
  marked `reaped`. A `stopped` lease's calls are reaped at once.
- **Exactly once, with any number of reapers.** The `call.ended` a reaper writes is a function of
  the log alone: seq = the call's last seq + 1, event id derived from the call id, time = the call's
  last event's (when it was last heard of). Two reapers that race write the same event twice, which
  readers take once (a repeated seq is a redelivery); a reaper that comes later reads it back and
  writes nothing.
- **No false alarms after an outage.** While the log cannot be written nobody can renew; so a reaper
  judges others only while it sees its own renewals arrive, and after a gap it starts their clocks
  again. A gateway that cannot write its log for long ends its own calls first (`gateway.runtime`), so
  by the time a reaper acts the owner has given them up.

Known limit: a gateway cut off from the log but not from its callers for longer than `lease_s`, whose
buffered events reach the log after a reaper ended its calls, would give those calls events after
their end; Kafka's transactional fencing would close that window and is not used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

from consumers.event_reader import read_call
from consumers.log_consumer import LogAdmin, LogConsumer
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogProducer
from schemas.events import CallEnded, CallStarted
from schemas.topics import GATEWAYS

log = logging.getLogger(__name__)

LeaseState = Literal["serving", "stopped", "reaped"]

RENEW_S = 2.0
LEASE_S = 20.0
"""A lease not renewed for this long is lost. Longer than a gateway waits before it ends the calls it
cannot record (`gateway.runtime.LOG_OUTAGE_END_S`), so an owner cut off from the log ends its calls first."""
REAPER_PRODUCER = "voxlog.reaper"
_REAPED_IDS = uuid.UUID("5f1c0d0e-6a4b-4c2e-9a61-0c0ffee0a11e")


def new_instance_id() -> str:
    return f"gw-{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class LeasedCall:
    call_id: str
    tenant_id: str
    started_ms: int
    provider_call_id: str | None = None


@dataclass(frozen=True)
class Lease:
    instance: str
    state: LeaseState
    calls: tuple[LeasedCall, ...]
    renewed_ms: int
    """The writer's wall clock, for people reading the topic; the reaper never compares it with its own."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Lease:
        raw = json.loads(data)
        return cls(instance=str(raw["instance"]), state=raw["state"], renewed_ms=int(raw["renewed_ms"]),
                   calls=tuple(LeasedCall(**c) for c in raw["calls"]))


class LeaseKeeper:
    """One gateway instance's lease: `hold` a call before its first event, `release` it after its last."""

    def __init__(self, producer: LogProducer, instance: str | None = None, *, renew_s: float = RENEW_S,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.producer = producer
        self.instance = instance or new_instance_id()
        self.renew_s = renew_s
        self._wall_ms = wall_ms
        self._calls: dict[str, LeasedCall] = {}
        self._changes = 0
        self._written = -1
        self._lock = asyncio.Lock()
        self._state: LeaseState = "serving"

    @property
    def calls(self) -> list[LeasedCall]:
        return list(self._calls.values())

    async def hold(self, call: LeasedCall) -> None:
        """Returns once a lease listing `call` is durable in the log (raises what the log raised)."""
        self._calls[call.call_id] = call
        self._changes += 1
        await self._publish(self._changes)

    def release(self, call_id: str) -> None:
        """The call has ended in the log; the next renewal drops it."""
        if self._calls.pop(call_id, None) is not None:
            self._changes += 1

    async def renew(self) -> None:
        self._changes += 1
        await self._publish(self._changes)

    async def run(self, stop: asyncio.Event) -> None:
        """Renews every `renew_s` until `stop`; a renewal the log cannot take is tried again next time."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.renew_s * 2):
                    await self.renew()
            except Exception as exc:  # the log is away: readiness says so; keep trying
                log.warning("lease %s not renewed: %s", self.instance, exc)
            with_stop = asyncio.create_task(stop.wait())
            await asyncio.wait({with_stop}, timeout=self.renew_s)
            with_stop.cancel()

    async def close(self) -> None:
        """The last lease: `stopped`, with the calls that did not end (a reaper ends them at once)."""
        self._state = "stopped"
        self._changes += 1
        await self._publish(self._changes)

    async def _publish(self, wanted: int) -> None:
        # Coalesced: one write covers every change made before it started.
        async with self._lock:
            if self._written >= wanted:
                return
            changes = self._changes
            lease = Lease(self.instance, self._state, tuple(self._calls.values()), self._wall_ms())
            await self.producer.send(GATEWAYS, self.instance.encode(), lease.to_json())
            await self.producer.flush()
            self._written = changes


@dataclass
class _Seen:
    lease: Lease
    at: float
    """The reaper's monotonic time when this lease (its latest renewal) was read."""


@dataclass
class LeaseWatch:
    """What the reaper knows of the leases, and which are lost; no I/O. `own` is the instance the
    reaper runs beside: its renewals arriving are the sign that the log works, so that silence from
    the others means something."""

    own: str
    lease_s: float = LEASE_S
    seen: dict[str, _Seen] = field(default_factory=dict)
    own_seen_at: float | None = None

    def observe(self, lease: Lease, now: float) -> None:
        if lease.instance == self.own:
            if self.own_seen_at is None or now - self.own_seen_at > self.lease_s / 2:
                # Our first renewal read back, or the first after a gap: the log was away and nobody
                # could renew, so everybody's clock starts again.
                for seen in self.seen.values():
                    seen.at = now
            self.own_seen_at = now
        self.seen[lease.instance] = _Seen(lease, now)

    def lost(self, now: float) -> list[Lease]:
        """Leases whose calls are to be ended now."""
        if self.own_seen_at is None or now - self.own_seen_at > self.lease_s / 2:
            return []  # a lost gateway and a log that is away look alike from here
        return [seen.lease for instance, seen in self.seen.items()
                if instance != self.own and seen.lease.state != "reaped" and seen.lease.calls
                and (seen.lease.state == "stopped" or now - seen.at > self.lease_s)]


class CallReaper:
    """Reads the leases, and ends the calls of lost instances (see the module's docstring)."""

    def __init__(self, consumer: LogConsumer, admin: Callable[[], LogAdmin], writer: EventWriter, own: str,
                 producer_version: str, *, lease_s: float = LEASE_S, clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.consumer = consumer
        self.admin = admin
        self.writer = writer
        self.watch = LeaseWatch(own, lease_s)
        self.producer_version = producer_version
        self.clock = clock
        self.wall_ms = wall_ms
        self.reaped_calls = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for record in await self.consumer.poll(timeout_s=0.5, max_records=1000):
                try:
                    lease = Lease.from_json(record.value)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("lease at %s/%d is not one (%s); skipped", record.topic, record.offset, exc)
                    continue
                self.watch.observe(lease, self.clock())
            for lease in self.watch.lost(self.clock()):
                try:
                    await self.reap(lease)
                except Exception as exc:  # the log is away again: the next round tries again
                    log.warning("could not end the calls of %s yet: %s", lease.instance, exc)

    async def reap(self, lease: Lease) -> None:
        for call in lease.calls:
            if await self.reap_call(call, lease.instance):
                self.reaped_calls += 1
                log.warning("call %s ended: its gateway %s is gone", call.call_id, lease.instance)
        marker = Lease(lease.instance, "reaped", (), self.wall_ms())
        await self.writer.producer.send(GATEWAYS, lease.instance.encode(), marker.to_json())
        await self.writer.flush()
        self.watch.observe(marker, self.clock())

    async def reap_call(self, call: LeasedCall, instance: str) -> bool:
        """Writes the call's `call.ended` if the log has none; True if it wrote one. A function of the
        log alone, so reapers that race write the same event."""
        async with self.admin() as admin:
            history = await read_call(admin, call.call_id, since_ms=call.started_ms - 60_000)
        events = history.events
        if not events or any(isinstance(e.payload, CallEnded) for e in events):
            return False  # never started (the lease was written first), or ended
        last = events[-1]
        started = next((e for e in events if isinstance(e.payload, CallStarted)), events[0])
        event_id = str(uuid.uuid5(_REAPED_IDS, call.call_id))
        recorder = CallRecorder(self.writer, tenant_id=last.tenant_id, call_id=call.call_id,
                                producer=REAPER_PRODUCER, producer_version=self.producer_version,
                                next_seq=last.seq + 1, new_id=lambda: event_id)
        ended_us = last.envelope.event_time_us
        await recorder.record(
            CallEnded(reason="gateway_lost", duration_ms=max(0, (ended_us - started.envelope.event_time_us) // 1000),
                      outcome=None, detail=f"its gateway {instance} stopped renewing its lease; last heard of "
                                           f"at seq {last.seq}"),
            event_time_us=ended_us, causation_id=last.envelope.event_id)
        await self.writer.flush()
        return True
