"""Test speech: real synthetic voices from espeak-ng and flite (the Debian packages), as 16-bit mono PCM.

Tests that need a caller saying something use these instead of recorded fixtures:
`synthesize_pcm16("i want to speak to a human")` is what a caller would say, at the sample rate
asked for, in espeak-ng's voice; `flite_pcm16(...)` the same in flite's. Results are cached per
engine, text and voice, in memory and in a folder under the system's temporary directory, because
each takes a few tens of milliseconds per phrase.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from streams.audio.codecs import read_wav, resample_pcm16, write_wav
from tests.needs import missing

DEFAULT_VOICE = "en-us"
DEFAULT_SPEED = 150  # words per minute; espeak-ng's own default, 175, is fast for a caller
CACHE_DIR = Path(tempfile.gettempdir()) / "voxlog-test-speech"


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def require_espeak() -> None:
    """Skips the calling test where espeak-ng is not installed; under CI (which installs it through
    tools/setup.sh) its absence fails the test instead, so the speech tests never silently vanish."""
    if not espeak_available():
        missing("espeak-ng", "tools/setup.sh installs it: apt-get install espeak-ng")


def require_flite() -> None:
    """`require_espeak`, for flite."""
    if shutil.which("flite") is None:
        missing("flite", "tools/setup.sh installs it: apt-get install flite")


@lru_cache(maxsize=256)
def _espeak_version() -> str:
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()


@lru_cache(maxsize=1)
def _flite_version() -> str:
    # flite says its version, then exits 1.
    return subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout.strip()


@lru_cache(maxsize=256)
def synthesize_pcm16(text: str, rate: int = 16_000, *, voice: str = DEFAULT_VOICE, speed: int = DEFAULT_SPEED) -> bytes:
    """`text` spoken by espeak-ng as 16-bit mono PCM at `rate` (espeak-ng speaks at 22.05 kHz)."""

    def speak() -> bytes:
        # espeak-ng writes placeholder sizes into a WAV on a pipe; the wave module reads to the end anyway.
        return subprocess.run(
            ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "--", text],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout

    return _cached(f"{_espeak_version()}|{voice}|{speed}|{rate}|{text}", rate, speak)


@lru_cache(maxsize=256)
def flite_pcm16(text: str, rate: int = 16_000, *, voice: str = "slt") -> bytes:
    """`text` spoken by flite as 16-bit mono PCM at `rate` (slt speaks at 16 kHz, kal at 8 kHz)."""

    def speak() -> bytes:
        # flite seeks back to fill in its WAV header, so it needs a file, not a pipe.
        with tempfile.TemporaryDirectory() as folder:
            wav = Path(folder) / "speech.wav"
            subprocess.run(["flite", "-voice", voice, "-f", "/dev/stdin", "-o", str(wav)], input=text.encode(),
                           capture_output=True, check=True, timeout=60)
            return wav.read_bytes()

    return _cached(f"{_flite_version()}|{voice}|{rate}|{text}", rate, speak)


def _cached(key: str, rate: int, speak: Callable[[], bytes]) -> bytes:
    """The WAV `speak` makes, as 16-bit mono PCM at `rate`; from the cache file for `key` if made before."""
    cached = CACHE_DIR / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pcm"
    if cached.exists():
        return cached.read_bytes()
    pcm, source_rate = read_wav(io.BytesIO(speak()))
    pcm = resample_pcm16(pcm, source_rate, rate)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{hashlib.sha256(pcm).hexdigest()[:8]}.tmp")
    partial.write_bytes(pcm)
    partial.replace(cached)  # atomic, so concurrent test processes never read half a file
    return pcm


def silence(ms: int, rate: int = 16_000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)


def with_silence(pcm: bytes, before_ms: int, after_ms: int, rate: int = 16_000) -> bytes:
    """`pcm` with digital silence before and after."""
    return silence(before_ms, rate) + pcm + silence(after_ms, rate)


def noise(ms: int, level_dbfs: float, rate: int = 16_000, *, seed: int = 0) -> bytes:
    """Deterministic white noise at an RMS level of `level_dbfs` (e.g. -60 for a quiet line)."""
    rng = np.random.default_rng(seed)
    amplitude = 32768.0 * 10 ** (level_dbfs / 20)
    samples = rng.normal(0.0, amplitude, rate * ms // 1000)
    return np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()


def mix(a: bytes, b: bytes) -> bytes:
    """Sample-wise sum of two 16-bit PCM signals (the shorter padded with silence), clipped."""
    x = np.frombuffer(a, dtype="<i2").astype(np.int32)
    y = np.frombuffer(b, dtype="<i2").astype(np.int32)
    n = max(x.size, y.size)
    total = np.zeros(n, dtype=np.int32)
    total[: x.size] += x
    total[: y.size] += y
    return np.clip(total, -32768, 32767).astype("<i2").tobytes()


def with_noise(pcm: bytes, level_dbfs: float, rate: int = 16_000, *, seed: int = 0) -> bytes:
    """`pcm` with white noise at `level_dbfs` under it, over its whole length."""
    ms = len(pcm) // 2 * 1000 // rate + 1
    return mix(pcm, noise(ms, level_dbfs, rate, seed=seed))[: len(pcm)]


def caller_utterance_wav(
    path: Path,
    text: str,
    *,
    rate: int = 48_000,
    before_ms: int = 1000,
    after_ms: int = 2000,
    voice: str = DEFAULT_VOICE,
) -> Path:
    """Writes a WAV of a caller saying `text` between silences, e.g. for Chromium's fake microphone
    (`--use-file-for-fake-audio-capture=PATH`, which loops the file; hence the trailing silence)."""
    pcm = with_silence(synthesize_pcm16(text, rate, voice=voice), before_ms, after_ms, rate)
    write_wav(path, pcm, rate)
    return path
