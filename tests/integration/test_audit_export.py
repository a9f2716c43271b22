"""Signed audit exports, run as a compliance team runs them: a tenant's audit events written to the
log (both backends), `voxlog audit export --signed` checking the trail against the log and signing
it, `voxlog audit verify --file` checking it offline with the public key alone; then the file
edited, truncated, checked with another key, its signature file missing or mangled, and the table
itself tampered with before an export: each fails with a plain message, never a traceback."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumers.backends import EmbeddedBackend, LogBackend
from tests.integration.test_audit_tampering import RECORDS, write_trail
from tests.integration.test_cli import voxlog

pytestmark = pytest.mark.slow


def verify(export: Path, public: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Offline: the home is an empty folder of its own, with no log and no ClickHouse in it."""
    done = voxlog("audit", "verify", "--file", str(export), "--public-key", str(public), home=home)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


def copy(export: Path, name: str) -> Path:
    """The export and its signature file under another name, to be tampered with."""
    other = export.with_name(name)
    shutil.copyfile(export, other)
    shutil.copyfile(f"{export}.sig", f"{other}.sig")
    return other


def test_a_signed_export_verifies_offline_and_each_tampering_fails(backend: LogBackend, log_bootstrap: str | None,
                                                                   tmp_path: Path) -> None:
    home, offline = tmp_path, tmp_path / "compliance"
    offline.mkdir()
    tenant = f"t{uuid.uuid4().hex[:8]}"
    sources = asyncio.run(write_trail(backend, tenant))

    public = offline / "voxlog-audit.pub.pem"
    made = voxlog("audit", "public-key", "--out", str(public), home=home, kafka=log_bootstrap)
    assert made.returncode == 0, made.stdout + made.stderr
    key_file = home / "audit-signing-key.pem"
    assert "made the audit signing key" in made.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in made.stdout + made.stderr + public.read_text()

    today = datetime.now(UTC).date()
    since, until = str(today - timedelta(days=1)), str(today + timedelta(days=1))
    export = offline / "audit.jsonl"
    exported = voxlog("audit", "export", "--tenant", tenant, "--since", since, "--until", until, "--out", str(export),
                      "--signed", home=home, kafka=log_bootstrap)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (f"exported {RECORDS} records of {tenant} (from {since}T00:00:00.000000Z, before {until}T00:00:00.000000Z) "
            "in 4 chains, checked against the log") in exported.stdout, exported.stdout
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(records) == RECORDS
    assert {r["tenant_id"] for r in records} == {tenant}
    assert {r["source"] for r in records} == set(sources.values())
    assert all(r.keys() >= {"chain_index", "prev_hash", "hash"} for r in records)
    signature = json.loads(Path(f"{export}.sig").read_text())
    assert (signature["algorithm"], signature["tenant_id"], signature["records"]) == ("Ed25519", tenant, RECORDS)
    assert key_file.read_bytes() not in export.read_bytes() + Path(f"{export}.sig").read_bytes()

    intact = verify(export, public, offline)
    assert intact.returncode == 0, intact.stdout
    assert (f"intact: {RECORDS} records of tenant {tenant} (from {since}T00:00:00.000000Z, before "
            f"{until}T00:00:00.000000Z) in 4 chains; signed by key {signature['key_id']} at "
            f"{signature['signed_at']}") in intact.stdout, intact.stdout
    head = [r for r in records if r["source"] == sources["audit"]][-1]["hash"]
    assert f"{sources['audit']} records 0..5, head {head}" in intact.stdout

    edited = copy(export, "edited.jsonl")
    lines = edited.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"outcome":"', '"outcome":"not ', 1)
    edited.write_text("".join(lines))
    found = verify(edited, public, offline)
    assert found.returncode == 1
    assert "line 3: " in found.stdout
    assert "was edited: its fields do not give its hash" in found.stdout, found.stdout

    truncated = copy(export, "truncated.jsonl")
    truncated.write_text("".join(export.read_text().splitlines(keepends=True)[:-1]))
    found = verify(truncated, public, offline)
    assert found.returncode == 1
    assert "truncated" in found.stdout, found.stdout
    assert f"the file holds {RECORDS - 1} records, the signed export {RECORDS}" in found.stdout

    other = tmp_path / "other-signer"
    other_public = offline / "other.pub.pem"
    assert voxlog("audit", "public-key", "--out", str(other_public), home=other).returncode == 0
    found = verify(export, other_public, offline)
    assert found.returncode == 1
    assert f"signed by key {signature['key_id']}, not by the public key given" in found.stdout, found.stdout

    unsigned = offline / "unsigned.jsonl"
    shutil.copyfile(export, unsigned)
    found = verify(unsigned, public, offline)
    assert found.returncode == 1
    assert f"its signature file {unsigned}.sig cannot be read" in found.stdout, found.stdout

    mangled = copy(export, "mangled.jsonl")
    Path(f"{mangled}.sig").write_text("this is not a signature")
    found = verify(mangled, public, offline)
    assert found.returncode == 1
    assert "the signature file is not JSON" in found.stdout, found.stdout

    empty = copy(export, "empty.jsonl")
    empty.write_text("")
    found = verify(empty, public, offline)
    assert found.returncode == 1
    assert "the export is empty" in found.stdout, found.stdout

    found = verify(export, key_file, offline)
    assert found.returncode == 1
    assert "that is a private key" in found.stdout, found.stdout


def tamper_table(home: Path, tenant: str, source: str) -> None:
    """Edits a record of `audit_log` in the home's embedded ClickHouse, from a process of its own (chDB
    opens one data folder per process), as whoever can write to ClickHouse can."""
    code = ("import sys; from pathlib import Path; from projections.store import AnalyticsStore; "
            "from tests.integration.test_audit_tampering import change_record; "
            "change_record(AnalyticsStore.open(None, Path(sys.argv[1])), sys.argv[2], sys.argv[3], 1)")
    subprocess.run([sys.executable, "-c", code, str(home), tenant, source], check=True, timeout=120)


def test_an_export_vouches_only_for_a_trail_the_log_confirms(embedded_backend: EmbeddedBackend,
                                                             tmp_path: Path) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    sources = asyncio.run(write_trail(embedded_backend, tenant))
    export = tmp_path / "audit.jsonl"

    whole = voxlog("audit", "export", "--tenant", tenant, "--out", str(export), "--signed", home=tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert f"exported {RECORDS} records of {tenant} (the whole trail) in 4 chains" in whole.stdout
    assert "made the audit signing key" in whole.stdout, "made on first use"
    assert json.loads(Path(f"{export}.sig").read_text())["since"] is None

    later = voxlog("audit", "export", "--tenant", tenant, "--since", "2999-01-01", home=tmp_path)
    assert later.returncode == 1
    assert f"nothing exported: no audit records of {tenant} (from 2999-01-01T00:00:00.000000Z on)" in later.stdout

    tamper_table(tmp_path, tenant, sources["audit"])
    refused = voxlog("audit", "export", "--tenant", tenant, "--out", str(tmp_path / "again.jsonl"), "--signed",
                     home=tmp_path)
    assert refused.returncode == 1
    assert f"tampered: {sources['audit']} record 1: changed" in refused.stdout, refused.stdout
    assert "not exported" in refused.stdout
    assert not (tmp_path / "again.jsonl").exists()
    assert "Traceback" not in refused.stdout + refused.stderr
