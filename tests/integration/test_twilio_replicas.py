"""Gateways behind one public address (a load balancer, as docker-compose.yml allows): Twilio posts each
call's voice webhook to the shared address, whichever replica the balancer picks answers it and holds
the call, so the call's media stream and its transfer's outcome must come back to that replica, not
to the balancer's next pick. Each replica knows its own address (VOXLOG_REPLICA_URL) and names it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed

from schemas.events import CallStarted, HandoffOutcome
from streams.channels.twilio_webhook_protocol import DIAL_ACTION_PATH, MEDIA_PATH
from tests.integration.test_call_e2e import agent_done_speaking, speech
from tests.integration.test_outbound_calls import dial_action_url, stream_of
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

BALANCER = "https://voice.example.com"
"""The address Twilio is configured with: no replica's own."""


def landing(url: str, replicas: list[LocalStack], turn: int) -> str:
    """Where a WebSocket to `url` lands: sent to the balancer, the replica whose turn it is (round
    robin, one connection after another); sent to a replica's own address, that replica."""
    parts = urlsplit(url)
    if parts.netloc != urlsplit(BALANCER).netloc:
        return url
    replica = urlsplit(replicas[turn % len(replicas)].base_url)
    return urlunsplit(("ws", replica.netloc, parts.path, "", ""))  # (the balancer's URL has no path of its own)


async def test_each_call_streams_and_hears_its_transfer_outcome_at_the_replica_that_answered(
        tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(local_stack(Settings(home=tmp_path / name), behind=BALANCER))
                    for name in ("a", "b")]
        for turn, answering in enumerate(replicas):
            caller = answering.caller(from_=f"+1555777000{turn}")  # the balancer gave the webhook to this one
            instructions = await caller.dial()  # signed over the balancer's URL
            own = urlsplit(answering.base_url)
            assert instructions.url == urlunsplit(("ws", own.netloc, MEDIA_PATH, "", "")), instructions.url
            async with caller:
                # The next connection through the balancer would reach the other replica; this goes to its own.
                await caller.connect(instructions, connect_url=landing(instructions.url, replicas, turn + 1))
                await agent_done_speaking(caller)
                with contextlib.suppress(ConnectionClosed):  # the transfer may end the stream while we still send
                    await caller.send_mulaw(speech("i want to talk to a person"))
                await asyncio.wait_for(caller.closed.wait(), 30)
            await answering.gateway.wait_idle(30)
            call_id = instructions.parameters["call_id"]
            events = await stream_of(answering, call_id)
            assert isinstance(events[0].payload, CallStarted)

            (transfer,) = answering.twilio.requests_for("update_call", caller.call_sid)
            action = dial_action_url(transfer.params["Twiml"])
            assert action.startswith(f"{answering.base_url}{DIAL_ACTION_PATH}?"), action
            params = caller.voice_params(CallStatus="in-progress", DialCallStatus="completed", DialCallDuration="7",
                                         DialCallSid="CA" + "d" * 32)
            answer = await caller.post_webhook(action[len(answering.base_url):], params, signed_url=action)
            assert answer.status_code == 200, answer.text
            outcome = (await stream_of(answering, call_id))[-1].payload
            assert isinstance(outcome, HandoffOutcome)
            assert (outcome.outcome, outcome.duration_s) == ("connected", 7)
        assert [len(replica.gateway.reports) for replica in replicas] == [1, 1]
