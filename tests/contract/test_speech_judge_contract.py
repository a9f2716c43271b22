"""What every speech judge (`SpeechJudge`, streams/audio/vad.py) must do under the turn-taking `Vad`,
whatever decides: the energy level, WebRTC's detector, Silero's model. Each runs for real on
espeak-ng's speech; the noisy lines are `voxlog bench vad`'s own (voxlog/bench_vad.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.audio.codecs import frames
from streams.audio.vad import VAD_KINDS, Vad, VadEvent, VadKind, make_judge
from tests.speech import require_espeak, silence, synthesize_pcm16, with_noise, with_silence
from voxlog.bench_vad import Condition, judge_line, phone_line, speech_at_level

RATE = 16_000
PHRASES = ("i would like to book an appointment for tomorrow at ten", "my internet is down", "yes")


def run(vad: Vad, audio: bytes, frame_ms: int = 20) -> list[VadEvent]:
    events: list[VadEvent] = []
    for frame in frames(audio, RATE, frame_ms):
        events += vad.process(frame)
    return events + vad.finish()


def spoken() -> tuple[bytes, list[tuple[int, int]]]:
    """The phrases, 1.5 s of line before each and 1 s after, with where each is audible (ms)."""
    audio, spans, at = b"", [], 0
    for text in PHRASES:
        speech = synthesize_pcm16(text)
        loud = np.nonzero(np.abs(np.frombuffer(speech, dtype="<i2").astype(np.int64)) > 300)[0]
        spans.append((at + 1500 + int(loud[0]) * 1000 // RATE, at + 1500 + int(loud[-1]) * 1000 // RATE))
        piece = with_silence(speech, 1500, 1000)
        audio += piece
        at += len(piece) * 1000 // (2 * RATE)
    return audio, spans


@pytest.fixture(params=VAD_KINDS)
def kind(request: pytest.FixtureRequest) -> VadKind:
    return request.param  # type: ignore[no-any-return]


@pytest.mark.parametrize("hiss_dbfs", [None, -55])
@pytest.mark.parametrize("frame_ms", [20, 10, 30])
def test_each_phrase_is_one_turn_where_it_is_spoken(kind: VadKind, hiss_dbfs: float | None, frame_ms: int) -> None:
    require_espeak()
    audio, spans = spoken()
    if hiss_dbfs is not None:
        audio = with_noise(audio, hiss_dbfs, seed=11)
    events = run(Vad(make_judge(kind)), audio, frame_ms)
    starts = [e.offset_ms for e in events if e.kind == "speech_started"]
    stops = [e.offset_ms for e in events if e.kind == "speech_stopped"]
    assert len(starts) == len(stops) == len(PHRASES), events
    for start, stop, (first, last) in zip(starts, stops, spans, strict=True):
        assert first - 100 <= start <= first + 250, (kind, events, spans)
        assert last - 300 <= stop <= last + 150, (kind, events, spans)


def test_silence_is_never_speech(kind: VadKind) -> None:
    assert run(Vad(make_judge(kind)), silence(4000)) == []


def test_the_same_frames_give_the_same_turns(kind: VadKind) -> None:
    require_espeak()
    audio = with_noise(spoken()[0], -50, seed=3)
    assert run(Vad(make_judge(kind)), audio) == run(Vad(make_judge(kind)), audio)


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.tuples(st.integers(0, 2000), st.sampled_from([0, 30, 300, 3000, 20000])),
                       min_size=1, max_size=40),
       kind=st.sampled_from(VAD_KINDS))
def test_any_frames_any_sizes_a_frame_that_starts_speech_keeps_it(pieces: list[tuple[int, int]], kind: VadKind) -> None:
    """Frames of any length (whole samples), silent to clipping: a judgement for each, and hysteresis
    one way only (what may start speech also keeps it going)."""
    judge = make_judge(kind)
    rng = np.random.default_rng(len(pieces))
    for samples, amplitude in pieces:
        frame = np.clip(amplitude * rng.standard_normal(samples), -32768, 32767).astype("<i2").tobytes()
        starts, keeps = judge.judge(frame)
        assert isinstance(starts, bool)
        assert isinstance(keeps, bool)
        assert keeps or not starts


def test_an_unknown_judge_or_rate_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="no VAD 'loud'; there are energy, webrtc, silero"):
        make_judge("loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="WebRTC's VAD takes 8000, 16000, 32000, 48000 Hz, not 11025"):
        make_judge("webrtc", 11_025)
    with pytest.raises(ValueError, match="Silero's VAD \\(this model\\) takes 16000 Hz, not 8000"):
        make_judge("silero", 8000)


@pytest.mark.parametrize(("noise", "level"), [("rumble", -35.0), ("hiss", -25.0), ("clicks", -35.0)])
async def test_silero_takes_turns_on_a_noisy_phone_line(noise: str, level: float) -> None:
    """Why `vad: silero` exists: on these lines the energy judge holds the turn open from the first
    noise on, so the agent never answers (docs/performance.md, `voxlog bench vad`)."""
    require_espeak()
    speech = [await speech_at_level(text) for text in PHRASES]
    pcm, spans = phone_line(speech, noise, level, seed=5, babble=speech)
    tally = judge_line("silero", Condition(f"{noise} {level}", pcm, spans))
    assert (tally.missed, tally.stuck, tally.false_starts) == (0, 0, 0), tally
    assert len(tally.end_ms) == len(PHRASES)
