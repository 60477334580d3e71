"""Backup and restore on real lab VMs: the done-criteria of the backup engine.

Data is written in the guest (guest-exec) and read back from restored disks, either by booting the
restored VM or with debugfs on the restored image (which also must pass e2fsck).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.protect.backup import run_backup
from vmkeep.errors import LabError
from vmkeep.hypervisor import Hypervisor
from vmkeep.hypervisor.native import LibvirtHypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image

from .conftest import PREFIX


@pytest.fixture
def ds(vmkeep, qemu_reachable_data_dir: Path) -> Iterator[Path]:
    """A dir datastore QEMU can reach: backups are staged in it (``.vmkeep-staging``), so
    storing is a rename (the other modules' datastores, under /tmp/pytest-*, stage in the data
    dir)."""
    path = qemu_reachable_data_dir.with_name(qemu_reachable_data_dir.name + "-ds")
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_vm(lab: Lab, request: pytest.FixtureRequest) -> str:
    """A new running lab VM per test (its own disk, checkpoints and chain)."""
    name = f"{PREFIX}{request.node.name[5:30].replace('_', '-')}"
    lab.create(name, [256 << 20])
    yield name
    lab.remove(name)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def restored_sha(vmkeep, tmp_path: Path, backup: int, inc: int, guest_path: str) -> str:
    out = tmp_path / f"r-{backup}-{inc}.qcow2"
    vmkeep("restore", str(backup), "--increment", str(inc), "--disk", "vda", "--path", str(out))
    try:
        return sha(read_file_from_image(out, guest_path.removeprefix("/mnt/vda"), tmp_path))
    finally:
        out.unlink()  # restore never overwrites a file without --force


def test_full_and_three_increments_each_restore_point_is_bit_identical(
    vmkeep, lab: Lab, fresh_vm: str, ds: Path, tmp_path: Path
) -> None:
    vmkeep("vm", "import", fresh_vm)
    vmkeep("vm", "config", fresh_vm, "--mode", "increment", "--fs-freeze", "agent")
    expected: list[dict[str, str]] = []
    state: dict[str, str] = {}
    for point in range(4):
        state[f"/mnt/vda/f{point}"] = lab.write_random(fresh_vm, f"/mnt/vda/f{point}", 3)
        # rewrite an older file too, so increments also carry overwritten blocks
        if point:
            state["/mnt/vda/f0"] = lab.write_random(fresh_vm, "/mnt/vda/f0", 3)
        res = vmkeep("backup", fresh_vm, "--datastore", "ds", "--json").json()
        assert res["increment"] == point and res["status"] == "VALID"
        inc = res["increments"][point]
        assert inc["parent"] == (None if point == 0 else point - 1)
        assert inc["consistency"] == "AGENT_FROZEN"
        expected.append(dict(state))
    backup_id = res["id"]
    # staged in the datastore (storing was a rename), nothing in the data dir's staging area
    assert (ds / ".vmkeep-staging").is_dir() and not any((ds / ".vmkeep-staging").iterdir())
    assert not (Path(os.environ["VMKEEP_DATA_DIR"]) / "staging").exists()
    shown = vmkeep("backups", "show", str(backup_id), "--json").json()
    assert [i["id"] for i in shown["increments"]] == [0, 1, 2, 3]
    assert all(
        f["digest"].startswith("blake3:") and len(f["digest"]) == 71
        for i in shown["increments"]
        for f in i["files"]
    )
    for point, files in enumerate(expected):
        for path, digest in files.items():
            assert restored_sha(vmkeep, tmp_path, backup_id, point, path) == digest, (point, path)
        # a file written after this point must not be there
        later = f"/mnt/vda/f{point + 1}"
        if point < 3:
            with pytest.raises(LabError, match="does not exist"):
                restored_sha(vmkeep, tmp_path, backup_id, point, later)
    # the newest point as a whole new VM, booted: the guest itself reports the checksums
    name = f"{fresh_vm}-r"
    r = vmkeep("restore", str(backup_id), "--name", name, "--start", "--no-ip", "--json").json()
    try:
        assert r["increment"] == 3 and r["vm"] == name
        deadline = time.monotonic() + 120
        while not lab.hv.guest_ping(name, 2):
            assert time.monotonic() < deadline, "restored VM did not come up"
            time.sleep(0.5)
        for path, digest in expected[3].items():
            assert lab.sha256(name, path) == digest
        assert lab.hv.domain(name).uuid != lab.hv.domain(fresh_vm).uuid

        def mac(vm: str) -> str:
            return re.findall(r"<mac address='([^']+)'", lab.hv.domain_xml(vm, inactive=True))[0]

        assert mac(name) != mac(fresh_vm)  # NO_IP dropped the original MAC
    finally:
        lab.hv.destroy(name)
        lab.hv.undefine(name)
    vmkeep("backups", "verify", str(backup_id))


def test_increment_after_one_percent_change_stores_about_that_much(
    vmkeep, lab: Lab, ds: Path
) -> None:
    name = f"{PREFIX}onepct"
    lab.create(name, [1 << 30])
    try:
        vmkeep("vm", "import", name)
        vmkeep("vm", "config", name, "--mode", "increment")
        lab.write_random(name, "/mnt/vda/base", 64)
        full = vmkeep("backup", name, "-d", "ds", "--json").json()["increments"][0]["size"]
        changed = 10  # MiB: ~1 % of the 1 GiB disk
        lab.write_random(name, "/mnt/vda/base", changed, seek_mib=20)
        inc = vmkeep("backup", name, "-d", "ds", "--json").json()["increments"][1]["size"]
        mib = 1 << 20
        assert full >= 64 * mib
        assert changed * mib <= inc <= changed * mib * 1.3 + 4 * mib, (inc, full)
    finally:
        lab.remove(name)


class RecordingHypervisor(LibvirtHypervisor):
    """The real libvirt driver, asking the guest agent for its freeze state at backupBegin."""

    freeze_state_at_begin: str | None = None

    def backup_begin(
        self, name: str, backup_xml: str, checkpoint_xml: str | None, *, reuse: bool = False
    ) -> None:
        self.freeze_state_at_begin = self.fs_freeze_status(name, 10)
        super().backup_begin(name, backup_xml, checkpoint_xml, reuse=reuse)


def test_agent_freeze_is_held_during_backup_begin_only(vmkeep, fresh_vm: str, ds: Path) -> None:
    vmkeep("vm", "import", fresh_vm)
    vmkeep("vm", "config", fresh_vm, "--fs-freeze", "agent")
    hv = RecordingHypervisor("qemu:///system")
    ctx = Context(load_config(), _hv=hv)
    out = run_backup(ctx, fresh_vm, "ds")
    assert hv.freeze_state_at_begin == "frozen"
    assert hv.fs_freeze_status(fresh_vm, 10) == "thawed"
    inc = out.result["increments"][0]
    assert inc["consistency"] == "AGENT_FROZEN" and inc["freeze_ms"] > 0
    assert not out.warnings


def test_no_agent_gives_crash_consistency_warning_and_exit_1(
    vmkeep, noagent_vm: str, ds: Path, hv: Hypervisor
) -> None:
    vmkeep("vm", "import", noagent_vm)
    vmkeep("vm", "config", noagent_vm, "--fs-freeze", "agent")
    res = vmkeep("backup", noagent_vm, "-d", "ds", "--json", check=1)
    assert res.json()["increments"][-1]["consistency"] == "CRASH"
    assert "warning" in res.err and "crash-consistent" in res.err
    info = hv.domain(noagent_vm)
    assert info.state == "ACTIVE" and not info.paused


def test_suspend_mode_resumes_the_vm(vmkeep, fresh_vm: str, ds: Path, hv: Hypervisor) -> None:
    vmkeep("vm", "import", fresh_vm)
    vmkeep("vm", "config", fresh_vm, "--fs-freeze", "suspend")
    res = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()
    assert res["increments"][0]["consistency"] == "SUSPENDED"
    assert not hv.domain(fresh_vm).paused


def test_cancel_mid_backup_leaves_no_partial_file_and_next_backup_works(
    vmkeep, lab: Lab, ds: Path, tmp_path: Path, qemu_reachable_data_dir: Path
) -> None:
    pop = tmp_path / "pop"
    pop.mkdir()
    block = os.urandom(1 << 20)
    with open(pop / "big", "wb") as f:
        for i in range(1536):
            f.write(block[i % 97 :] + block[: i % 97])
    name = f"{PREFIX}cancel"
    lab.create(name, [2 << 30], populate=pop)
    try:
        vmkeep("vm", "import", name)
        vmkeep("vm", "config", name, "--mode", "increment")
        vmkeep("backup", name, "-d", "ds")  # chain 1, increment 0
        lab.write_random(name, "/mnt/vda/small", 1)
        # a --reset full of 1.5 GiB, cancelled while the libvirt job runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmkeep.cli.main", "backup", name, "-d", "ds", "--reset"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not lab.hv.job_progress(name)[0]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        res = vmkeep("backup", "cancel", name, "--json").json()
        assert res["cancelled"] is True
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        rows = vmkeep("backups", "list", "--vm", name, "--json").json()
        assert [r["status"] for r in rows] == ["VALID", "CANCELLED"]
        cancelled = rows[1]
        assert not (ds / cancelled["chain"]).exists(), "partial files left in the datastore"
        for staging in (qemu_reachable_data_dir / "staging", ds / ".vmkeep-staging"):
            assert not any(staging.glob("*")), f"{staging} not cleaned"
        assert not lab.hv.job_progress(name)[0]
        # the first chain is still usable: the next backup is its increment 1
        nxt = vmkeep("backup", name, "-d", "ds", "--json").json()
        assert nxt["id"] == rows[0]["id"] and nxt["increment"] == 1
        assert restored_sha(vmkeep, tmp_path, nxt["id"], 1, "/mnt/vda/small") == lab.sha256(
            name, "/mnt/vda/small"
        )
    finally:
        lab.remove(name)


@pytest.mark.parametrize("mode", ["full", "increment"])
def test_keep_last_2_leaves_exactly_two_restorable_points(
    vmkeep, lab: Lab, fresh_vm: str, ds: Path, tmp_path: Path, mode: str
) -> None:
    vmkeep("vm", "import", fresh_vm)
    vmkeep("vm", "config", fresh_vm, "--mode", mode, "--keep-last", "2")
    digests = []
    for i in range(4):
        digests.append(lab.write_random(fresh_vm, "/mnt/vda/data", 2 + i))
        vmkeep("backup", fresh_vm, "-d", "ds")
    rows = vmkeep("backups", "list", "--vm", fresh_vm, "--json").json()
    points = [(r["id"], i["id"]) for r in rows for i in r["increments"] if i["status"] == "VALID"]
    assert len(points) == 2, points
    if mode == "increment":
        assert len(rows) == 1 and [p[1] for p in points] == [2, 3]
        assert rows[0]["increments"][0]["parent"] is None  # 2 is the flattened base
    else:
        assert len(rows) == 2
    for (bid, inc), digest in zip(points, digests[2:], strict=True):
        assert restored_sha(vmkeep, tmp_path, bid, inc, "/mnt/vda/data") == digest
    on_disk = sorted(p.name for p in ds.rglob("*.qcow2"))
    assert len(on_disk) == 2, on_disk
    for r in rows:
        vmkeep("backups", "verify", str(r["id"]))


def test_deleted_checkpoint_falls_back_to_full_with_warning(
    vmkeep, lab: Lab, fresh_vm: str, ds: Path
) -> None:
    vmkeep("vm", "import", fresh_vm)
    vmkeep("vm", "config", fresh_vm, "--mode", "increment")
    first = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()
    checkpoint = first["increments"][0]["checkpoint"]
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "checkpoint-delete", fresh_vm, checkpoint],
        check=True,
        capture_output=True,
    )
    res = vmkeep("backup", fresh_vm, "-d", "ds", "--json", check=1)
    data = res.json()
    assert data["id"] != first["id"] and data["increment"] == 0
    assert "missing" in res.err and "new full backup chain" in res.err
    # and the new chain takes increments again
    again = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()
    assert again["id"] == data["id"] and again["increment"] == 1


def test_powered_off_vm_backup_and_incremental_across_power_cycle(
    vmkeep, lab: Lab, fresh_vm: str, ds: Path, tmp_path: Path, hv: Hypervisor
) -> None:
    vmkeep("vm", "import", fresh_vm)
    vmkeep("vm", "config", fresh_vm, "--mode", "increment")
    a = lab.write_random(fresh_vm, "/mnt/vda/a", 2)
    vmkeep("backup", fresh_vm, "-d", "ds")  # running: full
    b = lab.write_random(fresh_vm, "/mnt/vda/b", 2)
    hv.destroy(fresh_vm)
    res = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()  # off: increment 1
    assert res["increment"] == 1 and res["increments"][1]["consistency"] == "OFFLINE"
    assert hv.domain(fresh_vm).state == "POWEROFF"  # left as found
    assert vmkeep("vm", "show", fresh_vm, "--json").json()["lcm_state"] == "POWEROFF"
    lab.start(fresh_vm)
    c = lab.write_random(fresh_vm, "/mnt/vda/c", 2)
    res = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()  # running again: increment 2
    assert res["increment"] == 2
    bid = res["id"]
    assert restored_sha(vmkeep, tmp_path, bid, 1, "/mnt/vda/b") == b
    assert restored_sha(vmkeep, tmp_path, bid, 2, "/mnt/vda/c") == c
    assert restored_sha(vmkeep, tmp_path, bid, 2, "/mnt/vda/a") == a


def test_bad_input_errors(vmkeep, fresh_vm: str, ds: Path) -> None:
    vmkeep("vm", "import", fresh_vm)
    r = vmkeep("vm", "config", fresh_vm, "--fs-freeze", "qemu", check=9)
    assert "fs_freeze" in r.err and "none, agent or suspend" in r.err
    r = vmkeep("backup", fresh_vm, "-d", "nope", check=6)
    assert "nope" in r.err and "datastore list" in r.err
    r = vmkeep("restore", "999", check=6)
    assert "999" in r.err
    res = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()
    r = vmkeep("restore", str(res["id"]), "--increment", "5", check=6)
    assert "has no increment 5" in r.err and "0" in r.err


def test_tampered_backup_file_is_named_on_restore(vmkeep, fresh_vm: str, ds: Path) -> None:
    vmkeep("vm", "import", fresh_vm)
    res = vmkeep("backup", fresh_vm, "-d", "ds", "--json").json()
    f = ds / res["chain"] / "0.vda.qcow2"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        fh.write(b"\xff" * 16)
    r = vmkeep("backups", "verify", str(res["id"]), check=17)
    assert "0.vda.qcow2" in r.err
    r = vmkeep("restore", str(res["id"]), "--disk", "vda", check=17)
    assert "0.vda.qcow2" in r.err
