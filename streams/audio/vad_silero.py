"""Silero's neural voice activity detector as a `SpeechJudge`, on onnxruntime.

The model is the ONNX file faster-whisper ships in its wheel (`faster_whisper/assets/silero_vad_v6.onnx`,
MIT), so it costs no download: a small LSTM that reads 32 ms windows (512 samples at 16 kHz, with the
64 before them as context) and carries its state from one to the next. A frame is judged by the newest
window that ended in it or before it (up to 32 ms behind), as speech from `threshold` and kept going
from `threshold - 0.15`, Silero's own hysteresis. About 55 us of CPU a window on its own (`voxlog bench
vad`, docs/performance.md): the most accurate judge here, and the dearest by far.

A gateway's calls judge their windows together (`judge_batched`, `SileroBatches`): the windows of every
call that waits are one run of the model, in a thread of its own, while the event loop goes on with the
calls. The file's graph reads its windows as one stream's steps in time; `streams_model` turns it to
read them as one step each of as many streams, which is all that changes, and each stream's
probability and state come out bit for bit as when it runs alone (tests/unit/test_vad_silero_batches.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import onnxruntime

if TYPE_CHECKING:
    import onnx

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
MOST_STREAMS = 256
"""Windows in one run of the model at most (8 ms of CPU): more wait for the next run."""

_Floats = npt.NDArray[np.float32]
_Judged = tuple[float, _Floats, _Floats]
"""A window's speech probability, and the stream's LSTM state (h, c) after it."""

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


def streams_model(model: onnx.ModelProto) -> bytes:
    """The model reading its N windows as one step of N streams, not N steps of one.

    Its encoder judges each window alone; the transpose before the LSTM makes the encoder's windows the
    LSTM's time axis, with a batch of one. Swapping those two axes makes them the batch, with one step
    of time, and the state's batch axis (fixed at 1 in the file) follows the input's. The decoder after
    the LSTM works on each window alone either way."""
    transposes = [node for node in model.graph.node
                  if node.op_type == "Transpose" and any(n.op_type == "LSTM" and node.output[0] in n.input
                                                         for n in model.graph.node)]
    perms = [list(attribute.ints) for node in transposes for attribute in node.attribute if attribute.name == "perm"]
    if len(transposes) != 1 or perms != [[0, 2, 1]]:
        raise RuntimeError(f"Silero's VAD model at {_model_path()} is not the graph voxlog knows how to batch "
                           f"(a [0, 2, 1] transpose into its LSTM; found {perms})")
    for attribute in transposes[0].attribute:
        if attribute.name == "perm":
            attribute.ints[:] = [2, 0, 1]
    for value in (*model.graph.input, *model.graph.output):
        if value.name in ("h", "c", "hn", "cn"):
            batch = value.type.tensor_type.shape.dim[1]
            batch.ClearField("dim_value")
            batch.dim_param = "streams"
    serialized: bytes = model.SerializeToString()
    return serialized


def _shared_session() -> onnxruntime.InferenceSession:
    """One session a process: `run` is thread-safe, and each judge carries its own state."""
    global _session
    with _session_lock:
        if _session is None:
            options = onnxruntime.SessionOptions()
            options.inter_op_num_threads = 1  # a call's frames are small: threads would cost more than they save
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            import onnx  # here, not above: it takes about half a second, paid where the model is loaded
            _session = onnxruntime.InferenceSession(streams_model(onnx.load(_model_path())), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        return _session


class SileroBatches:
    """Windows of many streams judged in one run of the model, in a thread of its own.

    A window waits only while a run is under way: the first is run as soon as the event loop comes
    round, with those asked for in the same pass; those asked for during a run go in the next. So one
    call alone is judged at once, and many calls, whose windows come together, share runs. One per
    event loop (`for_this_loop`): its futures belong to the loop."""

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self._session = session
        self._waiting: list[tuple[_Floats, _Floats, _Floats, asyncio.Future[_Judged]]] = []
        self._running: asyncio.Task[None] | None = None
        self.runs = 0
        self.windows = 0

    async def judge(self, window: _Floats, h: _Floats, c: _Floats) -> _Judged:
        loop = asyncio.get_running_loop()
        judged: asyncio.Future[_Judged] = loop.create_future()
        self._waiting.append((window, h, c, judged))
        if self._running is None:
            self._running = loop.create_task(self._run(), name="silero-batches")
        return await judged

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[_Floats, _Floats, _Floats, asyncio.Future[_Judged]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MOST_STREAMS], self._waiting[MOST_STREAMS:]
                batch = [item for item in batch if not item[3].done()]  # a call that ended meanwhile
                if not batch:
                    continue
                windows = np.concatenate([item[0] for item in batch])
                hs = np.concatenate([item[1] for item in batch], axis=1)
                cs = np.concatenate([item[2] for item in batch], axis=1)
                try:
                    probabilities, hn, cn = await loop.run_in_executor(_model_thread(), self._infer, windows, hs, cs)
                except Exception as exc:  # each waiting stream fails as its own run would have
                    for *_, judged in batch:
                        if not judged.done():
                            judged.set_exception(exc)
                    continue
                self.runs += 1
                self.windows += len(batch)
                for index, (*_, judged) in enumerate(batch):
                    if not judged.done():
                        judged.set_result((float(probabilities[index]), hn[:, index:index + 1],
                                           cn[:, index:index + 1]))
        finally:
            self._running = None
            for *_, judged in (*batch, *self._waiting):  # cancelled (the loop closing): no answer comes
                if not judged.done():
                    judged.cancel()
            self._waiting.clear()

    def _infer(self, windows: _Floats, h: _Floats, c: _Floats) -> tuple[_Floats, _Floats, _Floats]:
        probabilities, hn, cn = self._session.run(None, {"input": windows, "h": h, "c": c})
        return probabilities, hn, cn


_thread: ThreadPoolExecutor | None = None


def _model_thread() -> ThreadPoolExecutor:
    """The thread the batches run in, one a process: the model's runs take turns, off every event loop."""
    global _thread
    with _session_lock:
        if _thread is None:
            _thread = ThreadPoolExecutor(1, thread_name_prefix="silero-vad")
        return _thread


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SileroBatches] = weakref.WeakKeyDictionary()


def for_this_loop() -> SileroBatches:
    """The running event loop's batches (made at its first window)."""
    loop = asyncio.get_running_loop()
    batches = _batches.get(loop)
    if batches is None:
        batches = _batches[loop] = SileroBatches(_shared_session())
    return batches


def model_runs() -> dict[str, int]:
    """This process's runs of the model for calls judged together (`judge_batched`), and the windows
    they judged."""
    everyone = list(_batches.values())
    return {"runs": sum(batches.runs for batches in everyone), "windows": sum(batches.windows for batches in everyone)}


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
        for window in self._windows(frame):
            probabilities, self._h, self._c = self._session.run(None, {"input": window, "h": self._h, "c": self._c})
            self._probability = float(probabilities[0])
        return self._verdict()

    async def judge_batched(self, frame: bytes) -> tuple[bool, bool]:
        """`judge`, the model run with other streams' windows (`SileroBatches`): the same answers."""
        for window in self._windows(frame):
            self._probability, self._h, self._c = await for_this_loop().judge(window, self._h, self._c)
        return self._verdict()

    def _windows(self, frame: bytes) -> list[_Floats]:
        """The windows the frame completes, in order, for the model; none for a quiet frame."""
        pcm = np.frombuffer(frame, dtype="<i2")
        if pcm.size and pcm.max() <= QUIET_SAMPLE and pcm.min() >= -QUIET_SAMPLE:
            # A quiet line (a listening caller, a pause) is not speech: the model is not asked, which
            # is most of what it would cost on a clean line. It goes on with this frame as its context.
            tail = pcm[-CONTEXT:].astype(np.float32) / 32768.0
            self._pending = tail if tail.size == CONTEXT else np.concatenate((self._pending, tail))[-CONTEXT:]
            self._probability = 0.0
            return []
        pending = np.concatenate((self._pending, pcm.astype(np.float32) / 32768.0))
        count = (pending.size - CONTEXT) // WINDOW
        self._pending = pending[count * WINDOW:]
        return [pending[index * WINDOW:index * WINDOW + CONTEXT + WINDOW].reshape(1, -1) for index in range(count)]

    def _verdict(self) -> tuple[bool, bool]:
        return self._probability >= self._threshold, self._probability >= self._threshold - KEEP_MARGIN
