"""Restore drills on a real lab VM: a good point boots isolated and PASSes (checksums, fsck, agent,
probe); a point whose file system was damaged in the guest FAILs naming fsck; the drill VM, its
overlays and exports are gone afterwards, and the result is recorded on the point."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.errors import DomainNotFound
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab

from .conftest import PREFIX

VM = f"{PREFIX}drill"


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [256 << 20])
    yield VM
    lab.remove(VM)


def inode_table_block(image: Path, tmp: Path) -> tuple[int, int]:
    """Group 0's first inode-table block (it holds the root directory's inode), and the block
    size (1 KiB on a file system this small)."""
    raw = tmp / "probe.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    out = subprocess.run(["dumpe2fs", str(raw)], capture_output=True, text=True).stdout
    raw.unlink()
    m = re.search(r"Inode table at (\d+)-", out)
    size = re.search(r"Block size:\s+(\d+)", out)
    assert m and size, out[-2000:]
    return int(m.group(1)), int(size.group(1))


def assert_no_leftovers(hv: Hypervisor, data: Path, name: str) -> None:
    with pytest.raises(DomainNotFound):
        hv.domain(name)
    drills = data / "drills"
    assert not drills.exists() or not any(drills.iterdir())
    assert (
        str(drills) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    )
    assert str(drills) not in Path("/proc/mounts").read_text()


def test_drill_passes_on_a_good_point_and_fails_on_a_damaged_file_system(
    vmkeep, lab: Lab, hv: Hypervisor, vm: str, tmp_path: Path, qemu_reachable_data_dir: Path
) -> None:
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment", "--fs-freeze", "agent")
    # QEMU reads the backup files through the drill's overlays: a folder it can reach
    ds = qemu_reachable_data_dir / "ds"
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(ds))
    a = lab.write_random(vm, "/mnt/vda/a", 2)
    bid = vmkeep("backup", vm, "-d", "ds", "--json").json()["id"]

    probe = f"sha256sum /mnt/vda/a | grep -q {a}"
    good = vmkeep("drill", str(bid), "--probe", probe, "--json").json()
    assert good["result"] == "PASS" and good["reason"] is None, good
    steps = {c["step"]: c for c in good["checks"]}
    assert set(steps) == {"checksums", "fsck vda", "boot", "probe"}, steps
    assert all(c["ok"] for c in steps.values())
    assert "e2fsck -fn: clean" in steps["fsck vda"]["detail"]
    assert_no_leftovers(hv, qemu_reachable_data_dir, f"{vm}-drill-{bid}-0")

    # damage the file system in the guest: the root directory's inode zeroed on the device
    disk = Path(next(d.path for d in hv.domain(vm).disks if d.target == "vda"))
    block, bs = inode_table_block(disk, tmp_path)
    lab.sh(vm, f"umount /mnt/vda && dd if=/dev/zero of=/dev/vda bs={bs} seek={block} count=1 "
               "conv=notrunc 2>/dev/null && sync")  # fmt: skip
    second = vmkeep("backup", vm, "-d", "ds", "--json").json()
    assert second["increment"] == 1
    bad = vmkeep("drill", str(bid), "--json", check=26)
    res = bad.json()
    assert res["result"] == "FAIL" and res["reason"].startswith("fsck vda: ext4: e2fsck -fn exited")
    assert [c["step"] for c in res["checks"]] == ["checksums", "fsck vda"]  # it never booted
    assert "FAILED at fsck vda" in bad.err
    assert_no_leftovers(hv, qemu_reachable_data_dir, f"{vm}-drill-{bid}-1")

    shown = vmkeep("backups", "show", str(bid), "--json").json()
    drills = [i["last_drill"] for i in shown["increments"]]
    assert [d["result"] for d in drills] == ["PASS", "FAIL"]
    assert "e2fsck" in drills[1]["reason"]
    jobs = vmkeep("jobs", "list", "--json").json()
    assert sorted(j["state"] for j in jobs if j["kind"] == "drill") == ["DONE", "FAILED"]
