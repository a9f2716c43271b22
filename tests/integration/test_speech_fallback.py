"""Cloud speech providers failing mid-call: the caller is still heard and still answered, by the
next provider of the agent's chains, and the log tells what happened. The real Deepgram, OpenAI
(Whisper) and ElevenLabs SDKs, and PlayHT's HTTP API, talk to local servers that replay their
recorded wire protocols (tests/provider_ws_server.py, tests/provider_server.py); the caller is a real
Twilio media stream with synthesized speech, through the real gateway."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from schemas.events import (
    AgentAudioChunk,
    ErrorRaised,
    ProviderFallback,
    TranscriptFinal,
    TtsCompleted,
    TtsRequested,
)
from streams.call.replay import agent_for, verify_call
from streams.config.agents import load_agents
from streams.providers.registry import ProviderRegistry
from streams.providers.settings import ProviderSettings
from streams.providers.tts_chain import sentences
from tests.integration.test_call_e2e import AGENT_NUMBER, agent_done_speaking, events_of, speech
from tests.provider_server import Fault, ProviderServer
from tests.provider_ws_server import ProviderWsServer, WsFault
from voxlog.settings import DEFAULT_AGENTS_DIR, Settings
from voxlog.sim.stack import local_stack

pytestmark = pytest.mark.slow

ELEVENLABS_VOICE = "JBFqnCBsd6RMkjVDRZzb"  # the voice of the elevenlabs fixtures
PLAYHT_VOICE = "s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json"
WHISPER_TEXT = "I'd like to book a technician for Tuesday."  # the text of openai/transcription_ok


def cloud_speech_agents(folder: Path) -> Path:
    """The demo agents, the front desk hearing with Deepgram (Whisper behind it) and speaking with
    ElevenLabs (PlayHT behind it)."""
    shutil.copytree(DEFAULT_AGENTS_DIR, folder)
    path = folder / "demo" / "front-desk.yaml"
    agent = yaml.safe_load(path.read_text())
    agent["asr"] = {"provider": "deepgram", "model": "nova-3", "timeout_s": 3,
                    "fallbacks": [{"provider": "whisper", "model": "whisper-1"}]}
    agent["tts"] = {"provider": "elevenlabs", "voice": ELEVENLABS_VOICE, "timeout_s": 2,
                    "fallbacks": [{"provider": "playht", "voice": PLAYHT_VOICE}]}
    path.write_text(yaml.safe_dump(agent))
    return folder


async def test_a_dropped_recogniser_and_a_stalled_voice_are_replaced_within_the_turn(tmp_path: Path) -> None:
    agents = cloud_speech_agents(tmp_path / "agents")
    front_desk = next(a for a in load_agents(agents) if a.id == "front-desk")
    greeting_sentences = len(sentences(f"{front_desk.consent.text} {front_desk.greeting}"))
    async with (ProviderWsServer() as deepgram, ProviderServer() as whisper, ProviderServer() as elevenlabs,
                ProviderServer() as playht):
        # Deepgram hears the caller start, sends one interim, and its socket drops mid-utterance.
        deepgram.expect("deepgram/utterance_interims_final", WsFault(drop_after_messages=2))
        deepgram.expect("deepgram/utterance_interims_final")  # back to Deepgram, after Whisper's result
        whisper.reply("openai/transcription_ok")
        # ElevenLabs says the greeting, a sentence a request; its first sentence of the answer stalls
        # after a few chunks (its stall timeout gives it up), then PlayHT says the answer.
        for _ in range(greeting_sentences):
            elevenlabs.reply("elevenlabs/stream_ulaw_8000")
        elevenlabs.reply("elevenlabs/stream_ulaw_8000", Fault(stall_before_chunk=3, stall_s=60))
        for _ in range(10):
            elevenlabs.reply("elevenlabs/stream_ulaw_8000")
            playht.reply("playht/stream_mulaw_8000")
        keys = ProviderSettings(
            deepgram_api_key="dg-test-key", deepgram_base_url=deepgram.url,
            openai_api_key="sk-test-whisper", openai_base_url=f"{whisper.base_url}/v1",
            elevenlabs_api_key="xi-test-key", elevenlabs_base_url=elevenlabs.base_url,
            playht_api_key="playht-test-key", playht_user_id="playht-test-user", playht_base_url=playht.base_url)
        settings = Settings(home=tmp_path / "home", agents_dir=agents)
        async with local_stack(settings) as stack:
            stack.gateway.provider_registry = ProviderRegistry(keys)
            caller = stack.caller(from_="+15557770433", to=AGENT_NUMBER)
            instructions = await caller.dial()
            async with caller:
                await caller.connect(instructions)
                await agent_done_speaking(caller)  # consent notice and greeting, from ElevenLabs
                heard = len(caller.agent_audio)
                await caller.send_mulaw(speech("i would like to book a technician for tuesday"))
                assert await caller.agent_speaks_beyond(heard), "the caller got an answer"
                # A gap as long as ElevenLabs' stall timeout (2 s) comes mid-answer, while PlayHT takes over.
                assert await caller.agent_quiet(3.0, 60), "the answer ended"
                await caller.stop()
            call_id = instructions.parameters["call_id"]
            events = await events_of(stack, call_id)
            await stack.gateway.provider_registry.aclose()

    payloads = [e.payload for e in events]
    (final,) = [p for p in payloads if isinstance(p, TranscriptFinal)]
    assert (final.provider, final.model, final.text) == ("whisper", "whisper-1", WHISPER_TEXT)
    assert final.end_ms > final.start_ms >= 0
    assert [w.word for w in final.words][-1] == "Tuesday", "with Whisper's word timings"
    switches = [(p.capability, p.from_provider, p.to_provider, p.reason)
                for p in payloads if isinstance(p, ProviderFallback)]
    assert switches == [("asr", "deepgram", "whisper", "error"), ("tts", "elevenlabs", "playht", "timeout")]
    errors = [(p.component, p.provider, p.kind) for p in payloads if isinstance(p, ErrorRaised)]
    assert errors[0][:2] == ("asr", "deepgram")
    assert ("tts", "elevenlabs", "timeout") in errors

    spoken = {p.request_id: p for p in payloads if isinstance(p, TtsCompleted)}
    requested = [p for p in payloads if isinstance(p, TtsRequested)]
    greeting, answer = requested[0], requested[1]
    assert spoken[greeting.request_id].provider == "elevenlabs"
    assert spoken[answer.request_id].provider == "playht", "the answer, from the voice that took over"
    assert spoken[answer.request_id].voice == PLAYHT_VOICE
    assert not spoken[answer.request_id].interrupted
    assert spoken[answer.request_id].audio_ms > 0

    agent_audio = [p for p in payloads if isinstance(p, AgentAudioChunk)]
    assert {(c.codec, c.sample_rate) for c in agent_audio} == {("mulaw", 8000)}, "the phone line's own format"
    assert verify_call(events, agent_for(events, stack.gateway.router)).identical, "replay needs no provider"

    socket, returned = deepgram.sockets
    assert socket.headers["authorization"] == "Token dg-test-key"
    assert returned.query == socket.query, "the call went back to Deepgram for its next utterance"
    assert socket.query["encoding"] == ["linear16"]
    assert socket.query["sample_rate"] == ["16000"]
    (transcription,) = whisper.requests
    assert transcription.path == "/v1/audio/transcriptions"
    synthesis = elevenlabs.requests[0]
    assert synthesis.path == f"/v1/text-to-speech/{ELEVENLABS_VOICE}/stream"
    assert "output_format=ulaw_8000" in synthesis.query
    assert synthesis.headers["xi-api-key"] == "xi-test-key"
    assert playht.requests[0].json()["voice"] == PLAYHT_VOICE
    assert playht.requests[0].json()["output_format"] == "mulaw"
