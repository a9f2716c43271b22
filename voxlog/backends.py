"""The backends the settings name: the event log (Kafka when a bootstrap is set, else embedded) with the
keystore its personal data is sealed with, and where recordings are kept (S3 when a bucket is set, else
the recordings folder)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend
from projections.recording_store import LocalRecordingStore, RecordingStore
from streams.keystore.data_keys import DataKeyStore
from streams.keystore.local_key_encryption import LocalKeyEncryptionKeys
from voxlog.settings import Settings


@cache
def keystore_at(folder: Path) -> DataKeyStore:
    """One keystore per folder in a process, so that every log client shares its cache of keys."""
    return DataKeyStore(folder / "data_keys.db", LocalKeyEncryptionKeys(folder / "kek.db"))


def log_backend(settings: Settings) -> LogBackend:
    keys = keystore_at(settings.keystore_path.resolve())
    if settings.kafka_bootstrap:
        return KafkaBackend(settings.kafka_bootstrap, keys)
    return EmbeddedBackend(settings.log_path, keys)


def recording_store(settings: Settings) -> RecordingStore:
    if settings.recordings_s3_url is None:
        return LocalRecordingStore(settings.recordings_path)
    from projections.recording_store_s3 import S3RecordingStore  # boto3 is imported only when it is used

    key_id, secret = settings.recordings_s3_access_key_id, settings.recordings_s3_secret_access_key
    return S3RecordingStore.connect(
        settings.recordings_s3_url, endpoint_url=settings.recordings_s3_endpoint_url,
        region=settings.recordings_s3_region, access_key_id=key_id.get_secret_value() if key_id else None,
        secret_access_key=secret.get_secret_value() if secret else None)
