"""The voices that run a local program per text (streams/providers/tts_local.py): flite's own ways,
with the real flite and with small shell scripts standing in for it; espeak-ng's are in
tests/integration/test_offline_speech.py, and what every voice does in tests/contract/test_tts_contract.py."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from streams.providers.base import ErrorKind, ProviderError, close_chunks
from streams.providers.tts_espeak import EspeakTts
from streams.providers.tts_flite import FliteTts, sentences
from tests.speech import flite_pcm16, require_espeak, require_flite

SENTENCES = ["Hello there.", "How are you?", "Goodbye!"]


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where `tempfile` makes its folders during the test, to see what is left there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def script(tmp_path: Path, body: str) -> str:
    """A shell script standing in for flite, to pass as `binary`."""
    path = tmp_path / "flite"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def contents(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def speak(tts: FliteTts, text: str, voice: str = "slt", rate: int = 16_000) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(text, voice=voice, sample_rate=rate)]


async def error_of(tts: FliteTts, voice: str = "slt") -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await speak(tts, "Hello there.", voice)
    assert caught.value.provider == "flite"
    return caught.value


def test_text_is_cut_after_each_sentence_and_never_into_blank_pieces() -> None:
    assert sentences(" Hello there.  How are you?\nFine!! 3.5 dollars -v kal ") == [
        "Hello there.", "How are you?", "Fine!!", "3.5 dollars -v kal"]
    assert sentences("no end") == ["no end"]
    assert sentences(" \n ") == []


async def test_each_sentence_is_spoken_and_handed_on_before_the_next(tmp_path: Path) -> None:
    require_flite()
    said = tmp_path / "said"
    said.mkdir()
    # Real flite, each run's text kept in said/N.
    recording = script(tmp_path, f'tee "{said}/$(ls "{said}" | wc -l)" | {shutil.which("flite")} "$@"')
    speech = FliteTts(binary=recording).synthesize(" ".join(SENTENCES), voice="slt")

    first = await anext(speech)
    assert [p.read_text() for p in sorted(said.iterdir())] == [SENTENCES[0] + "\n"]
    pcm = first + b"".join([chunk async for chunk in speech])
    assert [p.read_text() for p in sorted(said.iterdir())] == [sentence + "\n" for sentence in SENTENCES]
    assert pcm == b"".join(flite_pcm16(sentence) for sentence in SENTENCES)


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000])
async def test_speech_comes_at_the_rate_asked_in_chunks_of_chunk_ms(rate: int) -> None:
    require_flite()
    chunks = await speak(FliteTts(chunk_ms=50), "Thanks for calling.", rate=rate)
    assert all(len(chunk) == rate // 20 * 2 for chunk in chunks[:-1])
    assert b"".join(chunks) == flite_pcm16("Thanks for calling.", rate)  # slt's 16 kHz, resampled


async def test_text_that_starts_with_a_dash_is_spoken_not_obeyed(tmp_path: Path) -> None:
    require_flite()
    obeyed = tmp_path / "obeyed.wav"
    plain = b"".join(await speak(FliteTts(), "hello there"))
    dashed = b"".join(await speak(FliteTts(), f"-voice kal -o {obeyed} hello there"))
    assert len(dashed) > len(plain)
    assert not obeyed.exists()


@pytest.mark.parametrize("voice", ["-voice", "nosuch", "slt\n", "slt.flitevox", "../slt.flitevox",
                                   "http://example.com/slt.flitevox", "/etc/passwd"])
async def test_a_voice_that_is_no_flite_voice_is_a_bad_request(voice: str) -> None:
    assert (await error_of(FliteTts(binary="/nonexistent/flite"), voice)).kind == ErrorKind.BAD_REQUEST


async def test_a_voice_file_flite_cannot_load_fails_rather_than_speaking_with_another_voice() -> None:
    require_flite()
    error = await error_of(FliteTts(), "/nonexistent/slt.flitevox")
    assert error.kind == ErrorKind.FAILED
    assert "/nonexistent/slt.flitevox" in str(error)


async def test_no_temporary_file_is_left(temp_dir: Path, tmp_path: Path) -> None:
    require_flite()
    assert await speak(FliteTts(), " ".join(SENTENCES))
    assert contents(temp_dir) == []

    speech = FliteTts().synthesize(" ".join(SENTENCES), voice="slt")
    assert await anext(speech)
    assert contents(temp_dir), "the private folder, while speaking"
    await close_chunks(speech)
    assert contents(temp_dir) == []

    await error_of(FliteTts(binary=script(tmp_path, 'echo broken > "$6"; exit 1')))
    assert contents(temp_dir) == []


async def test_flite_exiting_with_an_error_fails_with_its_last_line_of_stderr(tmp_path: Path) -> None:
    fake = script(tmp_path, "echo 'flite: reading' >&2; echo 'flite: out of memory' >&2; exit 1")
    error = await error_of(FliteTts(binary=fake))
    assert error.kind == ErrorKind.FAILED
    assert str(error).endswith("flite exited with status 1: flite: out of memory")


async def test_flite_writing_no_wav_is_empty_output(tmp_path: Path) -> None:
    assert (await error_of(FliteTts(binary=script(tmp_path, "cat >/dev/null")))).kind == ErrorKind.EMPTY_OUTPUT


async def test_flite_writing_something_else_than_a_wav_is_bad_output(tmp_path: Path) -> None:
    # "$6": the file after -voice V -f /dev/stdin -o.
    assert (await error_of(FliteTts(binary=script(tmp_path, 'echo hello > "$6"')))).kind == ErrorKind.BAD_OUTPUT


async def test_a_text_longer_than_a_pipe_holds_streams_rather_than_stalls() -> None:
    """espeak-ng speaks as it reads: the text goes in while its speech comes out."""
    require_espeak()
    speech = EspeakTts(timeout_s=10.0).synthesize("hello there friend " * 8000, voice="en-us")
    assert await anext(speech)
    await close_chunks(speech)
