"""The caller's side of a call: audio in, voice activity, recognition.

Each inbound frame is recorded as received, gathered into chunks of 100 ms (`streams.audio.chunking`),
while the caller's consent lets the call keep their audio (`keep_audio`, which the session sets from
the core: not after a refusal, nor under opt-in before a yes; the frame is heard all the same). The
VAD tells when the caller starts and stops speaking (inputs of the call), and only speech goes to the
recogniser, with the 300 ms of line before where the VAD says it began (pre-roll) so the start of a
word is not lost. An utterance's final transcript is awaited (a provider's round trip) in a task of
its own, and what the recogniser is given meanwhile waits its turn behind it: the VAD and the recording
never wait for a final, so the caller is heard in real time meanwhile (a barge-in, the next utterance)
rather than in one burst when it comes. Interim transcripts are recorded and shown; an utterance's
final transcript, written in the canonical form whoever recognised it
(streams/providers/asr_text.py: numbers, times and emails as the core and redaction read them), is an
input of the call, with times in the call's audio.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from producers.event_writer import CallRecorder
from schemas.events import CallerAudioChunk, SpeechStarted, SpeechStopped, TranscriptFinal, TranscriptInterim, Word
from streams.audio.chunking import FrameChunker, GatheredChunk
from streams.audio.formats import FRAME_MS
from streams.audio.vad import Vad, VadKind, make_judge
from streams.call.inputs import CallInputs
from streams.call.transport import MediaTransport
from streams.providers.asr_text import normalize_transcript
from streams.providers.base import AsrProvider, AsrStream, ProviderError

PREROLL_MS = 300
"""The line before where the VAD says speech began goes to the recogniser with it, so the start of a word
is not lost (the VAD confirms speech only after it has lasted a while, and a model judges a little late)."""
HEARD_FRAMES = 50
"""The last second of frames, kept for the pre-roll: speech is confirmed well within it."""
QUEUED_FRAMES = 500
"""10 s of caller audio waiting for the audio task; past that the channel waits (backpressure). As much
again may wait for a recogniser busy with a final; past that the audio task waits for it."""


@dataclass(frozen=True, slots=True)
class _UtteranceBegins:
    first_frame_ms: int
    """Where in the call's audio the utterance's first frame fed to the recogniser (its pre-roll) is."""


@dataclass(frozen=True, slots=True)
class _UtteranceEnds:
    stopped: float
    """When the VAD heard the caller stop (`time.perf_counter`): the final's latency runs from there."""


_RecogniserWork = bytes | _UtteranceBegins | _UtteranceEnds
"""A frame of speech to feed, or an utterance's bounds."""


class AudioRecognition:
    """`run` is the call's audio task: it opens the recogniser, then takes the frames `hear` queues,
    until `stop`. `speech_stopped_us` is when the VAD last heard the caller stop (the session's clock),
    where a turn's voice-to-voice latency starts."""

    def __init__(self, asr: AsrProvider, keywords: tuple[str, ...], transport: MediaTransport,
                 recorder: CallRecorder, inputs: CallInputs, clock_us: Callable[[], int], *,
                 vad: VadKind) -> None:
        self._asr = asr
        self._keywords = keywords
        self._transport = transport
        self._recorder = recorder
        self._inputs = inputs
        self._clock_us = clock_us
        self._frames: asyncio.Queue[tuple[bytes, bytes, str, int] | None] = asyncio.Queue(maxsize=QUEUED_FRAMES)
        self._finishing: asyncio.Task[None] | None = None
        """A final being awaited, then the recogniser's work given to it meanwhile (`_behind_final`)."""
        self._behind_final: deque[_RecogniserWork] = deque()
        self._vad = Vad(make_judge(vad))
        self._heard: deque[bytes] = deque(maxlen=HEARD_FRAMES)
        self._stream: AsrStream | None = None
        # The recogniser hears only speech, so its clock runs behind the call's; this maps one to the other.
        self._fed_ms = 0
        self._shift_ms = 0
        self._frames_heard = 0
        self._kept = FrameChunker(recorder.clock_us)
        self._keep_audio = True
        self._recording_ended = False
        self._utterances = 0
        self.speech_stopped_us = 0

    @property
    def keep_audio(self) -> bool:
        """Whether each frame is recorded (`audio.caller_chunk`); recognition hears every frame, kept or not."""
        return self._keep_audio

    @keep_audio.setter
    def keep_audio(self, keep: bool) -> None:
        if not keep:  # frames gathered before a refusal are not written after it
            self._kept.drop()
        self._keep_audio = keep

    @property
    def offset_ms(self) -> int:
        """How much caller audio the call has had: where in it something the channel reports happened."""
        return self._frames_heard * FRAME_MS

    async def hear(self, pcm16: bytes, raw: bytes, codec: str, sample_rate: int) -> None:
        await self._frames.put((pcm16, raw, codec, sample_rate))

    def stop(self) -> None:
        """Drops what is queued and ends `run` (a final being awaited is finished first); a channel blocked
        on a full queue (a dead audio task) goes on."""
        self._behind_final.clear()
        while not self._frames.empty():
            self._frames.get_nowait()
        self._frames.put_nowait(None)

    async def run(self, deaf: Callable[[str], None]) -> None:
        """`deaf` ends the call when no recogniser of the chain can be opened: the call has no ears."""
        try:
            self._stream = await self._asr.open_stream(keywords=self._keywords)
        except ProviderError as exc:
            self._inputs.report("asr", exc.report)
            deaf(f"speech recognition unavailable: {exc}"[:500])
            return
        try:
            while (item := await self._frames.get()) is not None:
                await self._frame(self._stream, *item)
        except asyncio.CancelledError:
            if self._finishing is not None:
                self._finishing.cancel()  # a recogniser that holds up the call's end is cut short with it
            raise
        finally:
            self.stop()
            try:
                if self._finishing is not None:
                    await self._finishing  # its final, not what waited behind it: a record begun is finished
            finally:
                await self._stream.close()

    async def end_recording(self) -> None:
        """The call is ending: the kept frames gathered so far are written (before its end), none after."""
        self._recording_ended = True
        await self._write(self._kept.take())

    async def _write(self, chunk: GatheredChunk | None) -> None:
        if chunk is not None:
            await self._recorder.record(
                CallerAudioChunk(codec="mulaw" if chunk.codec == "mulaw" else "pcm_s16le",
                                 sample_rate=chunk.sample_rate, chunk_index=chunk.index, offset_ms=chunk.offset_ms,
                                 duration_ms=chunk.duration_ms, audio=chunk.audio),
                event_time_us=chunk.first_at_us)

    async def _frame(self, stream: AsrStream, pcm16: bytes, raw: bytes, codec: str, rate: int) -> None:
        offset_ms = self.offset_ms
        # Read and gathered in one step: a refusal drops what is gathered (the setter).
        if self._keep_audio and not self._recording_ended:
            await self._write(self._kept.add(raw, codec, rate, offset_ms))
        self._frames_heard += 1  # counted kept or not: positions in the caller's stream stay those of the call
        self._heard.append(pcm16)
        for vad_event in self._vad.process(pcm16):
            if vad_event.kind == "speech_started":
                self._inputs.submit(SpeechStarted(offset_ms=vad_event.offset_ms))
                before = min(len(self._heard) - 1, (offset_ms - vad_event.offset_ms + PREROLL_MS) // FRAME_MS)
                earlier = list(self._heard)[-1 - before:-1] if before > 0 else []
                await self._recognise(stream, _UtteranceBegins(offset_ms - len(earlier) * FRAME_MS))
                for frame in earlier:
                    await self._recognise(stream, frame)
            else:
                self.speech_stopped_us = self._clock_us()
                self._inputs.submit(SpeechStopped(offset_ms=vad_event.offset_ms, duration_ms=vad_event.duration_ms))
                await self._recognise(stream, _UtteranceEnds(time.perf_counter()))
        if self._vad.in_speech:
            await self._recognise(stream, pcm16)

    async def _recognise(self, stream: AsrStream, work: _RecogniserWork) -> None:
        """The recogniser's work, done here while it is free; behind a final it is awaiting, queued for the
        task that awaits it (which does it in order, then ends). An utterance's end starts that task."""
        finishing = self._finishing
        if finishing is not None and not finishing.done():
            if len(self._behind_final) < QUEUED_FRAMES:
                self._behind_final.append(work)
                return
            await asyncio.wait({finishing})  # 10 s behind: the caller's audio waits for the recogniser
        if finishing is not None:
            self._finishing = None
            finishing.result()  # a bug in it ends the audio task, which the session reports
        if isinstance(work, _UtteranceEnds):
            self._finishing = asyncio.create_task(self._finish_then_catch_up(stream, work))
            self._finishing.add_done_callback(self._finished)
        else:
            await self._recognise_now(stream, work)

    async def _recognise_now(self, stream: AsrStream, work: _RecogniserWork) -> None:
        if isinstance(work, _UtteranceBegins):
            self._shift_ms = work.first_frame_ms - self._fed_ms
        elif isinstance(work, _UtteranceEnds):
            await self._finish_utterance(stream, work.stopped)
        else:
            await self._feed(stream, work)

    async def _finish_then_catch_up(self, stream: AsrStream, end: _UtteranceEnds) -> None:
        await self._recognise_now(stream, end)
        while self._behind_final:  # what came meanwhile, in order (another utterance's end among it)
            await self._recognise_now(stream, self._behind_final.popleft())

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A final's task that died of a bug ends `run` (which raises its error) without waiting for more audio."""
        if not task.cancelled() and task.exception() is not None:
            self.stop()

    async def _feed(self, stream: AsrStream, pcm16: bytes) -> None:
        self._fed_ms += FRAME_MS
        try:
            interim = await stream.accept(pcm16)
        except ProviderError as exc:
            self._inputs.report("asr", exc.report)  # the utterance's end tries again (a chain: from its first)
            return
        if interim is not None and interim.text:
            await self._recorder.record(
                TranscriptInterim(
                    utterance_id=f"u{self._utterances}",
                    text=interim.text,
                    confidence=interim.confidence,
                    provider=interim.provider or self._asr.name,
                    model=interim.model or self._asr.model,
                    start_ms=interim.start_ms + self._shift_ms,
                    end_ms=interim.end_ms + self._shift_ms,
                )
            )
            await self._transport.show("caller", interim.text, final=False)

    async def _finish_utterance(self, stream: AsrStream, stopped: float) -> None:
        try:
            result = await stream.end_utterance()
        except ProviderError as exc:
            self._inputs.report("asr", exc.report)
            return
        self._inputs.report("asr", result.report)
        utterance_id = f"u{self._utterances}"
        self._utterances += 1
        shift = self._shift_ms
        text = normalize_transcript(result.text)
        self._inputs.submit(
            TranscriptFinal(
                utterance_id=utterance_id,
                text=text,
                confidence=result.confidence,
                words=tuple(
                    Word(word=w.word, start_ms=w.start_ms + shift, end_ms=w.end_ms + shift, confidence=w.confidence)
                    for w in result.words
                ),
                provider=result.provider or self._asr.name,
                model=result.model or self._asr.model,
                language="en-US",
                start_ms=result.start_ms + shift,
                end_ms=result.end_ms + shift,
                latency_ms=int((time.perf_counter() - stopped) * 1000),
            )
        )
        if text:
            await self._transport.show("caller", text, final=True)
