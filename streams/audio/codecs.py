"""Audio plumbing on raw bytes: G.711 mu-law, resampling, 20 ms frames, levels and WAV files.

Everything here works on signed 16-bit little-endian mono PCM ("pcm16") held in `bytes`, the
format sessions use (16 kHz, `streams.audio.formats.PCM_RATE`); Twilio delivers 8 kHz mu-law and
espeak-ng writes 22.05 kHz WAV, so channels convert at the edges with these functions. The
functions are pure; `Resampler` keeps the little state a stream of 20 ms frames needs so that
frame boundaries leave no trace in the output.
"""

from __future__ import annotations

import io
import math
import os
import struct
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

__all__ = [
    "SILENCE_DBFS",
    "Resampler",
    "WavChunks",
    "WavHeader",
    "frame_bytes",
    "frames",
    "mulaw_to_pcm16",
    "parse_wav_header",
    "pcm16_to_mulaw",
    "read_wav",
    "resample_pcm16",
    "rms_dbfs",
    "to_mono_pcm16",
    "wav_bytes",
    "write_wav",
]

_Int16Array = npt.NDArray[np.int16]
_FloatArray = npt.NDArray[np.float64]

_PCM16 = np.dtype("<i2")
"""16-bit PCM as it is on the wire and in the log: little-endian."""
SILENCE_DBFS = -120.0
"""What `rms_dbfs` says for digital silence (and for no samples at all), instead of minus infinity."""


def _as_int16(pcm: bytes | bytearray | memoryview) -> _Int16Array:
    """A read-only view of the samples, not a copy (this runs for every frame of every call)."""
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, dtype=_PCM16)


def _to_bytes(samples: _Int16Array) -> bytes:
    return samples.astype(_PCM16, copy=False).tobytes()


# --- G.711 mu-law ---------------------------------------------------------------------------------


def _ulaw_compress_reference(linear: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    """The ITU-T G.191 (STL) `ulaw_compress` algorithm, vectorised: 16-bit linear in, mu-law out.

    The reference takes the 14 most significant bits, mirrors negative values by one's complement
    (so -1 sits opposite 0, as G.711's decision table is symmetric about -1/2), adds the bias 33,
    and packs segment and mantissa, inverted.
    """
    negative = linear < 0
    absno = np.where(negative, (~linear) >> 2, linear >> 2) + 33
    absno = np.minimum(absno, 0x1FFF)
    # segno = 1 + the number of significant bits of absno >> 6 (1..8).
    segno = np.ones_like(absno)
    shifted = absno >> 6
    while np.any(shifted):
        segno += shifted != 0
        shifted >>= 1
    high = 0x8 - segno
    low = 0xF - ((absno >> segno) & 0xF)
    code = (high << 4) | low
    code = np.where(negative, code, code | 0x80)
    result: npt.NDArray[np.uint8] = code.astype(np.uint8)
    return result


def _ulaw_expand_reference(codes: npt.NDArray[np.int32]) -> npt.NDArray[np.int16]:
    """The ITU-T G.191 `ulaw_expand` algorithm, vectorised: mu-law codes in, 16-bit linear out."""
    sign = np.where(codes < 0x80, -1, 1)
    mantissa = ~codes
    exponent = (mantissa >> 4) & 0x7
    segment = exponent + 1
    mantissa &= 0xF
    step = 4 << segment
    value = sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)
    result: _Int16Array = value.astype(np.int16)
    return result


_ULAW_DECODE: _Int16Array = _ulaw_expand_reference(np.arange(256, dtype=np.int32)).astype(_PCM16)
# Indexed by the sample's 16 bits read as unsigned (value & 0xFFFF).
_ULAW_ENCODE: npt.NDArray[np.uint8] = _ulaw_compress_reference(
    np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32)
)


def mulaw_to_pcm16(data: bytes) -> bytes:
    """G.711 mu-law bytes (one sample each) to 16-bit PCM, as the ITU reference decoder does."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)].tobytes()


def pcm16_to_mulaw(pcm: bytes) -> bytes:
    """16-bit PCM to G.711 mu-law, bit-exact with the ITU-T G.191 reference encoder.

    Python's `audioop.lin2ulaw` (Sun's g711.c) differs for a few negative inputs that lie exactly
    on a decision boundary (it mirrors -x to +x instead of to x-1); decoding agrees everywhere.
    """
    samples = _as_int16(pcm)
    return _ULAW_ENCODE[samples.view(np.uint16)].tobytes()


# --- resampling -----------------------------------------------------------------------------------

_ZERO_CROSSINGS = 32
"""Sinc zero crossings each side of the filter at the cut-off frequency (4.4 ms each side between 8 and 16 kHz)."""
_ROLLOFF = 0.92
"""Cut-off as a fraction of the lower rate's Nyquist frequency: 3.68 kHz between 8 and 16 kHz."""
_KAISER_BETA = 8.6
"""About 80 dB of stop-band attenuation."""


@dataclass(frozen=True, slots=True)
class _Polyphase:
    up: int  # L: output samples per `down` input samples
    down: int  # M
    half: int  # input samples each side of the centre tap
    table: _FloatArray  # (up, 2 * half + 1): the taps for each output phase

    @property
    def taps(self) -> int:
        return 2 * self.half + 1


@lru_cache(maxsize=32)
def _polyphase(from_rate: int, to_rate: int) -> _Polyphase:
    """A Kaiser-windowed sinc low-pass, sampled once for each of the `up` output phases.

    Output n sits at input position t = n * down / up; with base = floor(t) and phase p = t - base,
    tap k weighs input sample base - half + k, at distance p + half - k from t.
    """
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g
    ratio = min(1.0, to_rate / from_rate)  # below 1 when decimating: the cut-off follows the output
    cutoff = _ROLLOFF * ratio  # in cycles per input sample, times two (1.0 = the input's Nyquist)
    half = math.ceil(_ZERO_CROSSINGS / cutoff)
    k = np.arange(2 * half + 1, dtype=np.float64)
    phases = np.arange(up, dtype=np.float64)[:, None] / up
    distance = phases + half - k[None, :]  # in input samples
    x = np.clip(distance / (half + 1), -1.0, 1.0)
    kaiser = np.i0(_KAISER_BETA * np.sqrt(1.0 - x * x)) / np.i0(_KAISER_BETA)
    table = cutoff * np.sinc(cutoff * distance) * kaiser
    return _Polyphase(up=up, down=down, half=half, table=table)


def _apply(poly: _Polyphase, padded: _FloatArray, first_output: int, count: int, origin: int) -> _FloatArray:
    """Outputs first_output .. first_output + count - 1; `padded[j]` holds input sample j - origin."""
    if poly.up == 1 or poly.down == 1:
        return _apply_integer_ratio(poly, padded, first_output, count, origin)
    return _apply_any_ratio(poly, padded, first_output, count, origin)


def _apply_integer_ratio(
    poly: _Polyphase, padded: _FloatArray, first_output: int, count: int, origin: int
) -> _FloatArray:
    """`_apply_any_ratio` for up == 1 or down == 1 (the phone path, 8 <-> 16 kHz): the outputs of one
    phase are then a strided correlation of the input with that phase's taps, done in C."""
    out = np.empty(count, dtype=np.float64)
    end = first_output + count
    for phase in range(poly.up):
        first = first_output + (phase - first_output) % poly.up  # the first output with this phase
        if first >= end:
            continue
        outputs = (end - 1 - first) // poly.up + 1
        step = poly.down  # input samples between consecutive outputs of one phase (up == 1 or down == 1)
        start = first * poly.down // poly.up - poly.half + origin
        window = padded[start : start + (outputs - 1) * step + poly.taps]
        if start < 0 or window.size < (outputs - 1) * step + poly.taps:
            raise IndexError("resampler asked for outputs beyond its input")
        out[first - first_output :: poly.up] = np.correlate(window, poly.table[phase], "valid")[::step]
    return out


def _apply_any_ratio(poly: _Polyphase, padded: _FloatArray, first_output: int, count: int, origin: int) -> _FloatArray:
    out = np.empty(count, dtype=np.float64)
    block = 2048
    k = np.arange(poly.taps)
    for start in range(0, count, block):
        n = np.arange(first_output + start, first_output + min(count, start + block), dtype=np.int64)
        position = n * poly.down
        base = position // poly.up
        phase = position % poly.up
        index = (base - poly.half + origin)[:, None] + k[None, :]
        out[start : start + len(n)] = np.einsum("ij,ij->i", padded[index], poly.table[phase])
    return out


def _round_to_int16(values: _FloatArray) -> _Int16Array:
    """Rounds and clips `values` in place (a scratch array); ufuncs, not np.clip: a 20 ms frame is
    too short for np.clip's Python-level checks not to dominate."""
    np.rint(values, out=values)
    np.maximum(values, -32768.0, out=values)
    np.minimum(values, 32767.0, out=values)
    return values.astype(np.int16)


def resample_pcm16(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """Resamples 16-bit mono PCM with a band-limited (windowed-sinc, polyphase) filter.

    Any pair of integer rates works (8000 <-> 16000, 22050 -> 16000 ...); the output has
    ceil(n * to_rate / from_rate) samples, aligned with the input (no delay), the signal's edges
    treated as silence beyond. For a stream of frames use `Resampler`.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    samples = _as_int16(pcm)
    if from_rate == to_rate or samples.size == 0:
        return _to_bytes(samples)
    poly = _polyphase(from_rate, to_rate)
    count = -(-samples.size * poly.up // poly.down)
    padded = np.concatenate([np.zeros(poly.half), samples.astype(np.float64), np.zeros(poly.half + 1)])
    return _to_bytes(_round_to_int16(_apply(poly, padded, 0, count, poly.half)))


class Resampler:
    """Resamples a stream of 16-bit PCM chunks with the same filter as `resample_pcm16`.

    By default the output is the one-shot result for the whole stream delayed by
    `delay_input_samples` input samples (half the filter, 4.4 ms between 8 and 16 kHz): every chunk
    comes out as soon as it goes in, whatever the chunking, and between 8 and 16 kHz a 20 ms
    frame in gives exactly a 20 ms frame out. With `aligned=True` the output is instead exactly
    `resample_pcm16` of the whole stream, each output held back until the input it looks ahead to
    has arrived (so chunk sizes vary). `flush` returns what is held back, at the end.
    """

    def __init__(self, from_rate: int, to_rate: int, *, aligned: bool = False) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self.aligned = aligned
        self._poly = _polyphase(from_rate, to_rate) if from_rate != to_rate else None
        half = self._poly.half if self._poly else 0
        self._shift = 0 if aligned else half  # the output lags the input by this many input samples
        # _history[j] holds input sample _history_start + j; input before the stream is silence.
        self._history: _FloatArray = np.zeros(2 * half + 1, dtype=np.float64)
        self._history_start = -(2 * half + 1)
        self._received = 0  # input samples so far
        self._produced = 0  # output samples so far
        self._flushed = False

    @property
    def delay_input_samples(self) -> int:
        """How far the output lags the input, in input samples (0 when `aligned`)."""
        return self._shift

    def process(self, pcm: bytes) -> bytes:
        """Resamples the next chunk; returns every output sample that chunk completes."""
        if self._flushed:
            raise RuntimeError("Resampler was flushed; make a new one for a new stream")
        samples = _as_int16(pcm)
        if self._poly is None:
            return _to_bytes(samples)
        self._append(samples.astype(np.float64))
        return self._emit()

    def flush(self) -> bytes:
        """The outputs still held back, as if the stream went on with silence; then it is done.

        After it, the whole output has ceil((n + delay_input_samples) * to_rate / from_rate) samples.
        """
        if self._flushed:
            return b""
        self._flushed = True
        if self._poly is None:
            return b""
        real = self._received
        self._append(np.zeros(self._poly.half + 1, dtype=np.float64))
        target = -(-(real + self._shift) * self._poly.up // self._poly.down)
        return self._emit(limit=target)

    def _append(self, samples: _FloatArray) -> None:
        self._history = np.concatenate([self._history, samples])
        self._received += samples.size

    def _emit(self, limit: int | None = None) -> bytes:
        poly = self._poly
        assert poly is not None
        # Output n is the one-shot output n of the input delayed by `_shift` ("delayed" indices are
        # real ones plus _shift). Its newest tap is delayed sample floor(n * down / up) + half, i.e.
        # real sample floor(n * down / up) + half - _shift, which must have arrived.
        ready = self._received - poly.half + self._shift  # outputs need floor(n * down / up) < ready
        count = (ready * poly.up - 1) // poly.down + 1 - self._produced if ready > 0 else 0
        if limit is not None:
            count = min(count, limit - self._produced)
        if count <= 0:
            return b""
        origin = -(self._history_start + self._shift)  # _history[j] is delayed sample j - origin
        out = _apply(poly, self._history, self._produced, count, origin)
        self._produced += count
        # Keep what the next output needs: from its first tap on (a real sample index).
        keep_from = (self._produced * poly.down) // poly.up - poly.half - self._shift
        drop = keep_from - self._history_start
        if drop > 0:
            self._history = self._history[drop:]
            self._history_start += drop
        return _to_bytes(_round_to_int16(out))


# --- frames and levels ----------------------------------------------------------------------------


def frame_bytes(sample_rate: int, frame_ms: int = 20) -> int:
    """Bytes in one frame of 16-bit mono PCM: 640 for 20 ms at 16 kHz."""
    samples, rest = divmod(sample_rate * frame_ms, 1000)
    if rest or samples <= 0:
        raise ValueError(f"{frame_ms} ms at {sample_rate} Hz is not a whole, positive number of samples")
    return 2 * samples


def frames(pcm: bytes, sample_rate: int, frame_ms: int = 20, *, pad: bool = False) -> Iterator[bytes]:
    """Splits 16-bit PCM into frames of `frame_ms`; the last may be short, or zero-padded if `pad`."""
    size = frame_bytes(sample_rate, frame_ms)
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
    for start in range(0, len(pcm), size):
        frame = bytes(pcm[start : start + size])
        if pad and len(frame) < size:
            frame += b"\x00" * (size - len(frame))
        yield frame


def rms_dbfs(pcm: bytes) -> float:
    """Root-mean-square level relative to a full-scale square wave; `SILENCE_DBFS` for no signal."""
    samples = _as_int16(pcm)
    if samples.size == 0:
        return SILENCE_DBFS
    values = samples.astype(np.float64)
    mean_square = float(np.dot(values, values)) / values.size
    if mean_square <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 10.0 * math.log10(mean_square / (32768.0 * 32768.0)))


# --- WAV ------------------------------------------------------------------------------------------


def to_mono_pcm16(data: bytes, sample_width: int, channels: int) -> bytes:
    """Interleaved integer PCM of 1-4 bytes per sample (8-bit unsigned, others signed) to mono 16-bit."""
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    frame = sample_width * channels
    usable = len(data) - len(data) % frame
    raw = np.frombuffer(bytes(data[:usable]), dtype=np.uint8)
    if sample_width == 1:
        values = raw.astype(np.float64) - 128.0
        scale = 256.0
    elif sample_width == 2:
        values = raw.view("<i2").astype(np.float64)
        scale = 1.0
    elif sample_width == 3:
        triples = raw.reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        values = ints.astype(np.float64)
        scale = 1.0 / 256.0
    elif sample_width == 4:
        values = raw.view("<i4").astype(np.float64)
        scale = 1.0 / 65536.0
    else:
        raise ValueError(f"unsupported sample width {sample_width} bytes")
    if channels > 1:
        values = values.reshape(-1, channels).mean(axis=1)
    return _to_bytes(_round_to_int16(values * scale))


def read_wav(path: str | os.PathLike[str] | BinaryIO) -> tuple[bytes, int]:
    """Reads a PCM WAV file (any channels, 8-32 bit integer) as mono 16-bit PCM and its sample rate."""
    try:
        with wave.open(path if not isinstance(path, os.PathLike) else os.fspath(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from exc
    return to_mono_pcm16(data, width, channels), rate


def write_wav(path: str | os.PathLike[str] | BinaryIO, pcm: bytes, rate: int) -> None:
    """Writes mono 16-bit PCM as a WAV file."""
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even number of bytes, got {len(pcm)}")
    with wave.open(path if not isinstance(path, os.PathLike) else os.fspath(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    """Mono 16-bit PCM as the bytes of a WAV file."""
    buffer = io.BytesIO()
    write_wav(buffer, pcm, rate)
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class WavHeader:
    sample_rate: int
    channels: int
    sample_width: int  # bytes per sample
    data_offset: int  # where the sample data starts
    data_size: int | None  # None where the writer did not know it (a stream, e.g. espeak-ng --stdout)


def parse_wav_header(data: bytes) -> WavHeader | None:
    """Parses a RIFF/WAVE header from the start of `data`; None while more bytes are needed.

    For WAV written to a pipe, whose sizes are placeholders, so the data can be read as it comes.
    Raises ValueError for anything but integer PCM.
    """
    if len(data) < 12:
        return None
    riff, _size, wave_id = struct.unpack_from("<4sI4s", data, 0)
    if riff != b"RIFF" or wave_id != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    offset = 12
    fmt: tuple[int, int, int, int] | None = None
    while True:
        if len(data) < offset + 8:
            return None
        chunk_id, chunk_size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk before its fmt chunk")
            tag, channels, rate, bits = fmt
            if tag not in (1, 0xFFFE) or bits % 8 or not 8 <= bits <= 32:
                raise ValueError(f"unsupported WAV encoding (format {tag}, {bits} bits)")
            size = None if chunk_size in (0, 0xFFFFFFFF, 0x7FFFFFFF) or chunk_size >= 0x7FFF0000 else chunk_size
            return WavHeader(rate, channels, bits // 8, body, size)
        if len(data) < body + chunk_size:
            return None
        if chunk_id == b"fmt ":
            if chunk_size < 16:
                raise ValueError("WAV fmt chunk too short")
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", data, body)
            fmt = (tag, channels, rate, bits)
        offset = body + chunk_size + (chunk_size & 1)


class WavChunks:
    """16-bit mono PCM at the caller's rate from a streamed WAV file: its header first (whose sizes may
    be placeholders, as a stream's are), then its integer PCM as it comes, channels mixed down and
    resampled from the rate the header gives. Bytes past a declared data size (trailing chunks) are
    not audio and are dropped."""

    def __init__(self, to_rate: int) -> None:
        self.to_rate = to_rate
        self.header: WavHeader | None = None
        self._buffer = bytearray()
        self._resampler: Resampler | None = None
        self._left: int | None = None  # audio bytes still due, where the header declared a size

    def feed(self, data: bytes) -> bytes:
        """The samples `data` completes, at the caller's rate (may be empty); raises ValueError for a
        stream that is not integer PCM WAV."""
        self._buffer += data
        if self.header is None:
            self.header = parse_wav_header(bytes(self._buffer))
            if self.header is None:
                return b""
            del self._buffer[: self.header.data_offset]
            self._resampler = Resampler(self.header.sample_rate, self.to_rate, aligned=True)
            self._left = self.header.data_size
        assert self._resampler is not None
        frame = self.header.channels * self.header.sample_width
        usable = len(self._buffer) - len(self._buffer) % frame
        if self._left is not None:
            usable = min(usable, self._left)
            self._left -= usable
        pcm = to_mono_pcm16(bytes(self._buffer[:usable]), self.header.sample_width, self.header.channels)
        del self._buffer[:usable]
        return self._resampler.process(pcm)

    def end(self) -> bytes:
        """What is held back; raises ValueError where the stream stopped before its header was whole,
        in the middle of a sample, or short of the size its header declared."""
        if self.header is None or self._resampler is None:
            raise ValueError("the audio ended before its WAV header was complete")
        if self._left:
            raise ValueError(f"the audio ended {self._left} bytes short of the size its WAV header declared")
        if self._left is None and self._buffer:
            raise ValueError("the audio ended in the middle of a sample")
        return self._resampler.flush()
