"""The web widget's protocol on its WebSocket (`/widget/ws`), apart from the socket.

The page opens with a JSON `{"type": "start", "key": WIDGET_KEY, "page": URL}`, then sends binary
frames of 16 kHz 16-bit little-endian mono PCM (20 ms, 640 bytes, is what the script sends), and
`{"type": "mark", "name"}` when its playback reaches a mark (at once for the marks a clear dropped).
The server answers `{"type": "started", "call_id"}`, then binary frames of agent audio (same
format), `{"type": "transcript", "speaker", "text", "final"}`, `{"type": "mark", "name"}`,
`{"type": "clear"}` on barge-in, and `{"type": "end", "reason"}`; a call it cannot take gets
`{"type": "error", "message"}` or `{"type": "busy", "message"}` and the socket closes.

A text message is refused unread past `MAX_CONTROL_CHARS`; one that is not a JSON object (or nests too
deeply to parse) is a `BadFrame`, as an odd-sized audio frame is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from streams.audio.formats import PCM_FRAME_BYTES
from streams.channels.twilio_media_protocol import excerpt

MAX_FRAME_BYTES = PCM_FRAME_BYTES * 10
"""200 ms: more in one message is not a live microphone."""
MAX_CONTROL_CHARS = 8 * 1024
"""A text message's size at most, checked before it is parsed (which bounds the parser's work on garbage,
as the Twilio protocol's `MAX_MESSAGE_CHARS` does). The opening message carries the page's URL, which the
web servers before a page already limit to about this (nginx's and Apache's 8 KiB request lines); a mark
is a few dozen characters."""
PAGE_FIELD_CHARS = 500


@dataclass(frozen=True, slots=True)
class Hello:
    """The page's first message: which widget (its key picks the agent), on which page."""

    key: str
    page: str


@dataclass(frozen=True, slots=True)
class PageAudio:
    """20 ms of the caller's audio, 16 kHz 16-bit PCM."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class MarkReached:
    """The page's playback reached a mark we sent (or a clear dropped the audio before it)."""

    name: str


@dataclass(frozen=True, slots=True)
class BadFrame:
    reason: str


PageEvent = PageAudio | MarkReached | BadFrame


def parse_hello(text: str) -> Hello:
    """The page's opening message; raises ValueError when it is not one."""
    message = _load_control(text)
    return Hello(key=str(message.get("key", "")), page=str(message.get("page", ""))[:PAGE_FIELD_CHARS])


class PageReader:
    """Turns the page's messages into events: its audio in 20 ms frames whatever the size of its
    messages, its marks. Control messages it does not know are skipped: a newer page may send more."""

    def __init__(self) -> None:
        self._pending = b""

    def read(self, message: str | bytes) -> list[PageEvent]:
        if isinstance(message, str):
            try:
                name = _mark_name(_load_control(message))
            except ValueError as exc:
                return [BadFrame(f"{exc}: {excerpt(message)}")]
            return [] if name is None else [MarkReached(name)]
        if len(message) % 2 or len(message) > MAX_FRAME_BYTES:
            return [BadFrame(f"audio frame of {len(message)} bytes")]
        self._pending += message
        frames: list[PageEvent] = []
        while len(self._pending) >= PCM_FRAME_BYTES:
            frames.append(PageAudio(self._pending[:PCM_FRAME_BYTES]))
            self._pending = self._pending[PCM_FRAME_BYTES:]
        return frames


def _load_control(text: str) -> dict[str, Any]:
    """A control message's JSON object; ValueError, saying why, for anything else."""
    if len(text) > MAX_CONTROL_CHARS:
        raise ValueError(f"control message of {len(text)} characters, more than {MAX_CONTROL_CHARS}")
    try:
        message = json.loads(text)
    except RecursionError as exc:  # the parser recurses per level of nesting: "[[[[..." exhausts the stack
        raise ValueError("control message nested too deeply") from exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"control message is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ValueError(f"control message must be a JSON object, got {type(message).__name__}")
    return message


def _mark_name(message: dict[str, Any]) -> str | None:
    if message.get("type") == "mark" and isinstance(message.get("name"), str):
        return str(message["name"])
    return None


def _message(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields})


def started_message(call_id: str) -> str:
    return _message("started", call_id=call_id)


def transcript_message(speaker: Literal["caller", "agent"], text: str, final: bool) -> str:
    return _message("transcript", speaker=speaker, text=text, final=final)


def mark_message(name: str) -> str:
    return _message("mark", name=name)


def clear_message() -> str:
    return _message("clear")


def end_message(reason: str) -> str:
    return _message("end", reason=reason)


def busy_message(detail: str) -> str:
    return _message("busy", message=detail)


def error_message(detail: str) -> str:
    return _message("error", message=detail)
