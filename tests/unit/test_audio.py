"""streams.audio: G.711 mu-law against the ITU reference and audioop, resampling, frames, levels, WAV."""

from __future__ import annotations

import io
import itertools
import math
import struct
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.audio.chunking import CHUNK_FRAMES, FrameChunker, GatheredChunk
from streams.audio.codecs import (
    SILENCE_DBFS,
    Resampler,
    frame_bytes,
    frames,
    mulaw_to_pcm16,
    parse_wav_header,
    pcm16_to_mulaw,
    read_wav,
    resample_pcm16,
    rms_dbfs,
    to_mono_pcm16,
    wav_bytes,
    write_wav,
)
from streams.audio.formats import FRAME_MS

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # the oracle only; deprecated in 3.11, gone in 3.13

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int64)
pcm_bytes = st.binary(max_size=4000).map(lambda b: b[: len(b) - len(b) % 2])


def pcm(samples: np.ndarray | list[int]) -> bytes:
    return np.asarray(samples).astype("<i2").tobytes()


def samples_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.int64)


def tone(freq: float, seconds: float, rate: int, amplitude: float = 10000.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return pcm(np.rint(amplitude * np.sin(2 * math.pi * freq * t)))


def peak_frequency(data: bytes, rate: int) -> float:
    x = samples_of(data).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


# --- G.711 mu-law ---------------------------------------------------------------------------------


def itu_ulaw_compress(linear: int) -> int:
    """ITU-T G.191 (Software Tool Library) g711.c `ulaw_compress`, transcribed sample by sample."""
    absno = ((~linear) >> 2) + 33 if linear < 0 else (linear >> 2) + 33
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high_nibble = 0x0008 - segno
    low_nibble = 0x000F - ((absno >> segno) & 0x000F)
    code = (high_nibble << 4) | low_nibble
    return code | 0x80 if linear >= 0 else code


def itu_ulaw_expand(code: int) -> int:
    """ITU-T G.191 g711.c `ulaw_expand`."""
    sign = -1 if code < 0x80 else 1
    mantissa = ~code
    exponent = (mantissa >> 4) & 0x7
    segment = exponent + 1
    mantissa &= 0xF
    step = 4 << segment
    return sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)


def test_mulaw_decoding_matches_the_itu_reference_and_audioop_for_every_code() -> None:
    codes = bytes(range(256))
    decoded = samples_of(mulaw_to_pcm16(codes))
    assert decoded.tolist() == [itu_ulaw_expand(c) for c in range(256)]
    assert mulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)


def test_mulaw_encoding_is_bit_exact_with_the_itu_reference_for_every_sample() -> None:
    encoded = pcm16_to_mulaw(pcm(ALL_SAMPLES))
    assert list(encoded) == [itu_ulaw_compress(int(x)) for x in ALL_SAMPLES]


def test_mulaw_encoding_agrees_with_audioop_but_on_negative_decision_boundaries() -> None:
    """audioop (Sun's g711.c) mirrors -x onto +x, the ITU reference onto x-1 (one's complement):
    they differ only for some negative samples, by one quantisation step, never for x >= 0."""
    ours = np.frombuffer(pcm16_to_mulaw(pcm(ALL_SAMPLES)), dtype=np.uint8).astype(np.int64)
    theirs = np.frombuffer(audioop.lin2ulaw(pcm(ALL_SAMPLES), 2), dtype=np.uint8).astype(np.int64)
    differ = ours != theirs
    assert not differ[ALL_SAMPLES >= 0].any()
    assert differ.sum() < 0.01 * ALL_SAMPLES.size
    assert np.all(np.abs(ours[differ] - theirs[differ]) == 1)  # adjacent codes, same segment or next


def test_mulaw_negative_samples_mirror_by_ones_complement() -> None:
    negative = ALL_SAMPLES[ALL_SAMPLES < 0]
    mirrored = ~negative  # -1 -> 0, -32768 -> 32767
    neg_codes = np.frombuffer(pcm16_to_mulaw(pcm(negative)), dtype=np.uint8)
    pos_codes = np.frombuffer(pcm16_to_mulaw(pcm(mirrored)), dtype=np.uint8)
    assert np.array_equal(neg_codes, pos_codes & 0x7F)


@given(st.lists(st.integers(-32768, 32767), max_size=500))
def test_mulaw_round_trip_stays_within_the_quantisation_error(values: list[int]) -> None:
    back = samples_of(mulaw_to_pcm16(pcm16_to_mulaw(pcm(values))))
    for x, y in zip(values, back, strict=True):
        # Half a step of x's segment (steps double per segment, 1/16 of its start), or the clipping
        # above the largest level, 32124.
        assert abs(int(y) - x) <= (abs(x) + 132) // 32 + 4


@given(st.binary(max_size=2000))
def test_mulaw_decode_encode_decode_is_decode(codes: bytes) -> None:
    decoded = mulaw_to_pcm16(codes)
    assert mulaw_to_pcm16(pcm16_to_mulaw(decoded)) == decoded
    assert len(decoded) == 2 * len(codes)


def test_mulaw_codes_survive_decode_encode_but_negative_zero() -> None:
    codes = bytes(range(256))
    again = pcm16_to_mulaw(mulaw_to_pcm16(codes))
    assert [c for c in range(256) if again[c] != c] == [0x7F]  # -0 decodes to 0, which encodes as +0
    assert again[0x7F] == 0xFF


def test_pcm16_functions_refuse_odd_byte_counts() -> None:
    with pytest.raises(ValueError, match="even"):
        pcm16_to_mulaw(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="even"):
        resample_pcm16(b"\x00", 8000, 16000)


# --- resampling -----------------------------------------------------------------------------------

RATE_PAIRS = [(8000, 16000), (16000, 8000), (22050, 16000), (22050, 8000), (16000, 48000), (44100, 16000)]


@pytest.mark.parametrize(("from_rate", "to_rate"), RATE_PAIRS)
@given(samples=st.integers(0, 5000))
@settings(max_examples=25)
def test_resampling_preserves_the_length_ratio(from_rate: int, to_rate: int, samples: int) -> None:
    out = resample_pcm16(b"\x01\x00" * samples, from_rate, to_rate)
    assert len(out) // 2 == math.ceil(samples * to_rate / from_rate)


@pytest.mark.parametrize(("from_rate", "to_rate"), RATE_PAIRS)
def test_resampling_keeps_a_440_hz_tone_at_440_hz(from_rate: int, to_rate: int) -> None:
    out = resample_pcm16(tone(440, 1.0, from_rate), from_rate, to_rate)
    assert abs(peak_frequency(out, to_rate) - 440) <= 2
    inner = out[len(out) // 10 : -len(out) // 10 or None]  # away from the edges
    assert abs(rms_dbfs(inner) - rms_dbfs(tone(440, 1.0, from_rate))) < 0.05


def test_downsampling_to_8khz_filters_out_what_would_alias() -> None:
    def gain_db(freq: float) -> float:
        source = tone(freq, 1.0, 16000)
        return rms_dbfs(resample_pcm16(source, 16000, 8000)[800:-800]) - rms_dbfs(source)

    for passband in (300, 1000, 3000, 3400):
        assert abs(gain_db(passband)) < 0.1, passband
    for stopband in (4200, 5000, 6000, 7500):
        assert gain_db(stopband) < -70, stopband  # would fold back to 3.8, 3, 2 and 0.5 kHz


def test_upsampling_from_8khz_adds_no_images() -> None:
    out = resample_pcm16(tone(1000, 1.0, 8000), 8000, 16000)
    spectrum = np.abs(np.fft.rfft(samples_of(out)[1000:-1000] * np.hanning(14000)))
    freqs = np.fft.rfftfreq(14000, 1 / 16000)
    image = spectrum[(freqs > 6900) & (freqs < 7100)].max()  # 8000 - 1000
    assert 20 * math.log10(image / spectrum.max()) < -70


@pytest.mark.parametrize(("from_rate", "to_rate"), RATE_PAIRS)
@pytest.mark.parametrize("aligned", [False, True])
@given(data=st.data())
@settings(max_examples=10, deadline=None)
def test_streaming_resampler_equals_the_one_shot_result_whatever_the_chunking(
    from_rate: int, to_rate: int, aligned: bool, data: st.DataObject
) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    source = pcm(rng.normal(0, 6000, data.draw(st.integers(0, 3000))).clip(-32768, 32767))
    resampler = Resampler(from_rate, to_rate, aligned=aligned)
    out, at = b"", 0
    while at < len(source):
        size = 2 * data.draw(st.integers(0, 700))
        out += resampler.process(source[at : at + size])
        at += size
    out += resampler.flush()
    # Identical to resampling the whole at once (so there is no seam at chunk boundaries), the
    # unaligned one delayed by half the filter.
    assert out == resample_pcm16(b"\x00\x00" * resampler.delay_input_samples + source, from_rate, to_rate)


def test_streaming_resampler_turns_20ms_frames_into_20ms_frames() -> None:
    up, down = Resampler(8000, 16000), Resampler(16000, 8000)
    for frame in frames(tone(440, 0.5, 8000), 8000):
        wide = up.process(frame)
        assert len(wide) == 640
        assert len(down.process(wide)) == 320
    assert up.delay_input_samples == 35  # 4.4 ms at 8 kHz
    assert down.delay_input_samples == 70  # 4.4 ms at 16 kHz


def test_streamed_tone_has_no_clicks_at_frame_boundaries() -> None:
    resampler = Resampler(8000, 16000)
    out = b"".join(resampler.process(f) for f in frames(tone(440, 1.0, 8000), 8000))
    x = samples_of(out).astype(np.float64)[400:-400]
    # A clean 440 Hz tone at 16 kHz changes by at most 2*pi*440/16000*A per sample; a seam would jump.
    assert np.max(np.abs(np.diff(x))) <= 2 * math.pi * 440 / 16000 * 10000 * 1.01 + 2


def test_a_flushed_resampler_refuses_more_audio() -> None:
    resampler = Resampler(8000, 16000)
    resampler.process(b"\x00\x00" * 160)
    resampler.flush()
    assert resampler.flush() == b""
    with pytest.raises(RuntimeError):
        resampler.process(b"\x00\x00")


def test_same_rate_is_a_copy() -> None:
    data = tone(440, 0.1, 16000)
    assert resample_pcm16(data, 16000, 16000) == data
    assert Resampler(16000, 16000).process(data) == data


# --- frames and levels ----------------------------------------------------------------------------


@given(pcm_bytes, st.sampled_from([8000, 16000, 48000]), st.sampled_from([10, 20, 30]))
def test_frames_reassemble_to_the_input(data: bytes, rate: int, frame_ms: int) -> None:
    parts = list(frames(data, rate, frame_ms))
    assert b"".join(parts) == data
    size = frame_bytes(rate, frame_ms)
    assert all(len(p) == size for p in parts[:-1])
    assert all(0 < len(p) <= size for p in parts)


def test_frames_can_pad_the_last_one() -> None:
    parts = list(frames(b"\x01\x00" * 330, 16000, pad=True))
    assert [len(p) for p in parts] == [640, 640]
    assert parts[1] == b"\x01\x00" * 10 + b"\x00" * 620
    assert frame_bytes(16000) == 640
    assert frame_bytes(8000) == 320
    assert frame_bytes(22050) == 882
    with pytest.raises(ValueError, match="whole"):
        frame_bytes(22050, 1)  # 22.05 samples


def test_rms_dbfs() -> None:
    assert rms_dbfs(pcm([32767, -32768] * 100)) == pytest.approx(0.0, abs=0.001)
    assert rms_dbfs(tone(1000, 1.0, 16000, amplitude=32768 / 10)) == pytest.approx(-23.01, abs=0.05)
    assert rms_dbfs(b"\x00\x00" * 320) == SILENCE_DBFS
    assert rms_dbfs(b"") == SILENCE_DBFS


# --- WAV ------------------------------------------------------------------------------------------


def test_wav_round_trip(tmp_path: Path) -> None:
    data = tone(440, 0.3, 16000)
    write_wav(tmp_path / "a.wav", data, 16000)
    assert read_wav(tmp_path / "a.wav") == (data, 16000)
    assert read_wav(io.BytesIO(wav_bytes(data, 8000))) == (data, 8000)


@pytest.mark.parametrize(("width", "channels"), [(1, 1), (2, 2), (3, 1), (3, 2), (4, 1)])
def test_read_wav_converts_to_mono_16_bit(tmp_path: Path, width: int, channels: int) -> None:
    left = np.array([0, 1000, -1000, 32767, -32768, 12345], dtype=np.int64)
    right = -left // 2
    columns = [left, right][:channels]
    raw = bytearray()
    for i in range(left.size):
        for column in columns:
            value = int(column[i])
            if width == 1:
                raw += bytes([(value >> 8) + 128])
            else:
                raw += (value << (8 * (width - 2))).to_bytes(width, "little", signed=True)
    path = tmp_path / "in.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(22050)
        out.writeframes(bytes(raw))
    mono, rate = read_wav(path)
    assert rate == 22050
    expected = left if channels == 1 else (left + right) / 2
    if width == 1:
        expected = (expected // 256) * 256
    assert np.allclose(samples_of(mono), np.rint(expected), atol=1)
    assert to_mono_pcm16(raw, width, channels) == mono


def test_read_wav_refuses_what_is_not_a_wav(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match="WAV"):
        read_wav(tmp_path / "x.wav")


def test_parse_wav_header_reads_a_piped_wav_as_it_arrives() -> None:
    # What espeak-ng --stdout writes: placeholder sizes, because it cannot seek back on a pipe.
    header = (
        b"RIFF"
        + struct.pack("<I", 0x7FFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 22050, 44100, 2, 16)
        + b"data"
        + struct.pack("<I", 0x7FFFFFFF)
    )
    for cut in range(len(header)):
        assert parse_wav_header(header[:cut]) is None
    parsed = parse_wav_header(header + b"\x01\x02")
    assert parsed is not None
    assert (parsed.sample_rate, parsed.channels, parsed.sample_width) == (22050, 1, 2)
    assert parsed.data_offset == len(header)
    assert parsed.data_size is None
    sized = parse_wav_header(wav_bytes(b"\x00\x00" * 10, 8000))
    assert sized is not None
    assert sized.data_size == 20
    with pytest.raises(ValueError, match="RIFF"):
        parse_wav_header(b"RIFX" + b"\x00" * 40)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([(8000, 16000), (16000, 8000), (16000, 48000), (48000, 16000)]),
    st.integers(min_value=1, max_value=400),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_the_integer_ratio_resampling_path_matches_the_general_one(
    rates: tuple[int, int], inputs: int, first_output: int, seed: int
) -> None:
    from streams.audio import codecs as audio

    poly = audio._polyphase(*rates)
    padded = np.random.default_rng(seed).normal(size=inputs + 2 * poly.half + 1) * 8000
    count = max(1, inputs * poly.up // poly.down - first_output)
    last_base = (first_output + count - 1) * poly.down // poly.up
    if last_base + 2 * poly.half + 1 > padded.size:
        return  # outputs past the padded input: the callers never ask for those
    fast = audio._apply(poly, padded, first_output, count, poly.half)
    reference = audio._apply_any_ratio(poly, padded, first_output, count, poly.half)
    assert np.allclose(fast, reference)


# -- chunking: what one audio event is ---------------------------------------------------------------

frame_runs = st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.sampled_from(["mulaw", "pcm_s16le"]),
                                st.sampled_from([8000, 16000]), st.booleans()), max_size=60)


@given(frame_runs, st.integers(min_value=1, max_value=7))
def test_chunks_keep_every_frame_in_order_and_place_each_exactly(run: list[tuple[bytes, str, int, bool]],
                                                                 per_chunk: int) -> None:
    """Whatever the frames (formats changing, gaps where audio was not kept), the chunks hold each
    frame once, in order, at its own offset, and none is longer than its limit or mixes formats."""
    clock = itertools.count()
    chunker = FrameChunker(lambda: next(clock), per_chunk)
    chunks: list[GatheredChunk] = []
    sent: list[tuple[bytes, str, int, int]] = []
    offset = 0
    for frame, codec, rate, gap in run:
        offset += FRAME_MS * (3 if gap else 0)
        sent.append((frame, codec, rate, offset))
        ready = chunker.add(frame, codec, rate, offset)
        chunks += [ready] if ready else []
        offset += FRAME_MS
    last = chunker.take()
    chunks += [last] if last else []
    assert chunker.take() is None
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert b"".join(c.audio for c in chunks) == b"".join(f for f, *_ in sent)
    position = 0
    for chunk in chunks:
        frames_in = sent[position:position + chunk.duration_ms // FRAME_MS]
        assert 1 <= len(frames_in) <= per_chunk
        assert chunk.audio == b"".join(f for f, *_ in frames_in)
        assert {(c, r) for _, c, r, _ in frames_in} == {(chunk.codec, chunk.sample_rate)}
        assert [o for *_, o in frames_in] == [chunk.offset_ms + i * FRAME_MS for i in range(len(frames_in))]
        assert chunk.first_at_us == chunk.index, "the clock read once a chunk, at its first frame"
        position += len(frames_in)
    assert position == len(sent)


def test_a_chunk_is_answered_when_full_and_what_is_dropped_is_never_written() -> None:
    now = [0]
    chunker = FrameChunker(lambda: now[0])
    answered = []
    for i in range(CHUNK_FRAMES):
        now[0] = i
        answered.append(chunker.add(bytes([i]), "mulaw", 8000, i * FRAME_MS))
    assert answered[:-1] == [None] * (CHUNK_FRAMES - 1)
    assert answered[-1] == GatheredChunk(index=0, offset_ms=0, duration_ms=CHUNK_FRAMES * FRAME_MS,
                                         audio=bytes(range(CHUNK_FRAMES)), codec="mulaw", sample_rate=8000,
                                         first_at_us=0)
    now[0] = 9
    chunker.add(b"x", "mulaw", 8000, CHUNK_FRAMES * FRAME_MS)
    chunker.drop()
    assert chunker.take() is None
    now[0] = 10
    assert chunker.add(b"y", "mulaw", 8000, 0) is None
    assert chunker.take() == GatheredChunk(index=1, offset_ms=0, duration_ms=FRAME_MS, audio=b"y", codec="mulaw",
                                           sample_rate=8000, first_at_us=10)
