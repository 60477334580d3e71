"""Backups that run themselves: a policy set once (a pool, two backup jobs on ``0 2 * * *``) run
by the real daemon against real lab guests on an accelerated clock (one hour a second): every VM
of the pool is backed up every night within ``max_backups``, and each finished job reaches a
real webhook on loopback, signed, the first delivery refused and retried while the backups go
on."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vmkeep.hypervisor import Hypervisor

from .conftest import Webhook, running_daemon

SECRET = "s3cret-webhook-key"


@pytest.fixture
def tiny_store(qemu_reachable_data_dir: Path) -> Iterator[Path]:
    """A datastore folder on a 1 MiB tmpfs: every backup into it fails its space check."""
    path = qemu_reachable_data_dir / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def _wait(what: str, cond: Any, timeout: float = 900) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return got


def _most_at_once(rows: list[dict[str, Any]]) -> int:
    edges = sorted([(j["started"], 1) for j in rows] + [(j["finished"], -1) for j in rows])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_a_pool_policy_backs_up_every_vm_every_night_and_posts_to_a_webhook(
    vmkeep, hv: Hypervisor, agent_vm: str, noagent_vm: str, qemu_reachable_data_dir: Path,
    tiny_store: Path, webhook: Webhook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    vms = sorted([agent_vm, noagent_vm])
    for vm in vms:
        for cp in hv.checkpoints(vm):
            hv.delete_checkpoint(vm, cp)
        vmkeep("vm", "import", vm)
    data = qemu_reachable_data_dir
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(data / "ds"))
    vmkeep("datastore", "add", "tiny", "--driver", "dir", "--path", str(tiny_store))
    # the policy, set once: a pool, its VMs, two nightly jobs
    vmkeep("pool", "create", "prod", "--fs-freeze", "agent", "--mode", "increment")
    for vm in vms:
        vmkeep("vm", "config", vm, "--pool", "prod")
    vmkeep("backupjob", "create", "nightly", "--pool", "prod", "--datastore", "ds",
           "--schedule", "0 2 * * *")  # fmt: skip
    vmkeep("backupjob", "create", "nightly-tiny", "--pool", "prod", "--datastore", "tiny",
           "--schedule", "0 2 * * *", "--priority", "10")  # fmt: skip
    shown = vmkeep("vm", "show", agent_vm, "--json").json()
    assert shown["backup_config"]["fs_freeze"] == "AGENT"
    assert shown["backup_config_sources"]["fs_freeze"] == "pool prod"

    monkeypatch.setenv("VMKEEP_LIMITS_MAX_BACKUPS", "1")
    webhook.refuse_first = 1  # refused once, delivered again later
    monkeypatch.setenv("VMKEEP_NOTIFY_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("VMKEEP_NOTIFY_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("VMKEEP_NOTIFY_RETRY_AFTER", "1")
    # tomorrow 01:59:30 on a clock that runs an hour a second: 02:00 comes at once, the next
    # night 24 s later
    start = (datetime.now(UTC) + timedelta(days=1)).replace(hour=1, minute=59, second=30)
    log = tmp_path / "daemon.log"
    waits: set[str] = set()
    with running_daemon("--clock", f"{start.isoformat()},3600", log=log):

        def two_nights() -> bool:
            for j in vmkeep("jobs", "list", "--json").json():
                if j["waiting"]:
                    waits.add(j["waiting"])
            runs = vmkeep("backupjob", "show", "nightly", "--json").json()["runs"]
            if len(runs) >= 2:  # no third night: the test looks at two
                vmkeep("backupjob", "disable", "nightly")
                vmkeep("backupjob", "disable", "nightly-tiny")
            done = [
                r for r in runs[-2:] if all(j["state"] in ("DONE", "FAILED") for j in r["jobs"])
            ]
            return len(runs) >= 2 and len(done) == 2

        _wait("two nights of backups", two_nights)
        jobs = vmkeep("jobs", "list", "--json").json()
        _wait("every finished job at the webhook",
              lambda: len(webhook.delivered()) >= len([j for j in jobs if j["state"] in ("DONE", "FAILED")]))  # fmt: skip
        notes = vmkeep("notify", "list", "--json").json()

    nightly = vmkeep("backupjob", "show", "nightly", "--json").json()
    first, second = sorted(nightly["runs"], key=lambda r: r["slot"])[:2]
    assert first["slot"][11:16] == second["slot"][11:16] == "02:00"
    assert datetime.fromisoformat(second["slot"]) - datetime.fromisoformat(
        first["slot"]
    ) == timedelta(days=1)
    for run in (first, second):  # every VM of the pool, every night
        assert sorted(j["target"] for j in run["jobs"]) == vms
        assert all(j["state"] == "DONE" for j in run["jobs"]), run
    points = vmkeep("backups", "list", "--vm", agent_vm, "--json").json()
    assert [len(b["increments"]) for b in points if b["datastore"] == "ds"] == [2]  # full + inc
    tiny = vmkeep("backupjob", "show", "nightly-tiny", "--json").json()
    assert all(j["state"] == "FAILED" for r in tiny["runs"] for j in r["jobs"])
    # within the limit, measured from the job rows; the lower priority waited with its reason
    ran = [j for j in jobs if j["run"] is not None and j["started"] and j["finished"]]
    assert _most_at_once(ran) == 1
    assert "max_backups: 1 of 1 backups running" in waits, waits

    # the webhook: each finished job once, signed; the refused first delivery came again
    delivered = webhook.delivered()
    for d in webhook.got:
        want = "sha256=" + hmac.new(SECRET.encode(), d.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(d.signature, want), (d.status, d.signature)
    by = {(p["backupjob"], p["vm"], p["status"]) for p in delivered}
    assert ("nightly", agent_vm, "ok") in by
    assert ("nightly", noagent_vm, "warnings") in by  # no agent answers: crash-consistent
    assert {("nightly-tiny", vm, "failed") for vm in vms} <= by
    failed = [p for p in delivered if p["status"] == "failed"]
    assert all("space" in p["error"]["message"].lower() for p in failed), failed
    assert webhook.got[0].status == 500
    refused = webhook.got[0].json()
    assert sum(1 for p in delivered if p["job"] == refused["job"]) == 1  # delivered once, later
    retried = next(n for n in notes if n["job"] == refused["job"] and n["target"] == "webhook")
    assert (retried["state"], retried["attempts"]) == ("SENT", 2)
    # the refused delivery delayed no backup: the next job started before it came again
    again = next(d.at for d in webhook.got if d.status == 200 and d.json()["job"] == refused["job"])
    ended = next(
        datetime.fromisoformat(j["finished"]).timestamp() for j in jobs if j["id"] == refused["job"]
    )
    nxt = min(datetime.fromisoformat(j["started"]).timestamp() for j in ran
              if datetime.fromisoformat(j["started"]).timestamp() >= ended)  # fmt: skip
    assert nxt < again, (ended, nxt, again)
    text = log.read_text()
    assert SECRET not in text and webhook.token not in text  # no secret in the daemon's log

    # the daemon was down for three nights: back up, it runs the job once, for the newest slot
    vmkeep("backupjob", "enable", "nightly")
    back = datetime.fromisoformat(second["slot"]) + timedelta(days=3, hours=8)
    with running_daemon("--clock", f"{back.isoformat()},1", log=log) as (daemon, _api):
        runs = _wait("the missed run", lambda: [
            r for r in vmkeep("backupjob", "show", "nightly", "--json").json()["runs"]
            if r["origin"] == "missed" and r["jobs"]
            and all(j["state"] in ("DONE", "FAILED") for j in r["jobs"])])  # fmt: skip
        time.sleep(3)  # three more looks of the scheduler: nothing else fires
        after = vmkeep("backupjob", "show", "nightly", "--json").json()["runs"]
        # `backupjob run` with the daemon up: the daemon fires it, its workers run the jobs
        now = vmkeep("backupjob", "run", "nightly-tiny", "--json", check=None)
        assert now.code == 21 and "2 of 2 jobs" in now.err, (now.code, now.err)  # no space
        manual = json.loads(now.out)
        assert manual["origin"] == "manual" and manual["who"] == "@local"
        assert {j["state"] for j in manual["jobs"]} == {"FAILED"}
        ran = {j["id"]: j for j in vmkeep("jobs", "list", "--json").json()}
        assert {(ran[j["id"]]["origin"], ran[j["id"]]["pid"]) for j in manual["jobs"]} == {
            ("api", daemon.pid)
        }  # the daemon's workers ran them
    (missed,) = runs
    assert [r["id"] for r in after if r["origin"] == "missed"] == [missed["id"]], after
    assert max(r["slot"] for r in after) == missed["slot"] and missed["state"] == "FIRED"
    assert datetime.fromisoformat(missed["slot"]) == datetime.fromisoformat(
        second["slot"]
    ) + timedelta(days=3)
    assert sorted(j["target"] for j in missed["jobs"]) == vms
    assert all(j["state"] == "DONE" for j in missed["jobs"]), missed
