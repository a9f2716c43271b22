"""`RecordingStore` on S3 or any S3-compatible store (MinIO, Ceph, ...), with boto3.

A recording is one object, `<prefix><tenant_id>/<call_id>.wav`, its facts in the object's user
metadata. It is written by one PUT, or one multipart upload for a long call (boto3 switches at
8 MB, about two minutes of audio): either way S3 shows the object only once it is complete, with
its metadata, so an object that exists is final and a replayed `call.ended` reads the same facts
back. An upload a crash cut short leaves invisible parts: a bucket lifecycle rule that aborts
incomplete multipart uploads after a day clears them.

Credentials come from the settings (`VOXLOG_RECORDINGS_S3_ACCESS_KEY_ID` and
`..._SECRET_ACCESS_KEY`, secrets never logged) or, when those are unset, from boto3's own chain
(`AWS_*` variables, `~/.aws`, an instance role).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from projections.recording_store import (
    RangeNotSatisfiable,
    RecordingFacts,
    RecordingStoreError,
    RecordingStream,
    parse_s3_url,
    recording_path,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

READ_CHUNK_BYTES = 64 * 1024
CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
"""Fail within seconds when the store is unreachable (the projection retries on its own, and logs it)."""
_MISSING = {"404", "NoSuchKey", "NotFound"}


def _meta_key(name: str) -> str:
    return "voxlog-" + name.replace("_", "-")


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        raise RecordingStoreError(f"{what}: {exc}") from exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3RecordingStore:
    remote = True

    def __init__(self, client: S3Client, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url

    @classmethod
    def connect(cls, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                access_key_id: str | None = None, secret_access_key: str | None = None) -> S3RecordingStore:
        """The store at `url` (s3://bucket/prefix); without keys, boto3's own chain finds them."""
        bucket, prefix = parse_s3_url(url)
        # Path-style addressing for a store of one's own: its host name has no per-bucket subdomains.
        config = CLIENT_CONFIG.merge(Config(s3={"addressing_style": "path"})) if endpoint_url else CLIENT_CONFIG
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key, config=config)
        return cls(client, bucket, prefix, endpoint_url=endpoint_url)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def key(self, tenant_id: str, call_id: str) -> str:
        return self.prefix + recording_path(Path(), tenant_id, call_id).as_posix()

    def location(self, tenant_id: str, call_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(tenant_id, call_id)}"

    def finished(self, tenant_id: str, call_id: str) -> RecordingFacts | None:
        key = self.key(tenant_id, call_id)
        try:
            with _store_errors(f"cannot look up s3://{self.bucket}/{key}"):
                try:
                    head = self.client.head_object(Bucket=self.bucket, Key=key)
                except ClientError as exc:
                    if _code(exc) in _MISSING:
                        return None
                    raise
            meta = head["Metadata"]
            return RecordingFacts(**{f.name: int(meta[_meta_key(f.name)]) for f in fields(RecordingFacts)})
        except (KeyError, ValueError) as exc:
            raise ValueError(f"s3://{self.bucket}/{key} is not a voxlog recording (its metadata lacks {exc})") from exc

    def put(self, tenant_id: str, call_id: str, wav: Path, facts: RecordingFacts) -> None:
        key = self.key(tenant_id, call_id)
        metadata = {_meta_key(f.name): str(getattr(facts, f.name)) for f in fields(RecordingFacts)}
        with _store_errors(f"cannot upload s3://{self.bucket}/{key}"):
            self.client.upload_file(str(wav), self.bucket, key,
                                    ExtraArgs={"ContentType": "audio/wav", "Metadata": metadata})

    def read(self, tenant_id: str, call_id: str, byte_range: str | None = None) -> RecordingStream | None:
        key = self.key(tenant_id, call_id)
        with _store_errors(f"cannot read s3://{self.bucket}/{key}"):
            try:
                got = (self.client.get_object(Bucket=self.bucket, Key=key, Range=byte_range) if byte_range
                       else self.client.get_object(Bucket=self.bucket, Key=key))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                if _code(exc) == "InvalidRange":
                    raise RangeNotSatisfiable(f"{byte_range} is outside the recording") from exc
                raise
        body = got["Body"]
        return RecordingStream(body.iter_chunks(READ_CHUNK_BYTES), got["ContentLength"],
                               got.get("ContentRange") if byte_range else None, body.close)

    def erase(self, tenant_id: str, call_id: str) -> None:
        key = self.key(tenant_id, call_id)
        with _store_errors(f"cannot erase s3://{self.bucket}/{key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)
