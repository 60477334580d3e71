"""The README's restore promises no other test keeps, on a real lab VM (two data disks, a NIC):
``restore --no-nic`` (the new VM has no interface), ``restore --in-place --disk`` (only that disk
goes back), ``restore --instant`` cancelled (the VM runs on, on the untouched backup) and from a
remote store (rsync over a real sshd), a memory point restored after its domain is gone (the
guest's processes resume), and a memory point libvirt refuses to resume because the host's QEMU
cannot run its machine (the disks come back, the VM stays off, a warning names the fix).

The module's VM runs on an emulator wrapper (a script that execs QEMU) so that one test can make
"the host's QEMU" another one: it execs ``qemu-system-x86_64-microvm`` then (Debian's build with
neither the i440fx machines nor TCG), and libvirt refuses the saved state as it would after a
QEMU upgrade dropped the machine, or on another host."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.errors import DomainNotFound
from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import LabError
from vmkeep.lab.sshd import Sshd

from .conftest import PREFIX
from .test_offhost import rsync_opts, sshd  # noqa: F401 (the module-scoped sshd fixture)

VM = f"{PREFIX}rp"
QEMU = "/usr/bin/qemu-system-x86_64"
NO_I440FX = "/usr/bin/qemu-system-x86_64-microvm"  # Debian's build with microvm and q35 only
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done"


def wrapper(lab: Lab) -> Path:
    return lab.vm_dir(VM) / "qemu"


def point_emulator(lab: Lab, binary: str) -> None:
    """The VM's emulator execs ``binary`` from now on (libvirt probes it again: its file is new,
    in a later second than the one it replaces)."""
    path = wrapper(lab)
    script = f'#!/bin/sh\nexec {binary} "$@"\n'
    if path.exists() and path.read_text() == script:
        return
    if path.exists():
        was = int(path.stat().st_ctime)
        deadline = time.monotonic() + 5
        while int(time.time()) <= was:  # libvirt compares the emulator's ctime in seconds
            assert time.monotonic() < deadline
            time.sleep(0.05)
    tmp = path.with_name("qemu.new")
    tmp.write_text(script)
    tmp.chmod(0o755)
    tmp.replace(path)


def make_vm(lab: Lab, hv: Hypervisor) -> None:
    lab.create(VM, [64 << 20, 64 << 20], start=False)
    point_emulator(lab, QEMU)
    xml = re.sub(
        r"<emulator>[^<]*</emulator>", f"<emulator>{wrapper(lab)}</emulator>", hv.domain_xml(VM)
    )
    assert str(wrapper(lab)) in xml
    hv.define(xml)
    lab.start(VM)


@pytest.fixture(scope="module")
def vm(lab: Lab, hv: Hypervisor) -> Iterator[str]:
    make_vm(lab, hv)
    yield VM
    lab.remove(VM)


@pytest.fixture
def fresh(vm: str, hv: Hypervisor, lab: Lab, vmkeep, qemu_reachable_data_dir: Path) -> str:
    """The module's VM, running on real QEMU, in this test's new catalog with a dir datastore
    'ds' that QEMU reaches (an instant restore runs on the backup's own files)."""
    point_emulator(lab, QEMU)
    try:
        state = hv.domain(vm).state
    except DomainNotFound:  # an earlier test failed between undefine and restore
        lab.remove(vm)
        make_vm(lab, hv)
        state = hv.domain(vm).state
    if state != "ACTIVE":
        lab.start(vm)
    for cp in hv.checkpoints(vm):
        hv.delete_checkpoint(vm, cp)
    vmkeep("vm", "import", vm)
    vmkeep("vm", "config", vm, "--mode", "increment")
    vmkeep(
        "datastore", "add", "ds", "--driver", "dir", "--path", str(qemu_reachable_data_dir / "ds")
    )
    return vm


def wait_agent(hv: Hypervisor, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not hv.guest_ping(name, 2):
        assert time.monotonic() < deadline, f"{name}'s guest agent never answered"
        time.sleep(0.3)


def gone(hv: Hypervisor, name: str) -> None:
    hv.destroy(name)  # both let a domain that is off or gone be
    hv.undefine(name)


def image_info(image: Path) -> dict:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(info.stdout)


def backing_of(image: Path) -> str | None:
    return image_info(image).get("backing-filename")


def bitmaps(image: Path) -> list[str]:
    data = image_info(image).get("format-specific", {}).get("data", {})
    return [b["name"] for b in data.get("bitmaps", [])]


def test_no_nic_restores_a_vm_without_an_interface(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str, qemu_reachable_data_dir: Path
) -> None:
    """``vmkeep restore ID --no-nic --name NEW --path DIR --start``: the new VM has no
    interface (in libvirt and in the guest), its data is the point's."""
    a = lab.write_random(fresh, "/mnt/vda/a", 1)
    assert "eth0" in lab.sh(fresh, "ls /sys/class/net").split()  # the source VM has one
    bid = vmkeep("backup", fresh, "-d", "ds", "--json").json()["id"]
    new = f"{PREFIX}rp-nonic"
    try:
        out = vmkeep(
            "restore", str(bid), "--no-nic", "--name", new,
            "--path", str(qemu_reachable_data_dir / "nonic"), "--start", "--json",
        ).json()  # fmt: skip
        assert out["vm"] == new and out["started"] is True, out
        assert "<interface" in hv.domain_xml(fresh)
        assert "<interface" not in hv.domain_xml(new)
        wait_agent(hv, new)
        assert lab.sh(new, "ls /sys/class/net").split() == ["lo"]
        assert lab.sha256(new, "/mnt/vda/a") == a
        shown = vmkeep("vm", "show", new, "--json").json()
        assert shown["name"] == new
    finally:
        gone(hv, new)


def test_in_place_one_disk_rolls_back_that_disk_only(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str
) -> None:
    """``vmkeep restore ID --in-place --disk vdb``: vdb holds the point's bytes again, vda keeps
    the newer bytes written after the point."""
    lab.write_random(fresh, "/mnt/vda/a", 1)
    b0 = lab.write_random(fresh, "/mnt/vdb/b", 2)
    bid = vmkeep("backup", fresh, "-d", "ds", "--json").json()["id"]
    a1 = lab.write_random(fresh, "/mnt/vda/a", 2)  # newer bytes on both disks
    lab.write_random(fresh, "/mnt/vdb/b", 2)
    lab.write_random(fresh, "/mnt/vdb/later", 1)
    hv.destroy(fresh)
    res = vmkeep("restore", str(bid), "--in-place", "--disk", "vdb", "--json", check=1)
    out = res.json()
    assert out["in_place"] and list(out["disks"]) == ["vdb"], out
    assert "disks vda are not in the restore and were left as they are" in res.err
    # vda's checkpoints were dropped with its bitmaps (a stale one breaks a later checkpoint)
    vda = next(d.path for d in hv.domain(fresh).disks if d.target == "vda")
    assert not [b for b in bitmaps(Path(vda)) if b.startswith("vmkeep-")]
    lab.start(fresh)
    assert lab.sha256(fresh, "/mnt/vdb/b") == b0
    assert lab.sha256(fresh, "/mnt/vda/a") == a1
    assert "later" not in lab.sh(fresh, "ls /mnt/vdb").split()
    wrong = vmkeep("restore", str(bid), "--in-place", "--disk", "vdz", check=9)
    assert "vdz" in wrong.err and "vda, vdb" in wrong.err
    nxt = vmkeep("backup", fresh, "-d", "ds", "--json").json()
    assert nxt["id"] != bid and nxt["increment"] == 0  # a new full chain, as the warning said


def test_instant_restore_cancelled_runs_on_the_untouched_backup(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str, qemu_reachable_data_dir: Path
) -> None:
    """``vmkeep restore ID --instant --copy-bwlimit 1`` cancelled (Ctrl-C) while its copy runs:
    exit 130, the VM runs on with the point's data, its overlays still read the backup (which
    verifies as before), no block job, export or fetched file is left, the job is CANCELLED."""
    data = qemu_reachable_data_dir
    a = lab.write_random(fresh, "/mnt/vda/a", 8)
    bid = vmkeep("backup", fresh, "-d", "ds", "--json").json()["id"]
    new = f"{PREFIX}rp-inst"
    folder = data / "inst"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", "restore", str(bid), "--instant",
         "--name", new, "--path", str(folder), "--copy-bwlimit", "1", "--json"],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (
            new in [d.name for d in hv.list_domains()]
            and hv.domain(new).state == "ACTIVE"
            and hv.block_job(new, "vda") is not None
        ):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the copy never ran"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert hv.domain(new).state == "ACTIVE"
        assert hv.block_job(new, "vda") is None and hv.block_job(new, "vdb") is None
        stored = qemu_reachable_data_dir / "ds"
        for disk in ("vda", "vdb"):
            backing = backing_of(folder / f"{disk}.qcow2")
            assert backing is not None and Path(backing).is_relative_to(stored), backing
        wait_agent(hv, new)
        assert lab.sha256(new, "/mnt/vda/a") == a
        assert not (folder / ".backing").exists()
        verify = vmkeep("backups", "verify", str(bid), "--json").json()
        assert verify["ok"], verify
        job = next(j for j in vmkeep("jobs", "list", "--json").json() if j["kind"] == "restore")
        assert (job["state"], job["exit_code"]) == ("CANCELLED", 130), job
    finally:
        if proc.poll() is None:
            proc.kill()
        gone(hv, new)


def test_instant_restore_from_a_remote_store(
    vmkeep,
    lab: Lab,
    hv: Hypervisor,
    fresh: str,
    sshd: Sshd,  # noqa: F811
    tmp_path: Path,
    qemu_reachable_data_dir: Path,
) -> None:
    """``vmkeep restore ID --instant`` of a point on an rsync datastore: its files are fetched
    into the VM's folder, the VM runs on overlays over them, the copy makes it independent and
    the fetched files are removed."""
    vmkeep("datastore", "add", "far", *rsync_opts(sshd, tmp_path / "remote"))
    a = lab.write_random(fresh, "/mnt/vda/a", 2)
    bid = vmkeep("backup", fresh, "-d", "far", "--json").json()["id"]
    new = f"{PREFIX}rp-far"
    folder = qemu_reachable_data_dir / "far"
    try:
        out = vmkeep(
            "restore", str(bid), "--instant", "--name", new, "--path", str(folder), "--json"
        ).json()
        assert out["instant"] and out["independent"] and out["vm"] == new, out
        assert hv.domain(new).state == "ACTIVE"
        for disk in ("vda", "vdb"):
            assert backing_of(folder / f"{disk}.qcow2") is None
        assert not (folder / ".backing").exists()
        wait_agent(hv, new)
        assert lab.sha256(new, "/mnt/vda/a") == a
    finally:
        gone(hv, new)


def counter(lab: Lab, vm: str) -> int:
    return int(lab.sh(vm, "cat /tmp/counter").strip())


def counter_passes(lab: Lab, vm: str, value: int) -> int:
    deadline = time.monotonic() + 60
    while (now := counter(lab, vm)) <= value:
        assert time.monotonic() < deadline, f"the counter stays at {now}"
        time.sleep(0.1)
    return now


def test_memory_point_restored_after_its_domain_is_gone_resumes(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str
) -> None:
    """``vmkeep restore ID`` of a point with memory state, once its domain is gone: the VM comes
    back with its own name and UUID, running, its processes where they were at the point."""
    vmkeep("vm", "config", fresh, "--memory", "yes")
    lab.sh(fresh, f"({COUNTER}) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid")
    pid = lab.sh(fresh, "cat /tmp/counter.pid").strip()
    a = lab.write_random(fresh, "/mnt/vda/a", 1)
    before = counter_passes(lab, fresh, 0)
    first = vmkeep("backup", fresh, "-d", "ds", "--json").json()
    assert first["increments"][0]["consistency"] == "MEMORY"
    after = counter(lab, fresh)
    lab.write_random(fresh, "/mnt/vda/later", 1)
    last = counter_passes(lab, fresh, after + 20)  # well past its value at the point
    uuid_before = hv.domain(fresh).uuid
    hv.destroy(fresh)
    hv.undefine(fresh)
    # in the lab's folder, which outlives this test's data dir (the module's VM runs on)
    where = lab.vm_dir(fresh) / f"gen-{uuid.uuid4().hex[:6]}"
    out = vmkeep("restore", str(first["id"]), "--path", str(where), "--json").json()
    assert out["vm"] == fresh and out["resumed"] is True and out["started"] is True, out
    dom = hv.domain(fresh)
    assert dom.uuid == uuid_before and dom.state == "ACTIVE" and not dom.paused
    assert all(str(where) in d.path for d in dom.disks if d.device == "disk")
    value = counter(lab, fresh)
    assert lab.sh(fresh, "cat /tmp/counter.pid").strip() == pid  # the same process
    assert before <= value < last, (before, after, value, last)
    counter_passes(lab, fresh, value)  # and it runs on
    assert lab.sha256(fresh, "/mnt/vda/a") == a
    with pytest.raises(LabError):
        lab.sh(fresh, "test -e /mnt/vda/later")
    # it exists again: a second restore of the point as a new VM is refused, naming both ways
    clash = vmkeep("restore", str(first["id"]), check=25)
    assert "--in-place" in clash.err and "--without-memory" in clash.err


def test_memory_point_on_a_qemu_without_its_machine_type_restores_the_disks_cold(
    vmkeep, lab: Lab, hv: Hypervisor, fresh: str
) -> None:
    """``vmkeep restore ID --in-place`` of a memory point when the host's QEMU cannot run the
    point's machine (README: "the same QEMU machine type and CPU model are needed"): libvirt
    refuses to resume it; the disks are restored, the VM stays powered off and the warning
    (exit 1) names the way out (start it cold, or ``--without-memory``)."""
    vmkeep("vm", "config", fresh, "--memory", "yes")
    a = lab.write_random(fresh, "/mnt/vda/a", 1)
    bid = vmkeep("backup", fresh, "-d", "ds", "--json").json()["id"]
    lab.write_random(fresh, "/mnt/vda/later", 1)
    hv.destroy(fresh)
    point_emulator(lab, NO_I440FX)
    try:
        res = vmkeep("restore", str(bid), "--in-place", "--json", check=1)
        out = res.json()
        assert out["resumed"] is False and out["started"] is False, out
        assert "the memory state could not be resumed" in res.err, res.err
        # libvirt's refusal, naming what this host's QEMU lacks
        assert f"Emulator '{wrapper(lab)}' does not support" in res.err, res.err
        assert "start it for a cold boot (or restore with --without-memory)" in res.err
        assert hv.domain(fresh).state == "POWEROFF"
        shown = vmkeep("vm", "show", fresh, "--json").json()
        assert shown["lcm_state"] == "POWEROFF", shown
    finally:
        point_emulator(lab, QEMU)
    lab.start(fresh)  # the way out: a cold boot on the restored disks
    assert lab.sha256(fresh, "/mnt/vda/a") == a
    with pytest.raises(LabError):
        lab.sh(fresh, "test -e /mnt/vda/later")
