"""Retention by crypto-shredding and the compliance report, on both logs: audio goes first, then the rest,
each run audited; the report says what is kept, what was erased (when, by whom, why) and shredded."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from consumers.backends import LogBackend, ensure_topics
from consumers.event_reader import read_call
from producers.event_writer import EventWriter
from schemas.events import AuditRecorded, CallerAudioChunk, TranscriptFinal
from schemas.sealing import AUDIO_DATA, PERSONAL_DATA
from streams.config.tenants import Retention, TenantSpec
from streams.keystore.retention import DAY_MS, enforce_retention, retention_days
from streams.keystore.shredding import request_erasure
from tests.integration.test_cli import voxlog
from tests.integration.test_erasure import ERASED, KEPT, every_record, write_call
from voxlog.compliance import compliance_report


def test_personal_retention_covers_audio_too() -> None:
    assert retention_days(TenantSpec(id="a")) == {}
    assert retention_days(TenantSpec(id="a", retention=Retention(audio_days=7))) == {AUDIO_DATA: 7}
    assert retention_days(TenantSpec(id="a", retention=Retention(audio_days=30, personal_days=10))) == {
        AUDIO_DATA: 10, PERSONAL_DATA: 10}


async def shred(backend: LogBackend, tenant: TenantSpec, days_later: int) -> list[tuple[str, int]]:
    assert backend.keys is not None
    async with backend.producer() as producer:
        done = await enforce_retention(backend.keys, [tenant], EventWriter(producer),
                                       now_ms=time.time_ns() // 1_000_000 + days_later * DAY_MS,
                                       producer="test", producer_version="0")
    return [(d.kind, d.keys) for d in done]


async def test_retention_shreds_the_audio_then_everything(backend: LogBackend) -> None:
    tenant = TenantSpec(id=f"t{uuid.uuid4().hex[:8]}", retention=Retention(audio_days=1, personal_days=3))
    async with backend.admin() as admin:
        await ensure_topics(admin)
    async with backend.producer() as producer:
        call_id = await write_call(EventWriter(producer), tenant.id, KEPT, 0, said="retained words")

    async def call() -> tuple[list[CallerAudioChunk], list[TranscriptFinal]]:
        async with backend.admin() as admin:
            events = (await read_call(admin, call_id)).events
        return ([e.payload for e in events if isinstance(e.payload, CallerAudioChunk)],
                [e.payload for e in events if isinstance(e.payload, TranscriptFinal)])

    assert await shred(backend, tenant, 0) == []
    assert await shred(backend, tenant, 2) == [(AUDIO_DATA, 1)]
    audio, words = await call()
    assert audio
    assert all(chunk.audio == b"" for chunk in audio)
    assert all("retained words" in t.text for t in words)
    assert await shred(backend, tenant, 2) == [], "a key is shredded once"
    assert await shred(backend, tenant, 4) == [(PERSONAL_DATA, 2)]  # the call's and its caller memory's
    _, words = await call()
    assert all(t.text == "" for t in words)
    audited = [r for r in await every_record(backend) if r.topic == "voxlog.audit"]
    shredded = [e.payload for r in audited if (e := backend.codec.decode(r.value)).tenant_id == tenant.id]
    assert sorted((p.action, p.resource) for p in shredded if isinstance(p, AuditRecorded)) == [
        ("retention.shredded", "audio data keys"), ("retention.shredded", "personal data keys")]


async def test_the_report_says_what_is_kept_and_what_was_erased(backend: LogBackend) -> None:
    assert backend.keys is not None
    tenant = TenantSpec(id=f"t{uuid.uuid4().hex[:8]}", retention=Retention(audio_days=1))
    async with backend.producer() as producer:
        writer = EventWriter(producer)
        for number in (ERASED, KEPT):
            await write_call(writer, tenant.id, number, 0)
        erasure_id, _ = await request_erasure(writer, backend.keys, tenant.id, ERASED, requested_by="api-key:dpo",
                                              reason="asked by email", producer="test", producer_version="0")
    await shred(backend, tenant, 2)
    report = await compliance_report(backend, backend.keys, tenant)
    assert report.retention_days == {AUDIO_DATA: 1}
    assert report.live_keys == {PERSONAL_DATA: 2}  # the kept caller's call and memory
    (erasure,) = report.erasures
    assert (erasure["erasure_id"], erasure["keys_destroyed"], erasure["requested_by"], erasure["reason"]) == (
        erasure_id, 3, "api-key:dpo", "asked by email")
    (run,) = report.retention_runs
    assert (run["by"], run["keys_destroyed"]) == ("retention:audio:1d", 1)


@pytest.mark.slow
def test_compliance_commands(tmp_path: Path) -> None:
    done = voxlog("erase", "--tenant", "demo", "--number", ERASED, "--reason", "asked", home=tmp_path)
    assert done.returncode == 0, done.stderr
    report = voxlog("compliance", "report", "--tenant", "demo", "--json", home=tmp_path)
    assert report.returncode == 0, report.stderr
    assert any(e["reason"] == "asked" for e in json.loads(report.stdout)["erasures"])
    rotated = voxlog("compliance", "rotate-key", "--tenant", f"t{uuid.uuid4().hex[:8]}", home=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert "now wraps its 0 live data keys" in rotated.stdout
    retention = voxlog("compliance", "retention", "--tenant", "demo", home=tmp_path)
    assert retention.returncode == 0, retention.stderr
    assert "retention enforced for 1 tenants" in retention.stdout
