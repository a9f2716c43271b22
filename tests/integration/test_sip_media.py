"""What a SIP caller sends is what the call hears and records, sample for sample and in step with its
packets, through the real stack (PJSIP) over loopback RTP. PJSIP's loss concealment, on by default, held
back 5 ms of every frame it decoded: the caller's audio was heard 40 samples late, out of step with its
20 ms packets, and the end of each turn reached into one more frame (docs/performance.md, "SIP calls")."""

from __future__ import annotations

import pytest

from schemas.events import CallerAudioChunk
from tests.sip_wire import answered_call, payloads_of
from voxlog.sim.sip_caller import FRAME_BYTES
from voxlog.sim.stack import LocalStack

pytestmark = pytest.mark.slow

MARKER = bytes(range(0x00, 0x50)) * 2
"""One packet of loud mu-law codes (each decodes to a sample of its own and encodes back to itself) found
nowhere else in the call."""
PACKETS = 25


def recorded_mulaw(chunks: list[CallerAudioChunk]) -> bytes:
    """The caller's recorded stream, each chunk at its place (8 kHz mu-law: 8 bytes a millisecond)."""
    assert chunks
    assert {(c.codec, c.sample_rate) for c in chunks} == {("mulaw", 8000)}
    stream = bytearray()
    for chunk in sorted(chunks, key=lambda c: c.offset_ms):
        assert chunk.offset_ms * 8 == len(stream), "the recording has a gap or an overlap"
        stream += chunk.audio
    return bytes(stream)


async def test_the_caller_is_heard_sample_for_sample_in_step_with_its_packets(sip_stack: LocalStack) -> None:
    sent = MARKER * PACKETS
    assert len(MARKER) == FRAME_BYTES
    async with answered_call(sip_stack) as (caller, call_id):
        await caller.send_mulaw(sent)
        await caller.send_mulaw(b"\xff" * FRAME_BYTES * 25)
    recorded = recorded_mulaw([p for p in await payloads_of(sip_stack, call_id) if isinstance(p, CallerAudioChunk)])

    at = recorded.find(MARKER)
    assert at >= 0, "the caller's packet is not in the recording as it was sent"
    # The stream starts with the call's first packet; PJSIP's jitter buffer works in 10 ms frames (80
    # samples), so whatever it drops or adds on a busy machine, the packet starts on a 10 ms boundary.
    assert at % (FRAME_BYTES // 2) == 0, f"heard {at % (FRAME_BYTES // 2)} samples out of step with the packets"
    assert sent in recorded or recorded.count(MARKER) >= PACKETS - 2, "most of what was sent was not heard"
