"""The media edge of a call session: what a channel (Twilio media stream, web widget, SIP) must
offer the session, what it plays, and what the session needs to know about a call when it starts."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Literal

from schemas.events import CallStarted
from streams.audio.formats import MULAW_RATE, PCM_RATE
from streams.memory import key_of_call
from streams.providers.base import SpeechCodec

Channel = Literal["phone", "sip", "widget"]


@dataclass(frozen=True, slots=True)
class SpeechFormat:
    """How agent speech is played on a channel: what synthesis makes, the far end hears and the log records."""

    codec: SpeechCodec
    sample_rate: int


SPEECH_FORMATS: dict[str, SpeechFormat] = {
    "phone": SpeechFormat("mulaw", MULAW_RATE),  # a Twilio media stream carries 8 kHz mu-law only
    "sip": SpeechFormat("mulaw", MULAW_RATE),  # G.711 PCMU, the codec every SIP trunk offers
    "widget": SpeechFormat("pcm_s16le", PCM_RATE),
}
"""Each channel's speech format. The core reads it from `call.started`'s channel (so replay decides the
same `tts.requested`), a transport plays it: one table, so the log says what was played."""
DEFAULT_SPEECH = SPEECH_FORMATS["widget"]
"""For a call recorded without a known channel (`call.started` v1's `unknown`)."""


class TransportClosed(ConnectionError):
    """The far end is gone (socket closed, call hung up)."""


class MediaTransport(ABC):
    """One call's media connection. Caller audio crosses it as 16 kHz 16-bit mono PCM in 20 ms frames;
    agent speech in the channel's own format (`SPEECH_FORMATS`), which the session asks synthesis for;
    the transport converts the rest (Twilio: 8 kHz mu-law).

    Inbound audio is pushed to the session by the channel (`CallSession.hear`); the session calls
    these to talk back.
    """

    channel: Channel

    @property
    def speech_codec(self) -> SpeechCodec:
        """The codec `play_speech` takes: the channel's."""
        return SPEECH_FORMATS[self.channel].codec

    @property
    def speech_rate(self) -> int:
        return SPEECH_FORMATS[self.channel].sample_rate

    @abstractmethod
    async def play(self, frame: bytes) -> None:
        """Sends one 20 ms frame of agent audio; the session paces the calls in real time."""

    async def play_speech(self, frame: bytes) -> None:
        """Sends one 20 ms frame of agent audio in the channel's own format (`speech_codec`)."""
        await self.play(frame)

    @abstractmethod
    async def clear(self) -> None:
        """Barge-in: drop agent audio the far end has buffered but not played (Twilio `clear`)."""

    @abstractmethod
    async def mark(self, name: str) -> None:
        """Asks the far end to report when playback reaches this point (Twilio `mark`)."""

    @abstractmethod
    async def transfer(self, target: str) -> tuple[str, str | None]:
        """Hands the call to a human at `target`; returns (outcome, detail): outcome is one of
        connected, no_answer, busy, failed."""

    @abstractmethod
    async def hangup(self) -> None:
        """Ends the call from our side."""

    async def detach(self) -> None:
        """Stops our media without ending the call, which goes on elsewhere (after a transfer).
        Channels that cannot tell the two apart hang up."""
        await self.hangup()

    async def send_transcript(self, speaker: Literal["caller", "agent"], text: str, final: bool) -> None:  # noqa: B027
        """Channels with a screen (the widget) show the live transcript; phones ignore it."""

    async def show(self, speaker: Literal["caller", "agent"], text: str, *, final: bool) -> None:
        """`send_transcript`, where a far end already gone is no reason to stop: the transcript is a courtesy."""
        with contextlib.suppress(TransportClosed):
            await self.send_transcript(speaker, text, final)


@dataclass(frozen=True)
class InboundCall:
    """A call that connected and was routed: whose it is, and its `call.started` (what the channel
    knows and the router chose), the first event the session records."""

    call_id: str
    tenant_id: str
    started: CallStarted

    def __post_init__(self) -> None:
        # Whose call it is, recorded in the clear beside the sealed numbers: erasure finds it by that.
        if self.started.caller_key is None:
            key = key_of_call(self.tenant_id, self.started)
            object.__setattr__(self, "started", replace(self.started, caller_key=key))
