"""Speech chains: a recogniser or a voice that fails midway is replaced within the turn, the
replacement hears (or says) what was lost, and the result says who answered and what failed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.providers.asr_chain import ChainAsr
from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    ErrorKind,
    ProviderError,
    ProviderSwitch,
    Recognition,
    RecognizedWord,
    TtsProvider,
    close_chunks,
)
from streams.providers.resilience import ChainExhausted, CircuitBreaker, Guarded, ProviderChain
from streams.providers.tts_chain import ChainTts, sentences

FRAME = b"\x01\x00" * 320  # 20 ms of 16 kHz PCM


class FakeAsr(AsrProvider):
    """Recognises each utterance as the number of frames it heard; fails as told."""

    capabilities = AsrCapabilities(interim_results=True)

    def __init__(self, name: str, *, stall_final: int | None = None, fail_accept_at: int | None = None,
                 refuse_open: bool = False) -> None:
        self.name = name
        self.model = f"{name}-model"
        self.stall_final = stall_final
        """Which of its finals (0: the first) it stalls on."""
        self.finals = 0
        self.fail_accept_at = fail_accept_at
        self.refuse_open = refuse_open
        self.streams: list[FakeAsrStream] = []

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> AsrStream:
        if self.refuse_open:
            raise ProviderError(self.name, ErrorKind.CONNECTION, "refused", retryable=True)
        stream = FakeAsrStream(self)
        self.streams.append(stream)
        return stream


class FakeAsrStream(AsrStream):
    def __init__(self, asr: FakeAsr) -> None:
        super().__init__(asr.name)
        self.asr = asr
        self.frames = 0
        self.utterance_start = 0
        self.closed = False

    async def _accept(self, pcm: bytes) -> Recognition | None:
        if self.asr.fail_accept_at is not None and self.frames >= self.asr.fail_accept_at:
            raise ProviderError(self.asr.name, ErrorKind.CONNECTION, "the socket dropped", retryable=True)
        self.frames += 1
        return Recognition("…", False, 0.5, self.utterance_start * 20, self.frames * 20)

    async def _end_utterance(self) -> Recognition:
        self.asr.finals += 1
        if self.asr.finals - 1 == self.asr.stall_final:
            await asyncio.sleep(3600)  # a stall: the chain's attempt timeout gives it up
        heard = self.frames - self.utterance_start
        start, self.utterance_start = self.utterance_start, self.frames
        word = RecognizedWord(f"{heard}frames", start * 20, self.frames * 20, 0.9)
        return Recognition(f"{heard} frames", True, 0.9, start * 20, self.frames * 20, (word,))

    async def _close(self) -> None:
        self.closed = True


def asr_chain(*providers: FakeAsr, timeout_s: float = 0.2) -> ChainAsr:
    members = [Guarded(p, p.name, "", CircuitBreaker(), timeout_s) for p in providers]
    return ChainAsr(ProviderChain("asr", members, deadline_s=5.0))


async def test_a_stalled_final_is_given_by_the_next_recogniser_from_the_utterance_s_audio() -> None:
    primary, fallback = FakeAsr("deepgram", stall_final=1), FakeAsr("whisper")
    stream = await asr_chain(primary, fallback).open_stream()
    for _ in range(50):  # a first utterance, recognised by the primary
        await stream.accept(FRAME)
    first = await stream.end_utterance()
    assert (first.provider, first.text) == ("deepgram", "50 frames")
    assert (first.report.failures, first.report.fallbacks) == ([], [])
    for _ in range(30):  # the second: the primary stalls at its end
        await stream.accept(FRAME)
    second = await stream.end_utterance()

    assert (second.provider, second.model, second.text) == ("whisper", "whisper-model", "30 frames")
    assert (second.start_ms, second.end_ms) == (1000, 1600), "in the stream's time, not the fallback's"
    assert second.words[0].start_ms == 1000
    assert [(f.provider, f.kind) for f in second.report.failures] == [("deepgram", "timeout")]
    assert second.report.fallbacks == [ProviderSwitch("deepgram", "whisper", "timeout")]
    assert primary.streams[0].closed
    for _ in range(10):  # between utterances, the call went back to the primary (its circuit is closed)
        await stream.accept(FRAME)
        await asyncio.sleep(0)  # frames come from the network, the loop turning between them
    third = await stream.end_utterance()
    assert (third.provider, third.text, third.start_ms, third.report.failures) == ("deepgram", "10 frames", 1600, [])
    assert fallback.streams[0].closed
    await stream.close()
    assert primary.streams[1].closed


async def test_while_the_primary_s_circuit_is_open_the_call_stays_with_the_fallback() -> None:
    primary, fallback = FakeAsr("deepgram", stall_final=0), FakeAsr("whisper")
    chain = asr_chain(primary, fallback)
    chain.chain.primary.breaker.failure_threshold = 1
    stream = await chain.open_stream()
    for utterance in range(3):
        for _ in range(10):
            await stream.accept(FRAME)
        assert (await stream.end_utterance()).provider == "whisper", utterance
    assert len(primary.streams) == 1, "not tried again while its circuit is open"


async def test_a_socket_dropped_mid_utterance_hands_the_audio_so_far_to_the_next() -> None:
    primary, fallback = FakeAsr("deepgram", fail_accept_at=12), FakeAsr("whisper")
    stream = await asr_chain(primary, fallback).open_stream()
    interims = [await stream.accept(FRAME) for _ in range(20)]
    final = await stream.end_utterance()
    assert interims[12] is None, "the frame the primary dropped"
    assert interims[13] is not None
    assert interims[13].provider == "whisper"
    assert (final.provider, final.text, final.start_ms, final.end_ms) == ("whisper", "20 frames", 0, 400)
    assert final.report.fallbacks == [ProviderSwitch("deepgram", "whisper", "error")]


async def test_when_every_recogniser_fails_the_utterance_is_reported_and_the_next_tries_again() -> None:
    primary, fallback = FakeAsr("deepgram", stall_final=0), FakeAsr("whisper", stall_final=0)
    stream = await asr_chain(primary, fallback).open_stream()
    for _ in range(10):
        await stream.accept(FRAME)
    with pytest.raises(ChainExhausted) as raised:
        await stream.end_utterance()
    assert [(f.provider, f.kind) for f in raised.value.report.failures] == [("deepgram", "timeout"),
                                                                            ("whisper", "timeout")]
    for _ in range(5):
        await stream.accept(FRAME)
    again = await stream.end_utterance()
    assert (again.provider, again.text) == ("deepgram", "5 frames"), "from the top, and the lost utterance gone"


async def test_a_recogniser_that_cannot_connect_is_passed_over_at_the_start() -> None:
    stream = await asr_chain(FakeAsr("deepgram", refuse_open=True), FakeAsr("whisper")).open_stream()
    await stream.accept(FRAME)
    final = await stream.end_utterance()
    assert final.provider == "whisper"
    assert [f.kind for f in final.report.failures] == ["connection", "connection"], "retried once: it may be a blip"


class FakeTts(TtsProvider):
    """Speaks each text as its bytes, in 4-byte chunks; fails as told on its n-th request."""

    def __init__(self, name: str, *, fail: dict[int, str] | None = None) -> None:
        self.name = name
        self.fail = fail or {}
        self.requests: list[tuple[str, str]] = []
        self.closed = 0

    async def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        number = len(self.requests)
        self.requests.append((text, voice))
        how = self.fail.get(number)
        audio = text.encode()
        try:
            if how == "before":
                raise ProviderError(self.name, ErrorKind.SERVER, "HTTP 500", retryable=True)
            for index in range(0, len(audio), 4):
                if index >= 8 and how == "stall":
                    await asyncio.sleep(3600)
                if index >= 8 and how == "drop":
                    raise ProviderError(self.name, ErrorKind.PROTOCOL, "the stream was cut off", retryable=True)
                yield audio[index:index + 4]
        finally:
            self.closed += 1


def tts_chain(*providers: FakeTts, voices: Sequence[str] = ()) -> ChainTts:
    members = [Guarded(p, p.name, "", CircuitBreaker(), 0.5) for p in providers]
    return ChainTts(ProviderChain("tts", members, deadline_s=5.0), voices or [f"{p.name}-voice" for p in providers],
                    stall_s=0.2)


REPLY = "Your technician comes on Tuesday morning. They will call you before they arrive. Anything else today?"


async def test_a_voice_that_stalls_mid_sentence_is_replaced_from_that_sentence_s_start() -> None:
    primary, fallback = FakeTts("elevenlabs", fail={1: "stall"}), FakeTts("playht")
    speech = tts_chain(primary, fallback).speak(REPLY, voice="rachel")
    audio = b"".join([chunk async for chunk in speech.chunks])
    first, second, third = sentences(REPLY)

    assert audio == (first + second[:8] + second + third).encode(), "the cut sentence again, then the rest"
    assert primary.requests[0] == (first, "rachel")
    assert fallback.requests == [(second, "playht-voice"), (third, "playht-voice")]
    assert (speech.provider, speech.voice) == ("playht", "playht-voice")
    assert [(f.provider, f.kind) for f in speech.report.failures] == [("elevenlabs", "timeout")]
    assert speech.report.fallbacks == [ProviderSwitch("elevenlabs", "playht", "timeout")]
    assert primary.closed == len(primary.requests), "every stream it opened was let go"


async def test_a_voice_that_fails_before_its_first_byte_costs_no_audio() -> None:
    primary, fallback = FakeTts("elevenlabs", fail={0: "before", 1: "before"}), FakeTts("playht")
    speech = tts_chain(primary, fallback).speak(REPLY, voice="rachel")
    audio = b"".join([chunk async for chunk in speech.chunks])
    assert audio == "".join(sentences(REPLY)).encode()
    assert [f.kind for f in speech.report.failures] == ["server", "server"], "retried once, then handed over"
    assert speech.provider == "playht"


async def test_when_every_voice_fails_the_speech_ends_with_the_report() -> None:
    speech = tts_chain(FakeTts("elevenlabs", fail={0: "drop"}), FakeTts("espeak-ng", fail={0: "drop"})).speak(
        "Hello there.", voice="rachel")
    with pytest.raises(ChainExhausted):
        async for _ in speech.chunks:
            pass
    assert [(f.provider, f.kind) for f in speech.report.failures] == [("elevenlabs", "protocol"),
                                                                      ("espeak-ng", "protocol")]


async def test_a_barge_in_lets_go_of_the_speaking_stream_and_the_one_opened_ahead() -> None:
    primary, fallback = FakeTts("elevenlabs"), FakeTts("playht")
    speech = tts_chain(primary, fallback).speak(REPLY, voice="rachel")
    await anext(speech.chunks)
    await asyncio.sleep(0.05)  # the next sentence's request is opened meanwhile
    await close_chunks(speech.chunks)
    assert len(primary.requests) == 2
    assert primary.closed == 2


async def test_one_voice_speaks_the_reply_in_one_request() -> None:
    only = FakeTts("espeak-ng")
    speech = tts_chain(only).speak(REPLY, voice="en-us")
    assert b"".join([chunk async for chunk in speech.chunks]) == REPLY.encode()
    assert only.requests == [(REPLY, "en-us")]


@given(st.lists(st.sampled_from(["Yes.", "No!", "Why?", "a", "word", "e.g.", "3.5", "ok…", "\"Quoted.\"", "  "]),
                max_size=30))
def test_sentences_keep_every_word_in_order(words: list[str]) -> None:
    text = " ".join(words)
    parts = sentences(text)
    assert " ".join(parts).split() == text.split()
    assert all(part == part.strip() and part for part in parts)


async def test_a_call_whose_recognisers_cannot_open_yet_keeps_its_audio_for_when_one_can() -> None:
    """A busy machine starting many calls' recognisers at once, or providers away: the call still has a
    stream; the end of its first utterance tries again, with the audio, and says what failed before."""
    primary, fallback = FakeAsr("deepgram", refuse_open=True), FakeAsr("whisper", refuse_open=True)
    stream = await asr_chain(primary, fallback).open_stream()
    assert [await stream.accept(FRAME) for _ in range(10)] == [None] * 10
    fallback.refuse_open = False
    final = await stream.end_utterance()
    assert (final.provider, final.text) == ("whisper", "10 frames"), "the whole utterance, heard late"
    assert [(f.provider, f.kind) for f in final.report.failures][:4] == [
        ("deepgram", "connection"), ("deepgram", "connection"), ("whisper", "connection"), ("whisper", "connection")]
