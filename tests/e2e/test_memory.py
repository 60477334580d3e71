"""Memory state on a real lab VM (256 MiB RAM): a backup with ``memory yes`` saves the guest's RAM at
the paused instant its disks were captured; restoring it resumes the guest, so a counter process
carries on from its value at backup time, with the disks of that point."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import LabError
from vmkeep.model import VmState

from .conftest import PREFIX

VM = f"{PREFIX}memory"
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done"


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [256 << 20], memory_mib=256)
    yield VM
    lab.remove(VM)


def counter(lab: Lab, vm: str) -> int:
    return int(lab.sh(vm, "cat /tmp/counter").strip())


def counter_pid(lab: Lab, vm: str) -> str:
    return lab.sh(vm, "cat /tmp/counter.pid").strip()


def test_restore_resumes_the_guest_with_its_memory_and_disks(
    vmkeep, lab: Lab, hv: Hypervisor, vm: str, tmp_path
) -> None:
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment", "--memory", "yes")
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(tmp_path / "ds"))
    # a process whose state lives only in RAM (the lab guest's root is an initramfs)
    lab.sh(vm, f"({COUNTER}) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid")
    pid = counter_pid(lab, vm)
    a = lab.write_random(vm, "/mnt/vda/a", 3)
    first = vmkeep("backup", vm, "-d", "ds", "--json").json()
    bid = first["id"]
    b = lab.write_random(vm, "/mnt/vda/b", 2)
    before = counter(lab, vm)
    second = vmkeep("backup", vm, "-d", "ds", "--json").json()
    after = counter(lab, vm)
    assert second["id"] == bid and second["increment"] == 1
    point = second["increments"][1]
    assert point["consistency"] == "MEMORY"
    assert point["freeze_ms"] and point["freeze_ms"] > 0  # the downtime, stored per increment
    assert [f["name"] for f in point["files"] if f.get("memory")] == ["1.memory"]
    lab.write_random(vm, "/mnt/vda/c", 1)  # after the point: gone once it is restored

    # as a new VM, a point with memory can only come back as this VM: refused while it exists
    clash = vmkeep("restore", str(bid), check=25)
    assert "--in-place" in clash.err and "--without-memory" in clash.err
    running = vmkeep("restore", str(bid), "--in-place", check=4)
    assert "POWEROFF" in running.err

    time.sleep(3)  # the counter runs on well past its value at the point
    last = counter(lab, vm)
    hv.destroy(vm)
    # exit 1: the warning that the next backup starts a new chain (checkpoints were dropped)
    res = vmkeep("restore", str(bid), "--in-place", "--increment", "1", "--json", check=1).json()
    assert res["resumed"] is True and res["started"] is True
    assert hv.domain(vm).state == VmState.ACTIVE and not hv.domain(vm).paused
    value = counter(lab, vm)
    # the same process, carrying on from where it was when the point was taken
    assert counter_pid(lab, vm) == pid
    assert before <= value < last, (before, after, value, last)
    time.sleep(0.5)
    assert counter(lab, vm) > value  # and it runs
    assert lab.sha256(vm, "/mnt/vda/a") == a and lab.sha256(vm, "/mnt/vda/b") == b
    with pytest.raises(LabError):
        lab.sh(vm, "test -e /mnt/vda/c")

    # --without-memory: the disks of the full, a cold boot (no counter, no resume)
    hv.destroy(vm)
    cold = vmkeep(
        "restore", str(bid), "--in-place", "--increment", "0", "--without-memory", "--json", check=1
    ).json()
    assert "resumed" not in cold and cold["started"] is False
    assert hv.domain(vm).state == VmState.POWEROFF
    lab.start(vm)
    assert lab.sha256(vm, "/mnt/vda/a") == a
    with pytest.raises(LabError):
        lab.sh(vm, "test -e /mnt/vda/b || test -e /tmp/counter")

    shown = vmkeep("backups", "show", str(bid), "--json").json()
    assert [i["consistency"] for i in shown["increments"]] == ["MEMORY", "MEMORY"]
