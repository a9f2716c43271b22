"""A SIP call's media as the session's `MediaTransport`: the agent's speech queued on the call's port of
PJSIP's bridge (`gateway.sip_endpoint`), which sends it as RTP every 20 ms; barge-in drops the queue;
a mark waits in the queue behind the audio before it and is reported (`on_mark`) once that has gone out
or been dropped; transfer is a blind REFER, hang-up a BYE (or CANCEL)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable

from gateway.sip_endpoint import NARROWBAND_RATE, SipEndpoint, frame_bytes
from streams.audio.codecs import Resampler, mulaw_to_pcm16
from streams.audio.formats import PCM_RATE
from streams.call.transport import Channel, MediaTransport, TransportClosed
from streams.channels.sip_digest import number_of

log = logging.getLogger(__name__)

_DIALLED = re.compile(r"\+?[0-9*#]{1,32}")
TRANSFER_TIMEOUT_S = 60.0
"""A transfer whose final NOTIFY has not come by then counts as not answered."""


def transfer_outcome(code: int) -> str:
    """A REFER's outcome (its final NOTIFY's status, or its own refusal) as a handoff outcome."""
    if 200 <= code < 300:
        return "connected"
    if code in (486, 600):
        return "busy"
    if code in (408, 480, 487):
        return "no_answer"
    return "failed"


def refer_target(target: str, peer_host: str) -> str:
    """Where to REFER the caller: a SIP URI as given; a number through the peer that sent the call
    (the PBX or trunk, which knows how to reach it)."""
    if target.lower().startswith(("sip:", "sips:")):
        return target
    number = number_of(target if target.lower().startswith("tel:") else f"tel:{target}")
    dialled = re.sub(r"[\s().-]", "", number)  # the separators people write numbers with
    if not _DIALLED.fullmatch(dialled):
        raise ValueError(f"cannot transfer to {target!r}: neither a number nor a SIP URI")
    return f"sip:{dialled}@{peer_host}"


class SipMediaTransport(MediaTransport):
    channel: Channel = "sip"

    def __init__(self, endpoint: SipEndpoint, handle: int, peer_host: str, rate: int = NARROWBAND_RATE,
                 on_mark: Callable[[str], None] | None = None) -> None:
        self.endpoint = endpoint
        self.on_mark = on_mark
        """Told, on the loop, each mark's name once the audio queued before it has been sent (or dropped
        by a clear), in order."""
        self.handle = handle
        self.peer_host = peer_host
        self.closed = False
        self.rate = rate
        """The call's port's: its frames are `frame_bytes(rate)` long."""
        self._frame_bytes = frame_bytes(rate)
        self._down = Resampler(PCM_RATE, rate)
        self._up = Resampler(NARROWBAND_RATE, rate)
        self._pending = b""
        self._transfer: asyncio.Future[tuple[int, str]] | None = None
        self.frames_sent = 0
        self.frames_cleared: list[int] = []
        """How many queued frames each clear dropped unsent."""

    def _queue(self, pcm: bytes) -> None:
        if self.closed or not self.endpoint.play(self.handle, pcm):
            self.closed = True
            raise TransportClosed(f"sip call {self.handle} has no media")
        self.frames_sent += 1

    async def play(self, frame: bytes) -> None:
        """16 kHz PCM (any length), as frames at the port's rate."""
        self._pending += self._down.process(frame) if self.rate != PCM_RATE else frame
        size = self._frame_bytes
        while len(self._pending) >= size:
            self._queue(self._pending[:size])
            self._pending = self._pending[size:]

    async def play_speech(self, frame: bytes) -> None:
        """20 ms of mu-law (the channel's speech format): linear for the bridge, which encodes it for
        the codec the call agreed on (PCMU, PCMA; on G.722 it is upsampled first)."""
        pcm = mulaw_to_pcm16(frame)
        self._queue(pcm if self.rate == NARROWBAND_RATE else self._up.process(pcm))

    async def clear(self) -> None:
        dropped = None if self.closed else self.endpoint.clear(self.handle)
        if dropped is None:
            self.closed = True
            raise TransportClosed(f"sip call {self.handle} has no media")
        self.frames_cleared.append(dropped)
        self._pending = b""
        self._down = Resampler(PCM_RATE, self.rate)
        self._up = Resampler(NARROWBAND_RATE, self.rate)

    async def mark(self, name: str) -> None:
        """Behind the audio queued so far: `on_mark(name)` once the media clock has sent it (or a clear
        dropped it)."""
        if self.closed or not self.endpoint.mark(self.handle, functools.partial(self._reached, name)):
            self.closed = True
            raise TransportClosed(f"sip call {self.handle} has no media")

    def _reached(self, name: str) -> None:
        if self.on_mark is not None:
            self.on_mark(name)

    async def transfer(self, target: str) -> tuple[str, str | None]:
        try:
            uri = refer_target(target, self.peer_host)
        except ValueError as exc:
            return "failed", str(exc)
        if self.closed:
            raise TransportClosed(f"sip call {self.handle} has ended")
        self._transfer = asyncio.get_running_loop().create_future()
        self.endpoint.transfer(self.handle, uri)
        try:
            code, reason = await asyncio.wait_for(self._transfer, TRANSFER_TIMEOUT_S)
        except TimeoutError:
            return "no_answer", f"no final NOTIFY for the REFER to {uri} within {TRANSFER_TIMEOUT_S:.0f} s"
        finally:
            self._transfer = None
        outcome = transfer_outcome(code)
        return outcome, None if outcome == "connected" else f"REFER to {uri}: {code} {reason}".strip()

    def transfer_status(self, code: int, reason: str, final: bool) -> None:
        """A NOTIFY of the transfer's progress (or the REFER's refusal)."""
        if final and self._transfer is not None and not self._transfer.done():
            self._transfer.set_result((code, reason))

    def ended(self) -> None:
        self.closed = True
        if self._transfer is not None and not self._transfer.done():
            self._transfer.set_exception(TransportClosed(f"sip call {self.handle} ended during the transfer"))

    async def hangup(self) -> None:
        if not self.closed:
            self.closed = True
            self.endpoint.hangup(self.handle)
