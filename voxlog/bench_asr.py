"""`voxlog bench asr`: how well and how fast the offline recognisers hear callers.

**Accuracy.** Each of `SENTENCES` (bookings, dates, times, names, phone, account and zip numbers, an
email address, asking for a human) is spoken by each synthetic voice (espeak-ng, flite), and heard
by each recogniser twice: at 16 kHz as a browser sends it, and through the phone path (8 kHz, G.711
mu-law, back to 16 kHz, as the gateway decodes Twilio's frames), both over a faint line hiss. A
stream hears it as a session feeds it: 20 ms frames, 300 ms of the line before the speech and after
it, the agent's keywords. Score: word accuracy, 1 - WER, after the transcript is written as the
session records it (streams/providers/asr_text.py) and then through Whisper's English normaliser, with
every digit a word of its own and number words as digits, on both sides (so "4 1 5" and "four one
five" and "415" are the same three words).

**Cost and delay.** CPU seconds per audio second of each recogniser's worker processes; the delay
from the end of an utterance (`end_utterance`, as the VAD calls it) to its final text, for all
utterances and for those of 2.5-3.5 s. faster-whisper is measured as it serves calls: with
pocketsphinx beside it for interim results.

**Capacity.** N concurrent calls (each a stream fed in real time: an utterance over the phone path,
then 2 s while the agent answers) against one shared Whisper worker: the delay to the final text, and
how many finals Whisper gave rather than its pocketsphinx fallback (what a caller hears from a
machine past Whisper's capacity: the faster recogniser, never silence).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.process_cpu import process_cpu_s
from streams.audio.codecs import mulaw_to_pcm16, pcm16_to_mulaw, resample_pcm16
from streams.audio.formats import PCM_FRAME_BYTES, PCM_RATE
from streams.providers.asr_faster_whisper import FasterWhisperAsr
from streams.providers.asr_pocketsphinx import PocketsphinxAsr
from streams.providers.asr_text import normalize_transcript
from streams.providers.base import AsrProvider, AsrStream, Recognition, TtsProvider
from streams.providers.tts_espeak import EspeakTts
from streams.providers.tts_flite import FliteTts
from voxlog.bench import percentile, run_facts
from voxlog.progress import progress

SENTENCES = (
    "Hi, I'd like to book a technician for tomorrow morning.",
    "Can you schedule a visit for Friday at two thirty in the afternoon?",
    "My internet has been down since last night.",
    "The router keeps dropping the connection every few minutes.",
    "I want to talk to a human.",
    "Could I speak to a real person, please?",
    "My phone number is four one five, five five five, zero one three two.",
    "You can reach me at two one two, five five five, seven seven eight eight.",
    "My account number is seven three nine two, zero four one six.",
    "Please send the confirmation to jane dot doe at example dot com.",
    "My name is Maria Gonzalez.",
    "This is David Chen calling about my order.",
    "I need to reschedule my appointment to next Tuesday.",
    "Is Wednesday the fifteenth available?",
    "The outage started around seven o'clock this morning.",
    "Yes, that works for me.",
    "No, thank you, that's everything.",
    "Can you cancel my booking for Thursday?",
    "I was charged twice on my last bill.",
    "What time does the technician arrive?",
    "My zip code is nine four one zero three.",
    "I live at forty two Maple Street, apartment three.",
    "My ticket number is eight one five two.",
    "Could you call me back after five pm?",
    "The light on the modem is blinking red.",
    "I'd like to upgrade my plan to the faster one.",
    "Please book me for the first of December at nine thirty.",
    "My email is peter dot smith at gmail dot com.",
    "Thank you so much for your help, goodbye.",
    "Hello, is this Acme Home Services?",
    "Sorry, can you repeat that?",
    "I'll be home between noon and three.",
)
KEYWORDS = ("Acme", "appointment", "technician", "internet", "router", "outage")
"""The demo agent's (voxlog/agents/demo/front-desk.yaml)."""
VOICES = ("espeak-ng:en-us", "flite:rms")
LINE_MS = 300
"""The line before and after the speech: the session's pre-roll, and the VAD's hangover."""
HISS_DBFS = -55.0
_DIGIT_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}


@dataclass
class Heard:
    voice: str
    line: str
    sentence: str
    text: str
    provider: str
    audio_s: float
    delay_ms: float
    errors: int
    words: int


@dataclass
class Tally:
    heard: list[Heard] = field(default_factory=list)
    cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        words = sum(h.words for h in self.heard)
        audio_s = sum(h.audio_s for h in self.heard)
        delays = [h.delay_ms for h in self.heard]
        three_s = [h.delay_ms for h in self.heard if 2.5 <= h.audio_s <= 3.5]
        by_line = {line: 1 - sum(h.errors for h in self.heard if h.line == line) /
                   max(1, sum(h.words for h in self.heard if h.line == line)) for line in ("16k", "phone")}
        return {
            "accuracy_16k": round(by_line["16k"], 3),
            "accuracy_phone": round(by_line["phone"], 3),
            "accuracy_by_voice": {voice: round(1 - sum(h.errors for h in self.heard if h.voice == voice) /
                                               max(1, sum(h.words for h in self.heard if h.voice == voice)), 3)
                                  for voice in dict.fromkeys(h.voice for h in self.heard)},
            "words": words,
            "utterances": len(self.heard),
            "audio_s": round(audio_s, 1),
            "cpu_s": round(self.cpu_s, 2),
            "cpu_s_per_audio_s": round(self.cpu_s / audio_s, 3) if audio_s else None,
            "final_delay_ms": {"p50": round(statistics.median(delays)), "p90": round(percentile(delays, 0.9)),
                               "max": round(max(delays))} if delays else None,
            "final_delay_ms_3s_utterances": {"n": len(three_s), "p50": round(statistics.median(three_s))}
            if three_s else None,
            "answered_by": dict(sorted(Counter(h.provider for h in self.heard).items())),
        }


def scoring_words(text: str) -> list[str]:
    """The words scored: as the session records the transcript, then Whisper's English normaliser,
    then every digit a word (number words as digits)."""
    from whisper_normalizer.english import EnglishTextNormalizer  # type: ignore[import-untyped]

    normal = EnglishTextNormalizer()(normalize_transcript(text))
    words: list[str] = []
    for word in normal.split():
        word = _DIGIT_WORDS.get(word, word)
        words.extend(list(word) if word.isdigit() else re.findall(r"\d|\D+", word))
    return words


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Substitutions, insertions and deletions: the edit distance between the word lists."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def synthetic_voice(name: str) -> tuple[TtsProvider, str]:
    engine, _, voice = name.partition(":")
    if engine == "espeak-ng":
        return EspeakTts(words_per_minute=150), voice
    if engine == "flite":
        return FliteTts(), voice
    raise ValueError(f"unknown voice {name!r}: espeak-ng:VOICE or flite:VOICE")


async def speak(tts: TtsProvider, voice: str, text: str, rate: int) -> bytes:
    return b"".join([chunk async for chunk in tts.synthesize(text, voice=voice, sample_rate=rate)])


def _line(pcm16k: bytes, *, rng: np.random.Generator) -> bytes:
    """The speech with the line around it, over the hiss."""
    pad = np.zeros(PCM_RATE * LINE_MS // 1000, dtype=np.float64)
    speech = np.concatenate([pad, np.frombuffer(pcm16k, dtype="<i2").astype(np.float64), pad])
    speech += rng.normal(0.0, 32768.0 * 10 ** (HISS_DBFS / 20), speech.size)
    return bytes(np.clip(np.rint(speech), -32768, 32767).astype("<i2").tobytes())


async def caller_utterances(voices: Sequence[str], sentences: Sequence[str],
                            on_progress: Callable[[int], None] | None = None) -> list[tuple[str, str, str, bytes]]:
    """(voice, line, sentence, 16 kHz PCM as the recogniser gets it) for each voice, sentence and line;
    `on_progress` advanced by each sentence spoken."""
    rng = np.random.default_rng(0)
    out = []
    for name in voices:
        tts, voice = synthetic_voice(name)
        for sentence in sentences:
            wide = await speak(tts, voice, sentence, PCM_RATE)
            narrow = await speak(tts, voice, sentence, 8000)
            phone = resample_pcm16(mulaw_to_pcm16(pcm16_to_mulaw(narrow)), 8000, PCM_RATE)
            out.append((name, "16k", sentence, _line(wide, rng=rng)))
            out.append((name, "phone", sentence, _line(phone, rng=rng)))
            if on_progress is not None:
                on_progress(1)
    return out


async def _hear(stream: AsrStream, pcm: bytes, *, realtime: bool = False) -> tuple[Recognition, float]:
    started = time.monotonic()
    for index, at in enumerate(range(0, len(pcm), PCM_FRAME_BYTES)):
        await stream.accept(pcm[at : at + PCM_FRAME_BYTES])
        if realtime:
            await asyncio.sleep(max(0.0, started + (index + 1) * 0.02 - time.monotonic()))
    ended = time.perf_counter()
    result = await stream.end_utterance()
    return result, (time.perf_counter() - ended) * 1000


def _worker_pids() -> set[int]:
    """This process's children: the recognisers' worker processes."""
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    found.add(int(entry.name))
            except (OSError, IndexError):
                continue
    return found


async def hear_all(make: Callable[[], AsrProvider], utterances: list[tuple[str, str, str, bytes]],
                   on_progress: Callable[[int], None] | None = None) -> Tally:
    """Every utterance heard by a recogniser `make` makes; `on_progress` advanced by each."""
    tally = Tally()
    provider = make()
    before = {pid: process_cpu_s(pid) for pid in _worker_pids()}
    stream = await provider.open_stream(keywords=KEYWORDS)
    try:
        for voice, line, sentence, pcm in utterances:
            result, delay_ms = await _hear(stream, pcm)
            reference, hypothesis = scoring_words(sentence), scoring_words(result.text)
            tally.heard.append(Heard(voice, line, sentence, result.text, result.provider or provider.name,
                                     len(pcm) / (2 * PCM_RATE), delay_ms, word_errors(reference, hypothesis),
                                     len(reference)))
            if on_progress is not None:
                on_progress(1)
        tally.cpu_s = sum(process_cpu_s(pid) - before.get(pid, 0.0) for pid in _worker_pids())
    finally:
        await stream.close()
        await provider.aclose()
    return tally


async def _capacity(calls: int, utterances: list[bytes], seconds: float,
                    on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """`calls` streams, each saying its utterances in real time with 2 s between them, for `seconds`;
    `on_progress` advanced by each final text."""
    provider = FasterWhisperAsr(interim=PocketsphinxAsr())
    streams = await asyncio.gather(*(provider.open_stream(keywords=KEYWORDS) for _ in range(calls)))
    delays: list[float] = []
    answered: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def call(index: int, stream: AsrStream) -> None:
        await asyncio.sleep(index * 2.0 / calls)  # callers do not all stop speaking at once
        turn = index
        while time.monotonic() < deadline:
            result, delay_ms = await _hear(stream, utterances[turn % len(utterances)], realtime=True)
            delays.append(delay_ms)
            answered[result.provider] = answered.get(result.provider, 0) + 1
            if on_progress is not None:
                on_progress(1)
            turn += 1
            await asyncio.sleep(2.0)

    try:
        await asyncio.gather(*(call(i, s) for i, s in enumerate(streams)))
    finally:
        await asyncio.gather(*(s.close() for s in streams))
        await provider.aclose()
    whisper = answered.get(provider.name, 0)
    return {"calls": calls, "finals": len(delays), "by_whisper": whisper,
            "whisper_share": round(whisper / len(delays), 3) if delays else None,
            "final_delay_ms": {"p50": round(statistics.median(delays)), "p99": round(percentile(delays, 0.99))}
            if delays else None}


async def bench_asr(*, voices: Sequence[str] = VOICES, sentences: Sequence[str] = SENTENCES,
                    capacity_calls: Sequence[int] = (1, 2, 4, 8, 16), capacity_s: float = 30.0,
                    model_dir: Path | None = None) -> dict[str, Any]:
    with progress("bench asr: speaking the callers", total=len(voices) * len(sentences), unit="sentences") as spoke:
        utterances = await caller_utterances(voices, sentences, spoke)
    recognisers: dict[str, Callable[[], AsrProvider]] = {
        "faster-whisper": lambda: FasterWhisperAsr(model_dir=model_dir, interim=PocketsphinxAsr()),
        "pocketsphinx": PocketsphinxAsr,
    }
    results: dict[str, Any] = {}
    transcripts: dict[str, list[dict[str, Any]]] = {}
    for name, make in recognisers.items():
        with progress(f"bench asr: {name} hears", total=len(utterances), unit="utterances") as heard:
            tally = await hear_all(make, utterances, heard)
        results[name] = tally.summary()
        transcripts[name] = [{"voice": h.voice, "line": h.line, "said": h.sentence, "heard": h.text,
                              "by": h.provider, "errors": h.errors} for h in tally.heard]
    phone = [pcm for _voice, line, _s, pcm in utterances if line == "phone"]
    capacity = []
    for n in capacity_calls:
        with progress(f"bench asr: capacity, {n} calls for {capacity_s:.0f} s", unit="finals") as finals:
            capacity.append(await _capacity(n, phone, capacity_s, finals))
    return {
        **run_facts("asr"),
        "voices": list(voices),
        "sentences": len(sentences),
        "keywords": list(KEYWORDS),
        "hiss_dbfs": HISS_DBFS,
        "recognisers": results,
        "capacity": capacity,
        "targets": {"accuracy_16k": 0.85, "accuracy_phone": 0.75, "final_delay_ms_3s_p50": 400},
        "transcripts": transcripts,
    }
