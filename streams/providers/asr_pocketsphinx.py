"""Offline speech recognition with PocketSphinx 5 and the US English model its wheel carries.

Each stream gets its own worker process. PocketSphinx holds the GIL while it decodes (measured:
a thread decoding an 11 s utterance stalled the event loop for over 300 ms, mostly in the final
pass at the end of the utterance), so a thread would not keep its CPU off the event loop; a
process does, uses the other cores, and a crash in the C library takes down only its call. The
worker speaks a small length-prefixed protocol on its stdin/stdout (see `_worker_main`); requests
go one at a time, so results come back in the order the audio went in.

Audio is decoded as it arrives, 100 ms at a time: `accept` returns an interim result about every
`interim_interval_ms` of new audio when the hypothesis changed, and `end_utterance` the final one
with word timings. Times are ms of audio fed to the stream, counted across its utterances.

**Confidence.** PocketSphinx computes, for the final result, each word's posterior probability
in the word lattice (forward-backward over the lattice, `bestpath`). A word's confidence is that
posterior; an utterance's is the mean over its words (0.0 when nothing was recognised). On the
espeak-ng calls of `tests/integration/test_offline_speech.py`, correctly recognised words averaged
0.64 and wrong ones 0.26. Interim results have no lattice yet, so their confidence is 0.0.

**Keywords** bias recognition towards words and phrases the agent expects. Each keyword (a word,
or a phrase spoken as one unit) becomes an extra dictionary entry with the same pronunciation and
a unigram of its own in the trigram language model, `keyword_boost` times the probability of a
uniformly likely word; a recognised alias is written as the keyword's words again. The general
language model stays in force, so anything else can still be recognised. On 15 espeak-ng caller
phrases (89 words, 17 keywords; the integration test prints the current figures) keywords took
word accuracy from 82% to 87% and keyword recall from 25/30 to 26/30 at 16 kHz, and from 42% to
49% and 12/30 to 19/30 through 8 kHz mu-law, inserting no more keywords than the plain model did.
Words missing from the pronunciation dictionary cannot be keywords; the stream lists them in
`unknown_keywords`. A process with keywords loads a private copy of the language model (about
90 MB); without, the model file is memory-mapped and shared between processes.

**Noise floor.** The acoustic model subtracts an estimated noise spectrum and normalises the
cepstrum on the fly; on digitally silent stretches (synthetic speech, mu-law silence, gaps in
the words of espeak-ng) both go wrong. Adding deterministic pink noise at `noise_floor_dbfs`
(-45 dBFS by default; None to turn it off) before decoding took word accuracy on the same calls
from 34% to 82% at 16 kHz and from 19% to 42% through 8 kHz mu-law (white noise did less, and
words like "if" crept into silences). A quiet line's speech gets less headroom over it; lower it
for quiet callers.

**Cost.** About 0.16-0.22 s of CPU per second of audio on this project's 2-core machine (the
8 kHz line costs more: the search is less sure), plus a worker start of about 0.5 s per stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.audio.formats import PCM_RATE
from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    ErrorKind,
    ProviderError,
    Recognition,
    RecognizedWord,
)
from streams.providers.worker_process import WorkerProcess, child_pipes

__all__ = ["PocketsphinxAsr", "PocketsphinxStream", "StreamStats"]

PROVIDER = "pocketsphinx"
_MODULE = "streams.providers.asr_pocketsphinx"
_HEADER = struct.Struct("!cI")  # op, payload length
_LANGUAGES = {"en", "en-us"}
_KEYWORD_SUFFIX = "@kw"  # alias entries look like "speak_to_a_human@kw"
_FRAME_MS = 10  # PocketSphinx's frame rate is 100 per second
_NOISE_SECONDS = 10

DecoderOption = str | int | float | bool


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What a stream's worker has done: audio decoded and the CPU time it took."""

    audio_ms: int
    cpu_ms: int

    @property
    def real_time_factor(self) -> float:
        """CPU seconds per second of audio (below 1 keeps up with a live call)."""
        return self.cpu_ms / self.audio_ms if self.audio_ms else 0.0


class PocketsphinxAsr(AsrProvider):
    """PocketSphinx 5, model "en-us" (the acoustic model, trigram LM and CMUdict from its wheel).

    Args:
        keyword_boost: a keyword alias's unigram weight relative to a uniformly likely word.
        noise_floor_dbfs: level of the pink noise added before decoding; None adds none.
        interim_interval_ms: how much new audio between interim results.
        chunk_ms: audio is handed to the worker in chunks this long.
        timeout_s: the longest the worker may take for one request before the stream fails.
        start_timeout_s: the longest a worker may take to start and load the model.
        decoder_options: extra PocketSphinx configuration (e.g. {"beam": 1e-60}).
    """

    name = PROVIDER
    capabilities = AsrCapabilities(interim_results=True, local=True)

    def __init__(
        self,
        *,
        model: str = "en-us",
        keyword_boost: float = 100.0,
        noise_floor_dbfs: float | None = -45.0,
        interim_interval_ms: int = 500,
        chunk_ms: int = 100,
        timeout_s: float = 30.0,
        start_timeout_s: float = 60.0,
        decoder_options: Mapping[str, DecoderOption] | None = None,
    ) -> None:
        if model != "en-us":
            raise ValueError(f"pocketsphinx: only the bundled 'en-us' model is available, not {model!r}")
        if keyword_boost <= 0 or interim_interval_ms <= 0 or chunk_ms <= 0 or timeout_s <= 0:
            raise ValueError("keyword_boost, interim_interval_ms, chunk_ms and timeout_s must be positive")
        self.model = model
        self.keyword_boost = keyword_boost
        self.noise_floor_dbfs = noise_floor_dbfs
        self.interim_interval_ms = interim_interval_ms
        self.chunk_ms = chunk_ms
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.decoder_options = dict(decoder_options or {})

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> PocketsphinxStream:
        if language.lower() not in _LANGUAGES:
            raise ProviderError(
                PROVIDER, ErrorKind.UNSUPPORTED_LANGUAGE, f"model {self.model} recognises en-US, not {language}"
            )
        config = {
            "keywords": normalize_keywords(keywords),
            "keyword_boost": self.keyword_boost,
            "noise_floor_dbfs": self.noise_floor_dbfs,
            "interim_interval_ms": self.interim_interval_ms,
            "decoder_options": self.decoder_options,
        }
        return await PocketsphinxStream.start(
            config, chunk_ms=self.chunk_ms, timeout_s=self.timeout_s, start_timeout_s=self.start_timeout_s
        )


def normalize_keywords(keywords: Sequence[str]) -> list[str]:
    """Lower case, letters and apostrophes only, single spaces, no duplicates, order kept."""
    seen: dict[str, None] = {}
    for keyword in keywords:
        words = re.sub(r"[^a-z']+", " ", keyword.lower()).split()
        if words:
            seen.setdefault(" ".join(words), None)
    return list(seen)


class PocketsphinxStream(AsrStream):
    """One call's recognition, decoded in a worker process of its own."""

    def __init__(self, *, chunk_ms: int, timeout_s: float) -> None:
        super().__init__(PROVIDER)
        self._chunk_bytes = PCM_RATE * chunk_ms // 1000 * 2
        self._timeout_s = timeout_s
        self._buffer = bytearray()
        self._worker: WorkerProcess | None = None
        self._lock = asyncio.Lock()
        self.keywords: tuple[str, ...] = ()
        self.unknown_keywords: tuple[str, ...] = ()
        self.stats = StreamStats(0, 0)

    # -- AsrStream ------------------------------------------------------------------------------
    async def _accept(self, pcm: bytes) -> Recognition | None:
        async with self._lock:
            self._check_open()  # again: the request before this one may have failed the stream
            self._buffer += pcm
            if len(self._buffer) < self._chunk_bytes:
                return None
            chunk = bytes(self._buffer)
            self._buffer.clear()
            op, payload = await self._request(b"A", chunk)
            return _recognition(payload) if op == b"I" else None

    async def _end_utterance(self) -> Recognition:
        async with self._lock:
            self._check_open()  # (as in `_accept`)
            chunk = bytes(self._buffer)
            self._buffer.clear()
            _op, payload = await self._request(b"F", chunk)
            return _recognition(payload)

    async def _close(self) -> None:
        """Stops the worker (politely, unless the stream failed)."""
        async with self._lock:
            if self._worker is not None:
                await self._worker.close(_HEADER.pack(b"Q", 0) if self._failed is None else None)

    # -- the worker -----------------------------------------------------------------------------
    @classmethod
    async def start(
        cls, config: Mapping[str, Any], *, chunk_ms: int, timeout_s: float, start_timeout_s: float
    ) -> PocketsphinxStream:
        """Starts a worker process, loads the model with `config` (see `_Recognizer`) in it."""
        stream = cls(chunk_ms=chunk_ms, timeout_s=timeout_s)
        await stream._spawn(config, start_timeout_s)
        return stream

    async def _spawn(self, config: Mapping[str, Any], timeout_s: float) -> None:
        try:
            self._worker = await WorkerProcess.spawn(_MODULE)
        except OSError as exc:
            raise ProviderError(PROVIDER, ErrorKind.WORKER_FAILED,
                                f"cannot start the recognition worker: {exc}") from exc
        try:
            _op, payload = await self._request(b"C", json.dumps(config).encode(), timeout_s=timeout_s)
        except BaseException:
            self._closed = True
            await self._worker.close(None)
            raise
        ready = json.loads(payload)
        self.keywords = tuple(ready["keywords"])
        self.unknown_keywords = tuple(ready["unknown_keywords"])

    async def _request(self, op: bytes, payload: bytes, *, timeout_s: float | None = None) -> tuple[bytes, bytes]:
        worker = self._worker
        assert worker is not None
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                worker.stdin.write(_HEADER.pack(op, len(payload)) + payload)
                await worker.stdin.drain()
                header = await worker.stdout.readexactly(_HEADER.size)
                reply_op, size = _HEADER.unpack(header)
                reply = await worker.stdout.readexactly(size)
        except asyncio.CancelledError:
            # The reply may still come; nothing after it could tell which request it answers.
            self._fail(ProviderError(PROVIDER, ErrorKind.CANCELLED, "a request to the recognition worker was cancelled",
                                     retryable=True))
            worker.kill()
            raise
        except TimeoutError as exc:
            worker.kill()
            waited = timeout_s or self._timeout_s
            raise self._fail(ProviderError(PROVIDER, ErrorKind.TIMEOUT,
                                           f"no answer from the recognition worker in {waited} s",
                                           retryable=True)) from exc
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as exc:
            raise self._fail(ProviderError(PROVIDER, ErrorKind.WORKER_EXITED,
                                           f"the recognition worker stopped{await worker.last_words()}",
                                           retryable=True)) from exc
        if reply_op == b"E":
            message = json.loads(reply)
            error = ProviderError(PROVIDER, ErrorKind(message["kind"]), message["message"], retryable=False)
            raise self._fail(error) if message["fatal"] else error
        stats = json.loads(reply).get("stats") if reply_op in (b"I", b"F", b"N") and reply else None
        if stats:
            self.stats = StreamStats(int(stats["audio_ms"]), int(stats["cpu_ms"]))
        return reply_op, reply

def _recognition(payload: bytes) -> Recognition:
    data = json.loads(payload)
    return Recognition(
        text=data["text"],
        is_final=data["final"],
        confidence=data["confidence"],
        start_ms=data["start_ms"],
        end_ms=data["end_ms"],
        words=tuple(RecognizedWord(w, s, e, c) for w, s, e, c in data["words"]),
    )


# -- the worker process -----------------------------------------------------------------------------


class _Recognizer:
    """The decoder and its bookkeeping; runs in the worker process (or anywhere, synchronously)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        import numpy as np
        import pocketsphinx  # type: ignore[import-untyped]

        self._np = np
        keywords: list[str] = list(config.get("keywords", []))
        model = Path(pocketsphinx.get_model_path("en-us"))
        options: dict[str, Any] = {
            "hmm": str(model / "en-us"),
            "lm": str(model / "en-us.lm.bin"),
            "dict": str(model / "cmudict-en-us.dict"),
            "loglevel": "FATAL",
            # Adding words to the LM needs a private, writable copy; without keywords the mapped
            # file is shared between the calls' processes.
            "mmap": not keywords,
        }
        options.update(config.get("decoder_options", {}))
        self.decoder = pocketsphinx.Decoder(**options)
        self.keywords, self.unknown_keywords = self._add_keywords(keywords, float(config.get("keyword_boost", 100.0)))
        level = config.get("noise_floor_dbfs")
        self._noise = None if level is None else _pink_noise(PCM_RATE * _NOISE_SECONDS, float(level), seed=0)
        self._noise_at = 0
        self._interim_samples = PCM_RATE * int(config.get("interim_interval_ms", 500)) // 1000
        self._position = 0  # samples fed to the stream so far
        self._utterance_start: int | None = None  # where the open utterance began
        self._since_interim = 0
        self._last_interim = ""
        self._cpu_s = 0.0

    def _add_keywords(self, keywords: list[str], boost: float) -> tuple[list[str], list[str]]:
        used: list[str] = []
        unknown: list[str] = []
        entries: list[tuple[str, str]] = []
        for keyword in keywords:
            pronunciations = [self.decoder.lookup_word(word) for word in keyword.split()]
            if any(p is None for p in pronunciations):
                unknown.append(keyword)
                continue
            entries.append((keyword.replace(" ", "_") + _KEYWORD_SUFFIX, " ".join(pronunciations)))
            used.append(keyword)
        if entries:
            lm = self.decoder.get_lm()
            for i, (token, phones) in enumerate(entries):
                # The LM first, with our weight; the decoder's add_word then finds the word there.
                lm.add_word(token, boost)
                self.decoder.add_word(token, phones, i == len(entries) - 1)  # rebuild the search once
        return used, unknown

    def feed(self, pcm: bytes) -> dict[str, Any] | None:
        """Decodes more audio; returns an interim result when one is due and says something new."""
        started = time.process_time()
        try:
            if not pcm:
                return None
            if self._utterance_start is None:
                self.decoder.start_utt()
                self._utterance_start = self._position
                self._since_interim = 0
                self._last_interim = ""
            self.decoder.process_raw(self._condition(pcm), False, False)
            samples = len(pcm) // 2
            self._position += samples
            self._since_interim += samples
            if self._since_interim < self._interim_samples:
                return None
            self._since_interim = 0
            words = self._words(final=False)
            text = " ".join(w[0] for w in words)
            if not text or text == self._last_interim:
                return None
            self._last_interim = text
            return self._result(text, words, final=False)
        finally:
            self._cpu_s += time.process_time() - started

    def finish(self) -> dict[str, Any]:
        """Ends the utterance: the final result for the audio since the last one."""
        started = time.process_time()
        try:
            if self._utterance_start is None:
                return self._result("", [], final=True)
            try:
                self.decoder.end_utt()
                words = self._words(final=True)
                return self._result(" ".join(w[0] for w in words), words, final=True)
            finally:
                self._utterance_start = None  # the next audio starts a new utterance, whatever happened
        finally:
            self._cpu_s += time.process_time() - started

    def stats(self) -> dict[str, int]:
        return {"audio_ms": self._position * 1000 // PCM_RATE, "cpu_ms": round(self._cpu_s * 1000)}

    def _condition(self, pcm: bytes) -> bytes:
        """Adds the next stretch of the (looping) noise floor."""
        if self._noise is None:
            return pcm
        np = self._np
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        index = (self._noise_at + np.arange(samples.size)) % self._noise.size
        self._noise_at = (self._noise_at + samples.size) % self._noise.size
        samples += self._noise[index]
        return bytes(np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes())

    def _words(self, *, final: bool) -> list[tuple[str, int, int, float]]:
        start = self._utterance_start or 0
        base_ms = start * 1000 // PCM_RATE
        end_ms = self._position * 1000 // PCM_RATE
        words: list[tuple[str, int, int, float]] = []
        if self.decoder.hyp() is None:
            return words
        for seg in self.decoder.seg():
            token = re.sub(r"\(\d+\)$", "", seg.word)
            if not token or token[0] in "<[+":  # <s>, </s>, <sil>, [NOISE], ++GARBAGE++
                continue
            begin = min(end_ms, base_ms + seg.start_frame * _FRAME_MS)
            finish = min(end_ms, max(begin, base_ms + (seg.end_frame + 1) * _FRAME_MS))
            confidence = min(1.0, max(0.0, float(seg.prob))) if final else 0.0
            if token.endswith(_KEYWORD_SUFFIX):
                parts = token[: -len(_KEYWORD_SUFFIX)].split("_")
                words.extend(self._split(parts, begin, finish, confidence))
            else:
                words.append((token, begin, finish, confidence))
        return words

    def _split(self, parts: list[str], begin: int, finish: int, confidence: float) -> list[tuple[str, int, int, float]]:
        """A keyword phrase's span shared among its words in proportion to their phones."""
        weights = [len((self.decoder.lookup_word(p) or p).split()) for p in parts]
        total = sum(weights)
        out: list[tuple[str, int, int, float]] = []
        at = float(begin)
        for part, weight in zip(parts, weights, strict=True):
            nxt = at + (finish - begin) * weight / total
            out.append((part, round(at), round(nxt), confidence))
            at = nxt
        return out

    def _result(self, text: str, words: list[tuple[str, int, int, float]], *, final: bool) -> dict[str, Any]:
        start = self._utterance_start if self._utterance_start is not None else self._position
        confidence = sum(w[3] for w in words) / len(words) if final and words else 0.0
        return {
            "text": text,
            "final": final,
            "confidence": confidence,
            "start_ms": start * 1000 // PCM_RATE,
            "end_ms": self._position * 1000 // PCM_RATE,
            "words": words,
            "stats": self.stats(),
        }


def _pink_noise(samples: int, level_dbfs: float, *, seed: int) -> Any:
    """Deterministic pink (1/f) noise at an RMS of `level_dbfs`, flat below 50 Hz, made by shaping
    white noise's spectrum; it is periodic, so it loops without a seam."""
    import numpy as np

    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.normal(0.0, 1.0, samples))
    frequency = np.maximum(np.fft.rfftfreq(samples, 1.0 / PCM_RATE), 50.0)
    spectrum /= np.sqrt(frequency)
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, samples)
    return noise * (32768.0 * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(noise * noise)))


def _worker_main() -> None:  # pragma: no cover - runs in the child process; exercised by the tests
    """Serves one stream: requests on stdin, replies on stdout, both `_HEADER` + payload.

    C (config JSON) -> R (keywords used) | E;  A (PCM) -> I (interim JSON) | N (stats JSON) | E;
    F (the last PCM) -> F (final JSON) | E;  Q -> exits. An error reply carries kind and message.
    """
    requests, replies = child_pipes()

    def reply(op: bytes, payload: bytes) -> None:
        replies.write(_HEADER.pack(op, len(payload)) + payload)
        replies.flush()

    def error(kind: ErrorKind, message: str, *, fatal: bool) -> None:
        reply(b"E", json.dumps({"kind": kind, "message": message, "fatal": fatal}).encode())

    recognizer: _Recognizer | None = None
    while True:
        header = requests.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return  # the parent went away
        op, size = _HEADER.unpack(header)
        payload = requests.read(size) if size else b""
        if op == b"Q":
            return
        try:
            if op == b"C":
                recognizer = _Recognizer(json.loads(payload))
                ready = {"keywords": recognizer.keywords, "unknown_keywords": recognizer.unknown_keywords}
                reply(b"R", json.dumps(ready).encode())
            elif recognizer is None:
                error(ErrorKind.PROTOCOL, f"request {op!r} before the configuration", fatal=True)
            elif op == b"A":
                interim = recognizer.feed(payload)
                if interim is None:
                    reply(b"N", json.dumps({"stats": recognizer.stats()}).encode())
                else:
                    reply(b"I", json.dumps(interim).encode())
            elif op == b"F":
                recognizer.feed(payload)
                reply(b"F", json.dumps(recognizer.finish()).encode())
            else:
                error(ErrorKind.PROTOCOL, f"unknown request {op!r}", fatal=True)
        except Exception as exc:  # the C library reports failures as RuntimeError/ValueError
            error(
                ErrorKind.DECODER_FAILED if recognizer is not None else ErrorKind.MODEL_FAILED,
                f"{type(exc).__name__}: {exc}",
                fatal=recognizer is None,
            )
            if recognizer is None:
                return


if __name__ == "__main__":  # pragma: no cover
    _worker_main()
