"""Points you can count on, on a real guest: retention on the calendar across two chains (prune
--dry-run says exactly what prune then does, points in the middle of a chain are merged away,
every kept point restores the bytes it was taken with, the next backup still extends the chain),
and a verify job that re-reads only what is due and catches a flipped byte (the damaged chain is
never extended: the next backup starts a new one).

The points' times are set back in the catalog to span a week: the calendar rules read them, the
merges and restores are real."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from vmkeep.catalog.tables import Increment
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image

from .conftest import Webhook

FILE = "/mnt/vda/point"


def _set_times(times: dict[tuple[int, int], datetime]) -> None:
    ctx = Context(load_config())
    with ctx.catalog.session() as s:
        for inc in s.execute(select(Increment)).scalars():
            if (inc.backup_id, inc.seq) in times:
                inc.started_at = times[(inc.backup_id, inc.seq)]


def _restored_digest(vmkeep, backup: int, seq: int, tmp: Path) -> str:
    out = tmp / f"r-{backup}-{seq}.qcow2"
    vmkeep("restore", str(backup), "--increment", str(seq), "--disk", "vda", "--path", str(out))
    digest = hashlib.sha256(read_file_from_image(out, "/point", tmp)).hexdigest()
    out.unlink()
    return digest


def test_calendar_prune_across_chains_then_verify_and_drill_jobs(
    vmkeep, lab: Lab, hv: Hypervisor, agent_vm: str, qemu_reachable_data_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, webhook: Webhook,
) -> None:  # fmt: skip
    vm = agent_vm
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    store = qemu_reachable_data_dir / "ds"
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(store))
    vmkeep("vm", "config", vm, "--mode", "increment")
    digest: dict[tuple[int, int], str] = {}
    for i in range(7):  # chain A: 5 points; then --reset, chain B: 2 points
        written = lab.write_random(vm, FILE, 1)
        args = ["--reset"] if i == 5 else []
        r = vmkeep("backup", vm, "-d", "ds", *args, "--json").json()
        digest[(r["id"], r["increment"])] = written
    (a, b) = sorted({bid for bid, _ in digest})
    assert sorted(digest) == [(a, 0), (a, 1), (a, 2), (a, 3), (a, 4), (b, 0), (b, 1)]
    day = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    _set_times({(a, 0): day - timedelta(days=6), (a, 1): day - timedelta(days=5, hours=2),
                (a, 2): day - timedelta(days=5), (a, 3): day - timedelta(days=4, hours=1),
                (a, 4): day - timedelta(days=4), (b, 0): day - timedelta(days=1, hours=1),
                (b, 1): day - timedelta(days=1)})  # fmt: skip

    planned = vmkeep("prune", vm, "--keep-daily", "4", "--dry-run", "--json").json()
    points = planned["datastores"][0]["points"]
    decided = {(p["backup"], p["increment"]): p["keep"] for p in points}
    kept = {k for k, keep in decided.items() if keep}
    assert kept == {(b, 1), (a, 4), (a, 2), (a, 0)}, points  # each day's newest point
    why = {(p["backup"], p["increment"]): (p["rule"], p["how"]) for p in points}
    assert why[(a, 1)] == ("an older point of keep_daily " + str((day - timedelta(days=5)).date()),
                           "merged into increment 2")  # fmt: skip
    assert (
        why[(b, 0)][1] == "merged into increment 1" and why[(b, 1)][1] == "becomes the chain's base"
    )
    assert why[(a, 2)][1] == "now built on 0" and why[(a, 4)][1] == "now built on 2"
    listed = vmkeep("backups", "list", "--vm", vm, "--json").json()
    assert sum(len(x["increments"]) for x in listed) == 7  # a dry run changes nothing

    done = vmkeep("prune", vm, "--keep-daily", "4", "--json").json()
    assert [(p["backup"], p["increment"], p["keep"]) for p in done["datastores"][0]["points"]] == [
        (p["backup"], p["increment"], p["keep"]) for p in points
    ]
    listed = vmkeep("backups", "list", "--vm", vm, "--json").json()
    now_there = {(x["id"], i["id"]) for x in listed for i in x["increments"]}
    assert now_there == kept
    assert not (store / vm / str(a) / "1.vda.qcow2").exists()
    for backup, seq in sorted(kept):  # each kept point restores the bytes it was taken with
        assert _restored_digest(vmkeep, backup, seq, tmp_path) == digest[(backup, seq)]

    # the merged chain B is still the one the next backup extends
    written = lab.write_random(vm, FILE, 1)
    r = vmkeep("backup", vm, "-d", "ds", "--json").json()
    assert (r["id"], r["increment"]) == (b, 2)
    digest[(b, 2)] = written

    # a verify job: reads what is due, then leaves it alone for --reverify-after days
    vmkeep("backupjob", "create", "v", "--task", "verify", "--vm", vm, "--datastore", "ds",
           "--schedule", "daily", "--reverify-after", "7")  # fmt: skip
    run = vmkeep("backupjob", "run", "v", "--json").json()
    assert sorted(j["target"] for j in run["jobs"]) == [str(a), str(b)]
    assert {j["state"] for j in run["jobs"]} == {"DONE"}
    shown = vmkeep("backups", "show", str(b), "--json").json()["increments"]
    assert {i["verify_result"] for i in shown} == {"OK"}
    run = vmkeep("backupjob", "run", "v", "--json").json()
    assert run["jobs"] == [] and "verified within 7 days" in run["skipped"][0]["reason"]

    # a drill job: the VM's newest point boots; its result and time to a running copy are kept
    vmkeep("backupjob", "create", "d", "--task", "drill", "--vm", vm, "--datastore", "ds",
           "--schedule", "sat 04:00", "--probe", "test -s /mnt/vda/point")  # fmt: skip
    run = vmkeep("backupjob", "run", "d", "--json").json()
    assert [(j["target"], j["state"]) for j in run["jobs"]] == [(str(b), "DONE")], run
    drilled = vmkeep("backups", "show", str(b), "--json").json()["increments"][-1]["last_drill"]
    assert drilled["result"] == "PASS" and drilled["duration_s"] > 0, drilled
    assert "PASS" in vmkeep("backups", "show", str(b)).out

    # a flipped byte in chain B's newest point: the next verify (re-verify after 0 days) fails,
    # the point is DAMAGED, and the next backup starts a new chain instead of extending it
    stored = store / vm / str(b) / "2.vda.qcow2"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    vmkeep("backupjob", "edit", "v", "--reverify-after", "0")
    # the failed verify is reported
    monkeypatch.setenv("VMKEEP_NOTIFY_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("VMKEEP_NOTIFY_ON", "failure")
    run = vmkeep("backupjob", "run", "v", "--json", check=17).json()
    states = {j["target"]: (j["state"], j["exit_code"]) for j in run["jobs"]}
    assert states == {str(a): ("DONE", 0), str(b): ("FAILED", 17)}, run
    assert [(n["event"], n["status"], n["kind"], n["target"]) for n in webhook.delivered()] == [
        ("job.finished", "failed", "verify", str(b))
    ], webhook.got
    monkeypatch.delenv("VMKEEP_NOTIFY_WEBHOOK_URL")
    shown = vmkeep("backups", "show", str(b), "--json").json()["increments"]
    assert [(i["id"], i["status"], i["verify_result"]) for i in shown] == [
        (1, "VALID", "OK"), (2, "DAMAGED", "FAILED")
    ]  # fmt: skip
    new = vmkeep("backup", vm, "-d", "ds", "--json", check=1)  # 1: done, with a warning
    assert "damaged" in new.err and "new full backup chain" in new.err, new.err
    assert new.json()["increment"] == 0 and new.json()["id"] not in (a, b)
