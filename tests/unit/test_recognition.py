"""streams.call.recognition: the caller is heard in real time while the recogniser works on a final."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import numpy as np

from producers.event_writer import CallRecorder, EventWriter
from schemas.events import SpeechStarted, SpeechStopped, TranscriptFinal
from streams.audio.codecs import frames
from streams.call.inputs import CallInputs, Input
from streams.call.recognition import AudioRecognition
from streams.call.transport import Channel, MediaTransport
from streams.providers.base import AsrCapabilities, AsrProvider, AsrStream, Recognition
from tests.fakes import MemoryProducer

RATE = 16_000


def tone(ms: int) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return np.rint(3000 * math.sqrt(2) * np.sin(2 * math.pi * 220 * t)).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


class HeldFinals(AsrProvider):
    """Each utterance's final waits until the test lets it go (a provider's round trip, as long as wanted)."""

    name = "held-finals"
    model = "held"
    capabilities = AsrCapabilities(interim_results=False)

    def __init__(self) -> None:
        self.asked = asyncio.Queue[asyncio.Event]()
        self.fed_while_held = 0

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> AsrStream:
        return HeldStream(self)


class HeldStream(AsrStream):
    def __init__(self, asr: HeldFinals) -> None:
        super().__init__(asr.name)
        self.asr = asr
        self.holding = False
        self.start_ms = 0
        self.said = 0

    async def _accept(self, pcm: bytes) -> Recognition | None:
        self.asr.fed_while_held += self.holding
        return None

    async def _end_utterance(self) -> Recognition:
        release = asyncio.Event()
        self.holding = True
        await self.asr.asked.put(release)
        await release.wait()
        self.holding = False
        self.said += 1
        result = Recognition(text=f"utterance {self.said}", is_final=True, confidence=1.0, start_ms=self.start_ms,
                             end_ms=self.fed_ms)
        self.start_ms = self.fed_ms
        return result

    async def _close(self) -> None:
        pass


class SilentLine(MediaTransport):
    channel: Channel = "phone"

    async def play(self, frame: bytes) -> None:
        pass

    async def clear(self) -> None:
        pass

    async def mark(self, name: str) -> None:
        pass

    async def transfer(self, target: str) -> tuple[str, str | None]:
        return "failed", None

    async def hangup(self) -> None:
        pass


def _listening() -> tuple[HeldFinals, CallInputs, AudioRecognition, asyncio.Task[None]]:
    """A call's caller side with a recogniser whose finals are held, and its audio task running."""
    asr, inputs = HeldFinals(), CallInputs(lambda: 0)
    recorder = CallRecorder(EventWriter(MemoryProducer()), tenant_id="t", call_id="c", producer="test",
                            producer_version="0")
    recognition = AudioRecognition(asr, (), SilentLine(), recorder, inputs, lambda: 0, vad="energy")
    return asr, inputs, recognition, asyncio.create_task(recognition.run(lambda detail: None))


async def _heard_until(inputs: CallInputs, heard: list[object], enough: Callable[[list[object]], bool]) -> None:
    """Takes the call's inputs into `heard` until it holds `enough` (the audio task works at its own pace)."""
    async def take() -> None:
        while not enough(heard):
            item = await inputs.next()
            assert isinstance(item, Input)
            heard.append(item.payload)
    await asyncio.wait_for(take(), 30)


def _kinds(heard: list[object]) -> list[type]:
    return [type(p) for p in heard]


async def test_the_next_utterance_is_heard_while_the_last_ones_final_is_awaited() -> None:
    asr, inputs, recognition, audio = _listening()

    async def say(pcm: bytes) -> None:
        for frame in frames(pcm, RATE, 20):
            await recognition.hear(frame, frame, "pcm_s16le", RATE)

    await say(silence(500) + tone(1000) + silence(900))
    first = await asyncio.wait_for(asr.asked.get(), 30)  # the first utterance's final is awaited, and held
    await say(tone(600))
    heard: list[object] = []
    # Heard while the final is held: with the recogniser in the audio task's way, the second start never came.
    await _heard_until(inputs, heard, lambda h: len(h) == 3)
    assert _kinds(heard) == [SpeechStarted, SpeechStopped, SpeechStarted], heard
    assert asr.fed_while_held == 0  # the recogniser took nothing of the next utterance before its final

    first.set()
    await say(silence(900))
    (await asyncio.wait_for(asr.asked.get(), 30)).set()
    await _heard_until(inputs, heard, lambda h: _kinds(h).count(TranscriptFinal) == 2)
    finals = [p for p in heard if isinstance(p, TranscriptFinal)]
    assert [f.text for f in finals] == ["utterance 1", "utterance 2"]
    # Times are the call's: each utterance begins with its 300 ms of pre-roll before the VAD's start.
    starts = [p.offset_ms for p in heard if isinstance(p, SpeechStarted)]
    assert starts == [500, 2400]
    assert (finals[0].start_ms, finals[1].start_ms) == (200, 2100)
    assert finals[0].end_ms >= 1500
    assert finals[1].end_ms >= 3000

    recognition.stop()
    await asyncio.wait_for(audio, 30)


async def test_a_call_that_ends_while_a_final_is_awaited_ends_its_audio_task_once_the_final_comes() -> None:
    asr, inputs, recognition, audio = _listening()
    for frame in frames(tone(800) + silence(900) + tone(400), RATE, 20):
        await recognition.hear(frame, frame, "pcm_s16le", RATE)
    held = await asyncio.wait_for(asr.asked.get(), 30)
    recognition.stop()
    done, _ = await asyncio.wait({audio}, timeout=0.2)
    assert not done  # the final at hand is still coming: its record is not cut off
    held.set()
    await asyncio.wait_for(audio, 30)
    heard: list[object] = []
    await _heard_until(inputs, heard, lambda h: TranscriptFinal in _kinds(h))
    assert [p.text for p in heard if isinstance(p, TranscriptFinal)] == ["utterance 1"]


async def test_an_audio_task_cancelled_while_a_final_is_awaited_does_not_wait_for_it() -> None:
    asr, _, recognition, audio = _listening()
    for frame in frames(tone(800) + silence(900), RATE, 20):
        await recognition.hear(frame, frame, "pcm_s16le", RATE)
    await asyncio.wait_for(asr.asked.get(), 30)  # held, and never let go: a recogniser that hangs
    audio.cancel()
    done, _ = await asyncio.wait({audio}, timeout=30)
    assert done
    assert audio.cancelled()
