"""What a hostile peer or stranger gets from a call in progress, over real UDP to the real stack (PJSIP).
Whose RTP a call takes (`gateway.rtp_source_lock`): a stranger who floods a call's RTP port is neither sent
the call nor heard in it, a caller behind NAT (its packets from another port than its SDP names) is
answered where they come from, and a peer that moves its media by re-INVITE is followed. What a peer may
ask within the call: a REFER (PJSIP would dial its target) and an INVITE replacing the call are refused,
audited, and the call goes on."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest

from gateway import rtp_source_lock
from schemas.events import ErrorRaised, SpeechStarted
from tests.sip_wire import AGENT, SipWire, answered_call, audits_of, payloads_of
from voxlog.bench_calls import caller_speech
from voxlog.sim.sip_caller import free_sip_port
from voxlog.sim.stack import LocalStack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not rtp_source_lock.SUPPORTED, reason="socket filters are Linux's")]

STRANGER = "127.0.0.5"
FLOOD_TICKS = 75
"""1.5 s of 20 ms ticks."""
PACKETS_A_TICK = 20
"""PJSIP switches to a source that sends ten packets between two of the caller's."""


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return count
        count += 1


async def flood(target: tuple[str, int], speech: bytes) -> int:
    """A stranger's RTP at the call's port, speech in it, `PACKETS_A_TICK` a tick: how many packets came back."""
    seq, timestamp, ssrc = random.randrange(65536), random.randrange(2**32), random.randrange(2**32)
    received = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind((STRANGER, 0))
        stranger.setblocking(False)
        for tick in range(FLOOD_TICKS):
            for index in range(PACKETS_A_TICK):
                at = (tick * PACKETS_A_TICK + index) * 160 % max(len(speech) - 160, 1)
                stranger.sendto(struct.pack("!BBHII", 0x80, 0, seq, timestamp, ssrc) + speech[at:at + 160], target)
                seq, timestamp = (seq + 1) % 65536, (timestamp + 160) % 2**32
            await asyncio.sleep(0.02)
            received += drain(stranger)
        await asyncio.sleep(0.3)
        return received + drain(stranger)


async def heard_speech(stack: LocalStack, call_id: str) -> bool:
    """Whether the agent's VAD heard speech in the call (a `speech.started` in its log)."""
    return any(isinstance(p, SpeechStarted) for p in await payloads_of(stack, call_id))


async def test_a_stranger_flooding_a_calls_rtp_port_is_sent_nothing_and_not_heard(sip_stack: LocalStack) -> None:
    async with answered_call(sip_stack) as (caller, call_id):
        assert caller.gateway_rtp is not None
        before = len(caller.agent_frames)
        back = await flood(caller.gateway_rtp, await caller_speech())
        during = len(caller.agent_frames) - before
        assert back == 0, f"the stranger was sent {back} packets of the call"
        # 90 ticks of the bridge's clock passed; a loaded machine may send fewer, none if the stranger had the call.
        assert during >= 45, f"the caller got {during} packets while the stranger flooded"
        await asyncio.sleep(1.0)  # the VAD would have heard the stranger's speech by now
    assert not await heard_speech(sip_stack, call_id), "the agent heard the stranger"


async def test_without_the_latch_pjsip_sends_the_call_to_the_stranger(
    sip_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack the latch stops is real: with it off, PJSIP's symmetric RTP hands the stranger the call."""
    monkeypatch.setattr(rtp_source_lock, "SUPPORTED", False)
    async with answered_call(sip_stack) as (caller, _):
        assert caller.gateway_rtp is not None
        assert await flood(caller.gateway_rtp, await caller_speech()) > 0


async def test_a_caller_behind_nat_is_answered_where_its_rtp_comes_from(sip_stack: LocalStack) -> None:
    # Its SDP names a port nothing listens on, as a phone behind NAT names its private one: the greeting
    # reaches the port its RTP comes from, or `answered_call` fails.
    async with answered_call(sip_stack, sdp_rtp_port=free_sip_port()) as (caller, _):
        assert caller.loud_bytes() > 8000


async def test_a_peer_that_moves_its_media_by_re_invite_is_heard_at_the_new_port(sip_stack: LocalStack) -> None:
    """A PBX moving a call's media to a phone: the latch follows the new SDP, the old address's is forgotten."""
    async with answered_call(sip_stack) as (caller, call_id):
        assert await caller.move_media() == 200
        moved_at = len(caller.agent_frames)
        await caller.send_mulaw(await caller_speech())
        await caller.send_mulaw(bytes([0xFF]) * 8000)  # a second of silence: the end of the caller's turn
        assert len(caller.agent_frames) - moved_at >= 50, "the agent's RTP did not follow to the new port"
    assert await heard_speech(sip_stack, call_id), "the caller was not heard from its new port"


async def test_a_callers_refer_is_refused_dials_nobody_and_the_call_goes_on(sip_stack: LocalStack) -> None:
    """PJSIP's default was to INVITE whatever a caller's REFER named: a premium number through the trunk."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        target.setblocking(False)
        refer_to = f"<sip:+19005550123@127.0.0.1:{target.getsockname()[1]}>"
        async with answered_call(sip_stack) as (caller, call_id):
            status = await caller.request("REFER", extra=[f"Refer-To: {refer_to}"])
            assert status == 403
            await asyncio.sleep(1.0)
            assert drain(target) == 0, "the gateway dialled the REFER's target"
            assert not caller.closed.is_set()
            before = len(caller.agent_frames)
            await asyncio.sleep(0.5)
            assert len(caller.agent_frames) - before >= 10, "the call's audio stopped"
    payloads = await payloads_of(sip_stack, call_id)
    [refused] = [p for p in payloads if isinstance(p, ErrorRaised) and "REFER" in p.message]
    assert refused.kind == "bad_input"
    assert "+19005550123" in refused.message
    [audit] = await audits_of(sip_stack, call_id)
    assert (audit.action, audit.outcome, audit.remote_addr) == ("sip.refer_refused", "denied", "127.0.0.1")


async def test_an_invite_that_replaces_a_call_is_refused_and_the_call_goes_on(sip_stack: LocalStack) -> None:
    """An INVITE with Replaces takes a call over without its own screening; nobody here needs it."""
    assert sip_stack.gateway.sip is not None
    async with answered_call(sip_stack) as (caller, call_id):
        wire = SipWire(sip_stack.gateway.sip.port, "127.0.0.1")
        try:
            taking = wire.invite(AGENT, headers={"Replaces": caller.replaces()})
            assert (await wire.final(taking)).status == 403
        finally:
            wire.close()
        assert not caller.closed.is_set()
        before = len(caller.agent_frames)
        await asyncio.sleep(0.5)
        assert len(caller.agent_frames) - before >= 10, "the call's audio stopped"
    assert [a.action for a in await audits_of(sip_stack, call_id)] == ["sip.replaces_refused"]
