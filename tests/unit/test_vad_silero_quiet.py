"""Silero's judge passes quiet frames by without the model, tested on the 16-bit samples as they come:
the same frames must be quiet, and the model must see the same windows, as when each frame was first
converted to floats and its loudest sample compared with -50 dBFS."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.audio import vad_silero
from streams.audio.vad_silero import CONTEXT, KEEP_MARGIN, QUIET, WINDOW, SileroJudge

_Floats = npt.NDArray[np.float32]


class CountingModel:
    """Stands in for onnxruntime's session: a probability from the window's samples, and each window kept."""

    def __init__(self) -> None:
        self.windows: list[_Floats] = []

    def run(self, _outputs: Any, feed: dict[str, Any]) -> tuple[_Floats, Any, Any]:
        window = feed["input"]
        self.windows.append(window.copy())
        probability = np.float32(min(1.0, float(np.abs(window).mean()) * 20))
        return np.array([probability], dtype=np.float32), feed["h"], feed["c"]


def judge_with(model: CountingModel) -> SileroJudge:
    judge = SileroJudge()
    judge._session = model  # type: ignore[assignment]
    return judge


class FloatReference:
    """The judge as first written: every frame to floats, then its loudest sample against `QUIET`."""

    def __init__(self, model: CountingModel, threshold: float = 0.5) -> None:
        self.model, self.threshold = model, threshold
        self.pending: _Floats = np.zeros(CONTEXT, dtype=np.float32)
        self.probability = 0.0

    def judge(self, frame: bytes) -> tuple[bool, bool]:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
        if samples.size and float(np.max(np.abs(samples))) < QUIET:
            self.pending = np.concatenate((self.pending, samples))[-CONTEXT:]
            self.probability = 0.0
            return False, False
        pending = np.concatenate((self.pending, samples))
        windows = (pending.size - CONTEXT) // WINDOW
        for index in range(windows):
            window = pending[index * WINDOW:index * WINDOW + CONTEXT + WINDOW].reshape(1, -1)
            probabilities, _, _ = self.model.run(None, {"input": window, "h": None, "c": None})
            self.probability = float(probabilities[0])
        self.pending = pending[windows * WINDOW:]
        return self.probability >= self.threshold, self.probability >= self.threshold - KEEP_MARGIN


def frame_of(samples: list[int]) -> bytes:
    return np.array(samples, dtype="<i2").tobytes()


def test_the_loudest_quiet_sample_is_103_either_way() -> None:
    for edge in (103, -103):
        model = CountingModel()
        judge = judge_with(model)
        assert judge.judge(frame_of([edge] * 640)) == (False, False)
        assert model.windows == [], f"a frame peaking at {edge} is quiet: the model is not asked"
    for loud in (104, -104, -32768):
        model = CountingModel()
        judge_with(model).judge(frame_of([0] * 639 + [loud]))
        assert len(model.windows) == 1, f"a frame with a sample of {loud} goes to the model"


def test_a_short_quiet_frame_keeps_the_context_it_extends() -> None:
    model = CountingModel()
    judge = judge_with(model)
    judge.judge(frame_of([50] * 320))
    judge.judge(frame_of([-7] * 10))
    judge.judge(frame_of([5000] * 512))
    expected = np.array([50] * 54 + [-7] * 10 + [5000] * 512, dtype=np.float32) / 32768.0
    assert np.array_equal(model.windows[0][0], expected)


samples = st.one_of(st.integers(-110, 110), st.integers(-32768, 32767))
frames = st.lists(st.lists(samples, min_size=0, max_size=700), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(frames)
def test_the_same_frames_are_quiet_and_the_same_windows_reach_the_model_as_in_floats(
        sequence: list[list[int]]) -> None:
    ours, theirs = CountingModel(), CountingModel()
    judge, reference = judge_with(ours), FloatReference(theirs)
    for samples_ in sequence:
        frame = frame_of(samples_)
        assert judge.judge(frame) == reference.judge(frame)
    assert len(ours.windows) == len(theirs.windows)
    for mine, reference_window in zip(ours.windows, theirs.windows, strict=True):
        assert np.array_equal(mine, reference_window)


def test_quiet_sample_is_the_largest_integer_under_quiet() -> None:
    assert vad_silero.QUIET_SAMPLE / 32768 < QUIET <= (vad_silero.QUIET_SAMPLE + 1) / 32768
