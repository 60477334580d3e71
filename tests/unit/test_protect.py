"""Protected restore points and notes (engine/points/protect.py) on a real SQLite catalog and a
real ``dir`` datastore holding real qcow2 backing chains (qemu-img): retention never prunes a
protected point nor a point it needs, delete refuses them unless an admin forces it, copy keeps
the note and not the protection; the CLI commands and the API routes by role."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from vmkeep.api.app import create_app
from vmkeep.catalog.tables import Backup, Increment, Vm
from vmkeep.checksums import digest_file
from vmkeep.cli import backups_cmd
from vmkeep.engine.core import stores
from vmkeep.engine.core.backup_config import resolve
from vmkeep.engine.core.chains import checkpoint_name, disk_file, needed_by_protected
from vmkeep.engine.core.context import Context
from vmkeep.engine.points import copy, delete, listing, protect, retention, verify
from vmkeep.engine.points.merge import apply_retention
from vmkeep.engine.service import tokens
from vmkeep.errors import (
    ChecksumMismatch,
    Forbidden,
    IncrementNotFound,
    InvalidValue,
    Refused,
    VmkeepError,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def ctx(fake_ctx: Context, tmp_path: Path) -> Context:
    stores.add(fake_ctx, "ds", "dir", {"path": str(tmp_path / "store")})
    stores.add(fake_ctx, "ds2", "dir", {"path": str(tmp_path / "store2")})
    with fake_ctx.catalog.session() as s:
        s.add(Vm(name="web", uuid="uuid-web", host_uri="fake:///system", state="ACTIVE",
                 lcm_state="RUNNING"))  # fmt: skip
    return fake_ctx


def ids(ctx: Context) -> tuple[int, int]:
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        return vm.id, stores.find_datastore(s, "ds").id


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def make_chain(ctx: Context, tmp: Path, mode: str, points: int, age: int = 0) -> int:
    """A chain of ``points`` VALID points stored in the ``dir`` datastore: a full qcow2, then
    increments backed by their parent by relative name, each writing its own byte pattern."""
    vm_id, ds_id = ids(ctx)
    with ctx.catalog.session() as s:
        b = Backup(vm_id=vm_id, datastore_id=ds_id, chain="", mode=mode, status="VALID",
                   created_at=T0 + timedelta(hours=age))  # fmt: skip
        s.add(b)
        s.flush()
        b.chain, bid = f"web/{b.id}", b.id
    work = tmp / f"stage-{bid}"
    work.mkdir()
    staged, rows = [], []
    for seq in range(points):
        img = work / disk_file(seq, "vda")
        if seq == 0:
            qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
        else:
            parent = disk_file(seq - 1, "vda")
            qemu_img("create", "-q", "-f", "qcow2", "-b", parent, "-F", "qcow2", str(img))
        pattern = f"write -P {seq + 1} {seq * 65536} 65536"
        subprocess.run(["qemu-io", "-c", pattern, str(img)], check=True, capture_output=True)
        f = {"disk": "vda", "name": img.name, "size": img.stat().st_size,
             "digest": digest_file(img)}  # fmt: skip
        rows.append(Increment(backup_id=bid, seq=seq, parent=seq - 1 if seq else None,
                              status="VALID", size=f["size"], files=[f],
                              started_at=T0 + timedelta(hours=age, minutes=seq),
                              checkpoint=checkpoint_name(bid, seq) if seq == points - 1 else None,
                              finished_at=T0))  # fmt: skip
        staged.append(img)
    with ctx.catalog.session() as s:
        driver = stores.driver_of(stores.find_datastore(s, "ds"))
        s.add_all(rows)
    driver.backup(f"web/{bid}", staged)
    return bid


def points(ctx: Context, bid: int) -> list[tuple[int, int | None, bool]]:
    with ctx.catalog.session() as s:
        b = s.get(Backup, bid)
        assert b is not None
        return [(i.seq, i.parent, i.protected) for i in b.increments]


def stored(tmp: Path, bid: int, seq: int) -> Path:
    return tmp / "store" / "web" / str(bid) / disk_file(seq, "vda")


def read_pattern(img: Path, seq: int) -> bool:
    """Whether the image (through its backing chain) holds point ``seq``'s bytes."""
    run = subprocess.run(
        ["qemu-io", "-r", "-c", f"read -P {seq + 1} {seq * 65536} 65536", str(img)],
        capture_output=True,
        text=True,
    )
    return run.returncode == 0 and "Pattern verification failed" not in run.stdout


# --- the rule ----------------------------------------------------------------------------------
def test_needed_by_protected_walks_the_parents(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 5)
    with ctx.catalog.session() as s:
        b = s.get(Backup, bid)
        assert b is not None
        assert needed_by_protected(b) == set()
        b.increments[2].protected = True
        assert needed_by_protected(b) == {0, 1, 2}
        b.increments[4].protected = True
        assert needed_by_protected(b) == {0, 1, 2, 3, 4}


# --- protect, unprotect, notes -----------------------------------------------------------------
def test_protect_the_newest_point_and_unprotect(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 3)
    res = protect.protect(ctx, bid, actor_name="alice")
    assert (res["increment"], res["protected"], res["protected_by"]) == (2, True, "alice")
    assert res["protected_at"] is not None
    again = protect.protect(ctx, bid, 2, actor_name="bob")  # keeps who protected it first
    assert (again["protected_by"], again["protected_at"]) == ("alice", res["protected_at"])
    shown = listing.show_backup(ctx, bid)["increments"]
    assert [(i["id"], i["protected"], i["protected_by"]) for i in shown] == [
        (0, False, None), (1, False, None), (2, True, "alice")
    ]  # fmt: skip
    listed = listing.list_backups(ctx)[0]["increments"][2]
    assert (listed["protected"], listed["protected_by"]) == (True, "alice")
    res = protect.unprotect(ctx, bid, 2)
    assert (res["protected"], res["protected_by"], res["protected_at"]) == (False, None, None)
    assert points(ctx, bid) == [(0, None, False), (1, 0, False), (2, 1, False)]


def test_protect_refuses_a_missing_or_unsound_point(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    with pytest.raises(IncrementNotFound, match="has no increment 7; it has increments 0, 1"):
        protect.protect(ctx, bid, 7, actor_name="a")
    with ctx.catalog.session() as s:
        b = s.get(Backup, bid)
        assert b is not None
        b.increments[1].status = "DAMAGED"
    with pytest.raises(Refused, match="it is DAMAGED and restores nothing.*VALID: 0"):
        protect.protect(ctx, bid, 1, actor_name="a")
    assert protect.protect(ctx, bid, actor_name="a")["increment"] == 0  # newest VALID


def test_note_set_cleared_and_too_long(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    assert protect.set_note(ctx, bid, 0, "before the upgrade\nto 12")["note"] == (
        "before the upgrade\nto 12"
    )
    assert listing.show_backup(ctx, bid)["increments"][0]["note"] == "before the upgrade\nto 12"
    assert protect.set_note(ctx, bid, None, "newest")["increment"] == 1
    with pytest.raises(InvalidValue, match="it has 1025 characters; use at most 1024"):
        protect.set_note(ctx, bid, 0, "x" * 1025)
    with pytest.raises(InvalidValue, match="remove its control characters"):
        protect.set_note(ctx, bid, 0, "bad\x1b[31m")
    assert protect.set_note(ctx, bid, 0, "x" * 1024)["note"] == "x" * 1024
    assert protect.set_note(ctx, bid, 0, "")["note"] is None
    assert listing.show_backup(ctx, bid)["increments"][0]["note"] is None


# --- retention ---------------------------------------------------------------------------------
def test_full_mode_skips_protected_chains_and_does_not_count_them(
    ctx: Context, tmp_path: Path
) -> None:
    chains = [make_chain(ctx, tmp_path, "FULL", 1, age=h) for h in range(2)]
    protect.protect(ctx, chains[0], actor_name="a")  # the oldest: first to go without it
    vm_id, ds_id = ids(ctx)
    cfg = resolve({"keep_last": 2, "mode": "full"})
    assert apply_retention(ctx, vm_id, ds_id, cfg) == []  # nothing to remove: silent
    chains += [make_chain(ctx, tmp_path, "FULL", 1, age=h) for h in range(2, 4)]
    msgs = apply_retention(ctx, vm_id, ds_id, resolve({"keep_last": 2, "mode": "full"}))
    assert msgs == [f"retention: deleted backup {chains[1]} (keep_last=2)"]
    left = [b["id"] for b in listing.list_backups(ctx)]
    assert left == [chains[0], chains[2], chains[3]]  # protected + keep_last unprotected
    assert stored(tmp_path, chains[0], 0).exists()
    assert not stored(tmp_path, chains[1], 0).exists()


def test_increment_mode_merges_around_a_protected_point(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 5)
    protect.protect(ctx, bid, 1, actor_name="a")
    vm_id, ds_id = ids(ctx)
    cfg = resolve({"keep_last": 2, "mode": "increment"})
    with ctx.catalog.session() as s:  # what prune --dry-run prints: each point and why
        shown = retention.plan(ctx, s, vm_id, ds_id, cfg).as_dict()
    assert [(p["increment"], p["keep"], p["rule"], p["how"]) for p in shown["points"]] == [
        (4, True, "keep_last 1/2", None),
        (3, True, "keep_last 2/2", "now built on 1"),
        (2, False, "no rule keeps it", "merged into increment 3"),
        (1, True, "protected", None),
        (0, True, f"a protected point of backup {bid} is built on it", None),
    ]
    msgs = apply_retention(ctx, vm_id, ds_id, cfg)
    assert msgs == [f"retention: removed increments [2] of backup {bid} (keep_last=2); "
                    "3 now built on 1"]  # fmt: skip
    assert points(ctx, bid) == [(0, None, False), (1, 0, True), (3, 1, False), (4, 3, False)]
    # the protected point is untouched and restorable: its stored backing chain is whole
    img = stored(tmp_path, bid, 1)
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(img)))
    assert [Path(i["filename"]).name for i in info] == [disk_file(1, "vda"), disk_file(0, "vda")]
    assert read_pattern(img, 0) and read_pattern(img, 1) and not read_pattern(img, 2)
    # point 3 still reads as it did, with point 2's bytes merged into it
    assert all(read_pattern(stored(tmp_path, bid, 3), q) for q in range(4))
    assert not stored(tmp_path, bid, 2).exists()
    assert listing.show_backup(ctx, bid)["increments"][2]["files"][0]["digest"] == digest_file(
        stored(tmp_path, bid, 3)
    )

    protect.unprotect(ctx, bid, 1)  # then points 0 and 1 go: 3 becomes the base
    msgs = apply_retention(ctx, vm_id, ds_id, cfg)
    assert msgs == [f"retention: removed increments [0, 1] of backup {bid} (keep_last=2); "
                    "3 is the new base"]  # fmt: skip
    assert points(ctx, bid) == [(3, None, False), (4, 3, False)]
    assert not stored(tmp_path, bid, 1).exists()
    assert all(read_pattern(stored(tmp_path, bid, 4), q) for q in range(5))
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json",
                               str(stored(tmp_path, bid, 4))))  # fmt: skip
    assert [Path(i["filename"]).name for i in info] == [disk_file(4, "vda"), disk_file(3, "vda")]


def test_calendar_retention_spans_every_chain(ctx: Context, tmp_path: Path) -> None:
    """Two chains (the second left by a --reset, say) under keep_daily: each day keeps its
    newest point, wherever it is; a chain none of whose points stays is deleted whole; points in
    the middle of a chain are merged away and every kept point reads as before."""
    old = make_chain(ctx, tmp_path, "INCREMENT", 3, age=0)  # day 1: 00:00, 00:01, 00:02
    new = make_chain(ctx, tmp_path, "INCREMENT", 4, age=24)  # day 2: 00:00 .. 00:03
    vm_id, ds_id = ids(ctx)
    with ctx.catalog.session() as s:
        b = s.get(Backup, new)
        assert b is not None
        for inc in b.increments[:2]:  # points 0 and 1 of the new chain on day 3, 2 and 3 day 4
            inc.started_at = T0 + timedelta(days=2, minutes=inc.seq)
        for inc in b.increments[2:]:
            inc.started_at = T0 + timedelta(days=3, minutes=inc.seq)
    cfg = resolve({"keep_daily": 2})
    with ctx.catalog.session() as s:
        plan = retention.plan(ctx, s, vm_id, ds_id, cfg)
    shown = [(p["backup"], p["increment"], p["keep"]) for p in plan.as_dict()["points"]]
    assert shown == [(new, 3, True), (new, 2, False), (new, 1, True), (new, 0, False),
                     (old, 2, False), (old, 1, False), (old, 0, False)]  # fmt: skip
    msgs = apply_retention(ctx, vm_id, ds_id, cfg)
    assert msgs == [
        f"retention: deleted backup {old} (keep_daily=2)",
        f"retention: removed increments [0, 2] of backup {new} (keep_daily=2); "
        "1 is the new base; 3 now built on 1",
    ]
    assert [b["id"] for b in listing.list_backups(ctx)] == [new]
    assert points(ctx, new) == [(1, None, False), (3, 1, False)]
    assert all(read_pattern(stored(tmp_path, new, 3), q) for q in range(4))
    assert all(read_pattern(stored(tmp_path, new, 1), q) for q in range(2))
    assert not read_pattern(stored(tmp_path, new, 1), 2)
    assert not (tmp_path / "store" / "web" / str(old)).exists()
    # what is stored matches the catalog: a verify of the merged chain passes
    assert verify.verify(ctx, new)["ok"] is True


# --- delete ------------------------------------------------------------------------------------
def test_delete_refused_then_forced(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 3)
    protect.protect(ctx, bid, 1, actor_name="a")
    with pytest.raises(Refused, match=rf"its increments 1 are protected\. Lift .*unprotect {bid} "
                       r"--increment 1.*--force \(admin only\)"):  # fmt: skip
        delete.delete_backup(ctx, bid)
    protect.protect(ctx, bid, 2, actor_name="a")
    with pytest.raises(Refused, match=f"delete of increment 2 of backup {bid} refused"):
        delete.delete_backup(ctx, bid, 2)
    assert [p[0] for p in points(ctx, bid)] == [0, 1, 2] and stored(tmp_path, bid, 2).exists()
    res = delete.delete_backup(ctx, bid, 2, force=True)
    assert res["deleted_files"] == [disk_file(2, "vda")]
    protect.unprotect(ctx, bid, 1)
    delete.delete_backup(ctx, bid)  # nothing protected left: no force needed
    assert listing.list_backups(ctx) == []


def test_a_datastore_is_not_forgotten_while_an_increment_is_written_to_it(
    ctx: Context, tmp_path: Path
) -> None:
    """An increment being added to a VALID chain: `datastore remove --force` is refused as for a
    new chain (it forgot the chain under the running backup; found by e2e/test_api_promises),
    and a delete of the chain is refused before its job is queued."""
    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    with ctx.catalog.session() as s:
        s.add(Increment(backup_id=bid, seq=2, parent=1, status="RUNNING", started_at=T0))
    with pytest.raises(Refused, match=f"backups {bid} are being written to it"):
        delete.remove_datastore(ctx, "ds", force=True)
    for check in (delete.check_delete, delete.delete_backup):  # a 409 before a job is queued
        with pytest.raises(Refused, match="a backup of this chain is running"):
            check(ctx, bid, None, True)
    with ctx.catalog.session() as s:
        s.execute(select(Increment).where(Increment.seq == 2)).scalar_one().status = "CANCELLED"
    assert delete.remove_datastore(ctx, "ds", force=True)["forgotten_backups"] == [bid]


def test_copy_keeps_the_note_not_the_protection(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    protect.protect(ctx, bid, 1, actor_name="a")
    protect.set_note(ctx, bid, 1, "golden")
    res = copy.copy_backup(ctx, bid, "ds2")
    inc = listing.show_backup(ctx, res["copy"])["increments"][1]
    assert (inc["note"], inc["protected"], inc["protected_by"]) == ("golden", False, None)
    protect.set_note(ctx, bid, 1, "golden, checked")  # a later copy brings the new note
    res = copy.copy_backup(ctx, bid, "ds2")
    assert res["copied_increments"] == []
    assert listing.show_backup(ctx, res["copy"])["increments"][1]["note"] == "golden, checked"
    manifest = json.loads((tmp_path / "store2" / "web" / str(bid) / "manifest.json").read_text())
    assert "protected" not in manifest["increments"][1] and "note" not in manifest["increments"][1]


def test_a_copy_never_replaces_a_protected_point_on_its_datastore(
    ctx: Context, tmp_path: Path
) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 3)
    copied = copy.copy_backup(ctx, bid, "ds2")["copy"]
    protect.protect(ctx, copied, 1, actor_name="a")  # on the second datastore
    vm_id, ds_id = ids(ctx)
    apply_retention(ctx, vm_id, ds_id, resolve({"keep_last": 2, "mode": "increment"}))
    with pytest.raises(Refused, match="points 1 there are protected"):
        copy.copy_backup(ctx, bid, "ds2")  # the source's point 1 was rewritten by the merge
    kept = tmp_path / "store2" / "web" / str(bid) / disk_file(1, "vda")
    assert read_pattern(kept, 0) and read_pattern(kept, 1)  # the protected bytes are intact
    assert (1, 0, True) in points(ctx, copied)


# --- adapters ----------------------------------------------------------------------------------
@pytest.fixture
def run_cli(ctx: Context, cli_on: Any) -> Any:
    """``vmkeep ARGS`` in-process on the test's context; (exit code, output)."""
    return cli_on(ctx, backups_cmd)


def test_cli_protect_note_show_delete(ctx: Context, tmp_path: Path, run_cli: Any) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    code, out = run_cli("backups", "protect", str(bid), "--json")
    assert code == 0, out
    assert json.loads(out)["increment"] == 1 and json.loads(out)["protected"] is True
    code, out = run_cli("backups", "note", str(bid), "--increment", "0", "base of the upgrade")
    assert code == 0 and f"increment 0 of backup {bid} note set" in out, out
    code, out = run_cli("backups", "show", str(bid))
    assert code == 0, out
    assert "P (" in out and "base of the upgrade" in out and "P: protected" in out
    code, out = run_cli("backups", "list", "--json")
    incs = json.loads(out)[0]["increments"]
    assert [(i["protected"], i["note"]) for i in incs] == [
        (False, "base of the upgrade"), (True, None)
    ]  # fmt: skip
    code, out = run_cli("backups", "delete", str(bid))
    assert code == 25 and f"unprotect {bid} --increment 1" in out, out
    code, out = run_cli("backups", "note", str(bid), "y" * 1025)
    assert code == 9 and "use at most 1024" in out, out
    code, out = run_cli("backups", "unprotect", str(bid), "--increment", "5")
    assert code != 0 and "has no increment 5" in out, out
    code, out = run_cli("backups", "delete", str(bid), "--force", "--json")
    assert code == 0, out
    assert listing.list_backups(ctx) == []


def test_routes_by_role(ctx: Context, tmp_path: Path) -> None:
    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    client = TestClient(create_app(ctx.config))
    role = {r: {"Authorization": f"Bearer {tokens.create(ctx, r[0], r)['token']}"}
            for r in ("viewer", "operator", "admin")}  # fmt: skip
    url = f"/v1/backups/{bid}"
    assert client.post(f"{url}/protect", headers=role["viewer"]).status_code == 403
    r = client.post(f"{url}/protect", params={"increment": 0}, headers=role["operator"])
    assert r.status_code == 200, r.text
    assert (r.json()["increment"], r.json()["protected_by"]) == (0, "o")
    assert client.delete(f"{url}/protect", headers=role["operator"]).status_code == 403
    r = client.put(f"{url}/note", json={"increment": 0, "text": "keep"}, headers=role["viewer"])
    assert r.status_code == 403
    r = client.put(f"{url}/note", json={"increment": 0, "text": "keep"}, headers=role["operator"])
    assert r.status_code == 200 and r.json()["note"] == "keep", r.text
    r = client.put(f"{url}/note", json={"text": "z" * 2000}, headers=role["operator"])
    assert r.status_code == 422 and "at most 1024" in r.json()["error"]["message"], r.text
    r = client.post(f"{url}/protect", params={"increment": 9}, headers=role["operator"])
    assert r.status_code == 404, r.text
    r = client.post(f"{url}/protect", params={"increment": -1}, headers=role["operator"])
    assert r.status_code == 422, r.text
    shown = client.get(url, headers=role["viewer"]).json()["increments"][0]
    assert (shown["protected"], shown["note"]) == (True, "keep")
    r = client.delete(url, headers=role["admin"])  # refused before a job is queued
    assert r.status_code == 409 and f"unprotect {bid} --increment 0" in r.text, r.text
    r = client.delete(url, params={"force": True}, headers=role["operator"])
    assert r.status_code == 403, r.text
    r = client.delete(url, params={"force": True}, headers=role["admin"])
    assert r.status_code == 202 and r.json()["job"]["state"] == "QUEUED", r.text
    r = client.delete(f"{url}/protect", params={"increment": 0}, headers=role["admin"])
    assert r.status_code == 200 and r.json()["protected"] is False, r.text


def test_force_needs_an_admin_even_when_delete_is_lowered(ctx: Context, tmp_path: Path) -> None:
    from vmkeep.engine.core.trust import Actor
    from vmkeep.engine.service import params, runners
    from vmkeep.engine.service.actions import Caller, action

    bid = make_chain(ctx, tmp_path, "INCREMENT", 1)
    p = params.DeleteParams(backup=bid, force=True)
    a = action("delete")
    with pytest.raises(Forbidden, match="has role operator; backups delete --force needs admin"):
        runners.check_delete(ctx, a, p, Actor("o", "operator"))
    assert runners.check_delete(ctx, a, p, Actor("root", "admin")) == p
    with pytest.raises(Forbidden, match="backups delete --force needs admin"):  # a queued job
        runners.run_delete(
            ctx, a, p, lambda _d, _t: None, Caller(Actor("o", "operator"), "o", "api")
        )
    assert listing.show_backup(ctx, bid)["id"] == bid  # not deleted


# --- prune, and backup jobs of tasks prune / verify / drill -------------------------------------
def test_prune_dry_run_says_what_prune_then_does(ctx: Context, tmp_path: Path, cli_on: Any) -> None:
    old = make_chain(ctx, tmp_path, "INCREMENT", 2, age=0)
    new = make_chain(ctx, tmp_path, "INCREMENT", 3, age=1)
    run = cli_on(ctx)
    code, out = run("prune", "web", "--dry-run", "--keep-last", "2", "--json")
    assert code == 0, out
    planned = json.loads(out)
    assert planned["dry_run"] is True and planned["rules"] == {"keep_last": 2}
    rows = [(p["backup"], p["increment"], p["keep"]) for p in planned["datastores"][0]["points"]]
    assert rows == [(new, 2, True), (new, 1, True), (new, 0, False), (old, 1, False),
                    (old, 0, False)]  # fmt: skip
    assert [b["id"] for b in listing.list_backups(ctx)] == [old, new]  # nothing done yet
    code, out = run("prune", "web", "--keep-last", "2")
    assert code == 0, out
    assert "remove backup" in out and "keep_last 1/2" in out and f"deleted backup {old}" in out
    kept = {(b["id"], i["id"]) for b in listing.list_backups(ctx) for i in b["increments"]}
    assert kept == {(b, q) for b, q, keep in rows if keep}
    assert all(read_pattern(stored(tmp_path, new, 2), q) for q in range(3))
    code, out = run("prune", "web", "--all")
    assert code != 0 and "name one VM, or give --all" in out
    code, out = run("prune", "--all", "--dry-run")  # the VM's policy: no rule, all kept
    assert code == 0 and "none (every point kept)" in out, out


def test_backup_jobs_of_each_task_queue_their_actions(ctx: Context, tmp_path: Path) -> None:
    from vmkeep.catalog.tables import BackupJob
    from vmkeep.engine.service import backupjobs

    bid = make_chain(ctx, tmp_path, "INCREMENT", 3)
    backupjobs.create(ctx, "p", {"vms": ["web"]}, "ds", "daily", task="prune",
                      options={"keep_daily": 7})  # fmt: skip
    backupjobs.create(ctx, "v", {"vms": ["web"]}, "ds", "daily", task="verify",
                      options={"reverify_after": 7})  # fmt: skip
    backupjobs.create(ctx, "d", {"all": True}, "ds", "daily", task="drill",
                      options={"probe": "true", "timeout": 60})  # fmt: skip

    def selected(name: str) -> Any:
        with ctx.catalog.session() as s:
            bj = s.execute(select(BackupJob).where(BackupJob.name == name)).scalar_one()
            return backupjobs.selection(ctx, s, bj)

    assert selected("p") == ([("prune", {"vm": "web", "datastore": "ds", "keep_daily": 7})], [])
    assert selected("v") == ([("verify", {"backup": bid})], [])
    drill = {"backup": bid, "increment": 2, "probe": "true", "timeout": 60}
    assert selected("d") == ([("drill", drill)], [])
    # once verified, a verify job leaves the VM alone for --reverify-after days
    verify.verify(ctx, bid)
    shown = listing.show_backup(ctx, bid)["increments"]
    assert {(i["verify_result"], i["verified_at"] is not None) for i in shown} == {("OK", True)}
    targets, skipped = selected("v")
    assert (
        targets == []
        and skipped[0]["excluded"]
        and "verified within 7 days" in skipped[0]["reason"]
    )
    # a flipped byte: the verify fails, the points are DAMAGED and FAILED, due again
    img = stored(tmp_path, bid, 1)
    data = bytearray(img.read_bytes())
    data[-1] ^= 0xFF
    img.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="Checksum mismatch for web/"):
        verify.verify(ctx, bid)
    shown = listing.show_backup(ctx, bid)["increments"]
    assert [(i["status"], i["verify_result"]) for i in shown] == [
        ("VALID", "OK"), ("DAMAGED", "FAILED"), ("DAMAGED", "FAILED")
    ]  # fmt: skip
    assert selected("v")[0] == []  # point 0 read OK just now; damaged points restore nothing
    with ctx.catalog.session() as s:  # a week later the VALID point 0 is due again
        for i in s.get(Backup, bid).increments:  # type: ignore[union-attr]
            i.verified_at = datetime.now(UTC) - timedelta(days=8)
    assert selected("v")[0] == [("verify", {"backup": bid})]
    # options a task does not take, and a copy from anything but a backup job, are refused
    with pytest.raises(InvalidValue, match="a verify job takes reverify_after"):
        backupjobs.create(ctx, "x", {"vms": ["web"]}, "ds", "daily", task="verify",
                          options={"probe": "true"})  # fmt: skip
    with pytest.raises(InvalidValue, match="only a backup job copies"):
        backupjobs.create(ctx, "x", {"vms": ["web"]}, "ds", "daily", task="prune",
                          copy_to="ds2")  # fmt: skip
    # a job given another task drops the options the new task does not take
    edited = backupjobs.edit(ctx, "v", {"task": "drill", "options": {"timeout": 30}})
    assert (edited["task"], edited["options"]) == ("drill", {"timeout": 30})


def test_a_merge_keeps_a_disk_that_joined_the_chain(ctx: Context, tmp_path: Path) -> None:
    """vdb joined at point 2 (a full of it alone), point 3 builds on it. Point 2 merged away
    with point 3 rebuilt on point 1, which has no vdb: 3's vdb file becomes a full of its own
    (so marked), its vda file is rebased; both read as before."""
    bid = make_chain(ctx, tmp_path, "INCREMENT", 4)
    work = tmp_path / "vdb"
    work.mkdir()
    rows = {}
    for seq in (2, 3):
        img = work / disk_file(seq, "vdb")
        backing = ["-b", disk_file(2, "vdb"), "-F", "qcow2"] if seq == 3 else []
        qemu_img("create", "-q", "-f", "qcow2", *backing, str(img), *([] if backing else ["4M"]))
        cmd = f"write -P {seq + 11} {seq * 65536} 65536"
        subprocess.run(["qemu-io", "-c", cmd, str(img)], check=True, capture_output=True)
        rows[seq] = {"disk": "vdb", "name": img.name, "size": img.stat().st_size,
                     "digest": digest_file(img)} | ({"full": True} if seq == 2 else {})  # fmt: skip
    with ctx.catalog.session() as s:
        b = s.get(Backup, bid)
        assert b is not None
        for inc in b.increments:
            if inc.seq in rows:
                inc.files = [*inc.files, rows[inc.seq]]
        driver = stores.driver_of(b.datastore)
    driver.backup(f"web/{bid}", [work / disk_file(2, "vdb"), work / disk_file(3, "vdb")])
    protect.protect(ctx, bid, 1, actor_name="a")
    vm_id, ds_id = ids(ctx)
    msgs = apply_retention(ctx, vm_id, ds_id, resolve({"keep_last": 1}))
    assert msgs == [f"retention: removed increments [2] of backup {bid} (keep_last=1); "
                    "3 now built on 1"]  # fmt: skip
    vdb = tmp_path / "store" / "web" / str(bid) / disk_file(3, "vdb")
    info = json.loads(qemu_img("info", "--output=json", str(vdb)))
    assert "backing-filename" not in info  # a full of vdb now
    for seq in (2, 3):
        cmd = f"read -P {seq + 11} {seq * 65536} 65536"
        out = subprocess.run(["qemu-io", "-r", "-c", cmd, str(vdb)], capture_output=True, text=True)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout
    assert all(read_pattern(stored(tmp_path, bid, 3), q) for q in range(4))
    files = listing.show_backup(ctx, bid)["increments"][2]["files"]
    assert [(f["disk"], f.get("full", False)) for f in files] == [("vda", False), ("vdb", True)]
    assert verify.verify(ctx, bid)["ok"] is True


def _group_points(ctx: Context, points: list[tuple[str, int | None, int]]) -> list[int]:
    """Group restore points of group app (its one member: web), one per (status, backup,
    increment) given, oldest first; their ids."""
    from vmkeep.catalog.tables import Group, GroupBackup, GroupBackupMember, GroupMember

    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        g = Group(name="app")
        s.add(g)
        s.flush()
        s.add(GroupMember(group_id=g.id, vm_id=vm.id, position=0))
        ds = stores.find_datastore(s, "ds")
        out = []
        for status, backup, seq in points:
            gb = GroupBackup(group_id=g.id, datastore_id=ds.id, status=status)
            s.add(gb)
            s.flush()
            s.add(GroupBackupMember(group_backup_id=gb.id, vm_id=vm.id, vm_name="web",
                                    position=0, status=status, backup_id=backup,
                                    seq=seq))  # fmt: skip
            out.append(gb.id)
        return out


def test_a_drill_job_of_a_group_drills_its_newest_complete_cut(
    ctx: Context, tmp_path: Path
) -> None:
    from vmkeep.catalog.tables import BackupJob
    from vmkeep.engine.groups import manage
    from vmkeep.engine.service import backupjobs

    bid = make_chain(ctx, tmp_path, "FULL", 1)
    # the newest is FAILED, the one before lost its member's point: neither is drilled
    valid, incomplete, _ = _group_points(ctx, [("VALID", bid, 0), ("VALID", None, 0),
                                              ("FAILED", bid, 0)])  # fmt: skip
    with pytest.raises(InvalidValue, match=r"the points of member.s. web \(removed\) are gone"):
        manage.restore_group(ctx, incomplete, "-copy")
    backupjobs.create(ctx, "gd", {"group": "app"}, "ds", "daily", task="drill",
                      options={"probe": "true", "cross_probe": "web=nc -z 10.0.0.2 5432"})  # fmt: skip
    with pytest.raises(InvalidValue, match="MEMBER=CMD"):
        backupjobs.edit(ctx, "gd", {"options": {"cross_probe": "no-equals-sign"}})
    with ctx.catalog.session() as s:
        bj = s.execute(select(BackupJob).where(BackupJob.name == "gd")).scalar_one()
        assert backupjobs.selection(ctx, s, bj) == ([("group-drill", {
            "group_backup": valid, "probes": {"web": "true"},
            "cross_probe": {"member": "web", "command": "nc -z 10.0.0.2 5432"},
        })], [])  # fmt: skip
        bj.datastore = "ds2"
        targets, skipped = backupjobs.selection(ctx, s, bj)
        assert targets == [] and skipped[0]["reason"] == "no complete VALID group backup on ds2"


def test_retention_that_removes_a_members_point_leaves_its_group_point_incomplete(
    ctx: Context, tmp_path: Path
) -> None:
    from vmkeep.engine.groups import manage

    bid = make_chain(ctx, tmp_path, "INCREMENT", 3)
    gbs = _group_points(ctx, [("VALID", bid, 1), ("VALID", bid, 2)])
    vm_id, ds_id = ids(ctx)
    apply_retention(ctx, vm_id, ds_id, resolve({"keep_last": 1}))
    shown = {b["id"]: b["complete"] for b in manage.list_group_backups(ctx)}
    assert shown == {gbs[0]: False, gbs[1]: True}  # point 1 merged away, point 2 kept


def test_an_interrupted_merge_leaves_the_store_as_the_catalog_says_and_a_rerun_repairs(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a dir datastore (read in place) the merge rewrites copies: stopped before it stores,
    the stored files are untouched; stopped after it stored but before the catalog changed, the
    next run records the already rewritten files (digest, full) and verify passes."""
    from vmkeep.engine.points import merge

    bid = make_chain(ctx, tmp_path, "INCREMENT", 4)
    vm_id, ds_id = ids(ctx)
    cfg = resolve({"keep_last": 2})
    before = {q: digest_file(stored(tmp_path, bid, q)) for q in range(4)}

    def stop(name: str) -> None:
        if name == "retention":
            raise KeyboardInterrupt  # as a kill before the store

    monkeypatch.setattr(merge, "failpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        apply_retention(ctx, vm_id, ds_id, cfg)
    assert {q: digest_file(stored(tmp_path, bid, q)) for q in range(4)} == before
    assert not list((tmp_path / "store").rglob("*.new")) and not list(
        (tmp_path / "store").rglob("*.partial")
    )
    assert verify.verify(ctx, bid)["ok"] is True
    monkeypatch.undo()

    with ctx.catalog.session() as s:  # stored, then killed before the catalog update
        p = retention.plan(ctx, s, vm_id, ds_id, cfg)
        b = s.get(Backup, bid)
        assert b is not None
        files = {i.seq: [dict(f) for f in i.files] for i in b.increments}
    with ctx.catalog.session() as s:
        driver = stores.driver_of(stores.find_datastore(s, "ds"))
    merge._rewrite(ctx, driver, p.chains[0], files, [0, 1, 2, 3])
    assert digest_file(stored(tmp_path, bid, 2)) != before[2]  # 2 is a full now, in the store
    # a verify before the next run takes the stored file by its pending checksum: not DAMAGED
    assert verify.verify(ctx, bid)["ok"] is True
    assert {i["status"] for i in listing.show_backup(ctx, bid)["increments"]} == {"VALID"}
    assert apply_retention(ctx, vm_id, ds_id, cfg) == [
        f"retention: removed increments [0, 1] of backup {bid} (keep_last=2); 2 is the new base"
    ]
    assert verify.verify(ctx, bid)["ok"] is True
    assert all(read_pattern(stored(tmp_path, bid, 3), q) for q in range(4))
    shown = listing.show_backup(ctx, bid)["increments"]
    assert [(i["id"], i["files"][0].get("full", False)) for i in shown] == [(2, True), (3, False)]


@pytest.mark.parametrize("how", ["convert", "files", "copy"])
def test_a_restore_after_a_merge_killed_before_its_catalog_update_takes_the_stored_file(
    ctx: Context, tmp_path: Path, how: str
) -> None:
    """Between the killed merge and the next retention run or verify, a restore of the chain
    reads the rewritten file (its row's pending checksum): the same point's bytes, restored and
    recorded, not a point marked DAMAGED. Both ways restores check files: while converting
    (``convert_verified``) and before use (``verify_files``: instant, export, drill); a copy to
    another datastore too."""
    from vmkeep.checksums import expected_digests
    from vmkeep.engine.points import merge
    from vmkeep.engine.restore.point import convert_verified, verify_files

    bid = make_chain(ctx, tmp_path, "INCREMENT", 4)
    vm_id, ds_id = ids(ctx)
    with ctx.catalog.session() as s:
        p = retention.plan(ctx, s, vm_id, ds_id, resolve({"keep_last": 2}))
        b = s.get(Backup, bid)
        assert b is not None
        files = {i.seq: [dict(f) for f in i.files] for i in b.increments}
        driver = stores.driver_of(stores.find_datastore(s, "ds"))
    merge._rewrite(ctx, driver, p.chains[0], files, [0, 1, 2, 3])  # stored; no catalog update
    expected = expected_digests(f for q in range(4) for f in files[q])
    local = {n: tmp_path / "store" / "web" / str(bid) / n for n in expected}
    new = digest_file(local[disk_file(2, "vda")])
    assert expected[disk_file(2, "vda")] != new  # rewritten: the catalog says otherwise
    if how == "convert":
        dest = tmp_path / "out" / "vda.qcow2"
        dest.parent.mkdir()
        convert_verified(ctx, bid, f"web/{bid}", expected, local, {disk_file(3, "vda"): dest})
        assert all(read_pattern(dest, q) for q in range(4))
    elif how == "files":
        verify_files(ctx, bid, f"web/{bid}", expected, local)
    else:
        copied = copy.copy_backup(ctx, bid, "ds2")
        there = listing.show_backup(ctx, copied["copy"])["increments"]
        assert there[2]["files"][0]["digest"] == new and "pending" not in there[2]["files"][0]
    shown = listing.show_backup(ctx, bid)["increments"]
    assert {i["status"] for i in shown} == {"VALID"}
    row = shown[2]["files"][0]
    assert (row["digest"], row.get("full"), "pending" in row) == (new, True, False), row
    local[disk_file(3, "vda")].write_bytes(b"not the point")
    with pytest.raises(ChecksumMismatch):  # any other bytes are still a damaged point
        verify_files(ctx, bid, f"web/{bid}", expected, local)


@pytest.mark.parametrize("protected", [True, False])
def test_retention_leaves_a_chain_with_no_valid_point_alone(
    ctx: Context, tmp_path: Path, protected: bool
) -> None:
    """Its points are not judged (a dry run lists none of them), so they are not removed: a
    damaged chain, protected or not, is an admin's to delete."""
    damaged = make_chain(ctx, tmp_path, "INCREMENT", 2, age=0)
    good = make_chain(ctx, tmp_path, "INCREMENT", 1, age=1)
    with ctx.catalog.session() as s:
        b = s.get(Backup, damaged)
        assert b is not None
        b.increments[0].protected = protected
        for i in b.increments:
            i.status = "DAMAGED"
    vm_id, ds_id = ids(ctx)
    assert apply_retention(ctx, vm_id, ds_id, resolve({"keep_last": 1})) == []
    assert [b["id"] for b in listing.list_backups(ctx)] == [damaged, good]


def _store_state(tmp: Path, bid: int) -> dict[str, str]:
    return {p.name: digest_file(p) for p in sorted((tmp / "store" / "web" / str(bid)).iterdir())}


def test_a_rebase_works_on_a_copy_and_damage_stops_the_merge(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 rebased onto the protected 1 (2 removed): stopped before the store, the stored files
    are as they were. A stored file that no longer matches its checksum stops the merge before
    anything is rewritten: its point and those built on it are DAMAGED."""
    from vmkeep.engine.points import merge

    bid = make_chain(ctx, tmp_path, "INCREMENT", 4)
    protect.protect(ctx, bid, 1, actor_name="a")
    vm_id, ds_id = ids(ctx)
    cfg = resolve({"keep_last": 1})
    before = _store_state(tmp_path, bid)

    def stop(name: str) -> None:
        if name == "retention":
            raise KeyboardInterrupt

    monkeypatch.setattr(merge, "failpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        apply_retention(ctx, vm_id, ds_id, cfg)
    assert _store_state(tmp_path, bid) == before
    monkeypatch.undo()

    img = stored(tmp_path, bid, 2)
    data = bytearray(img.read_bytes())
    data[-1] ^= 0xFF
    img.write_bytes(bytes(data))
    before = _store_state(tmp_path, bid)
    with pytest.raises(ChecksumMismatch, match=f"web/{bid}/2.vda.qcow2"):
        apply_retention(ctx, vm_id, ds_id, cfg)
    assert _store_state(tmp_path, bid) == before
    shown = listing.show_backup(ctx, bid)["increments"]
    assert [(i["id"], i["status"]) for i in shown] == [
        (0, "VALID"), (1, "VALID"), (2, "DAMAGED"), (3, "DAMAGED")
    ]  # fmt: skip


def test_a_merge_refuses_a_file_that_names_a_backing_file_outside_its_chain(
    ctx: Context, tmp_path: Path
) -> None:
    """A hostile store's image naming a host file as its backing file is never opened by the
    merge (its bytes would be stored back)."""
    bid = make_chain(ctx, tmp_path, "INCREMENT", 3)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"TOPSECRET" * 1000)
    img = stored(tmp_path, bid, 1)
    qemu_img("rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(img))
    with ctx.catalog.session() as s:  # its checksum made to match: only the name is wrong
        b = s.get(Backup, bid)
        assert b is not None
        b.increments[1].files = [dict(b.increments[1].files[0], digest=digest_file(img))]
    vm_id, ds_id = ids(ctx)
    with pytest.raises(VmkeepError, match="not a file of its chain"):
        apply_retention(ctx, vm_id, ds_id, resolve({"keep_last": 1}))
    assert not any(b"TOPSECRET" in p.read_bytes() for p in (tmp_path / "store").rglob("*.qcow2"))


def test_recovery_removes_the_scratch_a_killed_merge_left(ctx: Context, tmp_path: Path) -> None:
    from vmkeep.engine.vm.recovery import _clear_interrupted_flatten

    bid = make_chain(ctx, tmp_path, "INCREMENT", 2)
    other = make_chain(ctx, tmp_path, "INCREMENT", 1)
    staging = tmp_path / "store" / ".vmkeep-staging"
    for b in (bid, other):
        (staging / f"merge-{b}-abc" / "work").mkdir(parents=True)
    with ctx.catalog.session() as s:
        b = s.get(Backup, bid)
        assert b is not None
        b.active_flatten = True
    vm_id, _ = ids(ctx)
    assert _clear_interrupted_flatten(ctx, vm_id) == [
        f"backup {bid}: an interrupted retention merge is left to the next run"
    ]
    assert sorted(p.name for p in staging.iterdir()) == [f"merge-{other}-abc"]  # not its
