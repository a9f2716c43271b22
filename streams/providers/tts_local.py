"""What the offline voices share: a local program run per text (espeak-ng, flite).

`LocalTts` runs the voice's program with `create_subprocess_exec` (never through a shell) and the text
on its standard input, so no text can be taken for an option or exceed the limits on a command line.
It holds the program to a deadline that the consumer's time between chunks does not count, kills and
reaps it when the consumer stops early, checks voice names, says how the program failed as a
`ProviderError`, and hands the speech on in chunks of `chunk_ms`. A subclass only runs its program
and turns what it wrote into PCM (`_pcm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import ClassVar, TypeVar

from streams.providers.base import ErrorKind, ProviderError, TtsCapabilities, TtsProvider, close_chunks

__all__ = ["Deadline", "LocalTts", "Program"]

_T = TypeVar("_T")


class Deadline:
    """The time a program may take for one text. The consumer's time between chunks (pacing playback,
    say) does not count: `LocalTts` moves the deadline on by every pause at a `yield`."""

    def __init__(self, provider: str, seconds: float) -> None:
        self.provider = provider
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    def extend(self, seconds: float) -> None:
        self._at += seconds

    async def within(self, awaitable: Awaitable[_T]) -> _T:
        """Awaits within what is left of the time; past it, a `timeout` ProviderError."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, self._at - time.monotonic()))
        except TimeoutError as exc:
            raise ProviderError(
                self.provider, ErrorKind.TIMEOUT, f"{self.provider} took more than {self.seconds} s", retryable=True
            ) from exc


class Program:
    """One run of a voice's program, as `LocalTts._running` started it."""

    def __init__(self, provider: str, process: asyncio.subprocess.Process, deadline: Deadline) -> None:
        assert process.stderr is not None
        self.provider = provider
        self.process = process
        self.deadline = deadline
        # Read as it comes: a program blocked on a full stderr pipe would never exit.
        self.stderr = asyncio.create_task(process.stderr.read())

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes of its standard output (b"" at its end)."""
        assert self.process.stdout is not None
        return await self.deadline.within(self.process.stdout.read(size))

    async def exited(self) -> str:
        """Waits for it to exit; returns what it wrote on stderr. ProviderError `failed` (with its last
        line of stderr) where it exited with an error."""
        returncode = await self.deadline.within(self.process.wait())
        stderr = (await self.deadline.within(self.stderr)).decode(errors="replace").strip()
        if returncode != 0:
            detail = f": {stderr.splitlines()[-1]}" if stderr else ""
            raise ProviderError(self.provider, ErrorKind.FAILED,
                                f"{self.provider} exited with status {returncode}{detail}")
        return stderr


class LocalTts(TtsProvider):
    """A voice that runs a local program per text, 16-bit mono PCM at any sample rate.

    Args:
        binary: the executable (a name on PATH or a path).
        chunk_ms: size of the chunks yielded.
        timeout_s: the longest the program may take for one text (time the consumer spends between
            chunks does not count).
        default_voice: used when the caller passes an empty voice.
    """

    capabilities = TtsCapabilities(local=True)
    package: ClassVar[str]
    """The Debian package that installs the program (what `not_installed` says to install)."""
    voices: ClassVar[re.Pattern[str]]
    """The voice names it takes, whole: never one that could pass for an option."""

    def __init__(self, *, binary: str, chunk_ms: int, timeout_s: float, default_voice: str) -> None:
        if chunk_ms <= 0 or timeout_s <= 0:
            raise ValueError("chunk_ms and timeout_s must be positive")
        self.binary = binary
        self.chunk_ms = chunk_ms
        self.timeout_s = timeout_s
        self.default_voice = default_voice

    def _voice(self, voice: str) -> str:
        voice = voice or self.default_voice
        if not self.voices.fullmatch(voice):
            raise ProviderError(self.name, ErrorKind.BAD_REQUEST, f"not a voice name: {voice!r}")
        return voice

    async def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        """`_pcm` in chunks of `chunk_ms`. ProviderError: `not_installed`, `failed` (the program exited
        with an error), `empty_output`, `bad_output`, `timeout`."""
        deadline = Deadline(self.name, self.timeout_s)
        chunk_bytes = max(2, sample_rate * self.chunk_ms // 1000 * 2)
        out = bytearray()  # PCM not yet yielded
        produced = 0
        pcm = self._pcm(text, voice, sample_rate, deadline)
        try:
            async for piece in pcm:
                out += piece
                while len(out) >= chunk_bytes:
                    paused = time.monotonic()
                    yield bytes(out[:chunk_bytes])
                    deadline.extend(time.monotonic() - paused)
                    produced += chunk_bytes
                    del out[:chunk_bytes]
        except ValueError as exc:  # not a WAV, or one cut short
            raise ProviderError(self.name, ErrorKind.BAD_OUTPUT, str(exc)) from exc
        finally:
            await close_chunks(pcm)  # stops the program now where the consumer stopped early
        if produced + len(out) == 0:
            raise ProviderError(self.name, ErrorKind.EMPTY_OUTPUT,
                                f"{self.name} wrote no audio for {len(text)} characters")
        if out:
            yield bytes(out)

    @abstractmethod
    def _pcm(self, text: str, voice: str, sample_rate: int, deadline: Deadline) -> AsyncIterator[bytes]:
        """16-bit mono PCM at `sample_rate` for `text`, in pieces of any size as the program makes it
        (run through `_running`, awaiting within `deadline`); ValueError for output that is no WAV."""

    @contextlib.asynccontextmanager
    async def _running(self, args: Sequence[str], text: str, deadline: Deadline, *,
                       stdout: bool = False) -> AsyncIterator[Program]:
        """`binary` with `args` and `text` on its standard input (`stdout`: its standard output piped,
        for `Program.read`); stopped and reaped on the way out, however that comes."""
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            raise ProviderError(self.name, ErrorKind.NOT_INSTALLED,
                                f"{self.binary!r} not found; install it (apt-get install {self.package})") from exc
        except OSError as exc:
            raise ProviderError(self.name, ErrorKind.FAILED, f"cannot run {self.binary!r}: {exc}") from exc
        program = Program(self.name, process, deadline)
        # Written alongside the reading: a program that speaks as it reads would otherwise fill its
        # stdout while a text longer than the stdin pipe holds waits to be taken in.
        feeding = asyncio.create_task(_feed(process, text.encode("utf-8") + b"\n"))
        try:
            yield program
        finally:
            await _stop(process)
            for task in (feeding, program.stderr):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def _feed(process: asyncio.subprocess.Process, data: bytes) -> None:
    """Writes the text and closes stdin; a program that exits without reading it all says why in its
    exit status."""
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
        process.stdin.close()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kills the program (unless it exited) and reaps it. What it wrote on stdout is read and dropped:
    asyncio stops reading a pipe whose buffer is full, and would then never see it close, nor let
    `wait` return."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            while process.stdout is not None and await process.stdout.read(65536):
                pass
            await process.wait()
