"""Offline speech end to end: espeak-ng callers, through a phone line or straight, into Vad and PocketsphinxAsr.

A caller says phrases an agent would hear, with silences between them. The audio reaches the
recogniser the way a session hands it over (`streams.call.recognition`): 20 ms frames at 16 kHz into the
VAD; from the VAD's speech_started (plus 300 ms of pre-roll) to its speech_stopped into the ASR
stream, then `end_utterance`. Two lines: straight 16 kHz (the web widget) and Twilio's 8 kHz mu-law
(synthesised at 8 kHz, G.711-encoded and decoded, resampled to 16 kHz frame by frame). Each line is
decoded once with the plain language model and once with the agent's keywords. The test prints
word accuracy, keyword recall and the real-time factor; it asserts what must hold, not timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import re
import subprocess
import time
import wave
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from streams.audio.codecs import Resampler, frames, mulaw_to_pcm16, pcm16_to_mulaw, read_wav, resample_pcm16
from streams.audio.vad import Vad
from streams.providers.asr_pocketsphinx import PocketsphinxAsr
from streams.providers.base import ProviderError, Recognition
from streams.providers.tts_espeak import EspeakTts
from tests.speech import caller_utterance_wav, require_espeak, synthesize_pcm16, with_silence

pytestmark = pytest.mark.slow

FRAME_MS = 20
PREROLL_FRAMES = 15  # as streams.call.recognition: 300 ms before the VAD's confirmation go to the recogniser

# The phrases the brief names, with the words that must come through for an agent to act on them.
KEY_PHRASES: dict[str, tuple[str, ...]] = {
    "i would like to book an appointment for tomorrow at ten": ("appointment", "book"),
    "i want to speak to a human": ("human",),
    "my internet is down": ("internet",),
    "yes": ("yes",),
    "no thank you goodbye": ("goodbye", "thank"),
}
# More of what callers say, to measure accuracy on more than five phrases.
MORE_PHRASES = [
    "can i cancel my appointment",
    "what time do you open on saturday",
    "i need help with my bill",
    "please transfer me to an agent",
    "my phone number is five five five one two three four",
    "the internet keeps dropping every evening",
    "i would like to reschedule to next monday",
    "thank you very much",
    "is anyone there",
    "i am calling about my order",
]
PHRASES = [*KEY_PHRASES, *MORE_PHRASES]
# What a support agent would list: words and short phrases it expects, not whole sentences.
KEYWORDS = [
    "book an appointment",
    "appointment",
    "reschedule",
    "cancel",
    "tomorrow",
    "monday",
    "saturday",
    "speak to a human",
    "human",
    "agent",
    "internet",
    "bill",
    "order",
    "yes",
    "no",
    "thank you",
    "goodbye",
]
KEYWORD_WORDS = sorted({w for k in KEYWORDS for w in k.split()})


@dataclass
class Utterance:
    vad_start_ms: int
    vad_stop_ms: int
    heard_from_ms: int  # where the audio given to the recogniser for it starts (with the pre-roll)
    heard_until_ms: int  # where the audio given to the recogniser ends: speech_stopped came in the next frame
    final: Recognition
    shift_ms: int  # stream time = recogniser time + shift
    interims: list[Recognition] = field(default_factory=list)


@dataclass
class Call:
    line: str
    keywords: bool
    utterances: list[Utterance]
    audio_s: float
    asr_audio_s: float
    asr_wall_s: float
    worker_cpu_s: float
    spans_ms: list[tuple[int, int]]  # where each phrase's speech really is


def phone_line(pcm8k: bytes) -> bytes:
    """What Twilio delivers and the gateway decodes: G.711 mu-law at 8 kHz, back to 16 kHz PCM."""
    mulaw = pcm16_to_mulaw(pcm8k)
    resampler = Resampler(8000, 16000)
    return b"".join(resampler.process(mulaw_to_pcm16(chunk)) for chunk in _chunks(mulaw, 160))


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def caller_audio(line: str) -> tuple[bytes, list[tuple[int, int]]]:
    """All phrases, 1.2 s of silence before each and 1 s after; and where each one's speech is."""
    audio, spans = b"", []
    for text in PHRASES:
        speech = synthesize_pcm16(text, 16000)
        loud = np.nonzero(np.abs(np.frombuffer(speech, dtype="<i2").astype(np.int64)) > 300)[0]
        at_ms = len(audio) // 32 + 1200
        spans.append((at_ms + int(loud[0]) // 16, at_ms + int(loud[-1]) // 16))
        if line == "8k-mulaw":
            pcm8k = with_silence(synthesize_pcm16(text, 8000), 1200, 1000, 8000)
            audio += phone_line(pcm8k)
        else:
            audio += with_silence(speech, 1200, 1000)
    return audio, spans


async def play_call(line: str, keywords: bool) -> Call:
    """Plays the caller into a VAD and an ASR stream the way streams.call.recognition does."""
    audio, spans = caller_audio(line)
    asr = PocketsphinxAsr()
    stream = await asr.open_stream(keywords=KEYWORDS if keywords else ())
    vad = Vad()
    preroll: deque[bytes] = deque(maxlen=PREROLL_FRAMES)
    utterances: list[Utterance] = []
    fed_ms = shift_ms = start_ms = heard_from_ms = 0
    interims: list[Recognition] = []
    wall = 0.0

    async def feed(frame: bytes) -> None:
        nonlocal fed_ms, wall
        fed_ms += FRAME_MS
        started = time.perf_counter()
        interim = await stream.accept(frame)
        wall += time.perf_counter() - started
        if interim is not None:
            interims.append(interim)

    try:
        for index, frame in enumerate(frames(audio, 16000)):
            offset_ms = index * FRAME_MS
            preroll.append(frame)
            for event in vad.process(frame):
                if event.kind == "speech_started":
                    start_ms = event.offset_ms
                    earlier = list(preroll)[:-1]
                    heard_from_ms = offset_ms - len(earlier) * FRAME_MS
                    shift_ms = heard_from_ms - fed_ms
                    interims = []
                    for old in earlier:
                        await feed(old)
                else:
                    started = time.perf_counter()
                    final = await stream.end_utterance()
                    wall += time.perf_counter() - started
                    utterances.append(
                        Utterance(start_ms, event.offset_ms, heard_from_ms, offset_ms, final, shift_ms, interims)
                    )
            if vad.in_speech:
                await feed(frame)
        assert not vad.finish()
        worker_cpu_s = stream.stats.cpu_ms / 1000
    finally:
        await stream.close()
    return Call(line, keywords, utterances, len(audio) / 32000, fed_ms / 1000, wall, worker_cpu_s, spans)


LINES = ["16k", "8k-mulaw"]


@pytest.fixture(scope="module")
def calls() -> dict[tuple[str, bool], Call]:
    """The four calls (two lines, with and without keywords), decoded concurrently."""
    require_espeak()

    async def all_calls() -> list[Call]:
        return await asyncio.gather(*(play_call(line, kw) for line in LINES for kw in (False, True)))

    return {(c.line, c.keywords): c for c in asyncio.run(all_calls())}


def word_errors(reference: str, hypothesis: str) -> int:
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1]


def said(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


@dataclass
class Score:
    word_accuracy: float
    keyword_hits: int
    keyword_total: int
    keyword_false: int


def score(call: Call) -> Score:
    errors = words = hits = total = false = 0
    for phrase, utterance in zip(PHRASES, call.utterances, strict=True):
        text = utterance.final.text
        errors += word_errors(phrase, text)
        words += len(phrase.split())
        for word in KEYWORD_WORDS:
            if said(word, phrase):
                total += 1
                hits += said(word, text)
            elif said(word, text):
                false += 1
    return Score(1 - errors / words, hits, total, false)


# --- what must hold ------------------------------------------------------------------------------


@pytest.mark.parametrize("line", LINES)
def test_the_vad_finds_one_utterance_per_phrase(calls: dict[tuple[str, bool], Call], line: str) -> None:
    call = calls[(line, False)]
    assert len(call.utterances) == len(PHRASES), [u.final.text for u in call.utterances]
    for utterance, (first, last) in zip(call.utterances, call.spans_ms, strict=True):
        assert first - 60 <= utterance.vad_start_ms <= first + 100
        assert last - 150 <= utterance.vad_stop_ms <= last + 60
        assert utterance.heard_until_ms + FRAME_MS - utterance.vad_stop_ms == 700  # the end-of-turn silence


@pytest.mark.parametrize(("line", "at_least"), [("16k", 5), ("8k-mulaw", 3)])
def test_with_keywords_the_key_words_come_through(
    calls: dict[tuple[str, bool], Call], line: str, at_least: int
) -> None:
    call = calls[(line, True)]
    got = [
        any(said(word, u.final.text) for word in KEY_PHRASES[phrase])
        for phrase, u in zip(KEY_PHRASES, call.utterances, strict=False)
    ]
    assert sum(got) >= at_least, [u.final.text for u in call.utterances[: len(KEY_PHRASES)]]


def test_the_plain_language_model_works_without_keywords(calls: dict[tuple[str, bool], Call]) -> None:
    call = calls[("16k", False)]
    texts = [u.final.text for u in call.utterances]
    assert score(call).word_accuracy >= 0.5, texts
    got = [
        any(said(w, u.final.text) for w in KEY_PHRASES[p]) for p, u in zip(KEY_PHRASES, call.utterances, strict=False)
    ]
    assert sum(got) >= 4, texts


@pytest.mark.parametrize("line", LINES)
def test_keywords_do_not_lose_keywords_or_invent_them(calls: dict[tuple[str, bool], Call], line: str) -> None:
    plain, biased = score(calls[(line, False)]), score(calls[(line, True)])
    assert biased.keyword_hits >= plain.keyword_hits
    assert biased.keyword_false <= plain.keyword_false


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("keywords", [False, True])
def test_word_timings_are_monotonic_and_inside_the_utterance(
    calls: dict[tuple[str, bool], Call], line: str, keywords: bool
) -> None:
    for utterance in calls[(line, keywords)].utterances:
        final = utterance.final
        assert final.is_final
        assert 0.0 <= final.confidence <= 1.0
        assert final.text == " ".join(w.word for w in final.words)
        previous_end = final.start_ms
        for word in final.words:
            assert previous_end <= word.start_ms <= word.end_ms <= final.end_ms
            assert 0.0 <= word.confidence <= 1.0
            previous_end = word.end_ms
        # In the call's time: within what the recogniser heard of this utterance, which starts up to
        # 300 ms before the VAD's speech_started and ends where speech_stopped came.
        assert final.start_ms + utterance.shift_ms == utterance.heard_from_ms
        assert final.end_ms + utterance.shift_ms == utterance.heard_until_ms
        assert utterance.heard_from_ms >= utterance.vad_start_ms - PREROLL_FRAMES * FRAME_MS
        for word in final.words:
            assert utterance.heard_from_ms <= word.start_ms + utterance.shift_ms
            assert word.end_ms + utterance.shift_ms <= utterance.heard_until_ms


def test_interim_results_come_every_half_second_or_so(calls: dict[tuple[str, bool], Call]) -> None:
    longest = calls[("16k", True)].utterances[0]  # "i would like to book an appointment ..."
    assert len(longest.interims) >= 3
    for interim in longest.interims:
        assert not interim.is_final
        assert interim.text
        assert interim.confidence == 0.0
        assert interim.start_ms == longest.final.start_ms
    ends = [i.end_ms for i in longest.interims]
    assert all(b - a >= 500 for a, b in itertools.pairwise(ends))


def test_report_accuracy_and_real_time_factor(
    calls: dict[tuple[str, bool], Call], capsys: pytest.CaptureFixture[str]
) -> None:
    """Prints the measurements (no timing is asserted)."""
    lines = [
        f"offline speech: {len(PHRASES)} espeak-ng phrases, {sum(len(p.split()) for p in PHRASES)} words, "
        f"{len(KEYWORDS)} keywords; {os.cpu_count()} CPUs",
        f"{'line':9} {'keywords':8} {'word acc':>8} {'kw recall':>9} {'false kw':>8} "
        f"{'worker RTF':>10} {'wall RTF':>8}",
    ]
    for (line, keywords), call in sorted(calls.items()):
        s = score(call)
        lines.append(
            f"{line:9} {'yes' if keywords else 'no':8} {s.word_accuracy:8.3f} "
            f"{f'{s.keyword_hits}/{s.keyword_total}':>9} {s.keyword_false:8d} "
            f"{call.worker_cpu_s / call.asr_audio_s:10.3f} {call.asr_wall_s / call.asr_audio_s:8.3f}"
        )
    for (line, keywords), call in sorted(calls.items()):
        for phrase, utterance in list(zip(PHRASES, call.utterances, strict=True))[: len(KEY_PHRASES)]:
            lines.append(f"  {line:9} kw={'y' if keywords else 'n'} {phrase!r} -> {utterance.final.text!r}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# --- the ASR provider's behaviour ----------------------------------------------------------------


async def test_keywords_are_normalised_and_unknown_words_listed() -> None:
    stream = await PocketsphinxAsr().open_stream(keywords=["Appointment", "speak to a HUMAN!", "xyzzyq plugh", "human"])
    try:
        assert stream.keywords == ("appointment", "speak to a human", "human")
        assert stream.unknown_keywords == ("xyzzyq plugh",)
    finally:
        await stream.close()


async def test_a_stream_without_audio_gives_an_empty_final() -> None:
    stream = await PocketsphinxAsr().open_stream()
    try:
        final = await stream.end_utterance()
        assert (final.text, final.is_final, final.words, final.confidence) == ("", True, (), 0.0)
        assert await stream.accept(b"\x00\x00" * 160) is None  # less than a chunk: buffered
    finally:
        await stream.close()
    await stream.close()  # twice is fine
    with pytest.raises(ProviderError) as error:
        await stream.accept(b"\x00\x00" * 160)
    assert error.value.kind == "closed"


async def test_times_run_on_across_utterances() -> None:
    require_espeak()
    stream = await PocketsphinxAsr().open_stream(keywords=["appointment"])
    try:
        first_audio = with_silence(synthesize_pcm16("yes"), 300, 300)
        for frame in frames(first_audio, 16000):
            await stream.accept(frame)
        first = await stream.end_utterance()
        second_audio = with_silence(synthesize_pcm16(PHRASES[0]), 300, 300)
        for frame in frames(second_audio, 16000):
            await stream.accept(frame)
        second = await stream.end_utterance()
    finally:
        await stream.close()
    assert first.text == "yes"
    assert "appointment" in second.text.split()
    assert second.start_ms == first.end_ms == len(first_audio) // 32
    assert second.end_ms == (len(first_audio) + len(second_audio)) // 32
    assert first.end_ms < second.words[0].start_ms < second.words[-1].end_ms <= second.end_ms


async def test_unsupported_language_and_model() -> None:
    with pytest.raises(ProviderError) as error:
        await PocketsphinxAsr().open_stream(language="de-DE")
    assert error.value.kind == "unsupported_language"
    with pytest.raises(ValueError, match="en-us"):
        PocketsphinxAsr(model="de")


async def test_a_dead_worker_is_a_retryable_provider_error() -> None:
    stream = await PocketsphinxAsr().open_stream()
    try:
        assert stream._worker is not None
        stream._worker.kill()
        await stream._worker.process.wait()
        await stream.accept(b"\x00\x00" * 1000)  # buffered: less than a chunk
        with pytest.raises(ProviderError) as error:
            await stream.accept(b"\x00\x00" * 1000)
        assert error.value.kind == "worker_exited"
        assert error.value.retryable
        with pytest.raises(ProviderError):  # and it stays failed
            await stream.end_utterance()
    finally:
        await stream.close()


async def test_a_bad_decoder_option_fails_at_open() -> None:
    with pytest.raises(ProviderError) as error:
        await PocketsphinxAsr(decoder_options={"no_such_option": 1}).open_stream()
    assert error.value.kind == "model_failed"


async def test_a_cancelled_request_fails_the_stream_instead_of_mixing_up_replies() -> None:
    """Cancelling a request whose reply is still on its way must not let that reply answer the next
    request: the stream fails, retryably. (If the reply won the race, the stream just goes on.)"""
    for _ in range(20):
        stream = await PocketsphinxAsr(chunk_ms=20).open_stream()
        try:
            task = asyncio.ensure_future(stream.accept(b"\x00\x00" * 320))
            await asyncio.sleep(0)  # the request is on its way, its reply not yet read
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled():
                await stream.accept(b"\x00\x00" * 320)  # the stream is still healthy: this must not raise
                continue
            with pytest.raises(ProviderError) as error:
                await stream.accept(b"\x00\x00" * 320)
            assert (error.value.kind, error.value.retryable) == ("cancelled", True)
            return
        finally:
            await stream.close()
    pytest.fail("in 20 tries the reply always beat the cancellation; the race was never exercised")


async def test_decoding_does_not_block_the_event_loop() -> None:
    """PocketSphinx holds the GIL while it decodes; the worker process keeps it off this loop."""
    require_espeak()
    speech = synthesize_pcm16(" ".join(PHRASES[:4]))  # about 8 s, one utterance
    stream = await PocketsphinxAsr().open_stream()
    stalls: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - started - 0.001)

    tick = asyncio.create_task(ticker())
    try:
        for frame in frames(speech, 16000):
            await stream.accept(frame)
        final = await stream.end_utterance()
    finally:
        done.set()
        await tick
        await stream.close()
    assert final.text
    assert max(stalls) < 0.15, f"the event loop stalled for {max(stalls) * 1000:.0f} ms"


# --- espeak-ng TTS -------------------------------------------------------------------------------


def _espeak_children() -> list[int]:
    children = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if pid.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if "(espeak-ng)" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    children.append(int(pid))
    return children


@pytest.mark.parametrize("rate", [16000, 8000])
async def test_tts_streams_100ms_chunks_of_espeaks_speech_at_the_rate_asked(rate: int) -> None:
    require_espeak()
    tts = EspeakTts(words_per_minute=160)
    text = "Thanks for calling. Your appointment is booked for tomorrow at ten. Goodbye."
    chunks = [chunk async for chunk in tts.synthesize(text, voice="en-us", sample_rate=rate)]
    assert len(chunks) > 10
    assert all(len(c) == rate // 10 * 2 for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= rate // 10 * 2
    # Exactly espeak-ng's own WAV, resampled in one go.
    wav = await asyncio.to_thread(
        subprocess.run,
        ["espeak-ng", "--stdout", "-v", "en-us", "-s", "160", "--", text],
        capture_output=True,
        check=True,
    )
    pcm, source_rate = read_wav(io.BytesIO(wav.stdout))
    assert source_rate == 22050
    assert b"".join(chunks) == resample_pcm16(pcm, 22050, rate)


async def test_tts_text_is_never_taken_for_options() -> None:
    require_espeak()
    tts = EspeakTts()
    plain = b"".join([c async for c in tts.synthesize("hello there", voice="en-us")])
    dashed = b"".join([c async for c in tts.synthesize("--help -v xx hello there", voice="en-us")])
    assert len(dashed) > len(plain)  # spoken, dashes and all, rather than obeyed
    assert [c async for c in tts.synthesize("   ", voice="en-us")] == []


async def test_tts_errors_are_provider_errors() -> None:
    require_espeak()

    async def error_of(tts: EspeakTts, voice: str = "en-us", text: str = "hello") -> ProviderError:
        with pytest.raises(ProviderError) as error:
            async for _ in tts.synthesize(text, voice=voice):
                pass
        return error.value

    assert (await error_of(EspeakTts(), voice="xx-nonexistent")).kind == "failed"
    assert "voice" in str(await error_of(EspeakTts(), voice="xx-nonexistent"))
    assert (await error_of(EspeakTts(), voice="-v")).kind == "bad_request"
    assert (await error_of(EspeakTts(binary="/nonexistent/espeak-ng"))).kind == "not_installed"
    timeout = await error_of(EspeakTts(timeout_s=0.05), text="a long text to speak " * 200)
    assert (timeout.kind, timeout.retryable) == ("timeout", True)
    await asyncio.sleep(0.1)
    assert _espeak_children() == []


async def test_tts_timeout_does_not_count_a_slow_consumer() -> None:
    """A session paces playback as it pulls chunks; only espeak-ng's own time counts."""
    require_espeak()
    chunks = 0
    async for _ in EspeakTts(timeout_s=1.0).synthesize("one two three four five six seven eight", voice="en-us"):
        chunks += 1
        await asyncio.sleep(0.05)
    assert chunks * 0.05 > 1.0


async def test_tts_stopping_early_kills_espeak() -> None:
    require_espeak()
    speech = EspeakTts().synthesize("a long text to speak " * 200, voice="en-us")
    first = await anext(speech)
    assert first
    await speech.aclose()
    assert _espeak_children() == []


async def test_tts_speech_is_recognised() -> None:
    require_espeak()
    text = "i would like to book an appointment for tomorrow at ten"
    pcm = b"".join([c async for c in EspeakTts().synthesize(text, voice="en-us", sample_rate=16000)])
    stream = await PocketsphinxAsr().open_stream(keywords=["book an appointment"])
    try:
        for frame in frames(with_silence(pcm, 300, 300), 16000):
            await stream.accept(frame)
        assert "appointment" in (await stream.end_utterance()).text.split()
    finally:
        await stream.close()


def test_caller_utterance_wav(tmp_path: Path) -> None:
    require_espeak()
    path = caller_utterance_wav(tmp_path / "caller.wav", "i want to speak to a human", before_ms=500, after_ms=700)
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 48000)
    pcm, rate = read_wav(path)
    assert rate == 48000
    assert len(pcm) == 2 * (48 * 1200) + len(synthesize_pcm16("i want to speak to a human", 48000))
