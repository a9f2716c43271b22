"""Debian's SIP user agent baresip (1.0.0, `apt-get install baresip`, /usr/bin/baresip) as a real far-end
peer for voxlog's SIP tests: a caller that dials the gateway and speaks, or a phone that answers (the
target of a transfer).

`baresip_peer(workdir, ...)` runs one baresip in a process group of its own, headless on the loopback
address (free ports picked here), with a config folder of its own under `workdir`, and drives it over its
`ctrl_tcp` module (netstring-framed JSON commands; every event baresip reports comes back on the same
socket and is kept in `BaresipPeer.events`). What a peer says is an 8 kHz mono 16-bit WAV played by the
`aufile` source (`speech_wav_8k` makes one from espeak-ng's speech; `play` switches to another mid-call);
what it hears is recorded by the `sndfile` filter, one WAV per call (`received_audio`). Its player is
`aubridge`, which needs no sound card.

What baresip 1.0.0 does, found by running it (the tests rely on it):
- commands (ctrl_tcp `command`, with `params`): `dial <uri>`, `accept`, `hangup`, `sndcode <digits>` (RFC 4733
  telephone-events), `transfer <uri>` (sends REFER), `ausrc aufile,<wav>`, `listcalls`, `help`;
- events (`"event": true`, `type`, with `id` the call's Call-ID, `peeruri`, `direction`, `param`):
  CALL_RINGING (outgoing, on 180), CALL_INCOMING (only where the account does not answer by itself),
  CALL_ESTABLISHED, CALL_RTPESTAB (first RTP received), CALL_DTMF_START (`param`: the digit received)
  and CALL_DTMF_END, CALL_CLOSED (`param`: the reason, e.g. "Connection reset by peer" on the far end's
  BYE, "Connection reset by user" on our own hang-up, "486 Busy Here"), AUDIO_ERROR;
- a REFER received: TRANSFER (`param`: the Refer-To URI), then baresip dials that URI as a new call (its
  own CALL_RINGING, CALL_ESTABLISHED, another `id`) and the first call ends with CALL_CLOSED once the
  transferor hangs up (the transferor's own CALL_CLOSED says "Call transfered");
- `aufile` ends the call when its file ends (AUDIO_ERROR "0,end of file", then CALL_CLOSED), so every
  file it plays is padded here with `hold_s` seconds of silence;
- SIP listens on UDP and TCP at the port given and on TLS at the next one, so both are picked free.

Without baresip a test skips (`require_baresip`), except under CI=true where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.audio.codecs import parse_wav_header, read_wav, resample_pcm16, to_mono_pcm16, write_wav
from tests.needs import missing
from tests.speech import require_espeak, synthesize_pcm16

BARESIP = Path("/usr/bin/baresip")
MODULES = Path("/usr/lib/baresip/modules")
RATE = 8_000  # what aufile plays and what PCMU carries
CODEC_RATES = {"g711": RATE, "g722": 16_000}
"""The codec modules a peer may load (its only one: what it offers and accepts), and the rate aufile then plays."""
STARTUP_TIMEOUT_S = 30.0  # a loaded 2-core machine
COMMAND_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # a port picked free may be taken before baresip binds it
DEFAULT_HOLD_S = 120.0


def require_baresip() -> None:
    if not BARESIP.exists():
        missing(str(BARESIP), "tools/setup.sh --dev installs it: apt-get install baresip")


def speech_wav_8k(text: str, path: Path) -> Path:
    """`text` spoken by espeak-ng, as the 8 kHz mono 16-bit WAV `aufile` plays."""
    require_espeak()
    write_wav(path, synthesize_pcm16(text, RATE), RATE)  # resampled from espeak-ng's 22.05 kHz
    return path


# -- ports and files ------------------------------------------------------------------------------


def _bindable(port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(*, with_next: bool = False) -> int:
    """A loopback port free for TCP and UDP (and, `with_next`, the next one for TCP: baresip's SIP/TLS)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as picker:
            picker.bind(("127.0.0.1", 0))
            port = int(picker.getsockname()[1])
        if port >= 65535 or not _bindable(port, socket.SOCK_DGRAM) or not _bindable(port, socket.SOCK_STREAM):
            continue
        if with_next and not _bindable(port + 1, socket.SOCK_STREAM):
            continue
        return port
    raise AssertionError("no free loopback port for baresip")


def _playable(source: Path | None, target: Path, hold_s: float, rate: int = RATE) -> Path:
    """`source` (any PCM WAV; silence where None) as mono 16-bit at `rate` (the codec's), followed by
    `hold_s` seconds of silence: aufile hangs up at the end of its file."""
    pcm = b""
    if source is not None:
        pcm, source_rate = read_wav(source)
        if source_rate != rate:
            pcm = resample_pcm16(pcm, source_rate, rate)
    write_wav(target, pcm + b"\x00\x00" * int(hold_s * rate), rate)
    return target


def _config(sip_port: int, ctrl_port: int, source: Path, recordings: Path, codec: str) -> str:
    modules = (codec, "aufile", "aubridge", "sndfile", "account", "menu", "ctrl_tcp")  # ctrl_tcp last
    return "\n".join([
        f"sip_listen 127.0.0.1:{sip_port}",
        "net_interface 127.0.0.1",
        "net_af ipv4",
        f"audio_source aufile,{source}",
        "audio_player aubridge,voxlog-test",  # no sound card; what it hears is recorded by sndfile
        f"snd_path {recordings}",
        "statmode_default off",  # no call-status line on the log every few ms
        f"module_path {MODULES}",
        *(f"module {name}.so" for name in modules),
        f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}",
        "",
    ])


def _kill_process_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)
            return


def _netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


# -- the peer -------------------------------------------------------------------------------------


@dataclass
class BaresipPeer:
    """One running baresip, driven over ctrl_tcp. `wait_event` returns each event once, in order, per kind."""

    user: str
    codec: str  # a module of CODEC_RATES
    sip_port: int
    ctrl_port: int
    folder: Path  # its config, log, and `recordings/`
    process: subprocess.Popen[bytes]
    events: list[dict[str, Any]] = field(default_factory=list)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _read_task: asyncio.Task[None] | None = None
    _replies: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _tokens: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _returned: dict[str, int] = field(default_factory=dict)  # per kind, how many wait_event returned
    _disconnected: str | None = None
    _play_files: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def uri(self) -> str:
        return f"sip:{self.user}@127.0.0.1:{self.sip_port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "baresip.log"

    @property
    def recordings(self) -> Path:
        return self.folder / "recordings"

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def diagnostics(self) -> str:
        """Everything to print when a test fails: the events and the log's end."""
        lines = [json.dumps(event, sort_keys=True) for event in self.events if event.get("type") != "CALL_RTCP"]
        return f"baresip {self.uri} events:\n" + "\n".join(lines) + f"\nlog:\n{self.log_tail()}"

    # -- ctrl_tcp --

    async def _connect(self, deadline: float) -> None:
        """Connects and waits for the first answer: baresip answers from its main loop, which starts
        once all of it (SIP transports, accounts, modules) is up."""
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"baresip exited ({self.process.returncode}) at start:\n{self.log_tail()}")
            try:
                self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.ctrl_port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"baresip's ctrl_tcp did not listen in {STARTUP_TIMEOUT_S} s:\n"
                                         f"{self.log_tail()}") from None
                await asyncio.sleep(0.05)
        self._read_task = asyncio.create_task(self._read(self._reader))
        await self.command("listcalls", timeout_s=max(0.1, deadline - time.monotonic()))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "baresip closed its ctrl_tcp connection"
        try:
            while True:
                length = await reader.readuntil(b":")
                payload = await reader.readexactly(int(length[:-1]))
                if await reader.readexactly(1) != b",":
                    raise ValueError("netstring without its trailing comma")
                message: dict[str, Any] = json.loads(payload)
                if message.get("response"):
                    waiter = self._replies.pop(str(message.get("token")), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
                elif message.get("event"):
                    async with self._changed:
                        self.events.append(message)
                        self._changed.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            reason = f"{reason} ({exc!r})"
        except (ValueError, asyncio.LimitOverrunError) as exc:
            reason = f"baresip sent what is not a netstring of JSON: {exc!r}"
        finally:
            self._disconnected = reason
            for waiter in self._replies.values():
                if not waiter.done():
                    waiter.set_exception(AssertionError(f"{reason}\n{self.log_tail()}"))
            async with self._changed:
                self._changed.notify_all()

    async def command(self, name: str, params: str = "", *, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        """Runs a command (as typed after `/` on baresip's console); its output, or AssertionError."""
        if self._writer is None or self._disconnected is not None:
            raise AssertionError(f"baresip {self.uri} is not connected: {self._disconnected}\n{self.log_tail()}")
        token = str(next(self._tokens))
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[token] = waiter
        self._writer.write(_netstring(json.dumps({"command": name, "params": params, "token": token}).encode()))
        await self._writer.drain()
        try:
            reply = await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            self._replies.pop(token, None)
            raise AssertionError(f"baresip did not answer /{name} {params} in {timeout_s} s\n"
                                 f"{self.diagnostics()}") from None
        data = str(reply.get("data", ""))
        if not reply.get("ok"):
            raise AssertionError(f"baresip refused /{name} {params}: {data}\n{self.diagnostics()}")
        return data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task

    # -- what a test does --

    async def dial(self, uri: str) -> None:
        await self.command("dial", uri)

    async def accept(self) -> None:
        """Answers the incoming call (CALL_INCOMING) of a peer that does not answer by itself."""
        await self.command("accept")

    async def send_dtmf(self, digits: str) -> None:
        """RFC 4733 telephone-events on the current call, one digit per command (baresip paces them)."""
        for digit in digits:
            await self.command("sndcode", digit)

    async def transfer(self, uri: str) -> None:
        """Sends REFER to the far end of the current call (a blind transfer to `uri`)."""
        await self.command("transfer", uri)

    async def play(self, wav: Path, *, hold_s: float = DEFAULT_HOLD_S) -> None:
        """Switches what this peer says, mid-call, to `wav` (from its start), then silence."""
        target = _playable(wav, self.folder / f"play-{next(self._play_files)}.wav", hold_s, CODEC_RATES[self.codec])
        await self.command("ausrc", f"aufile,{target}")

    async def hangup(self) -> None:
        await self.command("hangup")

    async def wait_event(self, kind: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The next event of `kind` (e.g. "CALL_ESTABLISHED", "CALL_CLOSED", "CALL_DTMF_START") not yet
        returned by this method, as baresip reported it; AssertionError with the diagnostics past the
        deadline or when baresip is gone."""
        wanted = self._returned.get(kind, 0) + 1

        def matching() -> list[dict[str, Any]]:
            return [event for event in self.events if event.get("type") == kind]

        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(matching()) >= wanted or self._disconnected is not None),
                    timeout_s)
            except TimeoutError:
                raise AssertionError(f"baresip {self.uri}: no {kind} (#{wanted}) in {timeout_s} s\n"
                                     f"{self.diagnostics()}") from None
        found = matching()
        if len(found) < wanted:
            raise AssertionError(f"baresip {self.uri}: no {kind} (#{wanted}): {self._disconnected}\n"
                                 f"{self.diagnostics()}")
        self._returned[kind] = wanted
        return found[wanted - 1]

    def received_digits(self) -> str:
        """The DTMF digits received so far, in order."""
        return "".join(str(e.get("param", "")) for e in self.events if e.get("type") == "CALL_DTMF_START")

    def recording_path(self) -> Path:
        """sndfile's WAV of what the peer heard in its last call, `recordings/dump-<start time>-dec.wav`
        (`-enc.wav` beside it is what it said). Two calls starting in the same second share a name."""
        found = sorted(self.recordings.glob("dump-*-dec.wav"))  # the name holds the start time, sortable
        if not found:
            raise AssertionError(f"baresip {self.uri} recorded no call in {self.recordings}\n{self.diagnostics()}")
        return found[-1]

    def received_audio(self) -> tuple[bytes, int]:
        """What the peer heard in its last call: 16-bit mono PCM and its rate (PCMU: 8 kHz). Read as far as
        written, so also while the call lasts (sndfile writes the WAV's sizes only when it closes it)."""
        path = self.recording_path()
        data = path.read_bytes()
        header = parse_wav_header(data)
        if header is None:
            return b"", RATE
        end = len(data) if header.data_size is None else min(len(data), header.data_offset + header.data_size)
        body = data[header.data_offset:end]
        frame = header.sample_width * header.channels
        body = body[: len(body) - len(body) % frame]
        return to_mono_pcm16(body, header.sample_width, header.channels), header.sample_rate


def _launch(folder: Path, user: str, source: Path, auto_answer: bool, codec: str) -> BaresipPeer:
    """Writes the config and accounts on freshly picked ports and starts baresip in its own process group."""
    sip_port = _free_port(with_next=True)
    ctrl_port = _free_port()
    while ctrl_port in (sip_port, sip_port + 1):
        ctrl_port = _free_port()
    recordings = folder / "recordings"
    recordings.mkdir(parents=True, exist_ok=True)
    (folder / "config").write_text(_config(sip_port, ctrl_port, source, recordings, codec))
    answer = ";answermode=auto" if auto_answer else ""
    (folder / "accounts").write_text(f"<sip:{user}@127.0.0.1:{sip_port}>;regint=0{answer}\n")
    with (folder / "baresip.log").open("ab") as log:
        process = subprocess.Popen([str(BARESIP), "-f", str(folder)], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return BaresipPeer(user, codec, sip_port, ctrl_port, folder, process)


async def _start(folder: Path, user: str, source: Path, auto_answer: bool, codec: str,
                 deadline: float) -> BaresipPeer:
    peer = _launch(folder, user, source, auto_answer, codec)
    try:
        await peer._connect(deadline)
    except BaseException:
        await peer.close()
        await asyncio.to_thread(_kill_process_group, peer.process)
        raise
    return peer


@asynccontextmanager
async def baresip_peer(workdir: Path, *, user: str = "caller", play: Path | None = None, auto_answer: bool = False,
                       hold_s: float = DEFAULT_HOLD_S, codec: str = "g711") -> AsyncIterator[BaresipPeer]:
    """A baresip with the SIP address `sip:<user>@127.0.0.1:<free port>` until the block ends, its files in
    `workdir/baresip-<user>/`. In each call it says `play` (any PCM WAV; silence where None) and then
    `hold_s` seconds of silence (then aufile hangs up); `auto_answer` answers incoming calls at once; `codec`
    (of CODEC_RATES) is the one codec it speaks."""
    require_baresip()
    folder = workdir / f"baresip-{user}"
    folder.mkdir(parents=True)
    source = _playable(play, folder / "play-0.wav", hold_s, CODEC_RATES[codec])
    failures: list[str] = []
    for _ in range(START_ATTEMPTS):
        try:
            peer = await _start(folder, user, source, auto_answer, codec, time.monotonic() + STARTUP_TIMEOUT_S)
            break
        except AssertionError as exc:  # e.g. a port taken between its pick and baresip's bind
            failures.append(str(exc))
    else:
        raise AssertionError(f"baresip did not start in {START_ATTEMPTS} tries:\n" + "\n---\n".join(failures))
    try:
        yield peer
    finally:
        await peer.close()
        await asyncio.to_thread(_kill_process_group, peer.process)
