"""The QA console in a real browser: headless Chromium (`tests/chromium.py`), whose network reaches the
local gateway and nothing else, opens `/console` on the local stack after a call was played through it
and another written into the log whose caller said some markup; QA gives the demo tenant's key, lists
and filters the calls, opens the played one, plays its recording and watches the highlighted
transcript line follow, runs a what-if with a reworded greeting and reads the diff; then opens the
other call, whose transcript shows the markup as text and runs none of it.

Screenshots of each step are written to `test-artifacts/console/` (gitignored; VOXLOG_TEST_ARTIFACTS
names another folder), for a person to look at.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from projections.store import AnalyticsStore
from tests.chromium import STARTUP_TIMEOUT_S, Browser, Page, devtools, only_loopback, open_page, start_chromium
from tests.integration.test_console_api import (
    GREETING,
    REWORDED,
    call_continuously,
    project,
    seed,
    seeded_call,
)
from tests.integration.test_outbound_calls import DEMO_KEY, agents_with_two_tenants
from tests.speech import require_espeak
from voxlog.settings import Settings
from voxlog.sim.stack import LocalStack, local_stack

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(os.environ.get("VOXLOG_TEST_ARTIFACTS") or Path(__file__).parents[2] / "test-artifacts") / "console"
MARKUP = '<script>window.__vxInjected = 1</script><img src=x onerror="window.__vxInjected = 2"> is my router broken'
STEP_TIMEOUT_S = 30


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    with start_chromium(tmp_path, [only_loopback(), "--mute-audio"]) as running:
        yield running


@pytest.fixture
async def stack(store: AnalyticsStore, tmp_path: Path) -> AsyncIterator[LocalStack]:
    settings = Settings(home=tmp_path / "home", agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as running:
        running.gateway.analytics = store  # this process's ClickHouse, the test's own database
        yield running


class Requests:
    """Every URL the page asked for (Network domain)."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def __call__(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            self.urls.append(params["request"]["url"])


def js(value: object) -> str:
    return json.dumps(value)


async def shot(page: Page, name: str) -> None:
    await page.screenshot(ARTIFACTS / f"{name}.png")


async def test_qa_reviews_a_call_in_the_console(stack: LocalStack, store: AnalyticsStore, browser: Browser) -> None:
    require_espeak()
    played = await call_continuously(stack, "i have a problem with my internet", "no thank you goodbye",
                                     number="+15557770188")
    await stack.gateway.wait_idle(30)
    marked_up = await seed(stack.gateway.backend, "demo", time.time_ns() // 1000 - 3_600_000_000,
                           seeded_call(caller_says=[MARKUP, "thanks"], index=1))
    await project(stack, store)
    assert stack.settings.agents_dir is not None
    agent_file = (stack.settings.agents_dir / "demo" / "front-desk.yaml").read_text()
    started = time.monotonic()

    requests = Requests()
    async with devtools(browser.devtools_url) as cdp:
        cdp.listeners.append(requests)
        page = await open_page(cdp, width=1400, height=1000)
        await page.navigate(f"{stack.base_url}/console")
        await page.wait_for("document.readyState === 'complete' && !document.getElementById('vx-login').hidden",
                            timeout_s=STARTUP_TIMEOUT_S, what="the console's key form")
        assert await page.evaluate("document.getElementById('vx-list').hidden"), "nothing shows without a key"
        await shot(page, "01-key")

        # A wrong key is refused, and nothing shows.
        await page.evaluate("document.getElementById('vx-key').value = 'not-a-key';"
                            "document.getElementById('vx-login').requestSubmit()", user_gesture=True)
        await page.wait_for("document.getElementById('vx-status').classList.contains('vx-error')",
                            timeout_s=STEP_TIMEOUT_S, what="the wrong key refused")
        assert await page.evaluate("document.getElementById('vx-list').hidden")
        assert await page.evaluate("sessionStorage.length") == 0
        cdp.log_entries.clear()  # the browser logs the 401 it got: expected here

        # The demo's key: its calls, newest first.
        await page.evaluate(f"document.getElementById('vx-key').value = {js(DEMO_KEY)};"
                            "document.getElementById('vx-login').requestSubmit()", user_gesture=True)
        rows = "Array.from(document.querySelectorAll('#vx-calls tbody tr[data-call-id]')).map(r => r.dataset.callId)"
        listed = await page.wait_for(f"(() => {{ const r = {rows}; return r.length === 2 ? r : null; }})()",
                                     timeout_s=STEP_TIMEOUT_S, what="the two calls listed")
        assert listed == [played, marked_up]
        assert await page.evaluate("document.getElementById('vx-page').textContent") == "1–2 of 2"
        await shot(page, "02-calls")

        # Filtered by outcome: the played call opened a ticket.
        await page.evaluate("(() => { const f = document.getElementById('vx-filters');"
                            "f.elements.outcome.value = 'ticket_created'; f.requestSubmit(); })()")
        await page.wait_for(f"(() => {{ const r = {rows}; return r.length === 1 && r[0] === {js(played)}; }})()",
                            timeout_s=STEP_TIMEOUT_S, what="only the ticket call listed")

        # The played call: facts, replay, transcript, recording.
        await page.click(f"#vx-calls tr[data-call-id={js(played)}] a")
        await page.wait_for(f"document.body.dataset.loadedCall === {js(played)}", timeout_s=STEP_TIMEOUT_S,
                            what="the call's page")
        assert await page.evaluate("document.getElementById('vx-replay').dataset.status") == "identical"
        lines = await page.evaluate("Array.from(document.querySelectorAll('#vx-transcript .vx-line')).map(l => "
                                    "({speaker: l.dataset.speaker, seq: l.dataset.seq, position: l.dataset.position,"
                                    " text: l.querySelector('.vx-text').textContent}))")
        assert any(GREETING in line["text"] for line in lines), lines
        assert any("internet" in line["text"] for line in lines if line["speaker"] == "caller"), lines
        assert await page.evaluate("document.querySelectorAll('#vx-turns tbody tr').length") >= 2
        assert await page.evaluate("document.querySelector('#vx-tools tbody').textContent.includes('create_ticket')")
        assert await page.evaluate("document.querySelectorAll('#vx-timeline tbody tr').length") > 10
        duration = await page.wait_for(
            "(() => { const a = document.getElementById('vx-audio'); "
            "return a.src.startsWith('blob:') && a.readyState >= 1 ? a.duration : 0; })()",
            timeout_s=STEP_TIMEOUT_S, what="the recording loaded into the player")
        assert 5 < duration < 60, duration

        # A click on the caller's line seeks there and highlights it.
        caller_line = next(line for line in lines if line["speaker"] == "caller" and "internet" in line["text"])
        await page.click(f"#vx-transcript .vx-line[data-seq={js(caller_line['seq'])}]")
        current = ("(() => { const c = document.querySelector('#vx-transcript .vx-current'); "
                   "return c ? c.dataset.seq : null; })()")
        assert await page.wait_for(current, timeout_s=STEP_TIMEOUT_S, what="a line highlighted") == caller_line["seq"]
        position = await page.evaluate("document.getElementById('vx-audio').currentTime")
        assert abs(position * 1000 - int(caller_line["position"])) < 300, (position, caller_line)

        # Played from the start, the highlight follows the recording.
        await page.evaluate("(() => { const a = document.getElementById('vx-audio'); a.pause(); a.currentTime = 0;"
                            "a.playbackRate = 2; return a.play(); })()", user_gesture=True)
        seen: list[str] = []
        deadline = time.monotonic() + duration / 2 + STEP_TIMEOUT_S
        while len(dict.fromkeys(seen)) < 3 and time.monotonic() < deadline:
            now = await page.evaluate(current)
            if now is not None and (not seen or seen[-1] != now):
                seen.append(now)
            await asyncio.sleep(0.1)
        playing = await page.evaluate("(() => { const a = document.getElementById('vx-audio');"
                                      "return {time: a.currentTime, paused: a.paused, error: a.error && a.error.code};"
                                      "})()")
        assert len(dict.fromkeys(seen)) >= 3, f"the highlight did not move along: {seen}, player {playing}"
        order = [line["seq"] for line in sorted((ln for ln in lines if ln["position"]), key=lambda ln:
                                                int(ln["position"]))]
        assert seen == [s for s in order if s in seen], f"the highlight went out of order: {seen} vs {order}"
        await shot(page, "03-call")
        await page.evaluate("document.getElementById('vx-audio').pause()")

        # What if the greeting were reworded: the opening differs, the rest is counterfactual.
        await page.evaluate(f"document.getElementById('vx-agent').value = "
                            f"{js(agent_file.replace(GREETING, REWORDED))}")
        await page.click("#vx-run-whatif")
        diff = await page.wait_for(
            "(() => { const rows = document.querySelectorAll('#vx-whatif-result tbody tr');"
            "return rows.length ? Array.from(rows).map(r => ({cls: r.className, index: r.dataset.index,"
            "text: r.textContent})) : null; })()", timeout_s=STEP_TIMEOUT_S * 2, what="the what-if's diff")
        assert diff[0]["cls"] == "vx-first-diff", diff
        assert GREETING in diff[0]["text"], diff[0]
        assert REWORDED in diff[0]["text"], diff[0]
        assert diff[1:], diff
        assert all(row["cls"] == "vx-counterfactual" for row in diff[1:]), diff
        summary = await page.evaluate("document.querySelector('#vx-whatif-result .vx-summary').textContent")
        assert summary.startswith("Changed."), summary
        await page.evaluate("document.getElementById('vx-whatif-result').scrollIntoView()")
        await shot(page, "04-whatif")

        # The call whose caller said markup: shown as text, none of it runs.
        await page.evaluate(f"location.hash = '#/calls/' + encodeURIComponent({js(marked_up)})")
        await page.wait_for(f"document.body.dataset.loadedCall === {js(marked_up)}", timeout_s=STEP_TIMEOUT_S,
                            what="the marked-up call's page")
        texts = await page.evaluate("Array.from(document.querySelectorAll('#vx-transcript .vx-text'))"
                                    ".map(t => t.textContent)")
        assert any("<script>window.__vxInjected = 1</script>" in text for text in texts), texts
        turns = await page.evaluate("document.querySelector('#vx-turns tbody').textContent")
        assert "<img src=x" in turns, turns
        await asyncio.sleep(0.5)  # an onerror would have fired by now
        assert await page.evaluate("typeof window.__vxInjected") == "undefined"
        assert await page.evaluate("document.querySelectorAll('main img, main script').length") == 0
        assert await page.evaluate("document.scripts.length") == 1
        await shot(page, "05-markup-as-text")

        assert not cdp.exceptions, cdp.diagnostics()
        assert not cdp.console_errors, cdp.diagnostics()
        assert not cdp.log_entries, cdp.diagnostics()  # a refused Content-Security-Policy would be logged here
    elsewhere = [url for url in requests.urls if not url.startswith((stack.base_url, "blob:", "data:"))]
    assert not elsewhere, f"the page reached beyond the gateway: {elsewhere}"
    print(f"console session {time.monotonic() - started:.1f} s; screenshots in {ARTIFACTS}")


async def test_the_api_docs_render_with_no_network_but_the_gateways(stack: LocalStack, browser: Browser) -> None:
    """`/docs` (Swagger UI) and `/redoc` in a browser that reaches the gateway and nothing else: both draw
    the API from assets voxlog serves, and nothing leaves for another host (ReDoc's script asks for its
    CDN's logo: the pages' Content-Security-Policy refuses it in the browser)."""
    requests = SentRequests()
    async with devtools(browser.devtools_url) as cdp:
        cdp.listeners.append(requests)
        page = await open_page(cdp, width=1200, height=900)
        await page.navigate(f"{stack.base_url}/docs")
        title = await page.wait_for("(() => { const t = document.querySelector('.swagger-ui .info .title');"
                                    "return t ? t.textContent : null; })()", timeout_s=STARTUP_TIMEOUT_S,
                                    what="Swagger UI's title")
        assert "voxlog gateway" in title
        await page.wait_for("document.querySelectorAll('.swagger-ui .opblock').length > 10", timeout_s=STEP_TIMEOUT_S,
                            what="the operations listed")
        await shot(page, "06-api-docs")
        await page.navigate(f"{stack.base_url}/redoc")
        await page.wait_for("document.body.textContent.includes('/v1/console/calls')", timeout_s=STARTUP_TIMEOUT_S,
                            what="ReDoc's operations")
        await shot(page, "07-redoc")
        await page.close()
    outside = [url for url in requests.sent() if not url.startswith((stack.base_url, "data:", "blob:"))]
    assert not outside, f"the API docs asked other hosts: {outside}"
    assert requests.urls, "no request was seen at all"


class SentRequests(Requests):
    """The URLs the page asked for, less those its Content-Security-Policy refused (never sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.refused: set[str] = set()

    def __call__(self, method: str, params: dict[str, Any]) -> None:
        super().__call__(method, params)
        if method == "Network.requestWillBeSent":
            self.by_id[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            self.refused.add(params["requestId"])

    def sent(self) -> list[str]:
        return [url for request_id, url in self.by_id.items() if request_id not in self.refused]
