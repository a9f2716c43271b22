"""Offline speech synthesis with espeak-ng (the Debian package `espeak-ng`).

Each request runs `espeak-ng --stdout -v VOICE -s WPM` as a subprocess (never through a shell),
with the text on its standard input, so no text can be taken for an option or exceed the limits on
a command line. espeak-ng writes a WAV stream (22.05 kHz, 16-bit mono, placeholder sizes) as it
synthesises, sentence by sentence; it is resampled as it arrives to the rate asked for and handed
on in chunks of `chunk_ms`, so the first audio is out before the whole text is spoken.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from streams.audio.codecs import WavChunks
from streams.providers.base import ErrorKind, ProviderError, TtsCapabilities, TtsProvider

__all__ = ["EspeakTts"]

PROVIDER = "espeak-ng"
_VOICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-./]*$")
_READ_SIZE = 8192
_T = TypeVar("_T")


class EspeakTts(TtsProvider):
    """espeak-ng voices ("en-us", "en-gb", "en-us+f3" ...), 16-bit mono PCM at any sample rate.

    Args:
        binary: the espeak-ng executable (a name on PATH or a path).
        words_per_minute: speaking rate (espeak-ng's -s; its own default is 175).
        chunk_ms: size of the chunks yielded.
        timeout_s: the longest espeak-ng may take for one text (time the consumer spends between
            chunks does not count).
        default_voice: used when the caller passes an empty voice.
    """

    name = PROVIDER
    capabilities = TtsCapabilities(local=True)

    def __init__(
        self,
        *,
        binary: str = "espeak-ng",
        words_per_minute: int = 160,
        chunk_ms: int = 100,
        timeout_s: float = 20.0,
        default_voice: str = "en-us",
    ) -> None:
        if not 80 <= words_per_minute <= 500:
            raise ValueError(f"words_per_minute must be within 80..500, got {words_per_minute}")
        if chunk_ms <= 0 or timeout_s <= 0:
            raise ValueError("chunk_ms and timeout_s must be positive")
        self.binary = binary
        self.words_per_minute = words_per_minute
        self.chunk_ms = chunk_ms
        self.timeout_s = timeout_s
        self.default_voice = default_voice

    def _voice(self, voice: str) -> str:
        voice = voice or self.default_voice
        if not _VOICE.match(voice):
            raise ProviderError(PROVIDER, ErrorKind.BAD_REQUEST, f"not a voice name: {voice!r}")
        return voice

    async def _synthesize(self, text: str, voice: str, sample_rate: int) -> AsyncIterator[bytes]:
        """As espeak-ng makes it. ProviderError: `not_installed`, `failed` (espeak-ng exited with an
        error: an unknown voice, for one), `empty_output`, `bad_output`, `timeout`."""
        # The time espeak-ng may take, not counting the time the consumer spends between chunks
        # (pacing playback, say): the deadline moves on by every pause at a `yield`.
        deadline = time.monotonic() + self.timeout_s
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary,
                "--stdout",
                "-v",
                voice,
                "-s",
                str(self.words_per_minute),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            raise ProviderError(
                PROVIDER, ErrorKind.NOT_INSTALLED, f"{self.binary!r} not found; install it (apt-get install espeak-ng)"
            ) from exc
        except OSError as exc:
            raise ProviderError(PROVIDER, ErrorKind.FAILED, f"cannot run {self.binary!r}: {exc}") from exc
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        stderr_task = asyncio.create_task(process.stderr.read())
        finished = False
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                process.stdin.write(text.encode("utf-8") + b"\n")
                await process.stdin.drain()
                process.stdin.close()

            chunk_bytes = max(2, sample_rate * self.chunk_ms // 1000 * 2)
            wav = WavChunks(sample_rate)
            out = bytearray()  # resampled PCM not yet yielded
            received = produced = 0
            while data := await self._before(deadline, process.stdout.read(_READ_SIZE)):
                received += len(data)
                out += wav.feed(data)
                while len(out) >= chunk_bytes:
                    paused = time.monotonic()
                    yield bytes(out[:chunk_bytes])
                    deadline += time.monotonic() - paused
                    produced += chunk_bytes
                    del out[:chunk_bytes]
            returncode = await self._before(deadline, process.wait())
            stderr = (await stderr_task).decode(errors="replace").strip()
            if returncode != 0:
                detail = f": {stderr.splitlines()[-1]}" if stderr else ""
                raise ProviderError(PROVIDER, ErrorKind.FAILED, f"espeak-ng exited with status {returncode}{detail}")
            if wav.header is None:
                raise ProviderError(PROVIDER, ErrorKind.BAD_OUTPUT if received else ErrorKind.EMPTY_OUTPUT,
                                    "espeak-ng wrote no WAV")
            out += wav.end()
            if produced + len(out) == 0:
                raise ProviderError(PROVIDER, ErrorKind.EMPTY_OUTPUT,
                                    f"espeak-ng wrote no audio for {len(text)} characters")
            if out:
                yield bytes(out)
            finished = True
        except ValueError as exc:  # not a WAV, or one cut short
            raise ProviderError(PROVIDER, ErrorKind.BAD_OUTPUT, str(exc)) from exc
        finally:
            if not finished:
                await _stop(process)
            if not stderr_task.done():
                stderr_task.cancel()
            with contextlib.suppress(BaseException):
                await stderr_task

    async def _before(self, deadline: float, awaitable: Awaitable[_T]) -> _T:
        """Awaits within what is left of the synthesis's time."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise ProviderError(
                PROVIDER, ErrorKind.TIMEOUT, f"espeak-ng took more than {self.timeout_s} s", retryable=True
            ) from exc


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kills espeak-ng and reaps it. What it wrote is read and dropped: asyncio stops reading a pipe
    whose buffer is full, and would then never see it close, nor let `wait` return."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            assert process.stdout is not None
            while await process.stdout.read(65536):
                pass
            await process.wait()
