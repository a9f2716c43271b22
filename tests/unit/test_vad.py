"""streams.vad: hysteresis, clicks, pauses, noise tracking; synthetic signals and real espeak-ng speech."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streams.audio.codecs import frames
from streams.audio.vad import EnergyJudge, Vad, VadEvent
from tests.speech import noise, require_espeak, silence, synthesize_pcm16, with_noise, with_silence

RATE = 16_000


def tone(ms: int, level_dbfs: float, freq: float = 220.0, rate: int = RATE) -> bytes:
    """A sine whose RMS level is `level_dbfs`."""
    t = np.arange(rate * ms // 1000) / rate
    amplitude = 32768 * 10 ** (level_dbfs / 20) * math.sqrt(2)
    return np.rint(amplitude * np.sin(2 * math.pi * freq * t)).astype("<i2").tobytes()


def run(vad: Vad, audio: bytes, frame_ms: int = 20, *, finish: bool = True) -> list[VadEvent]:
    events: list[VadEvent] = []
    for frame in frames(audio, vad.sample_rate, frame_ms):
        events += vad.process(frame)
    if finish:
        events += vad.finish()
    return events


def utterances(events: list[VadEvent]) -> list[tuple[int, int]]:
    """(start, end) pairs, checking that starts and stops alternate."""
    pairs: list[tuple[int, int]] = []
    start: int | None = None
    for event in events:
        if event.kind == "speech_started":
            assert start is None, events
            start = event.offset_ms
        else:
            assert start is not None, events
            assert event.duration_ms == event.offset_ms - start
            pairs.append((start, event.offset_ms))
            start = None
    assert start is None, events
    return pairs


def test_silence_and_steady_quiet_noise_are_not_speech() -> None:
    assert run(Vad(), silence(5000)) == []
    assert run(Vad(), noise(5000, -60)) == []


def test_a_burst_of_sound_is_one_utterance_with_exact_offsets() -> None:
    events = run(Vad(), silence(1000) + tone(1500, -20) + silence(1000))
    assert events == [
        VadEvent("speech_started", 1000),
        VadEvent("speech_stopped", 2500, 1500),
    ]


def test_speech_stopped_comes_after_the_end_of_turn_silence() -> None:
    vad = Vad(end_of_turn_silence_ms=700)
    audio = silence(500) + tone(1000, -20)
    assert run(vad, audio, finish=False) == [VadEvent("speech_started", 500)]
    stopped_at = None
    for i, frame in enumerate(frames(silence(2000), RATE)):
        if vad.process(frame):
            stopped_at = 1500 + (i + 1) * 20
            break
    assert stopped_at == 1500 + 700
    assert not vad.in_speech


def test_clicks_shorter_than_min_speech_are_ignored() -> None:
    audio = b"".join(silence(400) + tone(length, -10) for length in (20, 40, 60, 100)) + silence(1000)
    assert run(Vad(min_speech_ms=120), audio) == []
    # ... and one just long enough counts.
    assert utterances(run(Vad(min_speech_ms=120), silence(400) + tone(120, -10) + silence(1000))) == [(400, 520)]


def test_pauses_between_words_do_not_split_an_utterance() -> None:
    words = [tone(300, -20), silence(250), tone(400, -22), silence(500), tone(200, -25), silence(650), tone(300, -20)]
    audio = silence(500) + b"".join(words) + silence(1500)
    assert utterances(run(Vad(end_of_turn_silence_ms=700), audio)) == [(500, 500 + 2600)]


def test_a_pause_longer_than_the_end_of_turn_silence_ends_the_turn() -> None:
    audio = silence(500) + tone(500, -20) + silence(900) + tone(500, -20) + silence(1000)
    assert utterances(run(Vad(end_of_turn_silence_ms=700), audio)) == [(500, 1000), (1900, 2400)]


def test_hysteresis_between_the_start_and_stop_thresholds() -> None:
    vad_args = {"start_threshold_dbfs": -40.0, "stop_threshold_dbfs": -50.0}
    # Between the thresholds: not loud enough to start ...
    assert run(Vad(EnergyJudge(**vad_args)), silence(300) + tone(2000, -45) + silence(1000)) == []
    # ... but loud enough to carry on an utterance that started above -40 dBFS.
    audio = silence(300) + tone(300, -30) + tone(2000, -45) + tone(300, -55) + silence(1000)
    assert utterances(run(Vad(EnergyJudge(**vad_args)), audio)) == [(300, 300 + 300 + 2000)]


def test_thresholds_rise_above_the_noise_floor() -> None:
    judge = EnergyJudge(noise_window_ms=3000)
    run(Vad(judge), noise(4000, -45), finish=False)
    start, stop = judge.thresholds()
    assert judge.noise_floor_dbfs == pytest.approx(-45.5, abs=1.0)
    assert start == pytest.approx(judge.noise_floor_dbfs + 15)
    assert stop == pytest.approx(judge.noise_floor_dbfs + 9)
    assert EnergyJudge().thresholds() == (-40.0, -50.0)


def test_loud_steady_noise_is_taken_for_speech_only_until_the_floor_catches_up() -> None:
    """A fan at -35 dBFS switched on: louder than the start threshold, so at first it is 'speech';
    once the noise window no longer holds the quiet before it, the floor rises and that utterance
    ends (its end is where the floor rose). Speech over the noise is then found."""
    vad = Vad(EnergyJudge(noise_window_ms=3000))
    audio = silence(500) + with_noise(silence(4500) + tone(1000, -15) + silence(1500), -35, seed=2)
    pairs = utterances(run(vad, audio))
    assert len(pairs) == 2
    assert pairs[0][0] == 500
    assert pairs[0][1] == pytest.approx(3500, abs=40)  # the last quiet frame leaves the window
    assert pairs[1] == (pytest.approx(5000, abs=40), pytest.approx(6000, abs=40))


def test_finish_closes_an_open_utterance() -> None:
    vad = Vad()
    assert run(vad, silence(200) + tone(600, -20), finish=False) == [VadEvent("speech_started", 200)]
    assert vad.in_speech
    assert vad.finish() == [VadEvent("speech_stopped", 800, 600)]
    assert vad.finish() == []
    assert vad.position_ms == 800


def test_works_at_8khz_and_with_other_frame_sizes() -> None:
    audio8 = tone(800, -20, rate=8000)
    vad = Vad(EnergyJudge(sample_rate=8000), sample_rate=8000)
    events = run(vad, b"\x00\x00" * 4000 + audio8 + b"\x00\x00" * 8000)
    assert utterances(events) == [(500, 1300)]
    assert utterances(run(Vad(), silence(500) + tone(800, -20) + silence(1000), frame_ms=10)) == [(500, 1300)]


def test_is_deterministic() -> None:
    audio = with_noise(silence(300) + tone(700, -25) + silence(400) + tone(300, -30) + silence(1200), -50, seed=3)
    assert run(Vad(), audio) == run(Vad(), audio)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stop threshold"):
        EnergyJudge(start_threshold_dbfs=-50, stop_threshold_dbfs=-40)
    with pytest.raises(ValueError, match="positive"):
        Vad(end_of_turn_silence_ms=0)
    with pytest.raises(ValueError, match="even"):
        Vad().process(b"\x00")
    assert Vad().process(b"") == []


# --- real speech ---------------------------------------------------------------------------------

PHRASES = [
    "i would like to book an appointment for tomorrow at ten",
    "i want to speak to a human",
    "my internet is down",
    "yes",
    "no thank you goodbye",
]


def speech_span_ms(pcm: bytes) -> tuple[int, int]:
    """Where espeak-ng's audio is audible (it pads its output with silence)."""
    x = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int64))
    loud = np.nonzero(x > 300)[0]
    return int(loud[0]) * 1000 // RATE, int(loud[-1]) * 1000 // RATE


@pytest.mark.parametrize("noise_dbfs", [None, -60, -50])
def test_espeak_phrases_are_one_utterance_each(noise_dbfs: float | None) -> None:
    require_espeak()
    audio, expected, at = b"", [], 0
    for text in PHRASES:
        speech = synthesize_pcm16(text)
        first, last = speech_span_ms(speech)
        piece = with_silence(speech, 1500, 1000)
        expected.append((at + 1500 + first, at + 1500 + last))
        audio += piece
        at += len(piece) * 1000 // (2 * RATE)
    if noise_dbfs is not None:
        audio = with_noise(audio, noise_dbfs, seed=5)
    found = utterances(run(Vad(), audio))
    assert len(found) == len(PHRASES), found
    for (start, end), (first, last) in zip(found, expected, strict=True):
        assert first - 60 <= start <= first + 100
        assert last - 150 <= end <= last + 60


def test_the_noise_floor_is_the_quietest_frame_of_the_window() -> None:
    rng = np.random.default_rng(7)
    judge = EnergyJudge(noise_window_ms=200)
    vad = Vad(judge)
    levels: list[tuple[int, float]] = []
    for index in range(300):
        amplitude = float(rng.choice([0.0, 30.0, 300.0, 3000.0])) * (1 + rng.random())
        frame = (amplitude * rng.standard_normal(320)).astype("<i2").tobytes()
        vad.process(frame)
        from streams.audio.codecs import rms_dbfs

        levels.append(((index + 1) * 320, rms_dbfs(frame)))
        horizon = (index + 1) * 320 - 200 * 16
        window = [level for end, level in levels if end > horizon]
        if index >= 10:  # once the window holds only this stream's frames
            assert judge.noise_floor_dbfs == min(window)
