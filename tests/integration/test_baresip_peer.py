"""The baresip harness on its own (`tests/baresip_peer.py`), before voxlog's SIP tests lean on it: real
baresip peers on the loopback address call each other. One says espeak-ng's speech and the other's
recording of the call holds it; DTMF digits sent each way are reported by the other side; a hang-up is
seen by both; a REFER makes the transferred peer call the transfer target, which answers by hand.

baresip is Debian's (`apt-get install baresip`); without it the tests skip, except under CI=true where
they fail.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from streams.audio.codecs import frames, read_wav, rms_dbfs
from tests.baresip_peer import BaresipPeer, baresip_peer, require_baresip, speech_wav_8k

CALLER_SAYS = "hello, i would like to check the status of my order please"
SPEECH_DBFS = -40.0  # espeak-ng's speech through PCMU is about -22 dBFS; PCMU's silence about -84
FRAME_MS = 20


def speech_seconds(pcm: bytes, rate: int) -> float:
    """How long `pcm` holds sound: its 20 ms frames louder than `SPEECH_DBFS`."""
    loud = sum(1 for frame in frames(pcm, rate, FRAME_MS) if rms_dbfs(frame) > SPEECH_DBFS)
    return loud * FRAME_MS / 1000


async def heard(peer: BaresipPeer, seconds: float, timeout_s: float) -> tuple[bytes, int]:
    """The peer's recording of its call, once `seconds` of it are sound (or the deadline passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if any(peer.recordings.glob("dump-*-dec.wav")) or time.monotonic() > deadline:  # sndfile opens it
            pcm, rate = peer.received_audio()
            if speech_seconds(pcm, rate) >= seconds or time.monotonic() > deadline:
                return pcm, rate
        await asyncio.sleep(0.1)


@pytest.mark.slow  # the caller says its phrase in real time
async def test_a_call_carries_speech_dtmf_and_hangup(tmp_path: Path) -> None:
    require_baresip()
    wav = speech_wav_8k(CALLER_SAYS, tmp_path / "caller-says.wav")
    said, said_rate = read_wav(wav)
    said_s = speech_seconds(said, said_rate)
    assert said_s > 1.5, "espeak-ng said too little to test with"

    async with (baresip_peer(tmp_path, user="callee", auto_answer=True) as callee,
                baresip_peer(tmp_path, user="caller", play=wav) as caller):
        assert caller.sip_port != callee.sip_port
        await caller.dial(callee.uri)
        established = await caller.wait_event("CALL_ESTABLISHED")
        assert established["peeruri"] == callee.uri
        assert established["direction"] == "outgoing"
        incoming = await callee.wait_event("CALL_ESTABLISHED")
        assert incoming["direction"] == "incoming"
        assert incoming["peeruri"] == caller.uri
        assert incoming["id"] == established["id"]  # the Call-ID

        # the caller's whole phrase reaches the callee
        pcm, rate = await heard(callee, said_s * 0.8, timeout_s=said_s + 20)
        assert rate == 8_000, "PCMU is 8 kHz"
        got_s = speech_seconds(pcm, rate)
        assert got_s >= said_s * 0.8, f"callee heard {got_s:.2f} s of sound of {said_s:.2f}\n{callee.diagnostics()}"
        assert rms_dbfs(pcm[: len(said)]) > -32.0, callee.diagnostics()
        # the caller's recording holds what the silent callee said: silence
        mine, mine_rate = caller.received_audio()
        assert speech_seconds(mine, mine_rate) == 0.0

        await caller.send_dtmf("12#")
        for digit in "12#":
            assert (await callee.wait_event("CALL_DTMF_START"))["param"] == digit
        await callee.send_dtmf("9*")
        for digit in "9*":
            assert (await caller.wait_event("CALL_DTMF_START"))["param"] == digit
        assert callee.received_digits() == "12#"
        assert caller.received_digits() == "9*"

        await caller.hangup()
        assert "by user" in (await caller.wait_event("CALL_CLOSED"))["param"]
        assert "by peer" in (await callee.wait_event("CALL_CLOSED"))["param"]
        assert not any(e.get("type") == "AUDIO_ERROR" for e in callee.events + caller.events)


async def test_refer_moves_the_call_to_a_peer_that_answers_by_hand(tmp_path: Path) -> None:
    require_baresip()
    async with (baresip_peer(tmp_path, user="agent", auto_answer=True) as agent,
                baresip_peer(tmp_path, user="human") as human,
                baresip_peer(tmp_path, user="caller") as caller):
        await caller.dial(agent.uri)
        first = await caller.wait_event("CALL_ESTABLISHED")
        await agent.wait_event("CALL_ESTABLISHED")

        await agent.transfer(human.uri)  # REFER to the caller
        transfer = await caller.wait_event("TRANSFER")
        assert transfer["param"] == human.uri
        assert transfer["id"] == first["id"]
        ringing = await human.wait_event("CALL_INCOMING")
        assert ringing["peeruri"] == caller.uri
        await human.accept()
        second = await caller.wait_event("CALL_ESTABLISHED")
        assert second["peeruri"] == human.uri
        assert second["id"] != first["id"]
        assert (await human.wait_event("CALL_ESTABLISHED"))["id"] == second["id"]
        assert (await agent.wait_event("CALL_CLOSED"))["param"] == "Call transfered"
        closed = await caller.wait_event("CALL_CLOSED")
        assert closed["id"] == first["id"]

        await human.hangup()
        assert (await caller.wait_event("CALL_CLOSED"))["id"] == second["id"]
        await human.wait_event("CALL_CLOSED")
