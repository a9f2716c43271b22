"""The dialer: places the outbound calls asked for with `call.dial_requested`, within each tenant's
rate limit, at most once each.

It consumes `voxlog.commands` in its own group. A request is first written to the dialer's store
(SQLite, idempotent by dial id), then its offset is committed: from then on the store, not the log,
is the queue, so a rate-limited tenant never holds up the partition for the others. One task per
tenant takes that tenant's dials in request order, waits for a token of its bucket
(`Dialing.calls_per_minute`, `burst`), and places the call: through the tenant's SIP trunk when it
has one (`sip.outbound`; the gateway must serve SIP), else with Twilio's REST API (`CallPlacer`).

Outcomes are recorded in the dial's own stream (key = dial id, seq after the request's 0):
`call.dial_placed`, or `call.dial_failed` per failed attempt. Only what is safe to retry is retried
(Twilio's 429 and 5xx, a request that never left, a gateway full); a dial whose placing was interrupted by a
crash is given up rather than risk ringing someone twice. A dial not placed before it expires is
given up too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from consumers.backends import LogBackend
from consumers.event_reader import ConsumedEvent
from consumers.group_loop import run_in_group
from consumers.workers.state_file import open_state_db
from producers.event_writer import CallRecorder, EventWriter
from producers.log_producer import LogProducer
from schemas.base import EventPayload
from schemas.envelope import Envelope
from schemas.events import CallDialFailed, CallDialPlaced, CallDialRequested
from schemas.topics import COMMANDS, topic_for
from schemas.version import __version__
from streams.channels.twilio_outbound import OutboundRoute, status_url, voice_url
from streams.channels.twilio_rest import TwilioRest, TwilioRestError
from streams.config.tenants import Tenants
from streams.rate_limit import TokenBucket

log = logging.getLogger(__name__)

WORKER = "voxlog.dialer"
GROUP = "voxlog-dialer"
DIAL_TOPIC = topic_for(CallDialPlaced.EVENT_TYPE)


class PlaceFailed(Exception):
    """A call its provider did not place: why, its code (an HTTP or SIP status) and whether trying again may work."""

    def __init__(self, message: str, *, code: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.message, self.code, self.retryable = message, code, retryable


class CallPlacer(Protocol):
    """A way out to the telephone network: Twilio's REST API, or a tenant's SIP trunk."""

    @property
    def provider(self) -> str:
        """twilio, sip: what `call.dial_placed` and `call.dial_failed` say."""
        ...

    async def place(self, dial: Dial, status_seq: int) -> str:
        """Places the call: the provider's id of it. Until it is answered, its status events go on the
        dial's stream from `status_seq` on. Raises PlaceFailed."""
        ...


class TwilioPlacer:
    """Calls placed with Twilio's REST API; Twilio fetches the voice webhook when the person answers."""

    provider = "twilio"

    def __init__(self, rest: TwilioRest, public_url: str) -> None:
        if not public_url.startswith(("http://", "https://")):
            raise ValueError("the dialer needs the public URL Twilio reaches the gateway at (VOXLOG_PUBLIC_URL)")
        self.rest = rest
        self.public_url = public_url

    async def place(self, dial: Dial, status_seq: int) -> str:
        route = OutboundRoute(dial.dial_id, dial.call_id, dial.tenant_id, dial.agent_id, dial.parameters)
        try:
            call = await self.rest.create_call(
                dial.to_number, dial.from_number, voice_url(self.public_url, route),
                status_url(self.public_url, dial.dial_id, dial.tenant_id, status_seq), timeout_s=dial.ring_timeout_s)
        except TwilioRestError as exc:
            raise PlaceFailed(exc.message, code=exc.code, retryable=exc.retryable) from exc
        return call.sid


@dataclass(frozen=True)
class Dial:
    dial_id: str
    tenant_id: str
    agent_id: str
    call_id: str
    to_number: str
    from_number: str
    parameters: dict[str, str]
    expires_at_us: int
    ring_timeout_s: int
    requested_us: int
    request_event_id: str
    next_seq: int
    attempts: int


_COLUMNS = ("dial_id", "tenant_id", "agent_id", "call_id", "to_number", "from_number", "parameters_json",
            "expires_at_us", "ring_timeout_s", "requested_us", "request_event_id", "next_seq", "attempts")


class DialStore:
    """The dialer's queue and memory in one SQLite file. States: queued -> placing -> placed | failed."""

    def __init__(self, path: Path) -> None:
        self._db = open_state_db(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("""
                CREATE TABLE IF NOT EXISTS dials (
                    seqno INTEGER PRIMARY KEY, dial_id TEXT UNIQUE NOT NULL, tenant_id TEXT NOT NULL,
                    agent_id TEXT, call_id TEXT, to_number TEXT, from_number TEXT, parameters_json TEXT,
                    expires_at_us INTEGER, ring_timeout_s INTEGER, requested_us INTEGER, request_event_id TEXT,
                    next_seq INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                    state TEXT NOT NULL, provider_call_id TEXT, outbox BLOB)""")

    def enqueue(self, envelope: Envelope, request: CallDialRequested) -> bool:
        """Adds a request; False when it is known already (a redelivery)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO dials (dial_id, tenant_id, agent_id, call_id, to_number, from_number,"
                " parameters_json, expires_at_us, ring_timeout_s, requested_us, request_event_id, next_seq, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                (envelope.call_id, envelope.tenant_id, request.agent_id, request.call_id, request.to_number,
                 request.from_number, json.dumps(request.parameters, sort_keys=True), request.expires_at_us,
                 request.ring_timeout_s, envelope.event_time_us, envelope.event_id, envelope.seq + 1))
            return cursor.rowcount == 1

    def _dials(self, where: str, args: tuple[object, ...]) -> list[Dial]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM dials WHERE {where} ORDER BY seqno",
                                    args).fetchall()
        out = []
        for row in rows:
            values = dict(zip(_COLUMNS, row, strict=True))
            values["parameters"] = json.loads(values.pop("parameters_json") or "{}")
            out.append(Dial(**values))
        return out

    def queued(self, tenant_id: str | None = None) -> list[Dial]:
        if tenant_id is None:
            return self._dials("state = 'queued'", ())
        return self._dials("state = 'queued' AND tenant_id = ?", (tenant_id,))

    def interrupted(self) -> list[Dial]:
        """Dials whose placing a crash cut short: Twilio may or may not have them."""
        return self._dials("state = 'placing'", ())

    def update(self, dial_id: str, *, state: str, next_seq: int, attempts: int,
               provider_call_id: str | None = None, outbox: bytes | None = None) -> None:
        """Moves a dial on; `outbox` is the encoded event that tells the log, stored in the same
        transaction so that a crash before it is sent loses nothing (`outbox()`, `sent()`)."""
        with self._lock:
            self._db.execute(
                "UPDATE dials SET state = ?, next_seq = ?, attempts = ?,"
                " provider_call_id = COALESCE(?, provider_call_id), outbox = COALESCE(?, outbox) WHERE dial_id = ?",
                (state, next_seq, attempts, provider_call_id, outbox, dial_id))

    def outbox(self) -> list[tuple[str, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT dial_id, outbox FROM dials WHERE outbox IS NOT NULL ORDER BY seqno")
            return [(str(r[0]), bytes(r[1])) for r in rows.fetchall()]

    def sent(self, dial_id: str, data: bytes) -> None:
        with self._lock:
            self._db.execute("UPDATE dials SET outbox = NULL WHERE dial_id = ? AND outbox = ?", (dial_id, data))

    def state(self, dial_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM dials WHERE dial_id = ?", (dial_id,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class DialWorker:
    """Requests in from the log, calls out through each tenant's placer, outcomes back onto the log."""

    def __init__(
        self,
        backend: LogBackend,
        placer_for: Callable[[str], CallPlacer | None],
        tenants: Tenants,
        store: DialStore,
        *,
        attempts: int = 3,
        backoff_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.placer_for = placer_for
        self.tenants = tenants
        self.store = store
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.clock = clock
        self.sleep = sleep
        self.ready = asyncio.Event()
        self.placed = 0
        self.failed = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._writer: EventWriter | None = None

    async def run(self, stop: asyncio.Event) -> None:
        async def start(producer: LogProducer) -> None:
            self._writer = EventWriter(producer)
            await self._recover()

        async def handle(producer: LogProducer, item: ConsumedEvent) -> None:
            # Stored, then committed: from here the store is the queue.
            payload = item.event.payload
            if isinstance(payload, CallDialRequested):
                await asyncio.to_thread(self.store.enqueue, item.event.envelope, payload)
                self._schedule(item.event.tenant_id)

        async def finish() -> None:
            for task in self._loops.values():
                task.cancel()
            await asyncio.gather(*self._loops.values(), return_exceptions=True)

        await run_in_group(self.backend, [COMMANDS], GROUP, stop, handle, ready=self.ready, start=start,
                           finish=finish)

    async def _recover(self) -> None:
        for dial_id, data in await asyncio.to_thread(self.store.outbox):
            await self._send(dial_id, data)  # at least once: a consumer knows a repeat by its seq
        for dial in await asyncio.to_thread(self.store.interrupted):
            await self._give_up(dial, dial.attempts, "the dialer stopped while placing this call; its outcome is "
                                "unknown, so it is not placed again", code=None, provider=self._provider(dial))
        for dial in await asyncio.to_thread(self.store.queued):
            self._schedule(dial.tenant_id)

    def _schedule(self, tenant_id: str) -> None:
        self._wake.setdefault(tenant_id, asyncio.Event()).set()
        if tenant_id not in self._loops or self._loops[tenant_id].done():
            self._loops[tenant_id] = asyncio.create_task(self._tenant_loop(tenant_id), name=f"dialer-{tenant_id}")

    def _bucket(self, tenant_id: str) -> TokenBucket:
        if tenant_id not in self._buckets:
            dialing = self.tenants.get(tenant_id).dialing
            self._buckets[tenant_id] = TokenBucket(dialing.calls_per_minute / 60.0, dialing.burst, self.clock())
        return self._buckets[tenant_id]

    async def _tenant_loop(self, tenant_id: str) -> None:
        wake = self._wake[tenant_id]
        while True:
            wake.clear()
            for dial in await asyncio.to_thread(self.store.queued, tenant_id):
                try:
                    await self._dial(dial)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad dial must not stop the tenant's others
                    log.exception("dialer: dial %s failed unexpectedly", dial.dial_id)
            await wake.wait()

    async def _move(self, dial: Dial, payload: EventPayload, *, seq: int, state: str, attempts: int,
                    provider_call_id: str | None = None) -> None:
        """Stores the dial's new state with the event at `seq` that records it, then sends the event."""
        assert self._writer is not None
        recorder = CallRecorder(self._writer, tenant_id=dial.tenant_id, call_id=dial.dial_id, producer=WORKER,
                                producer_version=__version__, next_seq=seq)
        event = recorder.make(payload, causation_id=dial.request_event_id, correlation_id=dial.call_id)
        data = self._writer.codec.encode(event)
        await asyncio.to_thread(self.store.update, dial.dial_id, state=state, next_seq=seq + 1, attempts=attempts,
                                provider_call_id=provider_call_id, outbox=data)
        await self._send(dial.dial_id, data)

    async def _send(self, dial_id: str, data: bytes) -> None:
        assert self._writer is not None
        await self._writer.producer.send(DIAL_TOPIC, dial_id.encode(), data)
        await self._writer.flush()
        await asyncio.to_thread(self.store.sent, dial_id, data)

    async def _give_up(self, dial: Dial, attempt: int, error: str, *, code: int | None, provider: str) -> None:
        await self._move(dial, CallDialFailed(provider=provider, error=error, code=code, attempt=attempt,
                                              retryable=False, final=True),
                         seq=dial.next_seq, state="failed", attempts=attempt)
        self.failed += 1

    def _provider(self, dial: Dial) -> str:
        placer = self.placer_for(dial.tenant_id)
        return "none" if placer is None else placer.provider

    async def _dial(self, dial: Dial) -> None:
        placer = self.placer_for(dial.tenant_id)
        if placer is None:
            await self._give_up(dial, dial.attempts, f"no way out for tenant {dial.tenant_id}'s calls here: its SIP "
                                "trunk (sip.outbound) needs a gateway serving SIP (VOXLOG_SIP_BIND), a tenant "
                                "without one a Twilio account", code=None, provider="none")
            return
        bucket = self._bucket(dial.tenant_id)
        while (delay := bucket.delay(self.clock())) > 0:
            if self.clock() + delay > dial.expires_at_us / 1e6:
                break
            await self.sleep(delay)
        if self.clock() * 1e6 >= dial.expires_at_us or bucket.delay(self.clock()) > 0:
            await self._give_up(dial, dial.attempts, "expired before it could be placed (tenant rate limit or "
                                "dialer backlog)", code=None, provider=placer.provider)
            return
        bucket.take(self.clock())
        seq, attempt = dial.next_seq, dial.attempts
        while True:
            attempt += 1
            await asyncio.to_thread(self.store.update, dial.dial_id, state="placing", next_seq=seq, attempts=attempt)
            started = time.perf_counter()
            try:
                # The placed event takes `seq`; the call's status events number on from seq + 1.
                provider_call_id = await placer.place(dial, seq + 1)
            except PlaceFailed as exc:
                last = not exc.retryable or attempt >= self.attempts or self.clock() * 1e6 >= dial.expires_at_us
                await self._move(dial, CallDialFailed(provider=placer.provider, error=exc.message, code=exc.code,
                                                      attempt=attempt, retryable=not last, final=last),
                                 seq=seq, state="failed" if last else "queued", attempts=attempt)
                seq += 1
                if last:
                    self.failed += 1
                    return
                await self.sleep(self.backoff_s * 2 ** (attempt - 1))
                continue
            latency_ms = int((time.perf_counter() - started) * 1000)
            queued_ms = max(0, int(self.clock() * 1000 - dial.requested_us / 1000) - latency_ms)
            # Status events may already be numbering from seq + 1; this event holds seq.
            await self._move(dial, CallDialPlaced(provider=placer.provider, provider_call_id=provider_call_id,
                                                  attempt=attempt, queued_ms=queued_ms, latency_ms=latency_ms),
                             seq=seq, state="placed", attempts=attempt, provider_call_id=provider_call_id)
            self.placed += 1
            return
