"""Silero's model judging many calls' windows in one run (`SileroBatches`): each stream's probability and
state bit for bit those of its windows run alone, runs shared when calls' windows come together, and a
failure or a call that goes away harming no other call."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from streams.audio import vad_silero
from streams.audio.vad_silero import CONTEXT, STATE_SHAPE, WINDOW, SileroBatches, SileroJudge, streams_model


def windows(count: int, seed: int) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
    """Speech-like windows: noise whose loudness swings, as a voice's does."""
    rng = np.random.default_rng(seed)
    envelope = 0.02 + 0.3 * np.abs(np.sin(np.arange(count) / 3 + seed))
    return [(rng.standard_normal((1, CONTEXT + WINDOW)) * level).astype(np.float32) for level in envelope]


def alone(stream: list[np.ndarray[Any, np.dtype[np.float32]]]) -> list[tuple[float, bytes, bytes]]:
    session = vad_silero._shared_session()
    h = c = np.zeros(STATE_SHAPE, dtype=np.float32)
    out = []
    for window in stream:
        probability, h, c = session.run(None, {"input": window, "h": h, "c": c})
        out.append((float(probability[0]), h.tobytes(), c.tobytes()))
    return out


async def together(batches: SileroBatches, stream: list[np.ndarray[Any, np.dtype[np.float32]]],
                   ) -> list[tuple[float, bytes, bytes]]:
    h = c = np.zeros(STATE_SHAPE, dtype=np.float32)
    out = []
    for window in stream:
        probability, h, c = await batches.judge(window, h, c)
        out.append((probability, h.tobytes(), c.tobytes()))
    return out


async def test_streams_judged_together_get_what_each_gets_alone_bit_for_bit() -> None:
    streams = [windows(40, seed) for seed in range(24)]
    streams[5] = streams[5][:7]  # a call that ends early: the others go on in smaller runs
    batches = SileroBatches(vad_silero._shared_session())
    results = await asyncio.gather(*(together(batches, stream) for stream in streams))
    assert results == [alone(stream) for stream in streams]
    assert batches.windows == sum(len(stream) for stream in streams)
    assert batches.runs == 40, "the windows of each step, asked for together, are one run"


def test_the_model_as_shipped_reads_its_windows_as_one_streams_steps() -> None:
    """Why the graph is changed: as shipped, two windows are two steps of one stream (the second's
    probability depends on the first), and the state has room for one stream only."""
    shipped = onnxruntime.InferenceSession(str(vad_silero._model_path()), providers=["CPUExecutionProvider"])
    first, second = windows(2, seed=1)
    h = c = np.zeros(STATE_SHAPE, dtype=np.float32)
    both, _, _ = shipped.run(None, {"input": np.concatenate((first, second)), "h": h, "c": c})
    after_first = shipped.run(None, {"input": first, "h": h, "c": c})
    stepped, _, _ = shipped.run(None, {"input": second, "h": after_first[1], "c": after_first[2]})
    assert float(both[1]) == float(stepped[0])
    with pytest.raises(Exception, match="h"):
        shipped.run(None, {"input": np.concatenate((first, second)), "h": np.zeros((1, 2, 128), np.float32),
                           "c": np.zeros((1, 2, 128), np.float32)})


def test_a_model_of_another_shape_is_refused_by_name() -> None:
    model = onnx.load(vad_silero._model_path())
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Transpose" and list(attribute.ints) == [0, 2, 1]:
                attribute.ints[:] = [0, 1, 2]
    with pytest.raises(RuntimeError, match="not the graph voxlog knows how to batch"):
        streams_model(model)


class FailingOnce:
    """onnxruntime's session, failing the first run it is asked for."""

    def __init__(self) -> None:
        self.session = vad_silero._shared_session()
        self.failed = False

    def run(self, outputs: Any, feed: dict[str, Any]) -> Any:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the model could not run")
        return self.session.run(outputs, feed)


async def test_a_failed_run_fails_its_windows_and_the_next_windows_are_judged() -> None:
    batches = SileroBatches(FailingOnce())
    h = c = np.zeros(STATE_SHAPE, dtype=np.float32)
    first = await asyncio.gather(*(batches.judge(window, h, c) for window in windows(3, seed=2)),
                                 return_exceptions=True)
    assert [str(result) for result in first] == ["the model could not run"] * 3
    later = await batches.judge(windows(1, seed=2)[0], h, c)
    assert later[0] == alone(windows(1, seed=2))[0][0]


async def test_a_call_that_stops_waiting_does_not_stop_the_others() -> None:
    batches = SileroBatches(vad_silero._shared_session())
    h = c = np.zeros(STATE_SHAPE, dtype=np.float32)
    gone = asyncio.ensure_future(batches.judge(windows(1, seed=3)[0], h, c))
    staying = asyncio.ensure_future(batches.judge(windows(1, seed=4)[0], h, c))
    await asyncio.sleep(0)  # both wait for the run, which has not begun
    gone.cancel()
    probability, _, _ = await staying
    assert probability == alone(windows(1, seed=4))[0][0]
    assert gone.cancelled()
    assert (batches.runs, batches.windows) == (1, 1), "the window nobody waits for is not run"


async def test_a_judge_judges_the_same_batched_or_not() -> None:
    frames = [(np.sin(np.arange(320) / (3 + step % 5)) * (3000 if step % 40 < 25 else 50)).astype("<i2").tobytes()
              for step in range(200)]
    plain, batched = SileroJudge(), SileroJudge()
    for frame in frames:
        assert plain.judge(frame) == await batched.judge_batched(frame)
