"""Silero's neural voice activity detector as a `SpeechJudge`, on onnxruntime.

The model is the ONNX file faster-whisper ships in its wheel (`faster_whisper/assets/silero_vad_v6.onnx`,
MIT), so it costs no download: a small LSTM that reads 32 ms windows (512 samples at 16 kHz, with the
64 before them as context) and carries its state from one to the next. A frame is judged by the newest
window that ended in it or before it (up to 32 ms behind), as speech from `threshold` and kept going
from `threshold - 0.15`, Silero's own hysteresis. About 110 us of CPU a window, 100 us a 20 ms frame
of sound (docs/performance.md, `voxlog bench vad`): the most accurate judge here, and the dearest by far.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path

import numpy as np
import onnxruntime

RATE = 16_000
WINDOW = 512
CONTEXT = 64
STATE_SHAPE = (1, 1, 128)
KEEP_MARGIN = 0.15
"""Speech goes on while the probability stays above the threshold less this (Silero's own hysteresis)."""
QUIET = 10 ** (-50 / 20)
"""A frame whose every sample is below -50 dBFS of full scale is judged silence without the model."""
QUIET_SAMPLE = math.ceil(QUIET * 32768) - 1
"""The loudest 16-bit sample under `QUIET` (103): the test is made on the frame as it comes, before any
conversion, which is most of what a quiet frame costs."""

_session: onnxruntime.InferenceSession | None = None
_session_lock = threading.Lock()


def _model_path() -> Path:
    """Where faster-whisper's wheel put the model (found without importing faster-whisper and CTranslate2)."""
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Silero's VAD needs the faster-whisper package, which ships its model")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "silero_vad_v6.onnx"
    if not path.is_file():
        raise RuntimeError(f"faster-whisper's Silero VAD model is not at {path}")
    return path


def _shared_session() -> onnxruntime.InferenceSession:
    """One session a process: `run` is thread-safe, and each judge carries its own state."""
    global _session
    with _session_lock:
        if _session is None:
            options = onnxruntime.SessionOptions()
            options.inter_op_num_threads = 1  # a call's frames are small: threads would cost more than they save
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            _session = onnxruntime.InferenceSession(str(_model_path()), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        return _session


class SileroJudge:
    def __init__(self, *, threshold: float = 0.5, sample_rate: int = RATE) -> None:
        if sample_rate != RATE:
            raise ValueError(f"Silero's VAD (this model) takes {RATE} Hz, not {sample_rate}")
        if not KEEP_MARGIN < threshold < 1.0:
            raise ValueError(f"the threshold is a probability above {KEEP_MARGIN} and below 1")
        self._session = _shared_session()
        self._threshold = threshold
        self._h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._pending = np.zeros(CONTEXT, dtype=np.float32)  # the context, then samples not yet in a window
        self._probability = 0.0

    def judge(self, frame: bytes) -> tuple[bool, bool]:
        pcm = np.frombuffer(frame, dtype="<i2")
        if pcm.size and pcm.max() <= QUIET_SAMPLE and pcm.min() >= -QUIET_SAMPLE:
            # A quiet line (a listening caller, a pause) is not speech: the model is not asked, which
            # is most of what it would cost on a clean line. It goes on with this frame as its context.
            tail = pcm[-CONTEXT:].astype(np.float32) / 32768.0
            self._pending = tail if tail.size == CONTEXT else np.concatenate((self._pending, tail))[-CONTEXT:]
            self._probability = 0.0
            return False, False
        pending = np.concatenate((self._pending, pcm.astype(np.float32) / 32768.0))
        windows = (pending.size - CONTEXT) // WINDOW
        for index in range(windows):
            window = pending[index * WINDOW:index * WINDOW + CONTEXT + WINDOW].reshape(1, -1)
            probabilities, self._h, self._c = self._session.run(None, {"input": window, "h": self._h, "c": self._c})
            self._probability = float(probabilities[0])
        self._pending = pending[windows * WINDOW:]
        return self._probability >= self._threshold, self._probability >= self._threshold - KEEP_MARGIN
