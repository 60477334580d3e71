"""Host-level faults: libvirtd killed and restarted mid-copy, QEMU killed (a host crash: dirty
bitmaps left inconsistent), two backups of one VM at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from vmkeep.catalog.tables import Lock
from vmkeep.hypervisor import connect
from vmkeep.lab.hosts import is_running, libvirtd_pid

from .conftest import Harness

pytestmark = pytest.mark.serial  # it kills libvirtd: no other test may run meanwhile


def _wait(cond, timeout: float = 30, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _locked(h: Harness) -> bool:
    with h.catalog.session() as s:
        return s.execute(select(Lock).where(Lock.name.like("vm:%"))).first() is not None


def test_libvirtd_killed_and_restarted_mid_copy(harness: Harness) -> None:
    """`vmkeep backup VM -d DS` while libvirtd is SIGKILLed and started again: exit 11."""
    h = harness
    h.backup_and_check()
    h.write(mib=16)
    before = connect("qemu:///system")  # a connection from before the restart
    before.list_domains()
    proc = h.popen(
        "backup", h.vm, "-d", "ds", "--json", extra={"VMKEEP_FAILPOINTS": "copy=sleep:6"}
    )
    _wait(lambda: "fail point copy" in h.stderr_file.read_text(), 60, "the copy phase")
    # this machine's libvirtd, by its pid: other libvirtds (lab hosts) may run on this machine
    pid = libvirtd_pid(1)
    assert pid is not None, "no libvirtd pid in /run/libvirtd.pid"
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not is_running(pid), 10, "libvirtd gone")  # its pidfile lock and socket too
    subprocess.run(["libvirtd", "-d"], check=True)
    h.wait_libvirtd()
    res = h.finish(proc)
    # The documented outcome (README, docs/exit-codes.md): the attempt fails with exit 11
    # HypervisorConnectionLost (libvirtd cancels a backup job it finds when it starts), named as
    # such; vmkeep reconnects and cleans up; the next backup needs no manual step.
    assert res.code == 11, (res.code, res.out, res.err)
    assert "libvirtd connection lost" in res.err and "run the action again" in res.err, res.err
    assert res.out == "", res.out  # no point printed: there is none
    h.assert_healthy()
    statuses = [
        i["status"] for b in h.run("backups", "list", "--json").json() for i in b["increments"]
    ]
    assert statuses.count("VALID") == len(h.points), (statuses, h.points)
    h.backup_and_check()
    # a read on the old connection is asked again on a new one: no error after the restart
    assert h.vm in {d.name for d in before.list_domains()}


def _qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def test_qemu_killed_like_a_host_crash_copies_the_disk_whole_with_a_warning(
    harness: Harness,
) -> None:
    """QEMU killed: the dirty bitmap it had not saved is inconsistent. The next backup stays in
    its chain and copies that disk whole (libvirt names the disk whose bitmap it refuses), with
    a warning; the point restores, and the one after it is an ordinary increment."""
    h = harness
    h.backup_and_check()
    os.kill(_qemu_pid(h.vm), signal.SIGKILL)
    _wait(lambda: h.hv.domain(h.vm).state != "ACTIVE", 30, "QEMU gone")
    h.lab.start(h.vm)
    h.state.clear()  # data written after the last backup died with the guest's page cache
    for path in ("/mnt/vda/f0", "/mnt/vda/f1", "/mnt/vda/f2", "/mnt/vda/f3"):
        out = h.lab.sh(h.vm, f"[ -f {path} ] && sha256sum {path} || true").split()
        if out:
            h.state[path] = out[0]
    h.write()
    before = h.points[-1]
    res = h.backup(check=1)
    assert "disk vda is copied whole in this increment" in res.err, res.err
    p = h.record(res)
    assert (p.backup, p.increment) == (before.backup, before.increment + 1)
    h.restore_matches(p)
    h.assert_healthy()
    nxt = h.backup_and_check()
    assert (nxt.backup, nxt.increment) == (p.backup, p.increment + 1)


def test_two_backups_of_one_vm_at_once(harness: Harness) -> None:
    """Two `vmkeep backup VM -d DS` at once: the second is refused (exit 8) naming the first."""
    h = harness
    h.write()
    first = h.popen(
        "backup", h.vm, "-d", "ds", "--json", extra={"VMKEEP_FAILPOINTS": "copy=sleep:3"}
    )
    _wait(lambda: _locked(h), 30, "the first backup's lock")
    second = h.run("backup", h.vm, "-d", "ds", check=8)
    assert f"VM {h.vm} is busy: backup by pid {first.pid}" in second.err, second.err
    res = h.finish(first)
    assert res.code == 0, res.err
    h.record(res)
    h.assert_healthy()
    h.backup_and_check()
    for p in h.points:
        h.restore_matches(p)
