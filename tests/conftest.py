"""Shared fixtures: the event-log backends every contract test runs against."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from voxlog.backends import EmbeddedBackend, KafkaBackend, LogBackend

KAFKA_ENV = "VOXLOG_TEST_KAFKA_BOOTSTRAP"


def kafka_bootstrap() -> str:
    """The real broker's address; under CI a missing broker fails the run instead of skipping."""
    bootstrap = os.environ.get(KAFKA_ENV)
    if not bootstrap:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{KAFKA_ENV} is not set: CI must run the Kafka tests against a real broker")
        pytest.skip(f"{KAFKA_ENV} not set; `bash .ci/run` starts a broker and sets it")
    return bootstrap


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogBackend]:
    if request.param == "embedded":
        yield EmbeddedBackend(tmp_path / "log.db")
    else:
        yield KafkaBackend(kafka_bootstrap())


@pytest.fixture
def topic_name() -> str:
    """A topic of the test's own, so tests never see each other's messages on a shared broker."""
    return f"test.{uuid.uuid4().hex[:12]}"
