"""What every voice (`TtsProvider`, streams/providers/base.py) must do, whatever its vendor.

Each runs for real: espeak-ng and flite speak in their own processes; ElevenLabs' SDK and PlayHT's
HTTP API talk to a local server replaying their recorded wire protocols (tests/provider_server.py);
the benchmarks' timeline voice plays its tone. The wire details of the cloud voices (what each sends,
every way each fails) are in tests/unit/test_tts_providers.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from streams.audio.codecs import mulaw_to_pcm16
from streams.providers.base import ErrorKind, ProviderError, ProviderFailure, TtsProvider
from streams.providers.cloud import StreamTimeouts
from streams.providers.timeline import Timeline, TimelineTts
from streams.providers.tts_elevenlabs import ElevenLabsTts
from streams.providers.tts_espeak import EspeakTts
from streams.providers.tts_flite import FliteTts
from streams.providers.tts_playht import PlayHtTts
from tests.provider_server import ProviderServer
from tests.speech import require_espeak, require_flite

pytestmark = pytest.mark.timeout(120)

TEXT = "Thanks for calling Acme Heating."  # what the cloud voices' recordings say
RELAXED = StreamTimeouts(connect_s=10.0, first_token_s=10.0, stall_s=10.0)  # a loaded machine is slow
PHONE_RATE = 8_000


@dataclass
class Voice:
    """One implementation: its voice id, and voices made to speak (`speaking`: where the voice replays a
    recording, the one for a request of `codec` queued; None: none) or to fail (`failing`)."""

    voice: str
    make_speaking: Callable[[str | None], TtsProvider]
    make_failing: Callable[[], TtsProvider]
    made: list[TtsProvider] = field(default_factory=list)

    def speaking(self, codec: str | None = "pcm_s16le") -> TtsProvider:
        self.made.append(self.make_speaking(codec))
        return self.made[-1]

    def failing(self) -> TtsProvider:
        self.made.append(self.make_failing())
        return self.made[-1]


def elevenlabs(server: ProviderServer) -> Voice:
    def make(reply: str | None) -> TtsProvider:
        if reply is not None:
            server.reply(reply)
        return ElevenLabsTts("xi-contract-key", base_url=server.base_url, timeouts=RELAXED)

    recordings = {"pcm_s16le": "elevenlabs/stream_pcm_16000", "mulaw": "elevenlabs/stream_ulaw_8000"}
    return Voice("JBFqnCBsd6RMkjVDRZzb", lambda codec: make(recordings[codec] if codec else None),
                 lambda: make("elevenlabs/server_error_500"))


def playht(server: ProviderServer) -> Voice:
    def make(reply: str | None) -> TtsProvider:
        if reply is not None:
            server.reply(reply)
        return PlayHtTts("playht-contract-key", "playht-contract-user", base_url=server.base_url, timeouts=RELAXED)

    recordings = {"pcm_s16le": "playht/stream_wav_16000", "mulaw": "playht/stream_mulaw_8000"}
    return Voice("s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json",
                 lambda codec: make(recordings[codec] if codec else None), lambda: make("playht/server_error_500"))


def espeak() -> Voice:
    require_espeak()
    return Voice("en-us", lambda codec: EspeakTts(), lambda: EspeakTts(binary="/nonexistent/espeak-ng"))


def flite() -> Voice:
    require_flite()
    return Voice("slt", lambda codec: FliteTts(), lambda: FliteTts(binary="/nonexistent/flite"))


def timeline() -> Voice:
    script = Timeline(tts_first_byte_ms=0)
    return Voice("", lambda codec: TimelineTts(script), lambda: TimelineTts(script, failure="error"))


@pytest.fixture(params=["elevenlabs", "playht", "espeak-ng", "flite", "timeline"])
async def voice(request: pytest.FixtureRequest, server: ProviderServer) -> AsyncIterator[Voice]:
    made = {"elevenlabs": lambda: elevenlabs(server), "playht": lambda: playht(server), "espeak-ng": espeak,
            "flite": flite, "timeline": timeline}[request.param]()
    yield made
    for tts in made.made:
        await tts.aclose()


async def test_speech_comes_as_whole_16_bit_samples(voice: Voice) -> None:
    chunks = [chunk async for chunk in voice.speaking().synthesize(TEXT, voice=voice.voice, sample_rate=16_000)]
    assert len(chunks) > 1, "streamed, not in one piece"
    assert all(chunk and len(chunk) % 2 == 0 for chunk in chunks)


async def test_a_phone_line_gets_the_same_speech_as_8_khz_mu_law(voice: Voice) -> None:
    pcm = b"".join([c async for c in voice.speaking().synthesize(TEXT, voice=voice.voice, sample_rate=16_000)])
    tts = voice.speaking("mulaw")
    mulaw = b"".join([c async for c in tts.synthesize(TEXT, voice=voice.voice, sample_rate=PHONE_RATE,
                                                     codec="mulaw")])
    # One byte a sample at 8 kHz: as long as the PCM's speech, whether the voice makes it or it is encoded.
    assert abs(len(mulaw) - len(pcm) // 4) <= PHONE_RATE // 50
    assert len(mulaw_to_pcm16(mulaw)) == 2 * len(mulaw)


async def test_empty_text_is_no_speech(voice: Voice) -> None:
    tts = voice.speaking(codec=None)  # (nothing queued: nothing may be asked for)
    for codec in ("pcm_s16le", "mulaw"):
        assert [c async for c in tts.synthesize("  ", voice=voice.voice, codec=codec)] == []  # type: ignore[arg-type]


async def test_speech_says_who_spoke_and_that_nothing_failed(voice: Voice) -> None:
    tts = voice.speaking()
    speech = tts.speak(TEXT, voice=voice.voice)
    assert [c async for c in speech.chunks]
    assert speech.provider == tts.name
    assert (speech.report.failures, speech.report.fallbacks) == ([], [])


async def test_a_voice_that_fails_raises_a_provider_error_of_a_known_kind_and_the_speech_reports_it(
    voice: Voice,
) -> None:
    tts = voice.failing()
    speech = tts.speak(TEXT, voice=voice.voice)
    with pytest.raises(ProviderError) as caught:
        await anext(speech.chunks)
    error = caught.value
    assert type(error.kind) is ErrorKind
    assert error.provider == tts.name
    assert speech.report.failures == [ProviderFailure.of(error)], "what the session records of it"
