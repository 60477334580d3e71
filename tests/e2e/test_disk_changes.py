"""Chains that follow the disks (docs/architecture.md) on a real guest: between the increments of
one chain a disk is attached, replaced under its target, excluded, included again, grown,
detached, and attached to the powered-off VM, and every point restores bit-identical, with
exactly the disks it holds.

The lab guest's data disks hold no file system here (vda is unmounted): the test writes random
data to the block devices with O_DIRECT, so nothing else writes them, and a whole device's
sha256 in the guest at a point must equal the sha256 of the raw image restored from it. Disks
are hot-plugged: the lab guests boot with ACPI, and PCI hotplug in and out works on them. The
guest names a disk by its probe order, not by libvirt's target, so the test finds a target's
device by its PCI slot.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vmkeep.lab import Lab

from .conftest import PREFIX

MIB = 1 << 20
State = dict[str, tuple[int, str]]  # disk target -> (size in bytes, sha256 of its content)


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Any:
    """A running lab VM whose one data disk (32 MiB) is unmounted: raw data only."""
    name = lab.create(f"{PREFIX}disks", [32 * MIB])
    lab.sh(name, "umount /mnt/vda")
    yield name
    lab.remove(name)


def guest_device(lab: Lab, vm: str, target: str) -> str:
    """The guest's /dev name of libvirt's disk ``target``, by the disk's PCI slot."""
    root = ET.fromstring(lab.hv.domain_xml(vm))
    disk = next(d for d in root.iter("disk") if d.find("target").get("dev") == target)  # type: ignore[union-attr]
    addr = disk.find("address")
    assert addr is not None, f"no PCI address for {target}"
    pci = f"0000:00:{int(addr.get('slot', '0'), 16):02x}.{int(addr.get('function', '0'), 16)}"
    deadline = time.monotonic() + 30
    while True:
        out = lab.sh(vm, "for d in /sys/block/vd*; do echo ${d##*/} $(readlink -f $d); done")
        found = [line.split()[0] for line in out.splitlines() if f"/{pci}/" in line]
        if found:
            return f"/dev/{found[0]}"
        assert time.monotonic() < deadline, f"the guest shows no disk at {pci}:\n{out}"
        time.sleep(0.5)


def write(lab: Lab, vm: str, target: str, mib: int, seek_mib: int) -> None:
    dev = guest_device(lab, vm, target)
    lab.sh(vm, f"[ -b {dev} ] && dd if=/dev/urandom of={dev} bs=1M count={mib} seek={seek_mib} "
               "oflag=direct conv=notrunc,fsync 2>/dev/null")  # fmt: skip


def guest_state(lab: Lab, vm: str, targets: list[str]) -> State:
    out: State = {}
    for t in targets:
        dev = guest_device(lab, vm, t)
        sectors, digest = lab.sh(vm, f"cat /sys/block/{dev[5:]}/size; sha256sum {dev}").split()[:2]
        out[t] = (int(sectors) * 512, digest)
    return out


def image_state(disks: dict[str, str], work: Path) -> State:
    out: State = {}
    for t, path in disks.items():
        raw = work / f"{t}.raw"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", path, str(raw)], check=True)
        out[t] = (raw.stat().st_size, hashlib.sha256(raw.read_bytes()).hexdigest())
        raw.unlink()
    return out


def unplugged(lab: Lab, vm: str, target: str) -> None:
    """Wait until the guest gave the disk back (libvirt may return before it did)."""
    deadline = time.monotonic() + 30
    while target in {d.target for d in lab.hv.domain(vm).disks}:
        assert time.monotonic() < deadline, f"{target} was not unplugged"
        time.sleep(0.5)


def allow_disk_resize() -> None:
    """The lab VM is imported: [vmm] imported_vms_actions must list disk-resize."""
    actions = ["poweroff", "reboot", "suspend", "resume", "stop", "hold", "release",
               "disk-attach", "disk-detach", "disk-resize", "recover"]  # fmt: skip
    listed = ", ".join(f'"{a}"' for a in actions)
    with open(os.environ["VMKEEP_CONFIG"], "a") as f:
        f.write(f"[vmm]\nimported_vms_actions = [{listed}]\n")


def test_disks_attached_excluded_grown_and_detached_between_increments(
    vmkeep: Any, lab: Lab, guest: str, tmp_path: Path
) -> None:
    vm = guest
    allow_disk_resize()
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(tmp_path / "store"))
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment")
    expected: list[State] = []
    points: list[dict[str, Any]] = []

    def backup(disks: list[str], warned: str = "") -> dict[str, dict[str, Any]]:
        """Back up; the point must extend the chain (no new full), hold exactly ``disks``, and
        its files are returned by disk. ``warned``: the warning it must give (exit 1)."""
        expected.append(guest_state(lab, vm, disks))
        res = vmkeep("backup", vm, "--datastore", "ds", "--json", check=1 if warned else 0)
        assert "new full backup chain" not in res.err, res.err
        assert warned in res.err
        data = res.json()
        seq = len(points)
        assert (data["increment"], data["status"]) == (seq, "VALID")
        if points:
            assert data["id"] == points[0]["id"], "the chain restarted"
        point = data["increments"][seq]
        assert point["parent"] == (seq - 1 if seq else None)
        points.append(data)
        files = {f["disk"]: f for f in point["files"] if f["disk"]}
        assert sorted(files) == sorted(disks), point["files"]
        return files

    # 0: the chain's full, vda alone
    write(lab, vm, "vda", 2, 0)
    files = backup(["vda"])
    assert files["vda"]["full"] is True

    # 1: vdb hot-plugged: it joins the chain with a full of its own, vda stays incremental
    vmkeep("vm", "disk", "attach", vm, "--size", "8M", "--target", "vdb")
    write(lab, vm, "vdb", 3, 1)
    write(lab, vm, "vda", 1, 4)
    files = backup(["vda", "vdb"])
    assert files["vdb"]["full"] is True and "full" not in files["vda"]
    assert files["vda"]["size"] < 2 * MIB  # the 1 MiB written since point 0, not the disk

    # 2: both incremental
    write(lab, vm, "vdb", 1, 6)
    write(lab, vm, "vda", 1, 8)
    files = backup(["vda", "vdb"])
    assert "full" not in files["vda"] and "full" not in files["vdb"]
    assert files["vdb"]["size"] < 2 * MIB

    # 3: vdb's image replaced under the same target: libvirt finds no bitmap of point 2's
    # checkpoint on it, so vdb alone is copied whole (a warning), vda stays incremental
    vmkeep("vm", "disk", "detach", vm, "--target", "vdb")
    unplugged(lab, vm, "vdb")
    other = lab.vm_dir(vm) / "other-vdb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "8M"], check=True)
    vmkeep("vm", "disk", "attach", vm, "--source", str(other), "--target", "vdb")
    write(lab, vm, "vdb", 2, 3)
    files = backup(["vda", "vdb"], warned="disk vdb is copied whole in this increment")
    assert files["vdb"]["full"] is True and "full" not in files["vda"]

    # 4: vdb excluded: left out of the point, and the record says so
    shown = vmkeep("vm", "config", vm, "--exclude-disk", "vdb", "--json").json()
    assert shown["backup_config"]["exclude_disks"] == ["vdb"]
    assert re.search(r"exclude_disks\s+vdb\s+\(vm\)", vmkeep("vm", "show", vm).out)
    write(lab, vm, "vdb", 1, 2)  # written while excluded: only a full can carry it later
    write(lab, vm, "vda", 1, 10)
    backup(["vda"])

    # 5: vdb included again: it joins again with a full, vda stays incremental
    vmkeep("vm", "config", vm, "--exclude-disk", "unset")
    write(lab, vm, "vdb", 1, 7)
    files = backup(["vda", "vdb"])
    assert files["vdb"]["full"] is True and "full" not in files["vda"]

    # 6: vda grown live from 32 to 40 MiB, written past its old end: still an increment
    vmkeep("vm", "disk-resize", vm, "--disk", "vda", "--size", "40M")
    deadline = time.monotonic() + 30
    while guest_state(lab, vm, ["vda"])["vda"][0] != 40 * MIB:
        assert time.monotonic() < deadline, "the guest did not see vda grow"
        time.sleep(0.5)
    write(lab, vm, "vda", 2, 35)
    files = backup(["vda", "vdb"])
    assert "full" not in files["vda"] and files["vda"]["virtual_size"] == 40 * MIB
    assert files["vda"]["size"] < 4 * MIB

    # 7: vdb hot-unplugged: its part of the chain ends; vda goes on
    vmkeep("vm", "disk", "detach", vm, "--target", "vdb")
    unplugged(lab, vm, "vdb")
    write(lab, vm, "vda", 1, 12)
    backup(["vda"])

    # 8: powered off, vdc attached to the definition: the backup (of the guest started paused)
    # takes vdc whole, blank, and vda unchanged since point 7
    vmkeep("vm", "poweroff", vm)
    vmkeep("vm", "disk", "attach", vm, "--size", "8M", "--target", "vdc")
    expected_off = {
        "vda": expected[-1]["vda"],
        "vdc": (8 * MIB, hashlib.sha256(bytes(8 * MIB)).hexdigest()),
    }
    res = vmkeep("backup", vm, "--datastore", "ds", "--json").json()
    assert (res["id"], res["increment"]) == (points[0]["id"], 8)
    files = {f["disk"]: f for f in res["increments"][8]["files"] if f["disk"]}
    assert files["vdc"]["full"] is True and "full" not in files["vda"]
    assert res["increments"][8]["consistency"] == "OFFLINE"
    expected.append(expected_off)

    # 9: vdc grown while powered off (qemu-img resize keeps its bitmaps): still incremental
    vmkeep("vm", "disk-resize", vm, "--disk", "vdc", "--size", "12M")
    res = vmkeep("backup", vm, "--datastore", "ds", "--json").json()
    assert (res["id"], res["increment"]) == (points[0]["id"], 9)
    files = {f["disk"]: f for f in res["increments"][9]["files"] if f["disk"]}
    assert "full" not in files["vdc"] and files["vdc"]["virtual_size"] == 12 * MIB
    zeros = hashlib.sha256(bytes(12 * MIB)).hexdigest()
    expected.append({"vda": expected_off["vda"], "vdc": (12 * MIB, zeros)})

    backup_id = points[0]["id"]
    shown = vmkeep("backups", "show", str(backup_id), "--json").json()
    assert [p.get("excluded_disks") for p in shown["increments"]] == [
        [], [], [], [], ["vdb"], [], [], [], [], []
    ]  # fmt: skip

    # every point restores bit-identical, with exactly the disks it holds
    for seq, want in enumerate(expected):
        name = f"{PREFIX}dc-r{seq}"
        # the excluded disk is in point 4's domain XML, not in its files: a warning (exit 1)
        res = vmkeep("restore", str(backup_id), "--increment", str(seq), "--name", name,
                     "--json", check=1 if seq == 4 else 0)  # fmt: skip
        r = res.json()
        try:
            assert sorted(r["disks"]) == sorted(want), seq
            assert image_state(r["disks"], tmp_path) == want, seq
            if seq == 4:
                assert "disk vdb was not in the backup" in res.err
        finally:
            lab.hv.undefine(name)
            shutil.rmtree(Path(r["path"]), ignore_errors=True)
    # the grown disk: its old size before, its new size after
    assert [w["vda"][0] for w in expected] == [32 * MIB] * 6 + [40 * MIB] * 4
