"""Groups on three real lab VMs: a consistent cut across VMs, failure of one member, crash of
vmkeep while guests are frozen, group restore and ordered start/stop.

The "transaction" writer runs on the host: transaction t is appended (through guest-exec) to
/mnt/vda/tx first in VM1, then VM2, then VM3, each write finished before the next starts. A cut
is consistent when no VM holds a transaction that a VM earlier in the order lacks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.groups.backup import run_group_backup
from vmkeep.errors import GroupBackupFailed, HypervisorError
from vmkeep.hypervisor import Hypervisor, connect
from vmkeep.hypervisor.native import LibvirtHypervisor
from vmkeep.lab import Lab
from vmkeep.lab.lab import read_file_from_image

from .conftest import PREFIX, make_group, running_daemon

MEMBERS = [f"{PREFIX}g{i}" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def trio(lab: Lab) -> Iterator[list[str]]:
    for name in MEMBERS:
        lab.create(name, [64 << 20])
    yield MEMBERS
    for name in MEMBERS:
        lab.remove(name)


@pytest.fixture
def group(vmkeep, trio: list[str], tmp_path: Path, lab: Lab, hv: Hypervisor) -> str:
    """Group 'app' of the three VMs (fresh catalog), each running with its agent answering (a
    test may have killed one's agent) and with no checkpoint an earlier test's catalog left."""
    return make_group(vmkeep, lab, hv, trio, tmp_path / "ds", "--mode", "increment")


class TxWriter(threading.Thread):
    """Appends transaction t to every VM in order, continuously, retrying while a guest is frozen
    (the agent refuses guest-exec then)."""

    def __init__(self, vms: list[str]) -> None:
        super().__init__(daemon=True)
        self.vms, self.t, self.error = vms, 0, None
        self.stop = threading.Event()
        self.hv = connect("qemu:///system")

    def write(self, vm: str, t: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                res = self.hv.guest_exec(vm, ["/bin/sh", "-c", f"echo {t} >> /mnt/vda/tx"], 30)
                if res.exit_code == 0:
                    return
            except HypervisorError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t = self.t + 1
                for vm in self.vms:
                    self.write(vm, t)
                self.t = t
        except BaseException as err:  # reported by the test
            self.error = err

    def wait_for(self, t: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.t < t:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"writer stuck at {self.t}"
            time.sleep(0.05)


def last_tx(image: Path, workdir: Path) -> int:
    """The newest transaction in a restored disk (read with debugfs; e2fsck must pass)."""
    data = read_file_from_image(image, "/tx", workdir).decode()
    return max(int(x) for x in data.split())


def test_group_crud_and_errors(vmkeep, group: str, trio: list[str]) -> None:
    shown = vmkeep("group", "show", group, "--json").json()
    assert shown["start_order"] == trio and shown["stop_order"] == trio[::-1]
    assert "already exists" in vmkeep("group", "create", group, trio[0], check=7).err
    assert "not in the catalog" in vmkeep("group", "create", "x", "nope", check=6).err
    assert "vmkeep group list" in vmkeep("group", "show", "nope", check=6).err
    vmkeep("group", "remove", group, trio[1])
    assert vmkeep("group", "show", group, "--json").json()["members"] == [trio[0], trio[2]]
    vmkeep("group", "add", group, trio[1], "--position", "1")
    assert vmkeep("group", "show", group, "--json").json()["members"] == trio
    # A VM may be in several groups; an explicit stop order must name every member.
    vmkeep("group", "create", "db", trio[2], trio[0], "--stop-order", f"{trio[0]},{trio[2]}")
    assert (
        "every member"
        in vmkeep("group", "create", "bad", trio[0], trio[1], "--stop-order", trio[0], check=9).err
    )
    names = [g["name"] for g in vmkeep("group", "list", "--json").json()]
    assert names == [group, "db"]
    vmkeep("group", "delete", "db")
    assert [g["name"] for g in vmkeep("group", "list", "--json").json()] == [group]


def test_transactions_give_a_consistent_cut_after_group_restore(
    vmkeep, group: str, trio: list[str], lab: Lab, tmp_path: Path
) -> None:
    for vm in trio:
        lab.sh(vm, "rm -f /mnt/vda/tx; sync")
    writer = TxWriter(trio)
    writer.start()
    try:
        writer.wait_for(3)
        full = vmkeep("group", "backup", group, "-d", "ds", "--json").json()
        writer.wait_for(full_t := writer.t + 2)
        inc = vmkeep("group", "backup", group, "-d", "ds", "--json").json()
        writer.wait_for(writer.t + 2)  # the writer went on after the thaw
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    assert full["status"] == inc["status"] == "VALID"
    assert [m["increment"] for m in inc["members"]] == [1, 1, 1]  # increments per member
    assert all(m["consistency"] == "AGENT_FROZEN" for m in inc["members"])
    # freeze order: VM1 first, thaw order: VM1 last; the window spans them all
    m = inc["members"]
    assert m[0]["frozen_at_ms"] <= m[1]["frozen_at_ms"] <= m[2]["frozen_at_ms"]
    assert m[0]["thawed_at_ms"] >= m[1]["thawed_at_ms"] >= m[2]["thawed_at_ms"]
    assert inc["freeze_window_ms"] == pytest.approx(m[0]["thawed_at_ms"], abs=0.01)

    restored = vmkeep("group", "restore", str(inc["id"]), "--suffix", "-tx", "--json").json()
    try:
        cut = [last_tx(Path(r["disks"]["vda"]), tmp_path) for r in restored["members"]]
    finally:
        for r in restored["members"]:
            lab.remove(r["vm"])
    t1, t2, t3 = cut
    assert t1 >= t2 >= t3 and t1 - t3 <= 1, f"inconsistent cut {cut}"
    assert t3 >= full_t  # the increment, not the full, was restored
    assert t1 < writer.t  # and the cut fell while the writer was running

    shown = vmkeep("group", "show", group, "--json").json()
    assert [b["freeze_window_ms"] > 0 for b in shown["backups"]] == [True, True]
    b = vmkeep("backups", "show", str(m[1]["backup"]), "--json").json()
    assert b["increments"][1]["group"]["group_backup"] == inc["id"]
    assert b["increments"][1]["group"]["group_freeze_window_ms"] == inc["freeze_window_ms"]


class KillsAgentOf(LibvirtHypervisor):
    """The real driver; the real agent of ``victim`` is killed in the guest just before vmkeep
    freezes it, i.e. while the members before it in the order are frozen."""

    def __init__(self, uri: str, victim: str) -> None:
        super().__init__(uri)
        self.victim, self.frozen_seen = victim, {}

    def fs_freeze(self, name: str, timeout: float) -> int:
        if name == self.victim:
            self.frozen_seen = {
                other: self.fs_freeze_status(other, 5) for other in MEMBERS if other != name
            }
            kill = "sleep 0.2; kill $(cat /run/qemu-ga.pid)"
            with suppress(HypervisorError):  # the agent may die before it answers
                self._agent_command(
                    name,
                    {
                        "execute": "guest-exec",
                        "arguments": {"path": "/bin/sh", "arg": ["-c", kill]},
                    },
                    5,
                )
            deadline = time.monotonic() + 15
            while self.guest_ping(name, 1) and time.monotonic() < deadline:
                time.sleep(0.1)
        return super().fs_freeze(name, timeout)


def test_agent_killed_mid_group_backup_thaws_the_others_and_records_the_member(
    vmkeep, group: str, trio: list[str], hv: Hypervisor, lab: Lab, tmp_path: Path
) -> None:
    first = vmkeep("group", "backup", group, "-d", "ds", "--json").json()
    victim = trio[1]
    ctx = Context(load_config(), KillsAgentOf("qemu:///system", victim))
    with pytest.raises(GroupBackupFailed) as exc:
        run_group_backup(ctx, group, "ds")
    assert victim in str(exc.value)
    # VM1 really was frozen when the agent died; now every member is thawed and RUNNING
    seen = ctx.hv.frozen_seen  # type: ignore[attr-defined]
    assert seen == {trio[0]: "frozen", trio[2]: "thawed"}
    for vm in (trio[0], trio[2]):
        assert hv.fs_freeze_status(vm, 10) == "thawed"
    for vm in trio:
        assert not hv.domain(vm).paused
        assert vmkeep("vm", "show", vm, "--json").json()["lcm_state"] == "RUNNING"
    failed = vmkeep("group", "show", group, "--json").json()["last_backup"]
    assert failed["status"] == "FAILED" and failed["failed_vm"] == victim
    assert "agent" in failed["error"]
    # nothing of the failed attempt is left in the datastore
    chains = {m["vm"]: tmp_path / "ds" / m["vm"] / str(m["backup"]) for m in first["members"]}
    for path in chains.values():
        assert sorted(p.name.split(".")[0] for p in path.glob("*.qcow2")) == ["0"]
    # the agent is back after a reboot; the next group backup continues every chain
    hv.destroy(victim)
    lab.start(victim)
    nxt = vmkeep("group", "backup", group, "-d", "ds", "--json").json()
    assert nxt["status"] == "VALID"
    for a, b in zip(first["members"], nxt["members"], strict=True):
        assert b["backup"] == a["backup"] and b["increment"] == 2
        assert b["consistency"] == "AGENT_FROZEN"


def test_member_without_agent_fails_the_group_with_exit_20(
    vmkeep, agent_vm: str, noagent_vm: str, hv: Hypervisor, tmp_path: Path
) -> None:
    for vm in (agent_vm, noagent_vm):
        vmkeep("vm", "import", vm)
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(tmp_path / "ds"))
    vmkeep("group", "create", "mixed", agent_vm, noagent_vm)
    res = vmkeep("group", "backup", "mixed", "-d", "ds", check=20)
    assert noagent_vm in res.err and "thawed" in res.err
    assert hv.fs_freeze_status(agent_vm, 10) == "thawed"
    last = vmkeep("group", "show", "mixed", "--json").json()["last_backup"]
    assert last["failed_vm"] == noagent_vm
    assert {m["status"] for m in last["members"]} == {"FAILED"}
    attempts = vmkeep("backups", "list", "--json").json()
    assert len(attempts) == 2 and {b["status"] for b in attempts} == {"FAILED"}


CRASH_SCRIPT = """
import os, signal, sys
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.groups.backup import run_group_backup
from vmkeep.hypervisor.native import LibvirtHypervisor

class DiesDuringBegin(LibvirtHypervisor):
    def backup_begin(self, name, bxml, cxml, reuse=False):
        print("frozen", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

run_group_backup(Context(load_config(), DiesDuringBegin("qemu:///system")), "app", "ds")
"""


def test_vmkeep_killed_while_guests_are_frozen_the_watchdog_thaws_them(
    vmkeep, group: str, trio: list[str], hv: Hypervisor
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL and "frozen" in proc.stdout, proc.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(hv.fs_freeze_status(vm, 5) == "thawed" for vm in trio):
            break
        time.sleep(0.1)
    assert [hv.fs_freeze_status(vm, 5) for vm in trio] == ["thawed"] * 3
    log = (Path(os.environ["VMKEEP_DATA_DIR"]) / "watchdog.log").read_text()
    assert "died: recovering VMs" in log
    # The guard also cleaned up each member's abandoned attempt: no 'backup cancel', no manual
    # step; the group works again, and the abandoned group record is marked FAILED.
    assert vmkeep("group", "backup", group, "-d", "ds", "--json").json()["status"] == "VALID"
    first = vmkeep("group", "show", group, "--json").json()["backups"][0]
    assert first["status"] == "FAILED" and "died" in first["error"]


def test_group_restore_then_ordered_start_and_stop(
    vmkeep, group: str, trio: list[str], lab: Lab, hv: Hypervisor
) -> None:
    marks = {vm: lab.write_random(vm, "/mnt/vda/mark", 1) for vm in trio}
    # with a daemon on the catalog, `vmkeep group backup` is the daemon's job (its API's
    # group backup route, run by one of its workers)
    with running_daemon() as (_proc, api):
        gb = vmkeep("group", "backup", group, "-d", "ds", "--json").json()
        token = vmkeep("token", "create", "t", "--role", "viewer", "--json").json()["token"]
        job = api.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).json()[0]
        assert (job["kind"], job["who"], job["state"]) == ("group-backup", "@local", "DONE"), job
        assert job["result"]["id"] == gb["id"] and gb["status"] == "VALID", (job, gb)
    restored = vmkeep("group", "restore", str(gb["id"]), "--json").json()
    new = [r["vm"] for r in restored["members"]]
    assert new == [f"{vm}-g{gb['id']}" for vm in trio]
    try:
        assert "--suffix" in vmkeep("group", "restore", str(gb["id"]), check=7).err
        vmkeep("group", "create", "copy", *new, "--stop-order", f"{new[1]},{new[0]},{new[2]}")
        started = vmkeep("group", "start", "copy", "--json").json()
        assert [r["vm"] for r in started] == new
        # each member was up (agent answering) before the next one was started
        boot = [_qemu_start_ticks(vm) for vm in new]
        assert boot == sorted(boot) and boot[1] - boot[0] > 100, boot  # > 1 s apart
        for old, vm in zip(trio, new, strict=True):
            assert lab.sha256(vm, "/mnt/vda/mark") == marks[old]
        stopped = vmkeep("group", "stop", "copy", "--json").json()
        assert [r["vm"] for r in stopped] == [new[1], new[0], new[2]], stopped
        assert all(hv.domain(vm).state == "POWEROFF" for vm in new)
        # libvirt's own record of when each QEMU ended: each was off before the next one went
        off_at = {vm: _shut_down_at(vm) for vm in new}
        assert sorted(new, key=off_at.__getitem__) == [new[1], new[0], new[2]], off_at
    finally:
        for vm in new:
            lab.remove(vm)


def _qemu_start_ticks(name: str) -> int:
    """Start time (clock ticks since boot) of the domain's QEMU process."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _shut_down_at(name: str) -> str:
    """When libvirt last saw the domain's QEMU end, from its log (``YYYY-MM-DD HH:MM:SS.mmm``):
    libvirt's own clock, not a poll that a loaded host can delay."""
    lines = Path(f"/var/log/libvirt/qemu/{name}.log").read_text(errors="replace").splitlines()
    ends = [ln.split("+", 1)[0] for ln in lines if ": shutting down, reason=" in ln]
    assert ends, f"libvirt logged no end of {name}"
    return ends[-1]
