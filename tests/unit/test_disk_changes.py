"""Chains that follow the disks (docs/architecture.md): which disks of an increment are copied
whole (they joined the chain) and which since the parent's checkpoint, the backup XML that says
so (tests/unit/test_backup_xml.py), the disks EXCLUDE_DISKS leaves out, what a point records, and which files a restore of a
point reads. tests/e2e/test_disk_changes.py runs the same on a real guest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from vmkeep.api.app import create_app
from vmkeep.catalog.tables import Backup, Increment, Vm
from vmkeep.cli import vm_cmd
from vmkeep.engine.core import stores
from vmkeep.engine.core.backup_config import resolve
from vmkeep.engine.core.chains import backup_dict, point, point_files
from vmkeep.engine.core.context import Context
from vmkeep.engine.protect.member import MemberJob, finish_job
from vmkeep.engine.protect.plan import (
    Plan,
    bitmapless_disk,
    joined_disks,
    plan_backup,
    select_disks,
)
from vmkeep.engine.restore.point import resumable_memory
from vmkeep.engine.service import tokens
from vmkeep.errors import BackupFailed, InvalidValue, WrongState
from vmkeep.model import DiskInfo, DomainInfo, VmState, Warnings


def rows(*disks: str, seq: int = 1, full: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A point's file rows: one per disk (``full``: copied whole), then its domain XML."""
    out: list[dict[str, Any]] = []
    for d in disks:
        row: dict[str, Any] = {"disk": d, "name": f"{seq}.{d}.qcow2", "size": 1, "digest": "x"}
        if d in full:
            row["full"] = True
        out.append(row)
    return [*out, {"disk": None, "name": f"{seq}.domain.xml", "size": 1, "digest": "x"}]


# --- which disks are copied whole ----------------------------------------------------------------
def test_a_disk_the_parent_point_lacks_joins_with_a_full() -> None:
    parent = rows("vda")
    assert joined_disks(parent, ["vda", "vdb"]) == ("vdb",)
    assert joined_disks(parent, ["vda"]) == ()
    # detached (or excluded) since the parent: not in the point, nothing to join
    assert joined_disks(rows("vda", "vdb"), ["vda"]) == ()
    # the parent's XML row names no disk; a disk the parent holds stays incremental
    assert joined_disks(rows("vda", "vdb"), ["vdb", "vdc"]) == ("vdc",)


def test_plan_is_full() -> None:
    base = Plan(1, 0, None, "web/1", None, "vmkeep-1-0", True)
    assert base.is_full("vda") and base.is_full("vdz")  # a new chain copies every disk whole
    inc = Plan(1, 4, 3, "web/1", "vmkeep-1-3", "vmkeep-1-4", False, ("vdb",))
    assert inc.is_full("vdb") and not inc.is_full("vda")


def test_the_disk_libvirt_finds_without_its_bitmap_is_copied_whole() -> None:
    """libvirt 9's refusal when a disk's image lacks the parent checkpoint's bitmap."""
    said = (
        "Checkpoint '(incremental base)' of VM 'web' is missing or inconsistent: checkpoint "
        "inconsistent: missing or broken bitmap 'vmkeep-1-3' for disk 'vdb'"
    )
    inc = Plan(1, 4, 3, "web/1", "vmkeep-1-3", "vmkeep-1-4", False)
    assert bitmapless_disk(said, ["vda", "vdb"], inc) == "vdb"
    assert bitmapless_disk(said, ["vda"], inc) is None  # not a disk of this backup
    joined = Plan(1, 4, 3, "web/1", "vmkeep-1-3", "vmkeep-1-4", False, ("vdb",))
    assert bitmapless_disk(said, ["vda", "vdb"], joined) is None  # copied whole already
    gone = "Checkpoint '(incremental base)' of VM 'web' is missing or inconsistent: no checkpoint"
    assert bitmapless_disk(gone, ["vda", "vdb"], inc) is None  # a new chain


# --- EXCLUDE_DISKS -------------------------------------------------------------------------------
def domain(*targets: str) -> DomainInfo:
    disks = tuple(DiskInfo(t, f"/img/{t}.qcow2", "qcow2") for t in targets)
    return DomainInfo("web", "uuid-web", VmState.ACTIVE, False, True, disks)


def test_select_disks_leaves_the_excluded_out_and_says_which() -> None:
    cfg = resolve({"exclude_disks": ["vdb", "vdz"]})
    disks, excluded = select_disks(domain("vda", "vdb", "vdc"), cfg)
    assert [d.target for d in disks] == ["vda", "vdc"]
    assert excluded == ["vdb"]  # only disks the VM has: vdz is not one
    with pytest.raises(BackupFailed, match=r"every disk is excluded: vda.*--exclude-disk"):
        select_disks(domain("vda"), resolve({"exclude_disks": "vda"}))


def test_exclude_disks_values() -> None:
    assert resolve({"exclude_disks": "vdc, vdb,vdb"}).exclude_disks == ("vdb", "vdc")
    assert resolve({"exclude_disks": ["none"]}).exclude_disks == ()
    assert resolve({"exclude_disks": ""}).exclude_disks == ()
    assert resolve({}).as_dict()["exclude_disks"] == []
    for bad in ("vd b", ["../vda"], 7, ["vdb"] * 65):
        with pytest.raises(InvalidValue, match="exclude_disks"):
            resolve({"exclude_disks": bad})


@pytest.fixture
def ctx(fake_ctx: Context, tmp_path: Path) -> Context:
    stores.add(fake_ctx, "ds", "dir", {"path": str(tmp_path / "store")})
    with fake_ctx.catalog.session() as s:
        s.add(Vm(name="web", uuid="uuid-web", host_uri="fake:///system", state="ACTIVE",
                 lcm_state="RUNNING", backup_config={}))  # fmt: skip
    return fake_ctx


def test_vm_config_exclude_disk_set_shown_and_unset(ctx: Context, cli_on: Any) -> None:
    run = cli_on(ctx, vm_cmd)
    code, out = run("vm", "config", "web", "--exclude-disk", "vdc", "--exclude-disk", "vdb")
    assert code == 0, out
    assert "exclude_disks    vdb, vdc  (vm)" in out
    code, out = run("vm", "show", "web", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["backup_config"]["exclude_disks"] == ["vdb", "vdc"]
    assert shown["backup_config_sources"]["exclude_disks"] == "vm"
    code, out = run("vm", "show", "web")
    assert code == 0 and "exclude_disks    vdb, vdc  (vm)" in out, out
    # the disks given are the whole list: vdb is included again
    code, out = run("vm", "config", "web", "--exclude-disk", "vdc", "--json")
    assert json.loads(out)["backup_config"]["exclude_disks"] == ["vdc"]
    code, out = run("vm", "config", "web", "--exclude-disk", "none", "--json")
    assert json.loads(out)["backup_config"]["exclude_disks"] == []
    assert json.loads(out)["backup_config_sources"]["exclude_disks"] == "vm"
    code, out = run("vm", "config", "web", "--exclude-disk", "unset", "--json")
    assert json.loads(out)["backup_config_sources"]["exclude_disks"] == "default"
    code, out = run("vm", "config", "web", "--exclude-disk", "a/b")
    assert code != 0 and "exclude_disks" in out and "a disk target is" in out


def test_api_takes_exclude_disks(ctx: Context) -> None:
    client = TestClient(create_app(ctx.config))
    admin = {"Authorization": f"Bearer {tokens.create(ctx, 'a', 'admin')['token']}"}
    r = client.patch("/v1/vms/web/config", json={"exclude_disks": ["vdb"]}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["backup_config"]["exclude_disks"] == ["vdb"]
    r = client.patch("/v1/vms/web/config", json={"exclude_disks": "vdb,vdc"}, headers=admin)
    assert r.json()["backup_config"]["exclude_disks"] == ["vdb", "vdc"]
    r = client.patch("/v1/vms/web/config", json={"exclude_disks": ["no/way"]}, headers=admin)
    assert r.status_code == 422 and "exclude_disks" in r.text
    r = client.patch("/v1/vms/web/config", json={"exclude_disks": "unset"}, headers=admin)
    assert r.status_code == 200 and r.json()["backup_config"]["exclude_disks"] == []
    assert r.json()["backup_config_sources"]["exclude_disks"] == "default"


# --- what an increment plans and records ---------------------------------------------------------
def chain_with_base(ctx: Context, disks: tuple[str, ...]) -> tuple[int, int, int]:
    """A VALID chain of one point holding ``disks``, its checkpoint on the fake domain."""
    ctx.hv.define(  # type: ignore[attr-defined]
        "<domain type='qemu'><name>web</name><uuid>uuid-web</uuid><devices/></domain>"
    )
    ctx.hv.record("web").checkpoints.append("vmkeep-1-0")  # type: ignore[attr-defined]
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.name == "web")).scalar_one()
        ds = stores.find_datastore(s, "ds")
        b = Backup(vm_id=vm.id, datastore_id=ds.id, chain="web/1", mode="INCREMENT",
                   status="VALID")  # fmt: skip
        s.add(b)
        s.flush()
        s.add(Increment(backup_id=b.id, seq=0, parent=None, status="VALID",
                        checkpoint="vmkeep-1-0", files=rows(*disks, seq=0)))  # fmt: skip
        s.flush()
        return vm.id, ds.id, b.id


def test_an_attached_disk_joins_the_chain_and_its_file_is_recorded_as_a_full(
    ctx: Context, tmp_path: Path
) -> None:
    vm_id, ds_id, bid = chain_with_base(ctx, ("vda",))
    cfg = resolve({"mode": "increment", "exclude_disks": "vdc"})
    disks, excluded = select_disks(domain("vda", "vdb", "vdc"), cfg)
    warnings = Warnings()
    plan = plan_backup(ctx, vm_id, ds_id, cfg, disks, False, warnings)
    assert (plan.backup_id, plan.seq, plan.parent) == (bid, 1, 0)  # the same chain, no new full
    assert plan.incremental_from == "vmkeep-1-0" and plan.full_disks == ("vdb",)
    assert not warnings.items
    staging = tmp_path / "staging"
    staging.mkdir()
    for d in ("vda", "vdb"):
        (staging / f"1.{d}.qcow2").write_bytes(d.encode() * 100)
    with ctx.catalog.session() as s:
        driver = stores.driver_of(stores.find_datastore(s, "ds"))
    job = MemberJob(vm_id, "web", ds_id, cfg, disks, False, driver, plan=plan, staging=staging,
                    domain_xml="<domain/>", capacity={"vda": 1 << 20, "vdb": 2 << 20},
                    excluded=excluded)  # fmt: skip
    finish_job(ctx, job)
    with ctx.catalog.session() as s:
        shown = backup_dict(s.get(Backup, bid))
    files = {f["name"]: f for f in shown["increments"][1]["files"]}
    assert files["1.vdb.qcow2"]["full"] is True and files["1.vdb.qcow2"]["virtual_size"] == 2 << 20
    assert "full" not in files["1.vda.qcow2"]  # copied since the parent's checkpoint
    assert files["1.domain.xml"]["excluded_disks"] == ["vdc"]
    assert shown["increments"][1]["excluded_disks"] == ["vdc"]  # on the point's row too
    assert (tmp_path / "store" / "web/1" / "1.vdb.qcow2").read_bytes() == b"vdb" * 100


def test_a_detached_disk_is_left_out_of_the_next_increment(ctx: Context) -> None:
    vm_id, ds_id, _bid = chain_with_base(ctx, ("vda", "vdb"))
    cfg = resolve({"mode": "increment"})
    disks, excluded = select_disks(domain("vda"), cfg)
    plan = plan_backup(ctx, vm_id, ds_id, cfg, disks, False, Warnings())
    assert (plan.seq, plan.parent, plan.full_disks, excluded) == (1, 0, (), [])


# --- which files a restore reads -----------------------------------------------------------------
def test_point_files_follow_each_disk_back_to_where_it_joined() -> None:
    """vdb at 0, detached at 1, attached again at 2 (a full), incremental at 3; vdc joins at 3."""
    b = Backup(id=1)
    points = [
        Increment(backup_id=1, seq=0, parent=None, status="VALID", files=rows("vda", "vdb", seq=0)),
        Increment(backup_id=1, seq=1, parent=0, status="VALID", files=rows("vda", seq=1)),
        Increment(backup_id=1, seq=2, parent=1, status="VALID", files=rows("vda", "vdb", seq=2, full=("vdb",))),
        Increment(backup_id=1, seq=3, parent=2, status="VALID",
                  files=rows("vda", "vdb", "vdc", seq=3, full=("vdc",))),
    ]  # fmt: skip
    b.increments = points

    def names(seq: int, disks: list[str]) -> list[str]:
        _target, chain = point(b, seq)
        return [f["name"] for f in point_files(chain, disks)]

    assert names(3, ["vda", "vdb", "vdc"]) == [
        "3.vda.qcow2", "2.vda.qcow2", "1.vda.qcow2", "0.vda.qcow2",
        "3.vdb.qcow2", "2.vdb.qcow2",  # not 0.vdb: vdb's chain starts again at 2
        "3.vdc.qcow2",
    ]  # fmt: skip
    assert names(1, ["vda"]) == ["1.vda.qcow2", "0.vda.qcow2"]
    assert names(0, ["vda", "vdb"]) == ["0.vda.qcow2", "0.vdb.qcow2"]
    # a point built on one without the disk, the disk not marked full: a broken chain
    points[2].files = rows("vda", "vdb", seq=2)
    with pytest.raises(WrongState, match="backup 1 is missing disk vdb in increment 1"):
        names(3, ["vdb"])


def test_a_point_that_left_disks_out_is_not_resumed_from_its_memory() -> None:
    mem = {"disk": None, "name": "2.memory", "size": 1, "digest": "x", "memory": True}
    files = rows("vda", seq=2)
    whole = Increment(backup_id=1, seq=2, parent=1, status="VALID", files=[*files, mem])
    assert resumable_memory(whole, Warnings()) == mem
    files[-1]["excluded_disks"] = ["vdb"]
    warnings = Warnings()
    left_out = Increment(backup_id=1, seq=2, parent=1, status="VALID", files=[*files, mem])
    assert resumable_memory(left_out, warnings) is None
    assert "left out disk(s) vdb" in warnings.items[0] and "powered off" in warnings.items[0]
