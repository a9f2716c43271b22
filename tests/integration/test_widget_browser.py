"""The web voice widget in a real browser: headless Chromium opens `/widget` on the local stack, its
microphone is a WAV file (Chromium's fake capture device) of a caller saying "i have a problem with
my internet", and the test drives the page over the Chrome DevTools Protocol (`tests/chromium.py`:
plain `websockets`, no Playwright or Selenium): click "Start call", watch the transcript for the
greeting and the ticket the agent opens, let the answer's audio all come, close the page, then check
the call in the log.

What runs for real: getUserMedia, the AudioWorklet capture and its resampling to 16 kHz PCM, the
widget's WebSocket protocol, the agent's audio received and scheduled on Web Audio, the gateway's
widget socket, VAD + pocketsphinx on the browser's audio, the scripted agent and its ticket tool.

Chromium is Debian's (`apt-get install chromium`) at /usr/bin/chromium; without it the test skips,
except under CI=true where it fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumers.event_reader import read_call
from schemas.base import Event, EventPayload
from schemas.events import AgentAudioChunk, CallEnded, CallerAudioChunk, CallStarted, ToolRequested, TurnTaken
from streams.audio.codecs import write_wav
from tests.chromium import STARTUP_TIMEOUT_S, Browser, devtools, open_page, start_chromium
from tests.speech import require_espeak, silence, synthesize_pcm16
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WIDGET_KEY = "demo-widget-key"
CALLER_SAYS = "i have a problem with my internet"
GREETING = "Thanks for calling Acme"  # voxlog/agents/demo/front-desk.yaml
TICKET_ANSWER = re.compile(r"opened ticket T\w+")  # its after_tool for create_ticket
# Chromium's fake capture device resamples the file to its own rate, so the WAV can be at the rate the
# widget sends: 16 kHz mono 16-bit.
FAKE_MIC_RATE = 16_000
# The file starts when getUserMedia opens the device, just before the widget's socket connects and the
# agent starts its consent notice and greeting (about 6 s of speech): the caller waits for them to end.
LEAD_SILENCE_MS = 8_000
# The agent answers meanwhile. The file is played once (`%noloop`, then silence); were it looped, the
# caller would repeat itself only after this.
TAIL_SILENCE_MS = 12_000
CALL_TIMEOUT_S = 90  # from the click to the agent's ticket answer in the transcript


# -- the caller's microphone -------------------------------------------------------------------


@pytest.fixture
def caller_wav(tmp_path: Path) -> Path:
    require_espeak()
    pcm = silence(LEAD_SILENCE_MS, FAKE_MIC_RATE) + synthesize_pcm16(CALLER_SAYS, FAKE_MIC_RATE)
    pcm += silence(TAIL_SILENCE_MS, FAKE_MIC_RATE)
    path = tmp_path / "caller.wav"
    write_wav(path, pcm, FAKE_MIC_RATE)
    return path


# -- Chromium ----------------------------------------------------------------------------------


def fake_microphone(wav: Path) -> list[str]:
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        # `%noloop`: the file is played once, then silence, so the caller does not repeat itself.
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    ]


@pytest.fixture
def browser(tmp_path: Path, caller_wav: Path) -> Iterator[Browser]:
    with start_chromium(tmp_path, fake_microphone(caller_wav)) as running:
        yield running


@dataclass
class SocketTraffic:
    """The page's WebSocket traffic (Network domain): JSON messages received, each with how many audio
    (binary) frames had been received before it, and counts of audio frames each way."""

    received: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    audio_received: int = 0
    audio_sent: int = 0

    def __call__(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.webSocketFrameReceived":
            if params["response"]["opcode"] == 2:
                self.audio_received += 1
            elif params["response"]["opcode"] == 1:
                self.received.append((self.audio_received, json.loads(params["response"]["payloadData"])))
        elif method == "Network.webSocketFrameSent" and params["response"]["opcode"] == 2:
            self.audio_sent += 1


# What the page shows, read in one go; statuses come from a MutationObserver so none is missed.
WATCH_STATUS = """(() => {
  const status = document.querySelector("#voxlog-widget .vx-status");
  window.__vxStatuses = [status.textContent];
  new MutationObserver(() => {
    const now = status.textContent;
    if (window.__vxStatuses[window.__vxStatuses.length - 1] !== now) window.__vxStatuses.push(now);
  }).observe(status, { childList: true, characterData: true, subtree: true });
  return true;
})()"""
PAGE_STATE = """(() => {
  const root = document.getElementById("voxlog-widget");
  return {
    statuses: window.__vxStatuses,
    callId: root.dataset.callId || null,
    lines: Array.from(root.querySelectorAll(".vx-line")).map((line) => ({
      speaker: line.dataset.speaker,
      caller: line.classList.contains("vx-caller"),
      agent: line.classList.contains("vx-agent"),
      interim: line.classList.contains("vx-interim"),
      text: line.textContent,
    })),
  };
})()"""


def agent_lines(state: dict[str, Any]) -> list[str]:
    return [line["text"] for line in state["lines"] if line["agent"] and not line["interim"]]


def caller_lines(state: dict[str, Any]) -> list[str]:
    return [line["text"] for line in state["lines"] if line["caller"]]


def answered_ticket(state: dict[str, Any]) -> bool:
    return any(TICKET_ANSWER.search(text) for text in agent_lines(state))


def answer_heard(traffic: SocketTraffic) -> int | None:
    """Audio frames the page received for the ticket answer, once all of it has come: the server shows
    an agent line as it starts speaking it and sends a `mark` after the last frame."""
    answer = next((i for i, (_, m) in enumerate(traffic.received)
                   if m.get("type") == "transcript" and TICKET_ANSWER.search(m.get("text", ""))), None)
    if answer is None:
        return None
    mark = next((frames for frames, m in traffic.received[answer + 1:] if m.get("type") == "mark"), None)
    return None if mark is None else mark - traffic.received[answer][0]


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture
async def stack(log_bootstrap: str | None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "voxlog", kafka_bootstrap=log_bootstrap)
    async with local_stack(settings) as running:
        yield running


async def call_events(stack: LocalStack, call_id: str) -> list[Event[EventPayload]]:
    async with stack.gateway.backend.admin() as admin:
        history = await read_call(admin, call_id)
    assert not history.undecodable, history.undecodable
    return history.events


async def test_a_caller_reports_a_problem_through_the_widget_in_chromium(stack: LocalStack, browser: Browser) -> None:
    started = time.monotonic()
    traffic = SocketTraffic()
    async with devtools(browser.devtools_url) as cdp:
        cdp.listeners.append(traffic)
        page = await open_page(cdp)
        await page.navigate(f"{stack.base_url}/widget?key={WIDGET_KEY}")
        mounted = "document.readyState === 'complete' && !!document.querySelector('#voxlog-widget .vx-start')"
        await page.wait_for(mounted, timeout_s=STARTUP_TIMEOUT_S, what="the widget mounted")
        await page.evaluate(WATCH_STATUS)
        await page.click("#voxlog-widget .vx-start")
        clicked = time.monotonic()

        state: dict[str, Any] = {}
        deadline = clicked + CALL_TIMEOUT_S
        while True:
            state = await page.evaluate(PAGE_STATE)
            problem = next((s for s in state["statuses"] if s.startswith(("error", "call ended", "disconnected"))),
                           None)
            assert problem is None, f"the widget stopped: {problem!r}\n{state}\n{cdp.diagnostics()}"
            assert not cdp.exceptions, f"JavaScript exceptions on the page\n{state}\n{cdp.diagnostics()}"
            if answered_ticket(state):
                break
            assert time.monotonic() < deadline, (
                f"no ticket answer within {CALL_TIMEOUT_S} s of the click\n{state}\n{cdp.diagnostics()}\n"
                f"Chromium's log:\n{browser.log_tail()}")
            await asyncio.sleep(0.25)
        answered = time.monotonic()

        # The caller listens to the whole answer before closing the page.
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while (answer_frames := answer_heard(traffic)) is None:
            assert time.monotonic() < deadline, f"the ticket answer's audio did not all come\n{traffic.received}"
            assert not cdp.exceptions, f"JavaScript exceptions on the page\n{cdp.diagnostics()}"
            await asyncio.sleep(0.25)
        heard = time.monotonic()
        assert answer_frames > 50, f"{answer_frames} audio frames came for the ticket answer"
        assert traffic.audio_sent > 250, f"the page sent {traffic.audio_sent} audio frames"  # 20 ms each

        assert "connected" in state["statuses"], state["statuses"]
        call_id = state["callId"]
        assert call_id, state
        assert any(GREETING in text for text in agent_lines(state)), state["lines"]
        assert caller_lines(state), f"no caller line in the transcript: {state['lines']}"
        assert all(line["speaker"] in ("caller", "agent") for line in state["lines"]), state["lines"]

        await page.close()  # the caller closes the tab: the socket closes
        assert not cdp.exceptions, cdp.diagnostics()

    try:
        await stack.gateway.wait_idle(30)  # the session ends once the widget's socket has closed
    except TimeoutError:
        pytest.fail(f"the call was still in progress 30 s after the page closed: {list(stack.gateway.sessions)}")
    events = await call_events(stack, call_id)
    ended = time.monotonic()
    print(f"page up {clicked - started:.1f} s, ticket answer shown {answered - clicked:.1f} s after the click, "
          f"heard {heard - answered:.1f} s later, call in the log {ended - heard:.1f} s after; "
          f"caller lines: {caller_lines(state)}")

    first = events[0].payload
    assert isinstance(first, CallStarted), events[0]
    assert (first.channel, first.routed_by, first.agent_id) == ("widget", "widget_key", "front-desk"), first
    assert [e.seq for e in events] == list(range(len(events))), "seq is gap-free and ordered"
    caller_chunks = [e.payload for e in events if isinstance(e.payload, CallerAudioChunk)]
    assert caller_chunks, "no caller audio in the log"
    assert {(c.codec, c.sample_rate) for c in caller_chunks} == {("pcm_s16le", 16_000)}
    assert all(len(c.audio) == 32 * c.duration_ms > 0 for c in caller_chunks), "16 kHz 16-bit PCM, whole frames"
    assert any(any(c.audio) for c in caller_chunks), "the caller's audio is all zeros"
    agent_chunks = [e.payload for e in events if isinstance(e.payload, AgentAudioChunk)]
    assert sum(c.duration_ms for c in agent_chunks) > 1000, f"{len(agent_chunks)} agent audio chunks"
    assert {(c.codec, c.sample_rate) for c in agent_chunks} == {("pcm_s16le", 16_000)}
    assert len({c.tts_request_id for c in agent_chunks}) >= 2, "the agent spoke the greeting and the answer"
    turns = [e.payload for e in events if isinstance(e.payload, TurnTaken)]
    assert turns, "no turn.taken"
    assert any("internet" in t.caller_text for t in turns), [t.caller_text for t in turns]
    tools = [e.payload for e in events if isinstance(e.payload, ToolRequested)]
    assert "create_ticket" in [t.tool for t in tools], tools
    call_ended = [e.payload for e in events if isinstance(e.payload, CallEnded)]
    assert len(call_ended) == 1, call_ended
    assert events[-1].type == "call.ended", [e.type for e in events[-5:]]
    assert call_ended[0].reason in ("caller_hangup", "socket_closed"), call_ended[0]
