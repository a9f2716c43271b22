"""Shared fixtures: the event-log backends (every contract test, and any test on both backends, runs
against `backend`; `embedded_backend` and `kafka_backend` are each one alone; `log_bootstrap` is the
backend as voxlog's settings name it), and a ClickHouse database of the test's own in the process's one
chDB engine (`store`), also as a gateway reads it through a store host (`hosted`)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from consumers.backends import EmbeddedBackend, KafkaBackend, LogBackend
from projections.hosted_store import HostedStore, StoreHost
from projections.store import AnalyticsStore
from tests.needs import missing
from tests.provider_server import ProviderServer
from voxlog.backends import keystore_at

KAFKA_ENV = "VOXLOG_TEST_KAFKA_BOOTSTRAP"
KEYSTORE = Path(tempfile.gettempdir()) / f"voxlog-test-keystore-{os.getuid()}"
"""The tests' one keystore: every process a test starts shares it (VOXLOG_KEYSTORE), as every process of a
deployment does, since the test broker's topics are shared by every test, and outlive a run."""
os.environ["VOXLOG_KEYSTORE"] = str(KEYSTORE)

# Properties, not timings: on a busy machine one example can outlast Hypothesis's default deadline (200 ms:
# a collector pass, a starved core) and fail a run that found nothing wrong. Speed lives in `voxlog bench`.
settings.register_profile("voxlog", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("voxlog")


def kafka_bootstrap() -> str:
    """The real broker's address; under CI a missing broker fails the run instead of skipping."""
    bootstrap = os.environ.get(KAFKA_ENV)
    if not bootstrap:
        missing(f"a Kafka broker ({KAFKA_ENV})", "`bash .ci/run` starts one and sets it")
    return bootstrap


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test, by name: a test that asks for it, or for `backend` or `log_bootstrap`, runs
    once on the embedded log and once on the broker (marked `kafka`). The one place the two are listed."""
    return str(request.param)


@pytest.fixture
def embedded_backend(tmp_path: Path) -> EmbeddedBackend:
    """The embedded log in `tmp_path`, where `Settings(home=tmp_path)` (a stack, a `voxlog` process) keeps it."""
    return EmbeddedBackend(tmp_path / "log.db", keystore_at(KEYSTORE))


@pytest.fixture
def kafka_backend() -> KafkaBackend:
    """The test broker; without one the test skips (fails under CI). Tests asking for it are marked `kafka`."""
    return KafkaBackend(kafka_bootstrap(), keystore_at(KEYSTORE))


@pytest.fixture
def backend(backend_name: str, request: pytest.FixtureRequest) -> LogBackend:
    """The backend under test: `embedded_backend`, then `kafka_backend`."""
    made: LogBackend = request.getfixturevalue(f"{backend_name}_backend")
    return made


@pytest.fixture
def log_bootstrap(backend_name: str) -> str | None:
    """The backend under test as the `kafka_bootstrap` setting, for tests that run voxlog itself (a stack, a
    `voxlog` process): the broker's address, or None for the embedded log in the settings' home."""
    return kafka_bootstrap() if backend_name == "kafka" else None


CHDB_HOME = Path(tempfile.gettempdir()) / f"voxlog-test-chdb-{os.getpid()}"


@pytest.fixture(scope="session")
def chdb_engine() -> Iterator[AnalyticsStore]:
    """A connection held open to this process's chDB engine for the whole session. chDB runs one engine
    (one data path) per process and stops it when its last connection closes; a restart starts its
    threads anew and never gives the old ones back (each holding two descriptors open), so a session
    that let it stop between tests ran out of descriptors below 1024, which PJSIP's select() needs."""
    engine = AnalyticsStore.open(None, CHDB_HOME)
    yield engine
    engine.close()


@pytest.fixture
def store(chdb_engine: AnalyticsStore) -> Iterator[AnalyticsStore]:
    # Every test gets a database of its own in the one engine.
    database = f"t_{uuid.uuid4().hex[:12]}"
    chdb_engine.command(f"CREATE DATABASE {database}")
    made = AnalyticsStore(chdb_engine.dsn, database=database)
    yield made
    made.close()


@pytest.fixture(scope="session")
def store_host(chdb_engine: AnalyticsStore) -> Iterator[StoreHost]:
    """This process's chDB engine served as `voxlog serve`'s background process serves its own."""
    folder = Path(tempfile.mkdtemp(prefix="voxlog-test-host-"))
    host = StoreHost(chdb_engine.dsn, folder / "clickhouse.sock", secrets.token_bytes(32))
    yield host
    host.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def hosted(store: AnalyticsStore, store_host: StoreHost) -> HostedStore:
    """`store`'s database read through `store_host`, as a gateway reads the engine its background process holds."""
    database = str(store.query("SELECT currentDatabase()").rows[0][0])
    return HostedStore(store_host.address, store_host.authkey, store.dsn, database=database)


@pytest.fixture
def topic_name() -> str:
    """A topic of the test's own, so tests never see each other's messages on a shared broker."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def server() -> AsyncIterator[ProviderServer]:
    """A local server replaying recorded provider exchanges (tests/provider_server.py), for the SDK tests."""
    async with ProviderServer() as running:
        yield running
