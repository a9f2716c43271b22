"""Voice activity detection: when the caller starts talking, and when their turn is over.

A deterministic, energy-based detector for 20 ms frames of 16-bit PCM (16 kHz by default). Each
frame's RMS level is compared with two thresholds (hysteresis): speech starts once the level has
stayed above the *start* threshold's region for `min_speech_ms` (so a click does not count), and
the turn ends once it has stayed below the lower *stop* threshold for `end_of_turn_silence_ms`
(so the short pauses between words do not split an utterance).

Both thresholds follow the line's noise: the noise floor is the quietest frame of the last few
seconds (minimum statistics), and a threshold is never less than the floor plus a margin. The
same frames always give the same events: nothing depends on time or randomness.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from streams.audio.codecs import SILENCE_DBFS, rms_dbfs

__all__ = ["Vad", "VadEvent"]


@dataclass(frozen=True, slots=True)
class VadEvent:
    """`speech_started`: offset_ms is where the speech began, in ms from the start of the stream.

    `speech_stopped`: offset_ms is where the speech ended (the end of its last loud frame, not
    the later moment the silence made the detector sure), and duration_ms how long it lasted.
    """

    kind: Literal["speech_started", "speech_stopped"]
    offset_ms: int
    duration_ms: int = 0


class _State(Enum):
    SILENCE = "silence"
    PENDING = "pending"  # loud, but not yet for min_speech_ms
    SPEECH = "speech"


class Vad:
    """Energy VAD with hysteresis and noise-floor tracking; feed it frames in order with `process`.

    Args:
        start_threshold_dbfs: a frame this loud or louder may start speech.
        stop_threshold_dbfs: while speaking, a frame quieter than this counts as silence.
        min_speech_ms: how long the level must stay above the stop threshold, from a frame above
            the start threshold, before it is speech; shorter bursts (clicks, pops) are ignored.
        end_of_turn_silence_ms: how long the silence must last to end the utterance.
        start_margin_db, stop_margin_db: the thresholds are at least this far above the noise floor.
        noise_window_ms: how far back the noise floor looks (the quietest frame in that window).
        sample_rate: of the PCM frames.
    """

    def __init__(
        self,
        start_threshold_dbfs: float = -40.0,
        stop_threshold_dbfs: float = -50.0,
        min_speech_ms: int = 120,
        end_of_turn_silence_ms: int = 700,
        *,
        start_margin_db: float = 15.0,
        stop_margin_db: float = 9.0,
        noise_window_ms: int = 3000,
        sample_rate: int = 16_000,
    ) -> None:
        if stop_threshold_dbfs > start_threshold_dbfs:
            raise ValueError("the stop threshold must not be above the start threshold")
        if min_speech_ms < 0 or end_of_turn_silence_ms <= 0 or noise_window_ms <= 0 or sample_rate <= 0:
            raise ValueError("durations and the sample rate must be positive")
        self.start_threshold_dbfs = start_threshold_dbfs
        self.stop_threshold_dbfs = stop_threshold_dbfs
        self.min_speech_ms = min_speech_ms
        self.end_of_turn_silence_ms = end_of_turn_silence_ms
        self.start_margin_db = start_margin_db
        self.stop_margin_db = stop_margin_db
        self.noise_window_ms = noise_window_ms
        self.sample_rate = sample_rate

        self._samples = 0  # samples seen: the stream position
        self._state = _State.SILENCE
        self._speech_start_samples = 0  # where the pending or current speech began
        self._last_loud_end_samples = 0  # end of the latest frame above the stop threshold
        # (end sample, level) of the frames in the noise window that could still be its minimum:
        # levels rise from front to back, so the front is the floor (a sliding-window minimum, O(1)
        # a frame). It starts full of silence, so the first frames of a stream, speech or not, are
        # judged by the fixed thresholds alone.
        self._levels: deque[tuple[int, float]] = deque([(0, SILENCE_DBFS)])

    @property
    def in_speech(self) -> bool:
        """True between `speech_started` and `speech_stopped`."""
        return self._state is _State.SPEECH

    @property
    def position_ms(self) -> int:
        """How much audio has been processed, in ms."""
        return self._ms(self._samples)

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

    def process(self, frame: bytes) -> list[VadEvent]:
        """Feeds the next frame (20 ms is the intended size; any whole number of samples works)."""
        if len(frame) % 2:
            raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(frame)}")
        if not frame:
            return []
        level = rms_dbfs(frame)
        start_threshold, stop_threshold = self.thresholds()  # from the frames before this one
        frame_start = self._samples
        self._samples += len(frame) // 2
        self._remember(level)

        events: list[VadEvent] = []
        if self._state is _State.SILENCE:
            if level >= start_threshold:
                self._state = _State.PENDING
                self._speech_start_samples = frame_start
                self._last_loud_end_samples = self._samples
                self._confirm(events)
        elif self._state is _State.PENDING:
            if level >= stop_threshold:
                self._last_loud_end_samples = self._samples
                self._confirm(events)
            else:
                self._state = _State.SILENCE  # too short: a click, not speech
        elif level >= stop_threshold:
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

    def _remember(self, level: float) -> None:
        while self._levels and self._levels[-1][1] >= level:
            self._levels.pop()  # never the minimum again: this quieter or equal frame outlives it
        self._levels.append((self._samples, level))
        horizon = self._samples - self._to_samples(self.noise_window_ms)
        while self._levels and self._levels[0][0] <= horizon:
            self._levels.popleft()

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.sample_rate

    def _to_samples(self, ms: int) -> int:
        return ms * self.sample_rate // 1000
