"""What every speech recogniser (`AsrProvider`, streams/providers/base.py) must do, whatever its vendor.

Each runs for real: faster-whisper decodes espeak-ng's speech with Whisper tiny.en in its worker
process (pocketsphinx beside it for interims); pocketsphinx decodes it in its own worker process;
Deepgram's SDK and OpenAI's (Whisper) talk to local servers replaying their recorded wire protocols
(tests/provider_ws_server.py, tests/provider_server.py); the benchmarks' timeline recogniser answers
from its script. Nothing here waits for time to pass: a wait polls for what must come and fails at
a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streams.providers.asr_deepgram import DeepgramAsr
from streams.providers.asr_faster_whisper import FasterWhisperAsr
from streams.providers.asr_pocketsphinx import PocketsphinxAsr
from streams.providers.asr_whisper import WhisperAsr
from streams.providers.base import AsrProvider, AsrStream, ErrorKind, ProviderError, ProviderFailure, Recognition
from streams.providers.cloud import StreamTimeouts
from streams.providers.timeline import Timeline, TimelineAsr
from tests.provider_server import ProviderServer
from tests.provider_ws_server import ProviderWsServer
from tests.speech import require_espeak, synthesize_pcm16, with_silence
from tests.unit.test_asr_providers import audio

pytestmark = pytest.mark.timeout(120)

FRAME_BYTES = 640  # 20 ms of 16 kHz PCM, as a session feeds it
WAIT_S = 15.0
"""A bound on what must come (an interim result, a close), so that a recogniser that hangs fails."""
RELAXED = StreamTimeouts(connect_s=10.0, first_token_s=10.0, stall_s=10.0)  # a loaded machine is slow


@dataclass
class Recogniser:
    """One implementation: the audio of a call's two utterances, and recognisers made for that call
    (`working`) or to fail (`failing`), with what their servers replay queued."""

    utterances: tuple[bytes, bytes]
    make_working: Callable[[], AsrProvider]
    make_failing: Callable[[], AsrProvider]
    made: list[AsrProvider] = field(default_factory=list)

    def working(self) -> AsrProvider:
        self.made.append(self.make_working())
        return self.made[-1]

    def failing(self) -> AsrProvider:
        self.made.append(self.make_failing())
        return self.made[-1]


@pytest.fixture
async def ws_server() -> AsyncIterator[ProviderWsServer]:
    async with ProviderWsServer() as running:
        yield running


def pocketsphinx() -> Recogniser:
    require_espeak()
    first, second = (with_silence(synthesize_pcm16(said), 300, 300)
                     for said in ("i would like to book an appointment on tuesday", "yes please"))
    return Recogniser((first, second), PocketsphinxAsr,
                      lambda: PocketsphinxAsr(decoder_options={"no_such_option": 1}))  # its model fails to load


def faster_whisper() -> Recogniser:
    """As the registry makes it: pocketsphinx beside it for interim results."""
    first, second = pocketsphinx().utterances
    return Recogniser((first, second), lambda: FasterWhisperAsr(interim=PocketsphinxAsr()),
                      lambda: FasterWhisperAsr(model_dir=Path("/nonexistent/whisper-model")))


def deepgram(ws_server: ProviderWsServer) -> Recogniser:
    def make(exchange: str) -> AsrProvider:
        ws_server.expect(exchange)
        return DeepgramAsr("dg-contract-key", base_url=ws_server.url, timeouts=RELAXED)

    # Two utterances, 1.2 s and 1.4 s, an interim result in each; or a close (1011) mid-utterance.
    return Recogniser((audio(1200), audio(1400, offset_ms=1200)), lambda: make("deepgram/finalize_driven"),
                      lambda: make("deepgram/server_error_close"))


def whisper(server: ProviderServer) -> Recogniser:
    def make(*replies: str) -> AsrProvider:
        for reply in replies:
            server.reply(reply)
        return WhisperAsr("sk-contract-key", base_url=f"{server.base_url}/v1", timeouts=RELAXED)

    return Recogniser((audio(2800), audio(2800, offset_ms=2800)),
                      lambda: make("openai/transcription_ok", "openai/transcription_ok"),
                      lambda: make("openai/transcription_server_error_500"))


def timeline() -> Recogniser:
    script = Timeline(asr_final_ms=0)
    return Recogniser((audio(1000), audio(600)), lambda: TimelineAsr(script, ("hello there", "that is all")),
                      lambda: TimelineAsr(script, ("hello there",), failure="error"))


@pytest.fixture(params=["faster-whisper", "pocketsphinx", "deepgram", "whisper", "timeline"])
async def recogniser(request: pytest.FixtureRequest, server: ProviderServer,
                     ws_server: ProviderWsServer) -> AsyncIterator[Recogniser]:
    made = {"faster-whisper": faster_whisper, "pocketsphinx": pocketsphinx, "deepgram": lambda: deepgram(ws_server),
            "whisper": lambda: whisper(server), "timeline": timeline}[request.param]()
    yield made
    for asr in made.made:
        await asr.aclose()


async def feed(stream: AsrStream, pcm: bytes) -> list[Recognition]:
    """`pcm` in 20 ms frames, as a session feeds it; the interim results `accept` returned."""
    interims = []
    for at in range(0, len(pcm), FRAME_BYTES):
        result = await stream.accept(pcm[at:at + FRAME_BYTES])
        if result is not None:
            interims.append(result)
        await asyncio.sleep(0)  # frames come from the network, the loop turning between them
    return interims


async def utterance(asr: AsrProvider, audio: bytes) -> Recognition:
    """A call of one utterance, from the stream's opening to its close."""
    stream = await asr.open_stream()
    try:
        await feed(stream, audio)
        return await stream.end_utterance()
    finally:
        await stream.close()


async def an_interim(stream: AsrStream) -> Recognition:
    """The next interim result, for a recogniser whose results arrive on their own (over a socket)."""
    deadline = time.monotonic() + WAIT_S
    while (result := await stream.accept(b"")) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"no interim result within {WAIT_S:g} s")
        await asyncio.sleep(0.01)
    return result


async def test_each_utterance_gives_a_final_with_times_in_the_streams_audio(recogniser: Recogniser) -> None:
    first_audio, second_audio = recogniser.utterances
    stream = await recogniser.working().open_stream()
    try:
        await feed(stream, first_audio)
        first = await stream.end_utterance()
        await feed(stream, second_audio)
        second = await stream.end_utterance()
    finally:
        await stream.close()
    first_end, second_end = len(first_audio) // 32, (len(first_audio) + len(second_audio)) // 32
    assert (first.is_final, second.is_final) == (True, True)
    assert (first.start_ms, first.end_ms) == (0, first_end)
    assert (second.start_ms, second.end_ms) == (first_end, second_end), "times run on across utterances"
    for final in (first, second):
        assert all(final.start_ms <= w.start_ms <= w.end_ms <= final.end_ms for w in final.words), final.words
        assert 0.0 <= final.confidence <= 1.0
    assert first.text, "the first utterance is heard"


async def test_interim_results_come_before_the_final_where_the_recogniser_gives_them(recogniser: Recogniser) -> None:
    audio = recogniser.utterances[0]
    asr = recogniser.working()
    stream = await asr.open_stream()
    try:
        interims = await feed(stream, audio)
        if asr.capabilities.interim_results and not interims:
            interims.append(await an_interim(stream))
        final = await stream.end_utterance()
    finally:
        await stream.close()
    assert final.is_final
    if not asr.capabilities.interim_results:
        assert interims == []
        return
    assert interims, "it declares interim results"
    for interim in interims:
        assert not interim.is_final
        assert interim.text
        assert 0 <= interim.start_ms <= interim.end_ms <= len(audio) // 32


async def test_a_recogniser_that_fails_raises_a_provider_error_of_a_known_kind(recogniser: Recogniser) -> None:
    asr = recogniser.failing()
    with pytest.raises(ProviderError) as caught:
        await utterance(asr, recogniser.utterances[0])
    error = caught.value
    assert type(error.kind) is ErrorKind
    assert error.provider == asr.name
    assert error.report.failures == [ProviderFailure.of(error)], "what the session records of it"


async def test_close_is_idempotent_and_bounded(recogniser: Recogniser) -> None:
    stream = await recogniser.working().open_stream()
    await feed(stream, recogniser.utterances[0][:FRAME_BYTES * 10])
    for _ in range(2):
        await asyncio.wait_for(stream.close(), WAIT_S)
    for call in (stream.accept(b"\0\0" * 320), stream.end_utterance()):
        with pytest.raises(ProviderError) as caught:
            await call
        assert caught.value.kind == ErrorKind.CLOSED
