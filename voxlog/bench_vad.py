"""`voxlog bench vad`: the speech judges (`streams.audio.vad`) on a noisy phone line, for accuracy and cost.

**The line.** For each noise and level, one stream: each of `SENTENCES` spoken by each synthetic voice
(espeak-ng, flite) at -22 dBFS, with 3 s of line before each and after the last, the noise running
under all of it; made at 8 kHz, through G.711 mu-law and back to 16 kHz, as the gateway decodes
Twilio's frames. The noises, from a fixed seed: hiss (white), pink (an office's air), rumble (brown:
a car), hum (60 Hz and its harmonics: a bad ground), clicks (a keyboard: 3 ms bursts, about four a
second) and babble (other people talking: six sentences of another voice at once); each at -45, -35
and -25 dBFS (about 23, 13 and 3 dB below the caller), and a clean line.

**What is counted**, each judge under the same turn-taking (`Vad`: 120 ms to start, 700 ms of silence
to end a turn), 20 ms frames as the session feeds them:
- *false starts*: a `speech_started` not within 250 ms of an utterance, per minute of line without
  speech. While the agent speaks, each is a false barge-in: the agent stops mid-sentence;
- *noise as speech*: the share of the line without speech (past each utterance's 700 ms hangover)
  during which a turn is open: a turn the noise opened and holds;
- *missed*: utterances that start no speech;
- *stuck*: utterances whose turn did not end within 3 s of their last word (the noise held it
  open, so the agent does not answer), and *split* ones (two turns or more);
- *onset*: from the first word to when the VAD said `speech_started` (its confirmation); *end*: from
  the last word to `speech_stopped` (the 700 ms included): the delay every answer starts with;
- *cost*: CPU microseconds a 20 ms frame, judge and turn-taking together.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.audio.codecs import frames, mulaw_to_pcm16, pcm16_to_mulaw, resample_pcm16
from streams.audio.formats import FRAME_MS, MULAW_RATE, PCM_RATE
from streams.audio.vad import VAD_KINDS, Vad, VadKind, make_judge
from voxlog.bench import percentile, run_facts
from voxlog.bench_asr import SENTENCES, VOICES, speak, synthetic_voice

BABBLE_VOICE = "espeak-ng:en-gb"
NOISES = ("hiss", "pink", "rumble", "hum", "clicks", "babble")
NOISE_LEVELS_DBFS = (-45.0, -35.0, -25.0)
SPEECH_DBFS = -22.0
GAP_MS = 3000
MATCH_MS = 250
"""A start this near an utterance is that utterance's."""
STUCK_MS = 3000
_Float = npt.NDArray[np.float64]


@dataclass
class Condition:
    """One stream: the 16 kHz line as the VAD hears it, and where the speech is in it (ms)."""
    name: str
    pcm16k: bytes
    spans: list[tuple[int, int]]


@dataclass
class Tally:
    frames: int = 0
    cpu_s: float = 0.0
    utterances: int = 0
    missed: int = 0
    stuck: int = 0
    split: int = 0
    false_starts: int = 0
    line_s: float = 0.0
    noise_as_speech_s: float = 0.0
    onset_ms: list[float] = field(default_factory=list)
    end_ms: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for name in ("frames", "cpu_s", "utterances", "missed", "stuck", "split", "false_starts", "line_s",
                     "noise_as_speech_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.onset_ms += other.onset_ms
        self.end_ms += other.end_ms

    def figures(self) -> dict[str, Any]:
        def spread(values: list[float]) -> dict[str, float | None]:
            return {"p50": round(statistics.median(values)) if values else None,
                    "p90": round(percentile(values, 0.9)) if values else None}
        return {
            "utterances": self.utterances, "missed": self.missed, "stuck": self.stuck, "split": self.split,
            "false_starts": self.false_starts,
            "false_starts_per_min": round(self.false_starts / (self.line_s / 60), 2) if self.line_s else None,
            "noise_as_speech_pct": round(100 * self.noise_as_speech_s / self.line_s, 1) if self.line_s else None,
            "onset_ms": spread(self.onset_ms), "end_ms": spread(self.end_ms),
            "cpu_us_per_frame": round(self.cpu_s / self.frames * 1e6, 2) if self.frames else None,
        }


def _gain(signal: _Float, dbfs: float) -> float:
    """What `signal` is multiplied by for its RMS to be `dbfs`."""
    rms = float(np.sqrt(np.mean(signal * signal))) or 1.0
    return 32768.0 * 10 ** (dbfs / 20) / rms


def _at_level(signal: _Float, dbfs: float) -> _Float:
    return signal * _gain(signal, dbfs)


def _speech_span(pcm: _Float) -> tuple[int, int]:
    """Where the speech is audible in the synthesiser's output (it pads with silence), in samples."""
    loud = np.nonzero(np.abs(pcm) > 0.02 * float(np.max(np.abs(pcm))))[0]
    return int(loud[0]), int(loud[-1]) + 1


def active_level(pcm: _Float, dbfs: float) -> _Float:
    """`pcm` scaled so that its audible part is at `dbfs`."""
    first, last = _speech_span(pcm)
    return pcm * _gain(pcm[first:last], dbfs)


def noise(kind: str, samples: int, dbfs: float, rng: np.random.Generator, babble: Sequence[_Float]) -> _Float:
    """`samples` of the named noise at 8 kHz whose RMS is `dbfs` (clicks: each burst's)."""
    if kind == "hiss":
        return _at_level(rng.normal(size=samples), dbfs)
    if kind in ("pink", "rumble"):  # white noise shaped in frequency: 1/f (pink) or 1/f^2 (brown)
        spectrum = np.fft.rfft(rng.normal(size=samples))
        freqs = np.maximum(np.fft.rfftfreq(samples, 1 / MULAW_RATE), 20.0)
        spectrum /= np.sqrt(freqs) if kind == "pink" else freqs
        return _at_level(np.fft.irfft(spectrum, samples), dbfs)
    if kind == "hum":
        t = np.arange(samples) / MULAW_RATE
        return _at_level(sum((np.sin(2 * np.pi * 60 * h * t + h) / h for h in range(1, 8)), np.zeros(samples)), dbfs)
    if kind == "clicks":
        out = np.zeros(samples)
        burst = MULAW_RATE * 3 // 1000
        shape = rng.normal(size=burst) * np.exp(-np.arange(burst) / (burst / 4))
        shape = _at_level(shape, dbfs)
        for at in np.cumsum(rng.integers(MULAW_RATE // 8, MULAW_RATE // 2, size=samples // (MULAW_RATE // 8))):
            if at + burst > samples:
                break
            out[at:at + burst] += shape
        return out
    if kind == "babble":
        out = np.zeros(samples)
        for talker in babble:  # each talker loops its sentence from a place of its own
            start = int(rng.integers(0, talker.size))
            out += np.resize(np.roll(talker, -start), samples)
        return _at_level(out, dbfs)
    raise ValueError(f"unknown noise {kind!r}")


def phone_line(speech: Sequence[_Float], noise_kind: str | None, noise_dbfs: float, seed: int,
               babble: Sequence[_Float]) -> tuple[bytes, list[tuple[int, int]]]:
    """The utterances with `GAP_MS` of line around each, the noise under all, through mu-law to 16 kHz;
    with where each utterance is audible (ms)."""
    gap = np.zeros(MULAW_RATE * GAP_MS // 1000)
    pieces, spans, at = [gap], [], gap.size
    for utterance in speech:
        first, last = _speech_span(utterance)
        spans.append(((at + first) * 1000 // MULAW_RATE, (at + last) * 1000 // MULAW_RATE))
        pieces += [utterance, gap]
        at += utterance.size + gap.size
    line = np.concatenate(pieces)
    if noise_kind is not None:
        line += noise(noise_kind, line.size, noise_dbfs, np.random.default_rng(seed), babble)
    narrow = np.clip(np.rint(line), -32768, 32767).astype("<i2").tobytes()
    return resample_pcm16(mulaw_to_pcm16(pcm16_to_mulaw(narrow)), MULAW_RATE, PCM_RATE), spans


async def speech_at_level(sentence: str, voice: str = VOICES[0]) -> _Float:
    """`sentence` spoken by `voice` at 8 kHz, its audible part at `SPEECH_DBFS`."""
    tts, name = synthetic_voice(voice)
    pcm = await speak(tts, name, sentence, MULAW_RATE)
    return active_level(np.frombuffer(pcm, dtype="<i2").astype(np.float64), SPEECH_DBFS)


async def conditions(voices: Sequence[str], sentences: Sequence[str]) -> list[Condition]:
    """The clean line, then every noise at every level, over the same speech."""
    speech = [await speech_at_level(sentence, voice) for voice in voices for sentence in sentences]
    tts, voice = synthetic_voice(BABBLE_VOICE)
    babble = [np.frombuffer(await speak(tts, voice, s, MULAW_RATE), dtype="<i2").astype(np.float64)
              for s in SENTENCES[-6:]]
    out = [Condition("clean", *phone_line(speech, None, 0.0, 0, babble))]
    for seed, kind in enumerate(NOISES, start=1):
        for level in NOISE_LEVELS_DBFS:
            out.append(Condition(f"{kind} {level:.0f} dBFS", *phone_line(speech, kind, level, seed, babble)))
    return out


def _turns(said: list[tuple[str, int, int]], end_ms: int) -> list[tuple[int, int, int | None]]:
    """(where it started, when the VAD said so, when it said it ended or None) of each turn."""
    turns: list[tuple[int, int, int | None]] = []
    for what, offset, when in said:
        if what == "speech_started":
            turns.append((offset, when, None))
        elif turns:
            turns[-1] = (turns[-1][0], turns[-1][1], when if when < end_ms else None)
    return turns


def judge_line(kind: VadKind, condition: Condition) -> Tally:
    """One judge over one line: the turns it heard, against where the speech is."""
    vad = Vad(make_judge(kind))
    said: list[tuple[str, int, int]] = []  # (kind, offset, when the VAD said it), in ms
    count = 0
    in_speech: list[bool] = []
    started = time.process_time()
    for frame in frames(condition.pcm16k, PCM_RATE, FRAME_MS):
        count += 1
        for event in vad.process(frame):
            said.append((event.kind, event.offset_ms, count * FRAME_MS))
        in_speech.append(vad.in_speech)
    cpu_s = time.process_time() - started
    end_ms = count * FRAME_MS
    turns = _turns(said, end_ms)  # a turn the line's end closed never ended
    spans = condition.spans
    tally = Tally(frames=count, cpu_s=cpu_s, utterances=len(spans))
    tally.line_s = (end_ms - sum(last - first for first, last in spans)) / 1000
    spoken = np.zeros(count, dtype=bool)  # where a turn may be open: each utterance and its hangover
    for first, last in spans:
        spoken[max(0, first - MATCH_MS) // FRAME_MS:(last + vad.end_of_turn_silence_ms + MATCH_MS) // FRAME_MS] = True
    tally.noise_as_speech_s = float(np.count_nonzero(np.array(in_speech) & ~spoken)) * FRAME_MS / 1000
    tally.false_starts = sum(1 for offset, _when, _stopped in turns
                             if not any(first - MATCH_MS <= offset <= last + MATCH_MS for first, last in spans))
    for index, (first, last) in enumerate(spans):
        following = spans[index + 1][0] if index + 1 < len(spans) else end_ms
        over = [(offset, when, stopped) for offset, when, stopped in turns
                if offset <= last and (stopped is None or stopped >= first)]
        if not over:
            tally.missed += 1
            continue
        if over[0][0] < first - MATCH_MS:  # a turn the noise began, still open when the caller spoke
            tally.stuck += 1
            continue
        tally.onset_ms.append(over[0][1] - first)
        tally.split += len(over) > 1
        stopped = over[-1][2]
        if stopped is None or stopped - last > STUCK_MS or stopped > following:
            tally.stuck += 1
        else:
            tally.end_ms.append(stopped - last)
    return tally


async def bench_vad(*, kinds: Sequence[VadKind] = VAD_KINDS, voices: Sequence[str] = VOICES,
                    sentences: Sequence[str] = SENTENCES[:12]) -> dict[str, Any]:
    lines = await conditions(voices, sentences)
    judges: dict[str, Any] = {}
    for kind in kinds:
        make_judge(kind)  # loads what it needs (Silero's model) before anything is timed
        overall, noisy = Tally(), Tally()
        by_condition: dict[str, Any] = {}
        for condition in lines:
            tally = judge_line(kind, condition)
            by_condition[condition.name] = tally.figures()
            overall.add(tally)
            if condition.name != "clean":
                noisy.add(tally)
        judges[kind] = {"all": overall.figures(), "noisy": noisy.figures(), "lines": by_condition}
    return {
        **run_facts("vad"),
        "voices": list(voices), "sentences": len(sentences), "speech_dbfs": SPEECH_DBFS,
        "noises": list(NOISES), "noise_levels_dbfs": list(NOISE_LEVELS_DBFS),
        "line_s": round(sum(len(c.pcm16k) for c in lines) / 2 / PCM_RATE, 1),
        "judges": judges,
    }

