"""Synthetic calls: realistic event sequences for the demo and the benchmarks.

Until the call pipeline records real calls, this is the source the demo runs end to end; it stays
the load generator of `voxlog bench`. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import numpy as np

from schemas.base import EventPayload
from schemas.events import (
    AgentAudioChunk,
    BargeIn,
    CallAnswered,
    CallEnded,
    CallerAudioChunk,
    CallStarted,
    ConsentGiven,
    LlmDecided,
    LlmRequested,
    MemoryLoaded,
    SpeechStarted,
    SpeechStopped,
    ToolCallSpec,
    ToolRequested,
    ToolSucceeded,
    TranscriptFinal,
    TranscriptInterim,
    TtsCompleted,
    TtsRequested,
    TurnTaken,
    Word,
)
from streams.audio.codecs import pcm16_to_mulaw
from streams.audio.formats import FRAME_MS, MULAW_FRAME_BYTES, MULAW_RATE, PCM_FRAME_BYTES, PCM_RATE

CALLER_LINES = [
    ("i would like to book an appointment for tomorrow at ten", "book_appointment"),
    ("my internet has been down since this morning", "create_ticket"),
    ("can you tell me my account balance", None),
    ("i want to speak to a human please", "handoff"),
]


def mulaw_tone(n: int, phase: int, freq: float = 220.0, rate: int = MULAW_RATE) -> bytes:
    """A 220 Hz tone in G.711 mu-law: audio-shaped bytes of the right size and codec."""
    samples = 8000 * np.sin(2 * np.pi * freq * np.arange(phase, phase + n) / rate)
    return pcm16_to_mulaw(samples.astype("<i2").tobytes())


def caller_chunk(index: int, wideband: bool) -> CallerAudioChunk:
    """One 20 ms caller frame: 160 bytes of 8 kHz mu-law (phone) or 640 bytes of 16 kHz PCM (widget)."""
    if wideband:
        return CallerAudioChunk(
            codec="pcm_s16le",
            sample_rate=PCM_RATE,
            chunk_index=index,
            offset_ms=index * FRAME_MS,
            duration_ms=FRAME_MS,
            audio=bytes(PCM_FRAME_BYTES),
        )
    return CallerAudioChunk(
        codec="mulaw",
        sample_rate=MULAW_RATE,
        chunk_index=index,
        offset_ms=index * FRAME_MS,
        duration_ms=FRAME_MS,
        audio=_TONE_FRAMES[index % len(_TONE_FRAMES)],
    )


_TONE_FRAMES = [mulaw_tone(MULAW_FRAME_BYTES, k * MULAW_FRAME_BYTES) for k in range(20)]


def synthetic_call(
    call_index: int, *, seed: int = 7, turns: int = 2, frames_per_utterance: int = 50, agent_id: str = "front-desk"
) -> Iterator[EventPayload]:
    """The payloads of one call, in the order a live session would record them."""
    rng = random.Random(seed * 1_000_003 + call_index)
    wideband = call_index % 3 == 2
    yield CallStarted(
        channel="widget" if wideband else "phone",
        direction="inbound",
        agent_id=agent_id,
        agent_version="sha256:demo",
        from_number=None if wideband else f"+1555{rng.randrange(10**7):07d}",
        to_number=None if wideband else "+15550100",
        provider_call_id=f"CA{rng.getrandbits(128):032x}",
        routed_by="widget_key" if wideband else "number",
    )
    yield CallAnswered(answered_by="human")
    yield ConsentGiven(
        kind="recording", method="implied_by_continuing", prompt_text="This call is recorded to help us serve you."
    )
    yield MemoryLoaded(caller_key=f"caller-{call_index % 5}", summaries=(), source="synthetic")
    caller_index = agent_index = 0
    for turn in range(turns):
        text, tool = CALLER_LINES[(call_index + turn) % len(CALLER_LINES)]
        start_ms = caller_index * FRAME_MS
        yield SpeechStarted(offset_ms=start_ms)
        words = text.split()
        for frame in range(frames_per_utterance):
            yield caller_chunk(caller_index, wideband)
            caller_index += 1
            if frame and frame % 15 == 0:
                partial = " ".join(words[: max(1, len(words) * frame // frames_per_utterance)])
                yield TranscriptInterim(
                    utterance_id=f"u{turn}",
                    text=partial,
                    confidence=0.6,
                    provider="synthetic",
                    model="none",
                    start_ms=start_ms,
                    end_ms=caller_index * FRAME_MS,
                )
        end_ms = caller_index * FRAME_MS
        yield SpeechStopped(offset_ms=end_ms, duration_ms=end_ms - start_ms)
        span = (end_ms - start_ms) // max(1, len(words))
        yield TranscriptFinal(
            utterance_id=f"u{turn}",
            text=text,
            confidence=round(rng.uniform(0.7, 0.99), 3),
            words=tuple(
                Word(word=w, start_ms=start_ms + i * span, end_ms=start_ms + (i + 1) * span, confidence=0.9)
                for i, w in enumerate(words)
            ),
            provider="synthetic",
            model="none",
            start_ms=start_ms,
            end_ms=end_ms,
            latency_ms=rng.randrange(80, 250),
        )
        yield TurnTaken(turn_index=turn, caller_text=text, utterance_ids=(f"u{turn}",), end_of_turn_ms=end_ms)
        request_id = f"llm-{call_index}-{turn}"
        yield LlmRequested(
            request_id=request_id,
            turn_index=turn,
            agent_id=agent_id,
            prompt_id="front-desk/main",
            prompt_hash="sha256:demo",
            provider="offline-scripted",
            model="scripted-policy",
            parameters={"temperature": "0"},
            message_count=2 + 2 * turn,
            tools=("book_appointment", "create_ticket"),
        )
        calls: tuple[ToolCallSpec, ...] = ()
        if tool and tool != "handoff":
            calls = (ToolCallSpec(id=f"tc-{call_index}-{turn}", name=tool, arguments_json=json.dumps({"text": text})),)
        reply = "Done, anything else?" if calls else "Let me help you with that."
        yield LlmDecided(
            request_id=request_id,
            provider="offline-scripted",
            model="scripted-policy",
            text=reply,
            tool_calls=calls,
            finish_reason="tool_calls" if calls else "stop",
            input_tokens=40 + 20 * turn,
            output_tokens=12,
            time_to_first_token_ms=rng.randrange(150, 400),
            total_ms=rng.randrange(400, 900),
        )
        for spec in calls:
            yield ToolRequested(
                tool_call_id=spec.id,
                tool=spec.name,
                arguments_json=spec.arguments_json,
                idempotency_key=f"{call_index}:{spec.id}",
            )
            yield ToolSucceeded(
                tool_call_id=spec.id,
                tool=spec.name,
                result_json='{"ok": true}',
                attempt=1,
                latency_ms=rng.randrange(20, 120),
            )
        tts_id = f"tts-{call_index}-{turn}"
        yield TtsRequested(
            request_id=tts_id,
            text=reply,
            provider="synthetic",
            voice="default",
            codec="pcm_s16le" if wideband else "mulaw",
            sample_rate=PCM_RATE if wideband else MULAW_RATE,
        )
        agent_frames = 25
        barge = turn == 0 and call_index % 4 == 1
        played = 0
        for frame in range(agent_frames):
            yield AgentAudioChunk(
                codec="mulaw",
                sample_rate=MULAW_RATE,
                chunk_index=agent_index,
                offset_ms=agent_index * FRAME_MS,
                duration_ms=FRAME_MS,
                audio=_TONE_FRAMES[frame % len(_TONE_FRAMES)],
                tts_request_id=tts_id,
            )
            agent_index += 1
            played += FRAME_MS
            if barge and frame == 10:
                yield BargeIn(offset_ms=caller_index * FRAME_MS, interrupted_tts_request_id=tts_id, played_ms=played)
                break
        yield TtsCompleted(
            request_id=tts_id,
            provider="synthetic",
            voice="default",
            time_to_first_byte_ms=rng.randrange(60, 200),
            audio_ms=played,
            audio_bytes=played * 8,
            interrupted=barge,
        )
    yield CallEnded(reason="caller_hangup", duration_ms=(caller_index + agent_index) * FRAME_MS, outcome="resolved")


def concurrent_calls(concurrent: int, *, seed: int = 7, turns: int = 2) -> Iterator[tuple[int, EventPayload]]:
    """Endless interleaving of `concurrent` live calls, each in its own order: (call index, payload).

    Round-robin one event per call, starting a new call when one ends, the way a gateway's
    sessions write side by side.
    """
    streams = {i: synthetic_call(i, seed=seed, turns=turns) for i in range(concurrent)}
    next_index = concurrent
    while True:
        for index in list(streams):
            payload = next(streams[index], None)
            if payload is None:
                del streams[index]
                streams[next_index] = synthetic_call(next_index, seed=seed, turns=turns)
                index, next_index = next_index, next_index + 1
                payload = next(streams[index])
            yield index, payload
