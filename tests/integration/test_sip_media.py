"""What a SIP caller sends is what the call hears and records, sample for sample and in step with its
packets, through the real stack (PJSIP) over loopback RTP. PJSIP's loss concealment, on by default, held
back 5 ms of every frame it decoded: the caller's audio was heard 40 samples late, out of step with its
20 ms packets, and the end of each turn reached into one more frame (docs/performance.md, "SIP calls")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consumers.event_reader import read_call
from schemas.events import CallerAudioChunk
from voxlog.settings import Settings
from voxlog.sim.sip_caller import FRAME_BYTES, SipCaller, free_sip_port
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = pytest.mark.slow

AGENT = "+15550100"
MARKER = bytes(range(0x00, 0x50)) * 2
"""One packet of loud mu-law codes (each decodes to a sample of its own and encodes back to itself) found
nowhere else in the call."""
PACKETS = 25


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "home", sip_bind=f"127.0.0.1:{free_sip_port()}")
    async with local_stack(settings) as running:
        yield running


def recorded_mulaw(chunks: list[CallerAudioChunk]) -> bytes:
    """The caller's recorded stream, each chunk at its place (8 kHz mu-law: 8 bytes a millisecond)."""
    assert chunks
    assert {(c.codec, c.sample_rate) for c in chunks} == {("mulaw", 8000)}
    stream = bytearray()
    for chunk in sorted(chunks, key=lambda c: c.offset_ms):
        assert chunk.offset_ms * 8 == len(stream), "the recording has a gap or an overlap"
        stream += chunk.audio
    return bytes(stream)


async def test_the_caller_is_heard_sample_for_sample_in_step_with_its_packets(stack: LocalStack) -> None:
    assert stack.gateway.sip is not None
    caller = SipCaller("127.0.0.1", stack.gateway.sip.port, AGENT)
    assert await caller.dial() == 200
    try:
        assert await caller.agent_quiet(0.5, 30), "the greeting never ended (or never reached the caller)"
        [session] = stack.gateway.sessions.values()
        call_id = session.call.call_id
        sent = MARKER * PACKETS
        assert len(MARKER) == FRAME_BYTES
        await caller.send_mulaw(sent)
        await caller.send_mulaw(b"\xff" * FRAME_BYTES * 25)
    finally:
        await caller.hangup()
        await caller.close()
    await stack.gateway.wait_idle(30)
    async with stack.gateway.backend.admin() as admin:
        events = (await read_call(admin, call_id)).events
    recorded = recorded_mulaw([e.payload for e in events if isinstance(e.payload, CallerAudioChunk)])

    at = recorded.find(MARKER)
    assert at >= 0, "the caller's packet is not in the recording as it was sent"
    # The stream starts with the call's first packet; PJSIP's jitter buffer works in 10 ms frames (80
    # samples), so whatever it drops or adds on a busy machine, the packet starts on a 10 ms boundary.
    assert at % (FRAME_BYTES // 2) == 0, f"heard {at % (FRAME_BYTES // 2)} samples out of step with the packets"
    assert sent in recorded or recorded.count(MARKER) >= PACKETS - 2, "most of what was sent was not heard"
