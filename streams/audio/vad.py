"""Voice activity detection: when the caller starts talking, and when their turn is over.

`Vad` is the turn-taking state machine, fed 20 ms frames of 16-bit PCM (16 kHz by default); a
`SpeechJudge` says of each frame whether it may start speech and whether it keeps speech going
(hysteresis: the second is the easier to pass). Speech starts once frames have kept passing for
`min_speech_ms` from one that may start it (so a click does not count), and the turn ends once none
has passed for `end_of_turn_silence_ms` (so the short pauses between words do not split an
utterance).

Judges, one module each, chosen per agent (`AgentSpec.vad`), measured by `voxlog bench vad`
(docs/performance.md):
- `EnergyJudge` (here): each frame's level against two thresholds that follow the line's noise floor
  (the quietest frame of the last few seconds); no model, hears any sound as speech;
- `streams.audio.vad_webrtc.WebRtcJudge`: WebRTC's GMM voice detector (C, about 2.5 us a frame);
- `streams.audio.vad_silero.SileroJudge`: Silero's neural VAD on onnxruntime (about 100 us a frame of
  sound, none for a quiet one): the agents' default, the one that keeps taking turns on a noisy line.

The same frames always give the same events: nothing depends on time or randomness.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

from streams.audio.codecs import SILENCE_DBFS, rms_dbfs

__all__ = ["END_OF_TURN_SILENCE_MS", "MIN_SPEECH_MS", "VAD_KINDS", "EnergyJudge", "SpeechJudge", "Vad", "VadEvent",
           "VadKind", "make_judge"]


@dataclass(frozen=True, slots=True)
class VadEvent:
    """`speech_started`: offset_ms is where the speech began, in ms from the start of the stream.

    `speech_stopped`: offset_ms is where the speech ended (the end of its last loud frame, not
    the later moment the silence made the detector sure), and duration_ms how long it lasted.
    """

    kind: Literal["speech_started", "speech_stopped"]
    offset_ms: int
    duration_ms: int = 0


class SpeechJudge(Protocol):
    """Judges each frame of one stream, in order: (may it start speech, does it keep speech going)."""

    def judge(self, frame: bytes) -> tuple[bool, bool]: ...


class _State(Enum):
    SILENCE = "silence"
    PENDING = "pending"  # speech, but not yet for min_speech_ms
    SPEECH = "speech"


class EnergyJudge:
    """A frame's RMS level against a start and a lower stop threshold, each raised to at least a
    margin above the noise floor: the quietest frame in the last `noise_window_ms` (minimum
    statistics).

    Args:
        start_threshold_dbfs: a frame this loud or louder may start speech.
        stop_threshold_dbfs: while speaking, a frame quieter than this counts as silence.
        start_margin_db, stop_margin_db: the thresholds are at least this far above the noise floor.
        noise_window_ms: how far back the noise floor looks (the quietest frame in that window).
        sample_rate: of the PCM frames.
    """

    def __init__(
        self,
        start_threshold_dbfs: float = -40.0,
        stop_threshold_dbfs: float = -50.0,
        *,
        start_margin_db: float = 15.0,
        stop_margin_db: float = 9.0,
        noise_window_ms: int = 3000,
        sample_rate: int = 16_000,
    ) -> None:
        if stop_threshold_dbfs > start_threshold_dbfs:
            raise ValueError("the stop threshold must not be above the start threshold")
        if noise_window_ms <= 0 or sample_rate <= 0:
            raise ValueError("durations and the sample rate must be positive")
        self.start_threshold_dbfs = start_threshold_dbfs
        self.stop_threshold_dbfs = stop_threshold_dbfs
        self.start_margin_db = start_margin_db
        self.stop_margin_db = stop_margin_db
        self._window_samples = noise_window_ms * sample_rate // 1000
        self._samples = 0
        # (end sample, level) of the frames in the noise window that could still be its minimum:
        # levels rise from front to back, so the front is the floor (a sliding-window minimum, O(1)
        # a frame). It starts full of silence, so the first frames of a stream, speech or not, are
        # judged by the fixed thresholds alone.
        self._levels: deque[tuple[int, float]] = deque([(0, SILENCE_DBFS)])

    @property
    def noise_floor_dbfs(self) -> float:
        """The quietest frame level in the noise window (`SILENCE_DBFS` until a window has passed)."""
        return self._levels[0][1] if self._levels else SILENCE_DBFS

    def thresholds(self) -> tuple[float, float]:
        """The (start, stop) thresholds in force now, after raising them above the noise floor."""
        floor = self.noise_floor_dbfs
        return (
            max(self.start_threshold_dbfs, floor + self.start_margin_db),
            max(self.stop_threshold_dbfs, floor + self.stop_margin_db),
        )

    def judge(self, frame: bytes) -> tuple[bool, bool]:
        level = rms_dbfs(frame)
        start_threshold, stop_threshold = self.thresholds()  # from the frames before this one
        self._samples += len(frame) // 2
        self._remember(level)
        return level >= start_threshold, level >= stop_threshold

    def _remember(self, level: float) -> None:
        while self._levels and self._levels[-1][1] >= level:
            self._levels.pop()  # never the minimum again: this quieter or equal frame outlives it
        self._levels.append((self._samples, level))
        horizon = self._samples - self._window_samples
        while self._levels and self._levels[0][0] <= horizon:
            self._levels.popleft()


MIN_SPEECH_MS = 120
END_OF_TURN_SILENCE_MS = 700


class Vad:
    """Turn-taking over a `SpeechJudge` (an `EnergyJudge` where none is given; a call's is `make_judge(agent.vad)`);
    feed it frames in order with `process`.

    Args:
        judge: says of each frame whether it may start speech and whether it keeps it going.
        min_speech_ms: how long frames must keep passing, from one that may start speech, before it
            is speech; shorter bursts (clicks, pops) are ignored.
        end_of_turn_silence_ms: how long the silence must last to end the utterance.
        sample_rate: of the PCM frames.
    """

    def __init__(
        self,
        judge: SpeechJudge | None = None,
        *,
        min_speech_ms: int = MIN_SPEECH_MS,
        end_of_turn_silence_ms: int = END_OF_TURN_SILENCE_MS,
        sample_rate: int = 16_000,
    ) -> None:
        if min_speech_ms < 0 or end_of_turn_silence_ms <= 0 or sample_rate <= 0:
            raise ValueError("durations and the sample rate must be positive")
        self.judge = judge if judge is not None else EnergyJudge(sample_rate=sample_rate)
        self.min_speech_ms = min_speech_ms
        self.end_of_turn_silence_ms = end_of_turn_silence_ms
        self.sample_rate = sample_rate

        self._samples = 0  # samples seen: the stream position
        self._state = _State.SILENCE
        self._speech_start_samples = 0  # where the pending or current speech began
        self._last_loud_end_samples = 0  # end of the latest frame that kept speech going

    @property
    def in_speech(self) -> bool:
        """True between `speech_started` and `speech_stopped`."""
        return self._state is _State.SPEECH

    @property
    def position_ms(self) -> int:
        """How much audio has been processed, in ms."""
        return self._ms(self._samples)

    def process(self, frame: bytes) -> list[VadEvent]:
        """Feeds the next frame (20 ms is the intended size; any whole number of samples works)."""
        if len(frame) % 2:
            raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(frame)}")
        if not frame:
            return []
        starts, keeps = self.judge.judge(frame)
        frame_start = self._samples
        self._samples += len(frame) // 2

        events: list[VadEvent] = []
        if self._state is _State.SILENCE:
            if starts:
                self._state = _State.PENDING
                self._speech_start_samples = frame_start
                self._last_loud_end_samples = self._samples
                self._confirm(events)
        elif self._state is _State.PENDING:
            if keeps:
                self._last_loud_end_samples = self._samples
                self._confirm(events)
            else:
                self._state = _State.SILENCE  # too short: a click, not speech
        elif keeps:
            self._last_loud_end_samples = self._samples
        elif self._samples - self._last_loud_end_samples >= self._to_samples(self.end_of_turn_silence_ms):
            events.append(self._stop())
        return events

    def finish(self) -> list[VadEvent]:
        """The stream ended: closes an utterance still open (its end is the last loud frame)."""
        if self._state is _State.SPEECH:
            return [self._stop()]
        self._state = _State.SILENCE
        return []

    def _confirm(self, events: list[VadEvent]) -> None:
        if self._samples - self._speech_start_samples >= self._to_samples(self.min_speech_ms):
            self._state = _State.SPEECH
            events.append(VadEvent("speech_started", self._ms(self._speech_start_samples)))

    def _stop(self) -> VadEvent:
        self._state = _State.SILENCE
        start, end = self._ms(self._speech_start_samples), self._ms(self._last_loud_end_samples)
        return VadEvent("speech_stopped", end, end - start)

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.sample_rate

    def _to_samples(self, ms: int) -> int:
        return ms * self.sample_rate // 1000


VadKind = Literal["energy", "webrtc", "silero"]
VAD_KINDS: tuple[VadKind, ...] = ("energy", "webrtc", "silero")


def make_judge(kind: VadKind, sample_rate: int = 16_000) -> SpeechJudge:
    """A fresh judge of `kind` for one stream."""
    if kind == "energy":
        return EnergyJudge(sample_rate=sample_rate)
    # Imported when chosen: onnxruntime takes a while to load, and most gateways never need it.
    if kind == "webrtc":
        from streams.audio.vad_webrtc import WebRtcJudge
        return WebRtcJudge(sample_rate=sample_rate)
    if kind == "silero":
        from streams.audio.vad_silero import SileroJudge
        return SileroJudge(sample_rate=sample_rate)
    raise ValueError(f"no VAD {kind!r}; there are {', '.join(VAD_KINDS)}")
