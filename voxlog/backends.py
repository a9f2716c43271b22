"""The backends the settings name: the event log (Kafka when a bootstrap is set, else embedded) and where
recordings are kept (S3 when a bucket is set, else the recordings folder)."""

from __future__ import annotations

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend
from projections.recording_store import LocalRecordingStore, RecordingStore
from voxlog.settings import Settings


def log_backend(settings: Settings) -> LogBackend:
    if settings.kafka_bootstrap:
        return KafkaBackend(settings.kafka_bootstrap)
    return EmbeddedBackend(settings.log_path)


def recording_store(settings: Settings) -> RecordingStore:
    if settings.recordings_s3_url is None:
        return LocalRecordingStore(settings.recordings_path)
    from projections.recording_store_s3 import S3RecordingStore  # boto3 is imported only when it is used

    key_id, secret = settings.recordings_s3_access_key_id, settings.recordings_s3_secret_access_key
    return S3RecordingStore.connect(
        settings.recordings_s3_url, endpoint_url=settings.recordings_s3_endpoint_url,
        region=settings.recordings_s3_region, access_key_id=key_id.get_secret_value() if key_id else None,
        secret_access_key=secret.get_secret_value() if secret else None)
