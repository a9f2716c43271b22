"""The ElevenLabs adapter (the official SDK) and the PlayHT adapter (httpx on its streaming HTTP API)
against a local server that replays each provider's wire protocol (tests/fixtures/providers): audio
streamed byte for byte as it arrives, what each adapter sends, mu-law for a phone line, and every way
a provider fails, each as the right `ProviderError`, within its deadline, with the connection let go."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from elevenlabs import VoiceSettings
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.audio.codecs import WavChunks, mulaw_to_pcm16, resample_pcm16
from streams.providers.base import ProviderError
from streams.providers.cloud import StreamTimeouts
from streams.providers.tts_common import PcmChunks
from streams.providers.tts_elevenlabs import ElevenLabsTts
from streams.providers.tts_playht import PlayHtTts
from tests.provider_server import FIXTURES, Fault, ProviderServer, Reply

ELEVENLABS_KEY = "sk_voxlogtest_4f1c9a7e2b8d6053c1e9f7a2b4d8c6e0a1f3b5d7"
PLAYHT_KEY = "ak-voxlogtest-9c2e7b41d6a84f0e93b5c1d7a2e6f8b0"
PLAYHT_USER = "Xq7bR2mT9vLkP4sW1nHc8yZ3uJ6d"
ELEVENLABS_VOICE = "JBFqnCBsd6RMkjVDRZzb"
PLAYHT_VOICE = "s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json"
TEXT = "Thanks for calling Acme Heating."

TIMEOUT_S = 0.3  # a timeout under test: small, so that the file stays fast
SLACK_S = 1.5  # how much later than its timeout a failure may surface on a loaded machine
RELAXED = StreamTimeouts(connect_s=5.0, first_token_s=5.0, stall_s=5.0)  # where a test is not about time

PCM_16K = (FIXTURES / "elevenlabs" / "thanks_for_calling.pcm_16000").read_bytes()
PCM_8K = (FIXTURES / "elevenlabs" / "thanks_for_calling.pcm_8000").read_bytes()
WAV_HEADER_BYTES = 44

Tts = ElevenLabsTts | PlayHtTts


@dataclass(frozen=True)
class Provider:
    """One provider's side of the tests every provider must pass."""

    name: str
    make: Callable[[str, StreamTimeouts], Tts]  # (base_url, timeouts)
    voice: str
    path: str
    speech: str  # 16 kHz speech in several chunks
    speech_pcm: bytes  # what the caller gets from it
    mulaw: str  # 8 kHz mu-law
    unauthorized: str
    refused: str  # a request the API refuses as invalid
    refused_says: str
    rate_limited: str
    retry_after_s: float
    server_error: str
    not_audio: str  # a successful status with JSON where audio was expected
    not_audio_says: str
    cut: str  # a body that ends cleanly with audio missing
    cut_says: str


def make_elevenlabs(base_url: str, timeouts: StreamTimeouts) -> ElevenLabsTts:
    return ElevenLabsTts(ELEVENLABS_KEY, base_url=base_url, timeouts=timeouts)


def make_playht(base_url: str, timeouts: StreamTimeouts) -> PlayHtTts:
    return PlayHtTts(PLAYHT_KEY, PLAYHT_USER, base_url=base_url, timeouts=timeouts)


ELEVENLABS = Provider(
    name="elevenlabs",
    make=make_elevenlabs,
    voice=ELEVENLABS_VOICE,
    path=f"/v1/text-to-speech/{ELEVENLABS_VOICE}/stream",
    speech="elevenlabs/stream_pcm_16000",
    speech_pcm=PCM_16K,
    mulaw="elevenlabs/stream_ulaw_8000",
    unauthorized="elevenlabs/unauthorized_401",
    refused="elevenlabs/validation_error_422",
    refused_says="body.voice_settings.stability: Input should be less than or equal to 1",
    rate_limited="elevenlabs/rate_limited_429",
    retry_after_s=3.0,
    server_error="elevenlabs/server_error_500",
    not_audio="elevenlabs/error_json_200",
    not_audio_says="quota_exceeded: This request exceeds your quota",
    cut="elevenlabs/stream_cut_mid_sample",
    cut_says="in the middle of a sample",
)
PLAYHT = Provider(
    name="playht",
    make=make_playht,
    voice=PLAYHT_VOICE,
    path="/api/v2/tts/stream",
    speech="playht/stream_wav_16000",
    speech_pcm=(FIXTURES / "playht" / "thanks_for_calling_16000.wav").read_bytes()[WAV_HEADER_BYTES:],
    mulaw="playht/stream_mulaw_8000",
    unauthorized="playht/unauthorized_401",
    refused="playht/bad_request_400",
    refused_says="INVALID_VOICE: Invalid voice",
    rate_limited="playht/rate_limited_429",
    retry_after_s=12.0,
    server_error="playht/server_error_500",
    not_audio="playht/json_link_201",
    not_audio_says='"href":"https://play.ht/api/v2/tts/',
    cut="playht/stream_wav_cut_short",
    cut_says="51544 bytes short of the size its WAV header declared",
)


@pytest.fixture(params=[ELEVENLABS, PLAYHT], ids=lambda p: p.name)
def provider(request: pytest.FixtureRequest) -> Provider:
    spec: Provider = request.param
    return spec


@pytest.fixture
async def tts(provider: Provider, server: ProviderServer) -> AsyncIterator[Tts]:
    adapter = provider.make(server.base_url, RELAXED)
    yield adapter
    await adapter.aclose()


async def speech(tts: Tts, voice: str, sample_rate: int = 16_000) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(TEXT, voice=voice, sample_rate=sample_rate)]


async def failure(tts: Tts, voice: str, received: list[bytes] | None = None) -> ProviderError:
    """The error a synthesis ends with; the audio handed on before it goes into `received`."""

    async def listen() -> None:
        async for chunk in tts.synthesize(TEXT, voice=voice):
            if received is not None:
                received.append(chunk)

    with pytest.raises(ProviderError) as caught:
        await listen()
    return caught.value


async def hung_up(server: ProviderServer) -> float:
    """When the server saw the client close its connection (waits up to SLACK_S for it)."""
    when = await server.first_hangup(SLACK_S)
    assert when is not None, "the client kept the connection of a failed stream open"
    return when


def snr_db(reference: bytes, decoded: bytes) -> float:
    """Signal to noise of `decoded` against `reference` (16-bit PCM of the same length), in dB."""
    ref = memoryview(reference).cast("h")
    out = memoryview(decoded).cast("h")
    signal = sum(s * s for s in ref)
    noise = sum((s - d) ** 2 for s, d in zip(ref, out, strict=True))
    return 10 * math.log10(signal / max(noise, 1))


# Streaming


async def test_speech_arrives_byte_exact_in_whole_samples_before_the_body_is_complete(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    last = len(Reply.load(provider.speech).chunks) - 1
    server.reply(provider.speech, Fault(stall_before_chunk=last, stall_s=0.6))  # the body's end comes late
    arrivals: list[float] = []
    chunks: list[bytes] = []
    async for chunk in tts.synthesize(TEXT, voice=provider.voice, sample_rate=16_000):
        arrivals.append(time.perf_counter())
        chunks.append(chunk)
    assert b"".join(chunks) == provider.speech_pcm
    assert len(chunks) > 1
    assert all(len(chunk) % 2 == 0 for chunk in chunks)  # whole samples, however the network cut them
    assert arrivals[0] < server.faulted_at[0] + 0.6  # handed on before the last piece was even sent
    assert len(server.requests) == 1


async def test_mulaw_for_a_phone_line_comes_as_the_provider_sends_it_and_decodes_to_the_speech(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.mulaw)
    chunks = [chunk async for chunk in tts.synthesize(TEXT, voice=provider.voice, codec="mulaw")]
    mulaw = b"".join(chunks)
    assert mulaw == b"".join(Reply.load(provider.mulaw).chunks)
    assert len(chunks) > 1
    decoded = mulaw_to_pcm16(mulaw)  # what the Twilio channel's far end hears
    assert len(decoded) == len(PCM_8K)
    assert snr_db(PCM_8K, decoded) > 30  # G.711 keeps speech at about 38 dB


async def test_empty_text_sends_nothing(provider: Provider, server: ProviderServer, tts: Tts) -> None:
    assert [chunk async for chunk in tts.synthesize("  ", voice=provider.voice)] == []
    assert [chunk async for chunk in tts.synthesize("", voice=provider.voice, codec="mulaw")] == []
    assert server.requests == []


# What each adapter sends


async def test_elevenlabs_sends_the_voice_the_output_format_the_key_and_the_model(server: ProviderServer) -> None:
    tts = ElevenLabsTts(ELEVENLABS_KEY, base_url=server.base_url, timeouts=RELAXED)
    tuned = ElevenLabsTts(ELEVENLABS_KEY, base_url=server.base_url, model="eleven_turbo_v2_5", timeouts=RELAXED,
                          optimize_streaming_latency=3,
                          voice_settings=VoiceSettings(stability=0.4, similarity_boost=0.8, speed=1.1))
    server.reply("elevenlabs/stream_pcm_16000")
    server.reply("elevenlabs/stream_ulaw_8000")
    server.reply("elevenlabs/stream_pcm_16000")
    await speech(tts, ELEVENLABS_VOICE)
    [_ async for _ in tts.synthesize(TEXT, voice=ELEVENLABS_VOICE, codec="mulaw")]
    await speech(tuned, ELEVENLABS_VOICE)
    await tts.aclose()
    await tuned.aclose()
    plain, mulaw, tuned_request = server.requests
    assert (plain.method, plain.path) == ("POST", ELEVENLABS.path)
    assert plain.headers["xi-api-key"] == ELEVENLABS_KEY
    assert plain.headers["content-type"] == "application/json"
    assert parse_qs(plain.query) == {"output_format": ["pcm_16000"]}
    body = plain.json()
    assert (body["text"], body["model_id"]) == (TEXT, "eleven_flash_v2_5")
    assert body.get("voice_settings") is None  # the voice's stored settings apply
    assert parse_qs(mulaw.query) == {"output_format": ["ulaw_8000"]}
    assert parse_qs(tuned_request.query) == {"output_format": ["pcm_16000"], "optimize_streaming_latency": ["3"]}
    tuned_body = tuned_request.json()
    assert tuned_body["model_id"] == "eleven_turbo_v2_5"
    assert tuned_body["voice_settings"] == {"stability": 0.4, "similarity_boost": 0.8, "speed": 1.1}


async def test_elevenlabs_asks_for_the_callers_rate_or_the_next_one_up_and_resamples(server: ProviderServer) -> None:
    tts = ElevenLabsTts(ELEVENLABS_KEY, base_url=server.base_url, timeouts=RELAXED)
    server.reply("elevenlabs/stream_pcm_8000")
    server.reply("elevenlabs/stream_pcm_16000")
    at_8k = b"".join(await speech(tts, ELEVENLABS_VOICE, sample_rate=8_000))
    at_11k = b"".join(await speech(tts, ELEVENLABS_VOICE, sample_rate=11_025))
    await tts.aclose()
    assert [parse_qs(r.query)["output_format"] for r in server.requests] == [["pcm_8000"], ["pcm_16000"]]
    assert at_8k == PCM_8K
    assert at_11k == resample_pcm16(PCM_16K, 16_000, 11_025)


async def test_playht_sends_its_two_credentials_and_a_json_body_for_wav_and_for_mulaw(server: ProviderServer) -> None:
    tts = PlayHtTts(PLAYHT_KEY, PLAYHT_USER, base_url=server.base_url, timeouts=RELAXED)
    server.reply("playht/stream_wav_16000")
    server.reply("playht/stream_mulaw_8000")
    await speech(tts, PLAYHT_VOICE)
    [_ async for _ in tts.synthesize(TEXT, voice=PLAYHT_VOICE, codec="mulaw")]
    await tts.aclose()
    wav, mulaw = server.requests
    assert (wav.method, wav.path, wav.query) == ("POST", "/api/v2/tts/stream", "")
    assert wav.headers["authorization"] == PLAYHT_KEY
    assert wav.headers["x-user-id"] == PLAYHT_USER
    assert wav.headers["accept"] == "audio/wav"
    assert wav.headers["content-type"] == "application/json"
    assert wav.json() == {"text": TEXT, "voice": PLAYHT_VOICE, "voice_engine": "Play3.0-mini", "output_format": "wav",
                          "sample_rate": 16_000}
    assert mulaw.headers["accept"] == "audio/basic"
    assert (mulaw.json()["output_format"], mulaw.json()["sample_rate"]) == ("mulaw", 8_000)


async def test_playht_follows_the_rate_its_wav_header_gives(server: ProviderServer) -> None:
    """Asked for 8 kHz, a WAV at 16 kHz still reaches the caller at 8 kHz: the header is the truth."""
    tts = PlayHtTts(PLAYHT_KEY, PLAYHT_USER, base_url=server.base_url, timeouts=RELAXED)
    server.reply("playht/stream_wav_16000")
    at_8k = b"".join(await speech(tts, PLAYHT_VOICE, sample_rate=8_000))
    await tts.aclose()
    assert server.requests[0].json()["sample_rate"] == 8_000
    assert at_8k == resample_pcm16(PLAYHT.speech_pcm, 16_000, 8_000)


async def test_a_voice_that_cannot_be_sent_is_a_bad_request_and_nothing_is_sent(server: ProviderServer) -> None:
    elevenlabs = ElevenLabsTts(ELEVENLABS_KEY, base_url=server.base_url, timeouts=RELAXED)
    playht = PlayHtTts(PLAYHT_KEY, PLAYHT_USER, base_url=server.base_url, timeouts=RELAXED)
    for tts, voice in ((elevenlabs, "../../v1/user"), (elevenlabs, ""), (playht, " ")):
        error = await failure(tts, voice)
        assert (error.kind, error.retryable) == ("bad_request", False)
    await elevenlabs.aclose()
    await playht.aclose()
    assert server.requests == []


# Failures


async def test_a_wrong_key_is_an_auth_error_that_never_shows_the_key(
    provider: Provider, server: ProviderServer, tts: Tts, caplog: pytest.LogCaptureFixture
) -> None:
    server.reply(provider.unauthorized)
    server.reply(provider.speech)
    with caplog.at_level(logging.DEBUG):
        error = await failure(tts, provider.voice)
        await speech(tts, provider.voice)
    assert (error.kind, error.retryable) == ("auth", False)
    assert "HTTP 401" in str(error)
    for text in (str(error), repr(error.__cause__), caplog.text, repr(tts)):
        assert ELEVENLABS_KEY not in text
        assert PLAYHT_KEY not in text


async def test_a_refused_request_is_a_bad_request_with_the_providers_reason(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.refused)
    error = await failure(tts, provider.voice)
    assert (error.kind, error.retryable) == ("bad_request", False)
    assert provider.refused_says in str(error)


async def test_rate_limited_carries_the_retry_after_and_nothing_is_retried(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.rate_limited)
    error = await failure(tts, provider.voice)
    assert (error.kind, error.retryable) == ("rate_limited", True)
    assert error.retry_after_s == pytest.approx(provider.retry_after_s)
    assert len(server.requests) == 1  # no retries of the SDK's own or the client's


async def test_a_server_error_is_retryable_and_not_retried_here(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.server_error)
    error = await failure(tts, provider.voice)
    assert (error.kind, error.retryable) == ("server", True)
    assert "HTTP 500" in str(error)
    assert len(server.requests) == 1


async def test_json_where_audio_was_expected_is_a_protocol_error_not_audio(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.not_audio)
    received: list[bytes] = []
    error = await failure(tts, provider.voice, received)
    assert error.kind == "protocol"
    assert "where audio was expected" in str(error)
    assert provider.not_audio_says in str(error)
    assert received == []


async def test_a_body_that_ends_with_audio_missing_is_a_retryable_protocol_error(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.cut)
    received: list[bytes] = []
    error = await failure(tts, provider.voice, received)
    assert (error.kind, error.retryable) == ("protocol", True)
    assert provider.cut_says in str(error)
    assert received  # the audio before the cut was handed on as it came
    assert provider.speech_pcm.startswith(b"".join(received))


async def test_a_connection_dropped_mid_body_is_a_retryable_protocol_error(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    server.reply(provider.speech, Fault(close_after_chunks=3))
    received: list[bytes] = []
    error = await failure(tts, provider.voice, received)
    assert (error.kind, error.retryable) == ("protocol", True)
    assert "broke off" in str(error)
    assert provider.speech_pcm.startswith(b"".join(received))
    assert received


async def test_no_first_byte_in_time_is_a_timeout_and_the_connection_is_let_go(
    provider: Provider, server: ProviderServer
) -> None:
    tts = provider.make(server.base_url, StreamTimeouts(connect_s=5.0, first_token_s=TIMEOUT_S, stall_s=5.0))
    server.reply(provider.speech)  # the first request of a client pays for its setup: not the case under test
    await speech(tts, provider.voice)
    server.reply(provider.speech, Fault(headers_delay_s=30.0))
    started = time.perf_counter()
    error = await failure(tts, provider.voice)
    failed = time.perf_counter()
    assert (error.kind, error.retryable) == ("timeout", True)
    assert "no response within 0.3 s" in str(error)
    assert failed - started < TIMEOUT_S + SLACK_S
    assert await hung_up(server) - started < TIMEOUT_S + SLACK_S
    await tts.aclose()


async def test_a_stall_mid_stream_is_a_timeout_within_the_stall_timeout_and_the_connection_is_let_go(
    provider: Provider, server: ProviderServer
) -> None:
    tts = provider.make(server.base_url, StreamTimeouts(connect_s=5.0, first_token_s=5.0, stall_s=TIMEOUT_S))
    server.reply(provider.speech, Fault(stall_before_chunk=3, stall_s=30.0))
    server.reply(provider.speech)
    received: list[bytes] = []
    error = await failure(tts, provider.voice, received)
    stalled_for = time.perf_counter() - server.faulted_at[0]
    assert (error.kind, error.retryable) == ("timeout", True)
    assert "stalled" in str(error)
    assert TIMEOUT_S <= stalled_for < TIMEOUT_S + SLACK_S
    assert received  # what came before the stall was handed on
    assert await hung_up(server) - server.faulted_at[0] < TIMEOUT_S + SLACK_S
    assert b"".join(await speech(tts, provider.voice)) == provider.speech_pcm  # and the next request is served
    await tts.aclose()


async def test_a_slow_but_steady_stream_is_not_a_stall(provider: Provider, server: ProviderServer) -> None:
    """The stall timeout bounds each gap, not the answer: gaps shorter than it pass."""
    tts = provider.make(server.base_url, StreamTimeouts(connect_s=5.0, first_token_s=5.0, stall_s=1.0))
    server.reply(provider.speech, Fault(stall_before_chunk=2, stall_s=0.3))
    assert b"".join(await speech(tts, provider.voice)) == provider.speech_pcm
    await tts.aclose()


async def test_a_stream_let_go_midway_releases_its_connection_at_once(
    provider: Provider, server: ProviderServer, tts: Tts
) -> None:
    """A barge-in stops reading the speech: closing the stream closes the connection then and there."""
    server.reply(provider.speech, Fault(stall_before_chunk=3, stall_s=30.0))
    chunks = tts.synthesize(TEXT, voice=provider.voice)
    assert await anext(chunks)
    await chunks.aclose()  # type: ignore[attr-defined]
    closed = time.perf_counter()
    assert await hung_up(server) - closed < SLACK_S


async def test_nobody_listening_is_a_connection_error(provider: Provider) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tts = provider.make(f"http://127.0.0.1:{port}", RELAXED)
    error = await failure(tts, provider.voice)
    await tts.aclose()
    assert (error.kind, error.retryable) == ("connection", True)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose listener never accepts and whose queue is full: a connection to it hangs."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


async def test_no_connection_in_time_is_a_timeout_of_the_connect_timeout(provider: Provider) -> None:
    with unanswered_port() as port:
        tts = provider.make(f"http://127.0.0.1:{port}",
                            StreamTimeouts(connect_s=TIMEOUT_S, first_token_s=10.0, stall_s=10.0))
        started = time.perf_counter()
        error = await failure(tts, provider.voice)
        elapsed = time.perf_counter() - started
        await tts.aclose()
    assert (error.kind, error.retryable) == ("timeout", True)
    assert elapsed < TIMEOUT_S + SLACK_S


# The decoders, however the network cuts the audio


@given(st.lists(st.integers(1, len(PCM_16K) - 1), max_size=12, unique=True))
@settings(max_examples=60, deadline=None)
def test_pcm_and_wav_cut_anywhere_decode_to_the_same_samples(cuts: list[int]) -> None:
    wav = (FIXTURES / "playht" / "thanks_for_calling_16000.wav").read_bytes()
    for data, decoder, expected in (
        (PCM_16K, PcmChunks(16_000, 16_000), PCM_16K),
        (wav, WavChunks(16_000), PLAYHT.speech_pcm),
        (PCM_16K, PcmChunks(16_000, 8_000), resample_pcm16(PCM_16K, 16_000, 8_000)),
    ):
        bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
        out = [decoder.feed(data[a:b]) for a, b in itertools.pairwise(bounds)]
        assert all(len(piece) % 2 == 0 for piece in out)
        assert b"".join(out) + decoder.end() == expected


def test_a_wav_stream_stopped_before_its_header_or_mid_sample_is_refused() -> None:
    wav = (FIXTURES / "playht" / "thanks_for_calling_16000.wav").read_bytes()
    for data, says in ((wav[:30], "before its WAV header"), (wav[:WAV_HEADER_BYTES + 101], "middle of a sample")):
        decoder = WavChunks(16_000)
        decoder.feed(data)
        with pytest.raises(ValueError, match=says):
            decoder.end()
    with pytest.raises(ValueError, match="RIFF"):
        WavChunks(16_000).feed(b'{"error_message": "no"}')


def test_the_fixtures_audio_is_small() -> None:
    for path in Path(FIXTURES).glob("*/thanks_for_calling*"):
        assert path.stat().st_size < 100_000, path
