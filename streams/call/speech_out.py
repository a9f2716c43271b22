"""The agent's side of a call: speech synthesis, real-time pacing, playback, and its stop on a barge-in.

Each reply is synthesised in the channel's own format (`MediaTransport.speech_codec`), played in
20 ms frames paced in real time, each frame recorded as played (gathered into chunks of 100 ms that
never span two replies: `streams.audio.chunking`); how it ended (`tts.completed`:
which voice, how much was played, interrupted or not) is an input of the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from producers.event_writer import CallRecorder
from schemas.events import AgentAudioChunk, ErrorRaised, TtsCompleted
from streams.audio.chunking import FrameChunker, GatheredChunk
from streams.audio.formats import FRAME_MS
from streams.call.core import Speak
from streams.call.inputs import CallInputs
from streams.call.transport import MediaTransport, TransportClosed
from streams.providers.base import ProviderError, TtsProvider, close_chunks

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
"""Starts one of the call's tasks (a task that dies of a bug ends the call)."""


class SpeechOut:
    """`played` is told of each frame sent (the session's voice-to-voice latency watches for the first)."""

    def __init__(self, tts: TtsProvider, transport: MediaTransport, recorder: CallRecorder, inputs: CallInputs,
                 spawn: Spawn, played: Callable[[], None]) -> None:
        self._tts = tts
        self._transport = transport
        self._recorder = recorder
        self._inputs = inputs
        self._spawn = spawn
        self._played = played
        self._speech: asyncio.Task[None] | None = None
        self._played_frames = FrameChunker(recorder.clock_us)
        self._frames_played = 0
        self._recording_ended = False
        self._request_id: str | None = None
        """The speech whose frames `_played_frames` holds."""

    def say(self, action: Speak, causation_id: str) -> None:
        """After what is being said, not over it ("let me check that" and then the answer); `stop` ends both."""
        before = self._speech if self._speech is not None and not self._speech.done() else None
        self._speech = self._spawn(self._speak(action, causation_id, before), "speech")

    async def stop(self) -> None:
        """Barge-in: what is being said stops, and the far end drops what it has buffered."""
        self._cancel()
        with contextlib.suppress(TransportClosed):
            await self._transport.clear()

    async def close(self) -> None:
        """The call is over: speech stops, and is done with when this returns."""
        self._cancel()
        if self._speech is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a crash is reported by its spawner
                await self._speech

    def _cancel(self) -> None:
        if self._speech is not None:
            _cancel_once(self._speech)

    async def _speak(self, action: Speak, causation_id: str, before: asyncio.Task[None] | None) -> None:
        """Says `action`'s text once `before` (the speech in progress) is over; cancelled, it cancels
        `before` too, and records every speech it ends as interrupted."""
        if before is not None:
            try:
                await asyncio.wait({before})  # not `await before`: a speech that ends interrupted returns
            except asyncio.CancelledError:
                _cancel_once(before)
                self._inputs.submit(TtsCompleted(request_id=action.request_id, provider=self._tts.name,
                                                 voice=action.voice, time_to_first_byte_ms=0, audio_ms=0,
                                                 audio_bytes=0, interrupted=True), causation_id=causation_id)
                raise
        codec, rate = self._transport.speech_codec, self._transport.speech_rate
        speech = self._tts.speak(action.text, voice=action.voice, sample_rate=rate, codec=codec)
        frame_bytes = rate * FRAME_MS // 1000 * (1 if codec == "mulaw" else 2)
        silence = b"\xff" if codec == "mulaw" else b"\0"
        requested = time.perf_counter()
        first_byte_ms = 0
        frames_sent = 0
        interrupted = False
        pending = b""
        loop = asyncio.get_running_loop()
        start = 0.0
        await self._transport.show("agent", action.text, final=True)
        try:
            async for chunk in speech.chunks:
                if not first_byte_ms:
                    first_byte_ms = int((time.perf_counter() - requested) * 1000)
                    start = loop.time()
                pending += chunk
                while len(pending) >= frame_bytes:
                    frame, pending = pending[:frame_bytes], pending[frame_bytes:]
                    await self._play(frame, action.request_id, start + frames_sent * FRAME_MS / 1000)
                    frames_sent += 1
            if pending:
                await self._play(
                    pending.ljust(frame_bytes, silence), action.request_id, start + frames_sent * FRAME_MS / 1000
                )
                frames_sent += 1
            await self._transport.mark(action.request_id)
        except asyncio.CancelledError:
            interrupted = True
        except ProviderError:
            pass  # what failed is in the speech's report, recorded below
        except TransportClosed as exc:
            self._inputs.submit(ErrorRaised(component="transport", provider=self._transport.channel, kind="closed",
                                            message=str(exc), retryable=False, fatal=False),
                                causation_id=causation_id)
        finally:
            # Numbered before any other event can be (no shield: it would number it later, maybe after
            # the call's end); a speech is cancelled once (`_cancel_once`), so this await is not cut short.
            await self._write(self._played_frames.take())
            await close_chunks(speech.chunks)
            self._inputs.report("tts", speech.report, causation_id)
            self._inputs.submit(
                TtsCompleted(
                    request_id=action.request_id,
                    provider=speech.provider,
                    voice=speech.voice or action.voice,
                    time_to_first_byte_ms=first_byte_ms,
                    audio_ms=frames_sent * FRAME_MS,
                    audio_bytes=frames_sent * frame_bytes,
                    interrupted=interrupted,
                ),
                causation_id=causation_id,
            )

    async def _play(self, frame: bytes, request_id: str, due: float) -> None:
        """Sends one frame when its time comes (real-time pacing) and records it."""
        delay = due - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        await self._transport.play_speech(frame)
        self._played()
        if self._recording_ended:
            return  # played after the call's end: not the call's
        if request_id != self._request_id:
            await self._write(self._played_frames.take())
            self._request_id = request_id
        offset_ms = self._frames_played * FRAME_MS
        self._frames_played += 1
        await self._write(self._played_frames.add(frame, self._transport.speech_codec, self._transport.speech_rate,
                                                  offset_ms))

    async def end_recording(self) -> None:
        """The call is ending: the played frames gathered so far are written (before its end), none after."""
        self._recording_ended = True
        await self._write(self._played_frames.take())

    async def _write(self, chunk: GatheredChunk | None) -> None:
        if chunk is not None:
            await self._recorder.record(
                AgentAudioChunk(codec="mulaw" if chunk.codec == "mulaw" else "pcm_s16le",
                                sample_rate=chunk.sample_rate, chunk_index=chunk.index, offset_ms=chunk.offset_ms,
                                duration_ms=chunk.duration_ms, audio=chunk.audio, tts_request_id=self._request_id),
                event_time_us=chunk.first_at_us)


def _cancel_once(task: asyncio.Task[None]) -> None:
    """Cancels a speech that is not already being cancelled: a second cancel would cut short the
    `finally` that records what it played."""
    if not task.done() and not task.cancelling():
        task.cancel()
