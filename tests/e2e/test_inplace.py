"""In-place restore on a real lab VM: the VM itself rolled back, identity kept; refused while it
runs; a corrupted backup or a process killed mid-swap leaves the VM as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.errors import DomainNotFound
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.model import VmState

from .conftest import PREFIX

VM = f"{PREFIX}inplace"


@pytest.fixture(scope="module")
def vm(lab: Lab) -> Iterator[str]:
    lab.create(VM, [256 << 20])
    yield VM
    lab.remove(VM)


@pytest.fixture
def fresh(vm: str, hv: Hypervisor, lab: Lab, vmkeep, tmp_path: Path) -> str:
    """The module's VM, running, in this test's new catalog with a dir datastore 'ds'."""
    if hv.domain(vm).state != VmState.ACTIVE:
        lab.start(vm)
        lab.wait_ready(vm)
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment")
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(tmp_path / "ds"))
    return vm


def disk_of(hv: Hypervisor, vm: str) -> Path:
    return Path(next(d.path for d in hv.domain(vm).disks if d.target == "vda"))


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def power_off(hv: Hypervisor, vm: str) -> None:
    hv.destroy(vm)


def boot(lab: Lab, vm: str) -> None:
    lab.start(vm)
    lab.wait_ready(vm)


def test_in_place_rollback_is_bit_identical_and_keeps_the_vm(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str
) -> None:
    vm = fresh
    uuid_before = hv.domain(vm).uuid
    a0 = lab.write_random(vm, "/mnt/vda/a", 3)
    first = vmkeep("backup", vm, "-d", "ds", "--json").json()
    a1 = lab.write_random(vm, "/mnt/vda/a", 1, seek_mib=1)
    lab.write_random(vm, "/mnt/vda/b", 2)
    second = vmkeep("backup", vm, "-d", "ds", "--json").json()
    assert second["increment"] == 1
    lab.write_random(vm, "/mnt/vda/c", 1)  # after the last backup: must be gone after rollback
    # refused while the VM runs, naming the state and what it needs
    busy = vmkeep("restore", str(first["id"]), "--in-place", check=4)
    assert "POWEROFF" in busy.err and "restore in place" in busy.err
    clash = vmkeep("restore", str(first["id"]), "--in-place", "--name", "x", check=9)
    assert "--name" in clash.err
    power_off(hv, vm)
    res = vmkeep("restore", str(first["id"]), "--in-place", "--increment", "0", "--json", check=1)
    out = res.json()
    assert out["in_place"] and out["vm"] == vm and out["increment"] == 0
    assert "new full chain" in res.err
    boot(lab, vm)
    assert hv.domain(vm).uuid == uuid_before
    assert lab.sha256(vm, "/mnt/vda/a") == a0
    listed = lab.sh(vm, "ls /mnt/vda").split()
    assert "b" not in listed and "c" not in listed, listed
    # roll forward again to increment 1; the next backup starts a new chain
    power_off(hv, vm)
    vmkeep("restore", str(first["id"]), "--in-place", "--start", check=1)
    lab.wait_ready(vm)
    assert lab.sha256(vm, "/mnt/vda/a") == a1
    assert "c" not in lab.sh(vm, "ls /mnt/vda").split()
    nxt = vmkeep("backup", vm, "-d", "ds", "--json").json()
    assert nxt["id"] != first["id"] and nxt["increment"] == 0


def test_a_corrupted_backup_leaves_the_vm_as_it_was(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str, tmp_path: Path
) -> None:
    vm = fresh
    lab.write_random(vm, "/mnt/vda/a", 2)
    b = vmkeep("backup", vm, "-d", "ds", "--json").json()
    stored = tmp_path / "ds" / b["chain"] / "0.vda.qcow2"
    with open(stored, "r+b") as f:  # one flipped block in the middle of the stored full
        f.seek(stored.stat().st_size // 2)
        block = f.read(4096)
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(x ^ 0xFF for x in block))
    power_off(hv, vm)
    disk = disk_of(hv, vm)
    before = file_sha(disk)
    bad = vmkeep("restore", str(b["id"]), "--in-place", check=17)
    assert "0.vda.qcow2" in bad.err
    assert file_sha(disk) == before
    assert not list(disk.parent.glob("*.vmkeep-*")), "partial images left behind"
    shown = vmkeep("vm", "show", vm, "--json").json()
    assert shown["lcm_state"] == "POWEROFF"


def test_killed_mid_swap_the_next_command_puts_the_disk_back(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str
) -> None:
    vm = fresh
    a0 = lab.write_random(vm, "/mnt/vda/a", 2)
    b = vmkeep("backup", vm, "-d", "ds", "--json").json()
    lab.write_random(vm, "/mnt/vda/a", 2)
    power_off(hv, vm)
    disk = disk_of(hv, vm)
    before = file_sha(disk)
    env = dict(os.environ, VMKEEP_FAILPOINTS="swap=kill")
    proc = subprocess.run(
        [sys.executable, "-m", "vmkeep.cli.main", "restore", str(b["id"]), "--in-place"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    aside = disk.with_name(disk.name + ".vmkeep-before-restore")
    assert not disk.exists() and aside.exists()  # the window the fail point holds open
    # any next action on the VM undoes it first (no manual step), then works
    vmkeep("vm", "reset-state", vm)
    assert disk.exists() and not aside.exists() and file_sha(disk) == before
    vmkeep("restore", str(b["id"]), "--in-place", "--start", check=1)
    lab.wait_ready(vm)
    assert lab.sha256(vm, "/mnt/vda/a") == a0


def _copying_and_answering(hv: Hypervisor, name: str) -> bool:
    """The instant-restored VM runs, its disk is still being copied, and its agent answers."""
    try:
        info = hv.domain(name)
    except DomainNotFound:  # the restore has not defined it yet
        return False
    if info.state != "ACTIVE":  # defined, not started yet
        return False
    return hv.block_job(name, "vda") is not None and hv.guest_ping(name, 2)


def test_instant_restore_answers_while_its_copy_runs_then_stands_alone(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str
) -> None:
    import time

    vm = fresh
    data = Path(os.environ["VMKEEP_DATA_DIR"])  # QEMU must reach the backup files here
    vmkeep("datastore", "add", "q", "--driver", "dir", "--path", str(data / "q"))
    a0 = lab.write_random(vm, "/mnt/vda/a", 8)
    b = vmkeep("backup", vm, "-d", "q", "--json").json()
    new = f"{PREFIX}instant"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", "restore", str(b["id"]), "--instant",
         "--name", new, "--path", str(data / "inst"), "--copy-bwlimit", "1", "--json"],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        answered_during_copy = False
        while proc.poll() is None:
            if _copying_and_answering(hv, new):
                answered_during_copy = True
                break
            time.sleep(0.2)
        up_after = time.monotonic() - t0
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert answered_during_copy, "the guest did not answer while its disks were copied"
        res = __import__("json").loads(out)
        assert res["instant"] and res["independent"], res
        assert up_after < 120
        # the copy is done: the backup can go and the VM keeps its data, across a reboot too
        vmkeep("backups", "delete", str(b["id"]))
        assert lab.sha256(new, "/mnt/vda/a") == a0
        hv.destroy(new)
        hv.start(new)  # its serial log is in its own folder: wait for the agent instead
        deadline = time.monotonic() + 120
        while not hv.guest_ping(new, 2):
            assert time.monotonic() < deadline, "the restored VM did not boot again"
            time.sleep(0.5)
        assert lab.sha256(new, "/mnt/vda/a") == a0
    finally:
        if proc.poll() is None:
            proc.kill()
        lab.remove(new)
