"""Where finished call recordings are kept: the `RecordingStore` interface and its local adapter.

The recordings projection assembles each call's WAV in its working folder and hands the finished
file to a store; the API reads it back from there; caller erasure removes it. Two adapters:

- `LocalRecordingStore`: the recordings folder itself, `<root>/<tenant_id>/<call_id>.wav` with the
  recording's facts beside it (`<call_id>.json`, written first, so a WAV that exists is final and
  its facts are there).
- `S3RecordingStore` (`projections.recording_store_s3`): an S3-compatible bucket (AWS, MinIO,
  Ceph...), `s3://bucket/<prefix><tenant_id>/<call_id>.wav`, the facts in the object's own
  metadata, so object and facts appear together in one PUT (or one multipart upload): an object
  that exists is final.

`voxlog.backends.recording_store(settings)` picks one: S3 when `VOXLOG_RECORDINGS_S3_URL` is set, else the
local folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_S3_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?")


class RecordingStoreError(Exception):
    """The store could not do what was asked now (unreachable, refused, out of space): worth retrying."""


class RangeNotSatisfiable(Exception):
    """A byte range outside the recording."""


def recording_path(root: Path, tenant_id: str, call_id: str) -> Path:
    """Where a call's recording goes in a folder: `<root>/<tenant_id>/<call_id>.wav`.

    Raises ValueError for an id that is not a plain name (a path separator, `..`, a leading dot),
    so that no event can make the projection write outside `root` (nor name another key in a bucket).
    """
    for kind, value in (("tenant id", tenant_id), ("call id", call_id)):
        if not _ID.fullmatch(value):
            raise ValueError(f"{kind} {value!r} cannot name a recording")
    return root / tenant_id / f"{call_id}.wav"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix ending in `/` or empty); ValueError if it is not one."""
    match = _S3_URL.fullmatch(url)
    if match is None:
        raise ValueError(f"{url!r} is not an S3 URL: s3://bucket or s3://bucket/prefix (a bucket name is 3 to 63 "
                         "lowercase letters, digits, dots and hyphens)")
    prefix = (match["prefix"] or "").strip("/")
    return match["bucket"], f"{prefix}/" if prefix else ""


@dataclass(frozen=True)
class RecordingFacts:
    """What a finished recording's row says beyond its events; stored with the recording, so that a
    replayed `call.ended` gives the same row."""

    started_us: int
    duration_ms: int
    bytes: int
    caller_audio_ms: int
    agent_audio_ms: int


@dataclass
class RecordingStream:
    """A stored recording being read: all of it, or the byte range asked for."""

    chunks: Iterator[bytes]
    length: int
    """Bytes in `chunks`."""
    content_range: str | None
    """`bytes first-last/total` when a range was asked for."""
    close: Callable[[], None]


class RecordingStore(Protocol):
    """Finished recordings, one per call, with their facts. Every method may raise ValueError for an
    id that cannot name a recording, and RecordingStoreError when the store cannot be reached."""

    remote: bool
    """Its operations wait on the network (they are run in a thread, off the event loop)."""

    def describe(self) -> str: ...

    def location(self, tenant_id: str, call_id: str) -> str:
        """Where the call's recording is (or will be): what the `recordings` row's `path` says."""
        ...

    def finished(self, tenant_id: str, call_id: str) -> RecordingFacts | None:
        """The facts of the call's finished recording; None while there is none."""
        ...

    def put(self, tenant_id: str, call_id: str, wav: Path, facts: RecordingFacts) -> None:
        """Stores the finished WAV (a local file, which the store may move away) and its facts as one:
        `finished` sees neither or both. Putting a call again replaces it with itself."""
        ...

    def read(self, tenant_id: str, call_id: str, byte_range: str | None = None) -> Path | RecordingStream | None:
        """The recording: a local file the server sends itself, or a stream (of `byte_range`, an
        HTTP `bytes=first-last` range, when given); None when there is none. RangeNotSatisfiable
        for a range outside it."""
        ...

    def erase(self, tenant_id: str, call_id: str) -> None:
        """Removes the call's recording and its facts; erasing one that is not there is no error."""
        ...


class LocalRecordingStore:
    """The recordings folder. The projection assembles WAVs under the same folder (`.partial`), so
    storing one is a rename."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return f"the folder {self.root}"

    def location(self, tenant_id: str, call_id: str) -> str:
        return recording_path(self.root, tenant_id, call_id).relative_to(self.root).as_posix()

    def _facts_path(self, wav: Path) -> Path:
        return wav.with_suffix(".json")

    def finished(self, tenant_id: str, call_id: str) -> RecordingFacts | None:
        wav = recording_path(self.root, tenant_id, call_id)
        try:
            if not wav.exists():
                return None
            return RecordingFacts(**json.loads(self._facts_path(wav).read_text()))
        except OSError as exc:
            raise RecordingStoreError(f"cannot read {wav}'s facts: {exc}") from exc

    def put(self, tenant_id: str, call_id: str, wav: Path, facts: RecordingFacts) -> None:
        target = recording_path(self.root, tenant_id, call_id)
        facts_path = self._facts_path(target)
        facts_tmp = facts_path.with_name(facts_path.name + ".tmp")
        try:
            with wav.open("rb") as assembled:  # on disk before it is renamed into place: a power cut leaves no
                os.fsync(assembled.fileno())  # empty "final" WAV
            target.parent.mkdir(parents=True, exist_ok=True)
            facts_tmp.write_text(json.dumps(asdict(facts)))
            os.replace(facts_tmp, facts_path)
            os.replace(wav, target)  # last: a WAV that exists is final, its facts beside it
        except OSError as exc:
            raise RecordingStoreError(f"cannot store {target}: {exc}") from exc

    def read(self, tenant_id: str, call_id: str, byte_range: str | None = None) -> Path | None:
        wav = recording_path(self.root, tenant_id, call_id)
        return wav if wav.is_file() else None

    def erase(self, tenant_id: str, call_id: str) -> None:
        wav = recording_path(self.root, tenant_id, call_id)
        try:
            wav.unlink(missing_ok=True)  # first: facts without a WAV are no recording
            self._facts_path(wav).unlink(missing_ok=True)
        except OSError as exc:
            raise RecordingStoreError(f"cannot erase {wav}: {exc}") from exc
