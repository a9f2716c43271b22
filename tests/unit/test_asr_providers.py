"""The cloud speech recognition adapters with the official SDKs: Deepgram's live WebSocket
(`deepgram-sdk`) against tests/provider_ws_server.py and OpenAI's Whisper transcription (`openai`)
against tests/provider_server.py, each replaying the provider's recorded wire protocol
(tests/fixtures/providers): results and their timings, interims, what the client sent, and every way a
provider fails, each as the right `ProviderError`, within its timeout."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import math
import socket
import time
import wave
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streams.providers.asr_deepgram import DeepgramAsr, DeepgramStream
from streams.providers.asr_whisper import WhisperAsr
from streams.providers.base import AsrStream, ProviderError, Recognition
from streams.providers.cloud import StreamTimeouts
from tests.provider_server import Fault, ProviderServer
from tests.provider_ws_server import ProviderWsServer, WsFault

DEEPGRAM_KEY = "3f9c2a7e1b8d4f6a0c5e9b2d7a1f4c8e6b3d0a9f"
OPENAI_KEY = "sk-test-voxlog-7Hq2Lm9Xc4Vb8Nz1Pw6Rt3Ys2xQ9"
FRAME_MS = 20
TIMEOUT_S = 0.3  # a timeout under test: small, so that the file stays fast
SLACK_S = 1.5  # how much later than its timeout a failure may surface (2 slow shared cores)
# Where a test is not about timeouts: generous, as a loaded machine may be slow to answer.
RELAXED = StreamTimeouts(connect_s=5.0, first_token_s=5.0, stall_s=5.0)
KEYWORDS = ("Acme Heating", "technician")

BOOKING = "I'd like to book a technician for Tuesday."


def audio(ms: int, *, offset_ms: int = 0) -> bytes:
    """`ms` of 16 kHz PCM, a 440 Hz tone, `offset_ms` into it: deterministic, and not silence."""
    first = offset_ms * 16
    samples = (round(8000 * math.sin(2 * math.pi * 440 * (first + i) / 16000)) for i in range(ms * 16))
    return b"".join(sample.to_bytes(2, "little", signed=True) for sample in samples)


async def speak(stream: AsrStream, ms: int, *, offset_ms: int = 0) -> list[Recognition]:
    """Feeds `ms` of audio in 20 ms frames as a session does, letting the loop run between frames so
    that results arrive on the way, as they would live; returns what `accept` gave back."""
    pcm = audio(ms, offset_ms=offset_ms)
    frame = FRAME_MS * 32
    results = []
    for at in range(0, len(pcm), frame):
        result = await stream.accept(pcm[at : at + frame])
        if result is not None:
            results.append(result)
        await asyncio.sleep(0.002)
    return results


async def utterance(stream: AsrStream, ms: int) -> Recognition:
    await speak(stream, ms)
    return await stream.end_utterance()


async def failure(stream: AsrStream, ms: int) -> ProviderError:
    """The error an utterance of `ms` meets, from `accept` or at its end."""
    with pytest.raises(ProviderError) as caught:
        await utterance(stream, ms)
    return caught.value


def words(result: Recognition) -> list[tuple[str, int, int]]:
    return [(w.word, w.start_ms, w.end_ms) for w in result.words]


@pytest.fixture
async def ws_server() -> AsyncIterator[ProviderWsServer]:
    async with ProviderWsServer() as running:
        yield running


def deepgram(ws_server: ProviderWsServer, timeouts: StreamTimeouts = RELAXED, **options: Any) -> DeepgramAsr:
    return DeepgramAsr(DEEPGRAM_KEY, base_url=ws_server.url, timeouts=timeouts, **options)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- Deepgram: results ------------------------------------------------------------------------------


async def test_a_deepgram_utterance_gives_its_interims_then_its_final(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/utterance_interims_final")
    stream = await deepgram(ws_server).open_stream(keywords=KEYWORDS)
    interims = await speak(stream, 2800)
    started = time.perf_counter()
    final = await stream.end_utterance()
    waited = time.perf_counter() - started
    await stream.close()

    assert [i.text for i in interims] == [
        "I'd like", "I'd like to book a", "I'd like to book a technician for", BOOKING
    ]
    assert not any(i.is_final for i in interims)
    assert (interims[0].start_ms, interims[0].end_ms) == (0, 800)
    assert final.is_final
    assert final.text == BOOKING
    assert (final.start_ms, final.end_ms) == (0, 2800)
    assert words(final) == [
        ("I'd", 160, 380), ("like", 380, 640), ("to", 640, 780), ("book", 780, 1040), ("a", 1040, 1120),
        ("technician", 1120, 1680), ("for", 1680, 1860), ("Tuesday.", 1860, 2300),
    ]
    assert final.words[-1].confidence == pytest.approx(0.9863281)
    assert final.confidence == pytest.approx(0.99121094)
    # speech_final had ended the utterance: no answer to Finalize was waited for beyond a short settle.
    assert waited < RELAXED.first_token_s
    assert isinstance(stream, DeepgramStream)
    assert stream.request_id == "7c1f8a2e-5b3d-4e9a-a1c6-0d2b4f6e8a13"

    sent = ws_server.sockets[0]
    assert sent.path == "/v1/listen"
    assert sent.headers["authorization"] == f"Token {DEEPGRAM_KEY}"
    assert sent.query == {
        "model": ["nova-3"], "language": ["en-US"], "encoding": ["linear16"], "sample_rate": ["16000"],
        "channels": ["1"], "interim_results": ["true"], "endpointing": ["300"], "utterance_end_ms": ["1000"],
        "vad_events": ["true"], "smart_format": ["true"], "keyterm": list(KEYWORDS),
    }
    assert sent.audio_bytes == 2800 * 32
    assert sent.audio_frames == 2800 // FRAME_MS
    assert sent.control_types() == ["Finalize", "CloseStream"]
    assert sent.sent == 6  # SpeechStarted, four Results, and Metadata on CloseStream


async def test_the_final_segments_of_one_utterance_are_joined(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/utterance_two_segments")
    stream = await deepgram(ws_server).open_stream()
    interims = await speak(stream, 5600)
    final = await stream.end_utterance()
    await stream.close()

    first, second = "Yes, my address is on Elm Street.", "And the boiler is making a banging noise."
    assert f"{first} And the boiler" in [i.text for i in interims]  # the open interim after the final segment
    assert final.text == f"{first} {second}"
    assert len(final.words) == 15
    assert words(final)[6:8] == [("Street.", 1980, 2400), ("And", 2820, 2960)]
    # Each segment weighs as much as it has words.
    assert final.confidence == pytest.approx((0.97802734 * 7 + 0.98876953 * 8) / 15)
    assert (final.start_ms, final.end_ms) == (0, 5600)
    assert "keyterm" not in ws_server.sockets[0].query


async def test_finalize_ends_each_utterance_and_times_run_on_across_them(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/finalize_driven")
    stream = await deepgram(ws_server).open_stream()
    first_interims = await speak(stream, 1200)
    first = await stream.end_utterance()
    second_interims = await speak(stream, 1400, offset_ms=1200)
    second = await stream.end_utterance()
    await stream.close()

    assert [i.text for i in first_interims] == ["Tuesday"]
    assert (first.text, first.start_ms, first.end_ms) == ("Tuesday afternoon.", 0, 1200)
    assert words(first) == [("Tuesday", 140, 520), ("afternoon.", 520, 1040)]
    assert [(i.text, i.start_ms, i.end_ms) for i in second_interims] == [("Around three", 1200, 2000)]
    assert (second.text, second.start_ms, second.end_ms) == ("Around three o'clock.", 1200, 2600)
    assert words(second) == [("Around", 1340, 1620), ("three", 1620, 1900), ("o'clock.", 1900, 2420)]
    assert ws_server.sockets[0].control_types() == ["Finalize", "Finalize", "CloseStream"]


async def test_a_late_answer_to_finalize_does_not_end_the_next_utterance(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/late_finalize_answer")
    stream = await deepgram(ws_server).open_stream()
    await speak(stream, 1600)
    first = await stream.end_utterance()  # closed by speech_final: the answer to Finalize is not waited for
    await speak(stream, 1400, offset_ms=1600)  # the late answer comes meanwhile
    second = await stream.end_utterance()
    await stream.close()
    assert (first.text, first.start_ms, first.end_ms) == ("Yes, please.", 0, 1600)
    assert (second.text, second.start_ms, second.end_ms) == ("Tomorrow morning.", 1600, 3000)
    assert words(second) == [("Tomorrow", 1800, 2300), ("morning.", 2300, 2800)]


async def test_models_before_nova_3_get_the_keywords_as_keywords(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/finalize_driven")
    stream = await deepgram(ws_server, model="nova-2").open_stream(keywords=("technician", " ", "technician"))
    await stream.close()
    query = ws_server.sockets[0].query
    assert (query["model"], query["keywords"]) == (["nova-2"], ["technician"])
    assert "keyterm" not in query


async def test_an_utterance_with_no_audio_is_empty_and_asks_nothing(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/finalize_driven")
    stream = await deepgram(ws_server).open_stream()
    result = await stream.end_utterance()
    await stream.close()
    assert (result.text, result.is_final, result.words, result.start_ms, result.end_ms) == ("", True, (), 0, 0)
    assert ws_server.sockets[0].control_types() == ["CloseStream"]


async def test_a_quiet_stream_is_kept_alive(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/finalize_driven")
    stream = await deepgram(ws_server, keepalive_s=0.1).open_stream()
    await asyncio.sleep(0.45)
    await speak(stream, 100)  # audio counts as traffic: no KeepAlive is needed while it flows
    await stream.close()
    types = ws_server.sockets[0].control_types()
    assert types[-1] == "CloseStream"
    assert types.count("KeepAlive") >= 2
    assert set(types[:-1]) == {"KeepAlive"}


async def test_close_sends_closestream_and_ends_the_stream(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/utterance_interims_final")
    stream = await deepgram(ws_server).open_stream()
    await speak(stream, 400)
    await stream.close()
    await stream.close()  # a second close does nothing
    sent = ws_server.sockets[0]
    assert sent.control_types() == ["CloseStream"]
    assert sent.closed
    with pytest.raises(ProviderError) as caught:
        await stream.accept(audio(20))
    assert caught.value.kind == "closed"
    with pytest.raises(ProviderError):
        await stream.end_utterance()


async def test_close_does_not_wait_long_on_a_silent_server(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/utterance_interims_final", WsFault(stall_after_messages=0))
    stream = await deepgram(ws_server, timeouts=StreamTimeouts(5.0, 5.0, TIMEOUT_S)).open_stream()
    started = time.perf_counter()
    await stream.close()  # no Metadata comes: it waits stall_s for it at most
    assert time.perf_counter() - started < TIMEOUT_S + SLACK_S


async def test_close_is_bounded_on_a_server_that_hangs(ws_server: ProviderWsServer) -> None:
    ws_server.expect("deepgram/utterance_interims_final", WsFault(freeze_after_messages=0))
    stream = await deepgram(ws_server, timeouts=StreamTimeouts(5.0, 5.0, TIMEOUT_S)).open_stream()
    await speak(stream, 200)
    started = time.perf_counter()
    await stream.close()  # neither Metadata nor an answer to the close frame comes
    assert time.perf_counter() - started < TIMEOUT_S + SLACK_S


# -- Deepgram: failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "kind", "retryable", "retry_after_s"),
    [
        ("deepgram/unauthorized_401", "auth", False, None),
        ("deepgram/rate_limited_429", "rate_limited", True, 2.0),
    ],
)
async def test_a_refused_upgrade_is_an_error_of_its_status(
    ws_server: ProviderWsServer, fixture: str, kind: str, retryable: bool, retry_after_s: float | None
) -> None:
    ws_server.expect(fixture)
    with pytest.raises(ProviderError) as caught:
        await deepgram(ws_server).open_stream()
    error = caught.value
    assert (error.provider, error.kind, error.retryable, error.retry_after_s) == (
        "deepgram", kind, retryable, retry_after_s
    )
    assert DEEPGRAM_KEY not in str(error)
    assert ws_server.sockets[0].headers["authorization"] == f"Token {DEEPGRAM_KEY}"


async def test_no_server_is_a_connection_error() -> None:
    asr = DeepgramAsr(DEEPGRAM_KEY, base_url=f"ws://127.0.0.1:{closed_port()}", timeouts=RELAXED)
    with pytest.raises(ProviderError) as caught:
        await asr.open_stream()
    assert (caught.value.kind, caught.value.retryable) == ("connection", True)


async def test_an_upgrade_with_no_answer_times_out_within_connect_s() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # holds the connection open and answers nothing

    tcp = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    asr = DeepgramAsr(DEEPGRAM_KEY, base_url=f"ws://127.0.0.1:{port}", timeouts=StreamTimeouts(TIMEOUT_S, 5.0, 5.0))
    try:
        started = time.perf_counter()
        with pytest.raises(ProviderError) as caught:
            await asr.open_stream()
        elapsed = time.perf_counter() - started
    finally:
        for writer in accepted:
            writer.close()
        tcp.close()
        await tcp.wait_closed()
    assert (caught.value.kind, caught.value.retryable) == ("timeout", True)
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    ("fixture", "fault", "kind", "retryable", "says"),
    [
        ("deepgram/server_error_close", None, "server", True, "1011 (NET-0000)"),
        ("deepgram/error_message", None, "server", True, "InternalError"),
        ("deepgram/undecodable_audio_close", None, "bad_request", False, "1008 (DATA-0000)"),
        ("deepgram/malformed_message", None, "protocol", True, "not JSON"),
        ("deepgram/utterance_interims_final", WsFault(drop_after_messages=2), "connection", True, "without a close"),
    ],
    ids=["close-1011", "error-message", "close-1008", "malformed", "dropped"],
)
async def test_a_stream_that_fails_keeps_failing_with_the_same_error(
    ws_server: ProviderWsServer, fixture: str, fault: WsFault | None, kind: str, retryable: bool, says: str
) -> None:
    ws_server.expect(fixture, fault)
    stream = await deepgram(ws_server).open_stream()
    error = await failure(stream, 2800)
    assert (error.provider, error.kind, error.retryable) == ("deepgram", kind, retryable)
    assert says in str(error)
    assert DEEPGRAM_KEY not in str(error)
    # Later calls raise that error at once, for a fallback to take the utterance elsewhere.
    started = time.perf_counter()
    for call in (stream.accept(audio(20)), stream.end_utterance(), stream.accept(b"")):
        with pytest.raises(ProviderError) as again:
            await call
        assert again.value is error
    assert time.perf_counter() - started < 0.5
    await stream.close()  # clean, without raising


async def test_a_server_that_stalls_fails_the_utterance_within_first_token_s(ws_server: ProviderWsServer) -> None:
    # Two messages (SpeechStarted and the first interim), then nothing: the final never comes.
    ws_server.expect("deepgram/utterance_interims_final", WsFault(stall_after_messages=2))
    stream = await deepgram(ws_server, timeouts=StreamTimeouts(5.0, TIMEOUT_S, 5.0)).open_stream()
    interims = await speak(stream, 2800)
    started = time.perf_counter()
    with pytest.raises(ProviderError) as caught:
        await stream.end_utterance()
    elapsed = time.perf_counter() - started
    await stream.close()
    assert [i.text for i in interims] == ["I'd like"]
    assert (caught.value.kind, caught.value.retryable) == ("timeout", True)
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + SLACK_S
    assert ws_server.sockets[0].control_types()[0] == "Finalize"


# -- Whisper ----------------------------------------------------------------------------------------


def whisper(server: ProviderServer, timeouts: StreamTimeouts = RELAXED) -> WhisperAsr:
    return WhisperAsr(OPENAI_KEY, base_url=f"{server.base_url}/v1", timeouts=timeouts)


def form(request_body: bytes, content_type: str) -> dict[str, list[bytes]]:
    """A multipart/form-data body's fields, by name."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"content-type: {content_type}\r\n\r\n".encode() + request_body
    )
    fields: dict[str, list[bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(name, str)
        assert isinstance(payload, bytes)
        fields.setdefault(name, []).append(payload)
    return fields


async def test_whisper_transcribes_an_utterance_as_a_wav(server: ProviderServer) -> None:
    server.reply("openai/transcription_ok")
    asr = whisper(server)
    stream = await asr.open_stream(keywords=KEYWORDS)
    interims = await speak(stream, 2800)
    result = await stream.end_utterance()
    await stream.close()
    await asr.aclose()

    assert interims == []
    assert (result.text, result.is_final, result.start_ms, result.end_ms) == (BOOKING, True, 0, 2800)
    assert words(result)[-2:] == [("for", 1860, 2020), ("Tuesday", 2020, 2460)]
    sure, unsure = math.exp(-0.1053), math.exp(-0.4307)
    assert [w.confidence for w in result.words] == pytest.approx([sure] * 6 + [unsure] * 2)
    assert result.confidence == pytest.approx((1.7 * sure + 1.1 * unsure) / 2.8)

    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/audio/transcriptions")
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    fields = form(sent.body, sent.headers["content-type"])
    assert fields["model"] == [b"whisper-1"]
    assert fields["response_format"] == [b"verbose_json"]
    assert fields["timestamp_granularities[]"] == [b"word", b"segment"]
    assert fields["language"] == [b"en"]
    assert fields["prompt"] == [b"Acme Heating, technician"]
    with wave.open(io.BytesIO(fields["file"][0])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.getnframes() == 2800 * 16
        assert wav.readframes(wav.getnframes()) == audio(2800)


async def test_whisper_times_count_from_the_start_of_the_stream(server: ProviderServer) -> None:
    server.reply("openai/transcription_server_error_500")
    server.reply("openai/transcription_ok")
    asr = whisper(server)
    stream = await asr.open_stream()
    await speak(stream, 1000)
    with pytest.raises(ProviderError):
        await stream.end_utterance()
    await speak(stream, 2800)  # a failed utterance does not fail the stream: each is a request of its own
    result = await stream.end_utterance()
    await stream.close()
    await asr.aclose()
    assert (result.start_ms, result.end_ms) == (1000, 3800)
    assert words(result)[0] == ("I'd", 1160, 1380)
    assert "prompt" not in form(server.requests[1].body, server.requests[1].headers["content-type"])


async def test_whisper_asks_nothing_for_an_utterance_with_no_audio(server: ProviderServer) -> None:
    asr = whisper(server)
    stream = await asr.open_stream()
    result = await stream.end_utterance()
    await stream.close()
    await asr.aclose()
    assert (result.text, result.is_final, result.confidence, result.words) == ("", True, 0.0, ())
    assert server.requests == []
    with pytest.raises(ProviderError) as caught:
        await stream.accept(audio(20))
    assert caught.value.kind == "closed"


@pytest.mark.parametrize(
    ("fixture", "kind", "retryable", "retry_after_s"),
    [
        ("openai/transcription_rate_limited_429", "rate_limited", True, 1.2),  # retry-after-ms wins
        ("openai/transcription_server_error_500", "server", True, None),
        ("openai/transcription_unauthorized_401", "auth", False, None),
        ("openai/transcription_malformed", "protocol", True, None),
    ],
)
async def test_whisper_failures_are_errors_of_their_kind(
    server: ProviderServer, fixture: str, kind: str, retryable: bool, retry_after_s: float | None
) -> None:
    server.reply(fixture)
    asr = whisper(server)
    stream = await asr.open_stream()
    error = await failure(stream, 600)
    await asr.aclose()
    assert (error.provider, error.kind, error.retryable, error.retry_after_s) == (
        "whisper", kind, retryable, retry_after_s
    )
    assert OPENAI_KEY not in str(error)


async def test_whisper_without_an_answer_times_out_within_first_token_s(server: ProviderServer) -> None:
    server.reply("openai/transcription_ok", Fault(headers_delay_s=TIMEOUT_S + SLACK_S + 1.0))
    asr = whisper(server, StreamTimeouts(5.0, TIMEOUT_S, 5.0))
    stream = await asr.open_stream()
    await speak(stream, 600)
    started = time.perf_counter()
    with pytest.raises(ProviderError) as caught:
        await stream.end_utterance()
    elapsed = time.perf_counter() - started
    await asr.aclose()
    assert (caught.value.kind, caught.value.retryable) == ("timeout", True)
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + SLACK_S


async def test_whisper_with_no_server_is_a_connection_error() -> None:
    asr = WhisperAsr(OPENAI_KEY, base_url=f"http://127.0.0.1:{closed_port()}/v1", timeouts=RELAXED)
    stream = await asr.open_stream()
    error = await failure(stream, 200)
    await asr.aclose()
    assert (error.kind, error.retryable) == ("connection", True)
    assert OPENAI_KEY not in str(error)
