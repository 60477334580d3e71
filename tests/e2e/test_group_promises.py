"""README promises of `vm import --all` and of groups on two real lab guests: a parallel-freeze
group backup (both guests frozen at once, none left frozen), a group restore that starts the
restored members in the group's start order with the right bytes, and a forced group stop of a
member that ignores its shutdown.

The two guests are shared by the module (boot is the slow part); each test makes its own catalog
and datastore and brings the guests back up (agent answering) when an earlier test left them off.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.hypervisor import Hypervisor
from vmkeep.lab import Lab

from .conftest import PREFIX, guests_up, make_group

MEMBERS = [f"{PREFIX}gp1", f"{PREFIX}gp2"]
HOOK = "/run/vmkeep-freeze-hook"  # qemu-ga's fsfreeze hook in the guest (tmpfs: gone at boot)
SLOW = "/run/vmkeep-slow-freeze"  # while it exists, the hook holds each freeze this long
HOOK_SECONDS = 2


@pytest.fixture(scope="module")
def pair(lab: Lab) -> Iterator[list[str]]:
    for name in MEMBERS:
        lab.create(name, [64 << 20])
    yield MEMBERS
    for name in MEMBERS:
        lab.remove(name)


@pytest.fixture
def group(vmkeep, pair: list[str], tmp_path: Path, lab: Lab, hv: Hypervisor) -> str:
    """Group 'app' of the two guests (start order gp1, gp2) in a fresh catalog, each running
    with its agent answering, and datastore 'ds'."""
    return make_group(vmkeep, lab, hv, pair, tmp_path / "ds")


def wait_for(cond, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.3)


def test_vm_import_all_imports_every_lab_domain_once(
    vmkeep, pair: list[str], lab: Lab, hv: Hypervisor
) -> None:
    """`vmkeep vm import --all`: every domain of the host lands in the catalog; a second run
    reports the ones already there (same ids) and adds none."""
    guests_up(lab, hv, pair)
    vmkeep("vm", "import", pair[0])  # one is already imported before --all
    before = vmkeep("vm", "list", "--json").json()
    assert [v["name"] for v in before] == [pair[0]]
    first = vmkeep("vm", "import", "--all", "--json").json()
    ours = {r["name"]: r for r in first if r["name"].startswith(PREFIX)}
    assert set(lab.existing()) <= set(ours) and set(pair) <= set(ours), (lab.existing(), first)
    assert ours[pair[0]]["id"] == before[0]["id"] and ours[pair[0]]["new"] is False
    assert ours[pair[1]]["new"] is True
    assert all(ours[n]["lcm_state"] == "RUNNING" for n in pair)
    again = vmkeep("vm", "import", "--all")
    for name in pair:
        assert f"already imported {name} (id {ours[name]['id']}, RUNNING)" in again.out, again.out
    listed = [v["name"] for v in vmkeep("vm", "list", "--json").json()]
    for name in pair:
        assert listed.count(name) == 1, listed


def slow_freezes(lab: Lab, hv: Hypervisor, vms: list[str]) -> None:
    """Each guest's agent runs again with an fsfreeze hook that, while SLOW exists, takes
    HOOK_SECONDS before each freeze (as a database flushing its buffers would)."""
    for vm in vms:
        lab.sh(vm, f"printf '#!/bin/sh\\necho $1 >> {HOOK}.log\\n[ \"$1\" = freeze ] && "
                   f"[ -e {SLOW} ] && sleep {HOOK_SECONDS}\\nexit 0\\n' > {HOOK} && "
                   f"chmod 755 {HOOK} && touch {SLOW} && rm -f {HOOK}.log")  # fmt: skip
        pid = lab.sh(vm, "cat /run/qemu-ga.pid").strip()
        argv = lab.sh(vm, f"tr '\\0' ' ' < /proc/{pid}/cmdline").strip()
        if f"--fsfreeze-hook={HOOK}" in argv:
            continue
        # the old agent goes, and for 3 s none answers (so the host sees it gone, never asking
        # the old one anything it could die in the middle of), then the new one starts
        restart = (
            f"sleep 0.5; kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; "
            f"rm -f /run/qemu-ga.pid; sleep 3; {argv} --fsfreeze-hook={HOOK}"
        )
        lab.sh(vm, f"setsid sh -c {shlex.quote(restart)} </dev/null >/dev/null 2>&1 &")
        wait_for(lambda v=vm: not hv.guest_ping(v, 1), f"{vm}'s old agent gone", 30)
        wait_for(lambda v=vm: hv.guest_ping(v, 2), f"{vm}'s agent with the freeze hook", 60)
        assert lab.sh(vm, "cat /run/qemu-ga.pid").strip() != pid


def test_group_backup_parallel_freeze_freezes_both_at_once_and_thaws_them(
    vmkeep, group: str, pair: list[str], lab: Lab, hv: Hypervisor, tmp_path: Path
) -> None:
    """`vmkeep group backup app --datastore ds --parallel-freeze`: each guest's freeze takes
    HOOK_SECONDS in the guest, yet the second one began before the first was done (in group
    order it could only begin after); every member was frozen when the first thaw came; the
    agents say thawed afterwards; the cut's bytes come back."""
    marks = {vm: lab.write_random(vm, "/mnt/vda/mark", 1) for vm in pair}
    slow_freezes(lab, hv, pair)
    try:
        t0 = time.monotonic()
        gb = vmkeep("group", "backup", group, "--datastore", "ds", "--parallel-freeze",
                    "--json").json()  # fmt: skip
        took = time.monotonic() - t0
    finally:
        for vm in pair:
            lab.sh(vm, f"rm -f {SLOW}")
    assert gb["status"] == "VALID" and gb["parallel_freeze"] is True, gb
    m = {x["vm"]: x for x in gb["members"]}
    assert [m[vm]["consistency"] for vm in pair] == ["AGENT_FROZEN"] * 2
    hook_ms = HOOK_SECONDS * 1000
    # each freeze held at least the hook's time; both began before either could be done
    assert all(m[vm]["freeze_ms"] >= hook_ms for vm in pair), m
    assert max(x["frozen_at_ms"] for x in m.values()) < hook_ms, m
    # at the first thaw every member was frozen: one moment they all share
    assert max(x["frozen_at_ms"] for x in m.values()) < min(x["thawed_at_ms"] for x in m.values())
    # the window: from the first freeze (time 0) to the last thaw
    assert gb["freeze_window_ms"] == pytest.approx(max(x["thawed_at_ms"] for x in m.values()))
    assert gb["freeze_window_ms"] >= hook_ms and took > HOOK_SECONDS, gb
    # nothing is left frozen: the agents' own word (and each ran its hook: frozen, thawed)
    for vm in pair:
        assert lab.sh(vm, f"cat {HOOK}.log").split() == ["freeze", "thaw"]
        assert hv.fs_freeze_status(vm, 10) == "thawed"
        assert vmkeep("vm", "show", vm, "--json").json()["lcm_state"] == "RUNNING"
    shown = vmkeep("group", "show", group, "--json").json()["backups"]
    assert [(b["id"], b["parallel_freeze"]) for b in shown] == [(gb["id"], True)]
    # the cut holds the bytes written before it
    for vm in pair:
        got = vmkeep("files", "get", str(m[vm]["backup"]), "/mark", "--to", str(tmp_path / vm))
        assert got.code == 0
        data = (tmp_path / vm / "mark").read_bytes()
        assert hashlib.sha256(data).hexdigest() == marks[vm]


def _qemu_start_ticks(name: str) -> int:
    """Start time (clock ticks since boot) of the domain's QEMU process."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def guest_uptime(lab: Lab, vm: str) -> float:
    return float(lab.sh(vm, "cut -d' ' -f1 /proc/uptime"))


def test_group_restore_start_starts_members_in_start_order_with_their_bytes(
    vmkeep, group: str, pair: list[str], lab: Lab, hv: Hypervisor
) -> None:
    """`vmkeep group restore ID --suffix -r --start`: every member restored as a new VM and
    started in the group's start order, each up before the next; each runs with its bytes."""
    marks = {vm: lab.write_random(vm, "/mnt/vda/mark", 1) for vm in pair}
    gb = vmkeep("group", "backup", group, "--datastore", "ds", "--json").json()
    assert gb["status"] == "VALID", gb
    new = [f"{vm}-r" for vm in pair]
    try:
        restored = vmkeep("group", "restore", str(gb["id"]), "--suffix", "-r", "--start",
                          "--json").json()  # fmt: skip
        assert [r["vm"] for r in restored["members"]] == new and restored["started"] is True
        assert all(hv.domain(vm).state == "ACTIVE" for vm in new)
        boot = [_qemu_start_ticks(vm) for vm in new]
        assert boot[0] < boot[1], boot  # in start order
        # the second guest booted only once the first one's agent was up: the first guest's
        # uptime leads the second's by at least how long its agent took to start (1 s of
        # slack for the firmware's time before each kernel)
        lead = guest_uptime(lab, new[0]) - guest_uptime(lab, new[1])
        agent_up = int(lab.sh(new[0], "cut -d' ' -f22 /proc/$(cat /run/qemu-ga.pid)/stat")) / 100
        assert lead > agent_up - 1 and agent_up > 1, (lead, agent_up)
        for old, vm in zip(pair, new, strict=True):
            assert hv.guest_ping(vm, 5)
            assert vmkeep("vm", "show", vm, "--json").json()["lcm_state"] == "RUNNING"
            assert lab.sha256(vm, "/mnt/vda/mark") == marks[old]
    finally:
        for vm in new:
            lab.remove(vm)


def test_group_stop_force_powers_off_a_member_that_ignores_its_shutdown(
    vmkeep, group: str, pair: list[str], lab: Lab, hv: Hypervisor
) -> None:
    """`vmkeep group stop app [--force]`: gp2's agent is gone and the guest ignores ACPI's
    power button. Without --force the stop fails on it (first in the stop order) and leaves
    gp1 running; with --force gp2 is destroyed after the timeout and gp1 shut down after it."""
    first, ignores = pair
    lab.sh(ignores, "setsid sh -c 'sleep 0.5; kill $(cat /run/qemu-ga.pid)' </dev/null "
                    ">/dev/null 2>&1 &")  # fmt: skip
    wait_for(lambda: not hv.guest_ping(ignores, 1), f"{ignores}'s agent gone", 30)
    failed = vmkeep("group", "stop", group, "--timeout", "3", check=10)
    assert ignores in failed.err and "--force" in failed.err, failed
    assert hv.domain(ignores).state == "ACTIVE" and hv.domain(first).state == "ACTIVE"
    assert vmkeep("vm", "show", first, "--json").json()["lcm_state"] == "RUNNING"

    stopped = vmkeep("group", "stop", group, "--timeout", "8", "--force", "--json").json()
    assert stopped == [
        {"vm": ignores, "action": "destroyed after timeout"},
        {"vm": first, "action": "shut down"},
    ], stopped
    for vm in pair:
        assert hv.domain(vm).state == "POWEROFF"
        assert vmkeep("vm", "show", vm, "--json").json()["lcm_state"] == "POWEROFF"
    again = vmkeep("group", "stop", group, "--json").json()
    assert [r["action"] for r in again] == ["already off", "already off"]
