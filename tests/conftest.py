"""Shared fixtures: the event-log backends every contract test runs against, and a ClickHouse database
of the test's own in the process's one chDB engine."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend
from projections.store import AnalyticsStore
from tests.needs import missing
from tests.provider_server import ProviderServer

KAFKA_ENV = "VOXLOG_TEST_KAFKA_BOOTSTRAP"


def kafka_bootstrap() -> str:
    """The real broker's address; under CI a missing broker fails the run instead of skipping."""
    bootstrap = os.environ.get(KAFKA_ENV)
    if not bootstrap:
        missing(f"a Kafka broker ({KAFKA_ENV})", "`bash .ci/run` starts one and sets it")
    return bootstrap


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogBackend]:
    if request.param == "embedded":
        yield EmbeddedBackend(tmp_path / "log.db")
    else:
        yield KafkaBackend(kafka_bootstrap())


CHDB_HOME = Path(tempfile.gettempdir()) / f"voxlog-test-chdb-{os.getpid()}"


@pytest.fixture
def store() -> AnalyticsStore:
    # chDB runs one engine (one data path) per process: every test gets a database of its own in it.
    database = f"t_{uuid.uuid4().hex[:12]}"
    admin = AnalyticsStore.open(None, CHDB_HOME)
    admin.command(f"CREATE DATABASE {database}")
    return AnalyticsStore(admin.dsn, database=database)


@pytest.fixture
def topic_name() -> str:
    """A topic of the test's own, so tests never see each other's messages on a shared broker."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def server() -> AsyncIterator[ProviderServer]:
    """A local server replaying recorded provider exchanges (tests/provider_server.py), for the SDK tests."""
    async with ProviderServer() as running:
        yield running
