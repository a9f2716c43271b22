"""Headless Chromium driven over the Chrome DevTools Protocol with plain `websockets` (no Playwright or
Selenium), for the tests of voxlog's browser pages (the widget, the QA console).

`start_chromium` runs Debian's Chromium (`apt-get install chromium`, /usr/bin/chromium) in a process
group of its own with a fresh profile; `devtools` connects to the browser target; `open_page` opens
a tab and attaches to it (`Page`: evaluate, wait for, click, screenshot). What a page does wrong
(JavaScript exceptions, console errors, the browser's log errors: a refused Content-Security-Policy,
a failed load) is collected on the `Cdp` connection for the test to assert on and to print.

Without Chromium a test skips (`require_chromium`), except under CI=true where it fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.needs import missing

CHROMIUM = Path("/usr/bin/chromium")
STARTUP_TIMEOUT_S = 60  # Chromium's first start on a loaded 2-core machine
CDP_TIMEOUT_S = 30  # any single DevTools command

BASE_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",
)


def require_chromium() -> None:
    if not CHROMIUM.exists():
        missing(str(CHROMIUM), "tools/setup.sh installs it: apt-get install chromium")


def only_loopback() -> str:
    """A flag that makes every host name but the loopback address unresolvable: a page can reach the
    local gateway (at 127.0.0.1) and nothing else, as in a customer's VPC without internet."""
    return "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


# -- Chromium ----------------------------------------------------------------------------------


@dataclass
class Browser:
    process: subprocess.Popen[bytes]
    devtools_url: str  # the browser's DevTools WebSocket
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def chromium_args(user_data_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    return [str(CHROMIUM), *BASE_ARGS, f"--user-data-dir={user_data_dir}", *extra, "about:blank"]


def devtools_url(user_data_dir: Path, process: subprocess.Popen[bytes], log_path: Path) -> str:
    """With --remote-debugging-port=0 Chromium picks a free port and writes it, and the browser
    target's path, to `DevToolsActivePort` in the profile (written whole once listening)."""
    active_port = user_data_dir / "DevToolsActivePort"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Chromium exited ({process.returncode}) at start:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(OSError):
            lines = active_port.read_text().splitlines()
            if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].startswith("/devtools/browser/"):
                return f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
        time.sleep(0.1)
    raise AssertionError(f"Chromium wrote no DevToolsActivePort in {STARTUP_TIMEOUT_S} s:\n"
                         f"{log_path.read_text()[-4000:]}")


def kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """Chromium (the Debian launcher script, the browser, its zygote, renderers, utility processes)
    runs in a process group of its own: end all of it, politely and then not."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)
            if sig == signal.SIGTERM:
                # the leader is gone; its children may linger a moment: make sure
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            return


@contextlib.contextmanager
def start_chromium(folder: Path, extra_args: Sequence[str] = ()) -> Iterator[Browser]:
    """Chromium with a fresh profile under `folder` (and its log there), until the block ends."""
    require_chromium()
    user_data_dir = folder / "chromium-profile"
    user_data_dir.mkdir(parents=True)
    log_path = folder / "chromium.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(chromium_args(user_data_dir, extra_args), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Browser(process, devtools_url(user_data_dir, process, log_path), log_path)
    finally:
        kill_process_group(process)


# -- the DevTools Protocol ----------------------------------------------------------------------

Listener = Callable[[str, dict[str, Any]], None]
"""Called with every DevTools event (method, params), for what a test watches beyond the errors."""


@dataclass
class Cdp:
    """A DevTools connection to the browser target, with flattened sessions for pages."""

    ws: ClientConnection
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    exceptions: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    log_entries: list[str] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self.waiting.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    self.on_event(message["method"], message.get("params", {}))
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the DevTools connection closed"))

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text", "")
            self.exceptions.append(f"{description} at {details.get('url', '?')}:{details.get('lineNumber', '?')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console_errors.append(text)
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.log_entries.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        for listener in self.listeners:
            listener(method, params)

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> Any:
        message_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[message_id] = future
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send(json.dumps(message))
        try:
            reply = await asyncio.wait_for(future, CDP_TIMEOUT_S)
        finally:
            self.waiting.pop(message_id, None)
        if "error" in reply:
            raise AssertionError(f"DevTools {method} failed: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str, *, session: str, user_gesture: bool = False) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True, "userGesture": user_gesture},
                                 session=session)
        if "exceptionDetails" in result:
            raise AssertionError(f"evaluating {expression[:80]!r} threw: {result['exceptionDetails']}\n"
                                 f"{self.diagnostics()}")
        return result["result"].get("value")

    def diagnostics(self) -> str:
        return (f"JS exceptions: {self.exceptions}\nconsole errors: {self.console_errors}\n"
                f"browser log errors: {self.log_entries}")


@contextlib.asynccontextmanager
async def devtools(url: str) -> AsyncIterator[Cdp]:
    async with connect(url, max_size=None, ping_interval=None, open_timeout=CDP_TIMEOUT_S) as ws:
        cdp = Cdp(ws)
        reader = asyncio.create_task(cdp.read())
        try:
            yield cdp
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


@dataclass
class Page:
    """A tab, attached with a flattened session."""

    cdp: Cdp
    target: str
    session: str

    async def evaluate(self, expression: str, *, user_gesture: bool = False) -> Any:
        return await self.cdp.evaluate(expression, session=self.session, user_gesture=user_gesture)

    async def navigate(self, url: str) -> None:
        """Opens `url` and returns once its document has loaded: what is read next is the new page's, never
        the one being left (whose body may be gone by then)."""
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_load(method: str, params: dict[str, Any]) -> None:
            if method == "Page.loadEventFired" and not loaded.done():
                loaded.set_result(None)

        self.cdp.listeners.append(on_load)
        try:
            navigated = await self.cdp.send("Page.navigate", {"url": url}, session=self.session)
            assert "errorText" not in navigated, navigated
            await asyncio.wait_for(loaded, STARTUP_TIMEOUT_S)
        finally:
            self.cdp.listeners.remove(on_load)

    async def wait_for(self, expression: str, *, timeout_s: float, what: str, poll_s: float = 0.1,
                       context: Callable[[], str] = lambda: "") -> Any:
        """The value of `expression` once it is truthy, polled; fails after `timeout_s`, or at once on a
        JavaScript exception on the page, saying `what` was waited for."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            assert not self.cdp.exceptions, f"JavaScript exceptions on the page while waiting for {what}\n" \
                                            f"{context()}\n{self.cdp.diagnostics()}"
            assert time.monotonic() < deadline, (f"{what}: not within {timeout_s} s\n{context()}\n"
                                                 f"{self.cdp.diagnostics()}")
            await asyncio.sleep(poll_s)

    async def click(self, selector: str) -> None:
        """Clicks the first element `selector` finds (as a user's click: a user gesture)."""
        found = await self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                                    "if (!e) return false; e.click(); return true; })()", user_gesture=True)
        assert found, f"nothing to click: {selector}\n{self.cdp.diagnostics()}"

    async def screenshot(self, path: Path) -> Path:
        """The page as it looks now, as a PNG at `path`."""
        shot = await self.cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                   session=self.session)
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        await self.cdp.send("Target.closeTarget", {"targetId": self.target})


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def open_page(cdp: Cdp, domains: Sequence[str] = ("Runtime", "Log", "Network", "Page"), *,
                    width: int | None = None, height: int | None = None) -> Page:
    """A new blank tab with `domains` enabled (their events reach the `Cdp`'s listeners)."""
    target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
    session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
    for domain in domains:
        await cdp.send(f"{domain}.enable", session=session)
    if width is not None and height is not None:
        await cdp.send("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    return Page(cdp, target, session)
