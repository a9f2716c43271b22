"""The media edge of a call session: what a channel (Twilio media stream, web widget, SIP) must
offer the session, and what the session needs to know about a call when it starts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal


class TransportClosed(ConnectionError):
    """The far end is gone (socket closed, call hung up)."""


class MediaTransport(ABC):
    """One call's media connection. Audio crosses it as 16 kHz 16-bit mono PCM in 20 ms frames;
    the transport converts to and from its channel's format (Twilio: 8 kHz mu-law).

    Inbound audio is pushed to the session by the channel (`CallSession.hear`); the session calls
    these to talk back.
    """

    channel: Literal["phone", "sip", "widget"]
    speech_codec: Literal["pcm_s16le", "mulaw"] = "pcm_s16le"
    speech_rate: int = 16_000
    """The channel's own audio format, which the session asks speech synthesis for (a phone line:
    8 kHz mu-law, which cloud voices make themselves), and which `play_speech` takes."""

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


@dataclass(frozen=True)
class InboundCall:
    """What a channel knows when a call connects, for routing and the `call.started` event."""

    call_id: str
    channel: Literal["phone", "sip", "widget"]
    direction: Literal["inbound", "outbound"]
    tenant_id: str
    agent_id: str
    routed_by: str
    from_number: str | None = None
    to_number: str | None = None
    provider_call_id: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
