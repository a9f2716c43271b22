"""The projections as a faust worker (`voxlog projections run` on Kafka) against the real broker and
a real chDB: the tables it writes hold what the in-process runner gives for the same events, and a
worker killed (SIGKILL) at random points while calls are written, and started again, loses and
doubles no row.

The worker is a process of its own holding its own chDB (one process per data path), so its tables
are read by another process once it has stopped. The broker is shared: each test writes calls of a
tenant of its own, compares only that tenant's rows, and gives its worker consumer groups of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumers.backends import KafkaBackend
from projections.default_projections import default_projections
from projections.store import AnalyticsStore
from tests.integration.test_projections import AUDIT_COLUMN, project
from tests.projection_runs import snapshot, write_calls

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

REPO = Path(__file__).resolve().parents[2]
PROJECTION_TOPICS = {p.name: p.topics for p in default_projections(recordings=Path("unused"))}

DUMP_TABLES = """
import asyncio, json, sys
from pathlib import Path
from projections.audit import verify_chain
from projections.store import AnalyticsStore
from projections.tables import AUDIT_LOG
from tests.projection_runs import snapshot
home, tenant = sys.argv[1], sys.argv[2]
store = AnalyticsStore.open(None, Path(home))
tables = asyncio.run(snapshot(store))
audit = store.query(f"SELECT {', '.join(AUDIT_LOG.column_names)} FROM {AUDIT_LOG.name} FINAL "
                    "WHERE tenant_id = {t:String} ORDER BY source, chain_index", {"t": tenant}).rows
print(json.dumps({"tables": {name: [row for row in rows if row[0] == tenant] for name, rows in tables.items()},
                  "audit_problems": [str(problem) for problem in verify_chain(audit)]}, default=str))
"""
"""Prints, as JSON, one tenant's rows of every analyst table of a stopped worker's chDB, and what
checking the tenant's audit chain finds."""


class Worker:
    """`voxlog projections run` on Kafka, in a process of its own, with its own VOXLOG_HOME."""

    def __init__(self, tmp_path: Path, bootstrap: str) -> None:
        self.home = tmp_path / "home"
        self.app_id = f"test-projections-{uuid.uuid4().hex[:12]}"
        self.log_path = tmp_path / "worker.log"
        self.env = dict(os.environ, VOXLOG_HOME=str(self.home), VOXLOG_KAFKA_BOOTSTRAP=bootstrap,
                        VOXLOG_PROJECTIONS_APP_ID=self.app_id)
        self.env.pop("VOXLOG_CLICKHOUSE_DSN", None)
        self.cwd = tmp_path
        self.process: asyncio.subprocess.Process | None = None
        self.assignments_before = 0

    async def start(self) -> None:
        self.assignments_before = self.assignments()
        with self.log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("voxlog")), "projections", "run",
                env=self.env, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.cwd)

    def assignments(self) -> int:
        """How many times the calls projection (the last app the worker starts) was given its partitions."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("voxlog-projection-calls: ")

    async def projecting(self, timeout_s: float = 90) -> None:
        """Waits until this run of the worker has all its projections running."""
        deadline = time.monotonic() + timeout_s
        while self.assignments() == self.assignments_before:
            assert self.process is not None
            assert self.process.returncode is None, f"the worker stopped:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the worker did not start projecting:\n{self.log_tail()}"
            await asyncio.sleep(0.1)

    async def kill(self, how: signal.Signals) -> None:
        """SIGKILL: a crash, wherever it was, no flush, no goodbye. SIGTERM: faust stops the worker,
        cancelling a batch in the middle, acking it all the same and committing the acked offsets."""
        assert self.process is not None
        self.process.send_signal(how)
        await self.process.wait()

    async def stop(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def caught_up(self, ends: dict[tuple[str, int], int]) -> bool:
        """Whether every projection's group has committed past `ends` (faust commits what it acked,
        and it acks a batch once its rows and offsets are in ClickHouse)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.env["VOXLOG_KAFKA_BOOTSTRAP"])
        await admin.start()
        try:
            for name, topics in PROJECTION_TOPICS.items():
                committed = {(tp.topic, tp.partition): meta.offset
                             for tp, meta in (await admin.list_consumer_group_offsets(f"{self.app_id}-{name}")).items()}
                if any(committed.get(tp, 0) < end for tp, end in ends.items() if tp[0] in topics):
                    return False
            return True
        finally:
            await admin.close()

    async def wait_caught_up(self, ends: dict[tuple[str, int], int], timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.caught_up(ends):
            assert self.process is not None
            assert self.process.returncode is None, f"the worker stopped:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the worker did not catch up:\n{self.log_tail()}"
            await asyncio.sleep(1.0)

    async def tables(self, tenant: str) -> dict[str, list[Any]]:
        """The tenant's rows in the worker's tables (the worker stopped); its audit chain intact."""
        dump = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DUMP_TABLES, str(self.home), tenant, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await dump.communicate()
        assert dump.returncode == 0, err.decode()[-3000:]
        dumped = json.loads(out)
        assert dumped["audit_problems"] == [], "the audit chain is intact"
        tables: dict[str, list[Any]] = dumped["tables"]
        return tables


async def log_ends(log: KafkaBackend) -> dict[tuple[str, int], int]:
    async with log.admin() as admin:
        topics = {topic for topics in PROJECTION_TOPICS.values() for topic in topics}
        return {(topic, p): end for topic in topics for p, end in (await admin.end_offsets(topic)).items()}


async def in_process_tables(log: KafkaBackend, store: AnalyticsStore, tenant: str) -> dict[str, list[Any]]:
    """What the in-process runner makes of the same log (from offset zero), as the worker's dump reads."""
    await project(log, store)
    tables = {name: [row for row in rows if row[0] == tenant] for name, rows in (await snapshot(store)).items()}
    loaded: dict[str, list[Any]] = json.loads(json.dumps(tables, default=str))
    return loaded


async def test_the_faust_worker_writes_what_the_in_process_runner_writes(kafka_backend: KafkaBackend, tmp_path: Path,
                                                                         store: AnalyticsStore) -> None:
    log = kafka_backend
    tenant = f"t{uuid.uuid4().hex[:8]}"
    ids = await write_calls(log, tenant, 6)
    worker = Worker(tmp_path, log.bootstrap)
    await worker.start()
    try:
        await worker.wait_caught_up(await log_ends(log))
    finally:
        await worker.stop()
    tables = await worker.tables(tenant)

    assert sorted(row[1] for row in tables["calls"]) == sorted(ids)
    assert len(tables["turns"]) == 12
    assert sum(1 for row in tables["audit_log"] if row[AUDIT_COLUMN["action"]] == "consent.given") == 6
    assert len(tables["recordings"]) == 6
    assert tables == await in_process_tables(log, store, tenant)


async def test_killing_the_faust_worker_loses_and_doubles_nothing(kafka_backend: KafkaBackend, tmp_path: Path,
                                                                   store: AnalyticsStore) -> None:
    log = kafka_backend
    tenant = f"t{uuid.uuid4().hex[:8]}"
    rng = random.Random(5)
    worker = Worker(tmp_path, log.bootstrap)
    writing_done = asyncio.Event()

    async def keep_writing() -> list[str]:
        """A call a second, its events interleaved with the next's, until told to stop."""
        ids: list[str] = []
        while not writing_done.is_set():
            ids += await write_calls(log, tenant, 2, first=len(ids), pause_every=10)
            await asyncio.sleep(1.0)
        return ids

    writing = asyncio.create_task(keep_writing())
    kills = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < 60:
            await worker.start()
            # A restart after a SIGKILL waits for the dead worker's session to expire; once it projects
            # again, it dies (or is stopped) wherever it is: catching up, folding, inserting.
            await worker.projecting()
            await asyncio.sleep(rng.uniform(0.0, 2.5))
            await worker.kill(signal.SIGTERM if kills % 3 == 1 else signal.SIGKILL)
            kills += 1
        writing_done.set()
        ids = await writing
        await worker.start()
        await worker.wait_caught_up(await log_ends(log))
    finally:
        writing_done.set()
        await worker.stop()
    tables = await worker.tables(tenant)

    assert kills >= 3
    assert sorted(row[1] for row in tables["calls"]) == sorted(ids), "every call, once"
    assert len(tables["turns"]) == 2 * len(ids)
    assert len(tables["transcripts"]) == 4 * len(ids)
    assert sum(1 for row in tables["audit_log"] if row[AUDIT_COLUMN["action"]] == "consent.given") == len(ids)
    assert tables == await in_process_tables(log, store, tenant), "the rows the in-process runner gives"
