"""QA takes a call out of voxlog as a vCon: one real call through the gateway, its recording assembled
by the recordings projection; the tenant's key gets it (signed, valid by the vcon library, its
recording the one the API serves), another tenant's key and an unknown call get 404, no key 401, each
read audited; then `voxlog export vcon` writes it to a file and `--verify` checks it offline."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest

from projections.projection_runner import ProjectionRunner
from projections.recordings import RecordingsProjection
from projections.store import AnalyticsStore
from projections.vcon_export import EXPORT_ATTACHMENT, MEDIA_TYPE, load_public_key, read_call_material, verify_vcon
from schemas.codec import EventCodec
from schemas.events import AuditRecorded
from schemas.topics import AUDIT
from tests.integration.test_cli import voxlog
from tests.integration.test_console_api import project
from tests.integration.test_memory import call_and_say
from tests.integration.test_outbound_calls import OTHER_KEY, agents_with_two_tenants, api
from voxlog.settings import Settings
from voxlog.sim.stack import local_stack

pytestmark = pytest.mark.slow
NUMBER = "+15557770042"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def test_a_tenant_exports_its_call_as_a_signed_vcon_and_the_cli_writes_one(
    store: AnalyticsStore, tmp_path: Path
) -> None:
    from vcon import Vcon

    home = tmp_path / "home"
    settings = Settings(home=home, agents_dir=agents_with_two_tenants(tmp_path / "agents"))
    async with local_stack(settings) as stack:
        call_id = await call_and_say(stack, "i have a problem with my internet", "no thank you goodbye", number=NUMBER)
        await stack.gateway.wait_idle(30)
        projection = RecordingsProjection(stack.gateway.recordings_path, stack.gateway.recordings)
        await ProjectionRunner(stack.gateway.backend, store, projection).run(asyncio.Event(), until_caught_up=True)
        for _ in range(300):  # the summariser works after the call, on the caller's memory stream
            async with stack.gateway.backend.admin() as admin:
                found = await read_call_material(admin, stack.gateway.recordings, call_id, tenant_id="demo")
            if found is not None and found.summary is not None:
                break
            await asyncio.sleep(0.1)

        linked = await api(stack, "GET", f"/v1/calls/{call_id}/vcon")
        embedded = await api(stack, "GET", f"/v1/calls/{call_id}/vcon", params={"recording": "embed"})
        wav = (await api(stack, "GET", f"/v1/calls/{call_id}/recording")).content
        others = await api(stack, "GET", f"/v1/calls/{call_id}/vcon", key=OTHER_KEY)
        unknown = await api(stack, "GET", "/v1/calls/call-00000000-0000-0000-0000-000000000000/vcon")
        strange = await api(stack, "GET", "/v1/calls/..%2F..%2Fetc/vcon")
        anonymous = await api(stack, "GET", f"/v1/calls/{call_id}/vcon", key=None)
        # With the tables at hand, they bound the log's read: an id that is no call of theirs reads nothing.
        stack.gateway.analytics = store
        await project(stack, store)
        bounded = await api(stack, "GET", f"/v1/calls/{call_id}/vcon")
        unknown_bounded = await api(stack, "GET", "/v1/calls/call-11111111-1111-1111-1111-111111111111/vcon")
        others_bounded = await api(stack, "GET", f"/v1/calls/{call_id}/vcon", key=OTHER_KEY)
        async with stack.gateway.backend.admin() as admin:
            audited = [EventCodec().decode(r.value) async for r in admin.read_key((AUDIT,), call_id.encode())]
    assert linked.status_code == 200, linked.text
    assert linked.headers["content-type"] == MEDIA_TYPE
    assert (others.status_code, unknown.status_code, strange.status_code) == (404, 404, 404)
    assert others.json() == unknown.json() == {"detail": "no such call"}, "another's call looks like none"
    assert anonymous.status_code == 401
    reads = [(e.tenant_id, e.payload.outcome, e.payload.detail) for e in audited
             if isinstance(e.payload, AuditRecorded) and e.payload.action == "vcon.read"]
    assert reads == [("demo", "accepted", "recording link"), ("demo", "accepted", "recording embed"),
                     ("other", "failed", "no such call"), ("demo", "accepted", "recording link"),
                     ("other", "failed", "no such call")]
    assert bounded.status_code == 200, bounded.text
    assert json.loads(bounded.content)["dialog"] == json.loads(linked.content)["dialog"]
    assert (unknown_bounded.status_code, others_bounded.status_code) == (404, 404)
    assert unknown_bounded.json() == others_bounded.json() == {"detail": "no such call"}

    public_key = load_public_key((await asyncio.to_thread(
        voxlog, "export", "public-key", home=home)).stdout.encode())
    for answer in (linked, embedded):
        assert Vcon.validate_json(answer.text) == (True, [])
        verdict = verify_vcon(answer.content, public_key)
        assert verdict.intact, verdict.problems
    document = json.loads(linked.content)
    signed = base64.urlsafe_b64decode(document["payload"] + "=" * (-len(document["payload"]) % 4)).decode()
    for text in (linked.text, signed):
        assert NUMBER[2:] not in text, "the caller's number is masked, in the vCon and in what was signed"
    assert document["parties"][0]["tel"] == "+*********" + NUMBER[-2:]
    assert document["parties"][1]["name"] == "front-desk"
    (dialog,) = document["dialog"]
    assert dialog["url"] == f"{stack.base_url}/v1/calls/{call_id}/recording"
    assert dialog["signature"] == b64url(hashlib.sha256(wav).digest()), "the hash of the WAV the API serves"
    (with_audio,) = json.loads(embedded.content)["dialog"]
    assert base64.urlsafe_b64decode(with_audio["body"] + "=" * (-len(with_audio["body"]) % 4)) == wav
    transcript = json.loads(next(a for a in document["analysis"] if a["type"] == "transcript")["body"])
    assert {line["speaker"] for line in transcript} == {"caller", "agent"}
    assert "internet" in " ".join(line["text"] for line in transcript)
    summary = next(a for a in document["analysis"] if a["type"] == "summary")
    assert summary["body"].startswith("we opened ticket "), summary
    assert summary["product"] == "offline-extractive"

    # The command line, with the stack gone: the same call from the same home, to a file, checked offline.
    out = tmp_path / "call.vcon.json"
    exported = await asyncio.to_thread(voxlog, "export", "vcon", call_id, "--out", str(out), home=home)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"exported call {call_id} of demo as a signed vCon to {out}" in exported.stderr
    assert "with its recording" in exported.stderr
    assert Vcon.validate_file(str(out)) == (True, [])
    notes = json.loads(next(a for a in json.loads(out.read_bytes())["attachments"]
                            if a["type"] == EXPORT_ATTACHMENT)["body"])
    assert notes["recording"] == "embedded in dialog 0 (base64url)"
    pem = tmp_path / "vcon.pub.pem"
    await asyncio.to_thread(voxlog, "export", "public-key", "--out", str(pem), home=home)
    checked = await asyncio.to_thread(voxlog, "export", "vcon", "--verify", str(out), "--public-key", str(pem),
                                      home=home)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "intact" in checked.stdout
    tampered = tmp_path / "tampered.vcon.json"
    tampered.write_bytes(out.read_bytes().replace(b'"role": "agent"', b'"role": "human"', 1))
    refused = await asyncio.to_thread(voxlog, "export", "vcon", "--verify", str(tampered), home=home)
    assert refused.returncode == 1
    assert "changed after signing" in refused.stdout
    missing = await asyncio.to_thread(voxlog, "export", "vcon", "no-such-call", home=home)
    assert missing.returncode == 1
    assert "no call no-such-call" in missing.stderr
