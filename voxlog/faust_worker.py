"""The stream processors' faust app on the configured broker: `faust -A voxlog.faust_worker worker`
(what `voxlog workers` runs on Kafka). Built when this module is imported, as faust's command line wants,
and only then: nothing else imports it."""

from __future__ import annotations

from consumers.backends import KafkaBackend
from consumers.faust_processors import build_app
from consumers.processor_runner import default_processors
from voxlog.backends import log_backend
from voxlog.settings import Settings

_settings = Settings()
if not _settings.kafka_bootstrap:
    raise SystemExit("the faust worker needs Kafka: set VOXLOG_KAFKA_BOOTSTRAP (on the embedded log, `voxlog workers` "
                     "runs the processors in-process)")
_backend = log_backend(_settings)
assert isinstance(_backend, KafkaBackend)
app = build_app(_backend, default_processors())
