"""Group drills: prove that a group restore point (one consistent cut of every member) comes back
as a whole, without touching it or production.

``vmkeep group drill ID [--probe MEMBER=CMD]... [--cross-probe MEMBER=CMD]``:

1. for each member, in start order, the single-VM drill's steps on its point
   (``engine/restore/drill.py``): every file checked against its checksum, a throw-away overlay
   per disk, each file system checked on it;
2. an isolated libvirt network is created for this drill alone: a bridge with no ``<forward>``
   and no ``<ip>`` (no route to the host's networks, no host address, no DHCP);
3. each member is defined as a drill VM on its overlays, its NICs moved onto that network with
   their MAC addresses kept (the guest's own network set-up works as in production: the drill is
   a copy of production, isolated);
4. the members boot in start order, each guest agent answering before the next starts;
5. each member's probe (``--probe MEMBER=CMD``) runs in that guest and must exit 0;
6. the cross-member probe (``--cross-probe MEMBER=CMD``) runs in that member and must exit 0:
   it proves the cut works as a whole (the app member reaches the db member's port).

The first failed step ends the drill with FAIL, naming the member and the step; every step's
evidence is stored in ``group_drills``. The drill VMs, their overlays and the network are
removed in every case. A drill killed midway leaves them marked (the domain's
``<description>``, the network's ``<metadata>``, with the drill's process id): the next group
drill removes every marked leftover whose process is gone (``clear_leftovers``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from vmkeep.catalog.locks import holder, lock, pid_alive
from vmkeep.catalog.tables import GroupBackup, GroupDrill, Increment
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import check_stored_xml
from vmkeep.engine.restore.drill import (
    BOOT_TIMEOUT,
    Check,
    StepFailed,
    boot_check,
    clear_work,
    point_files,
    probe_check,
    remove_vm,
    stage,
)
from vmkeep.errors import GroupBackupNotFound, GroupDrillFailed, InvalidValue, VmkeepError
from vmkeep.hypervisor.domain_xml import (
    description,
    isolated_network_xml,
    network_isolation,
    network_mark,
    new_domain_xml,
    on_network,
    with_description,
)
from vmkeep.model import BackupStatus, Warnings

MARK = "vmkeep group drill"  # in the drill VMs' <description> and the network's <metadata>
_OWNER = re.compile(r"\(pid (\d+) on (\S+)\)")


@dataclass
class Step:
    """One step's evidence; ``member`` is None for the network and names the prober for the
    cross-member probe."""

    member: str | None
    step: str
    ok: bool
    detail: str


def drill_vm_name(vm: str, gb_id: int) -> str:
    return f"{vm}-gdrill-{gb_id}"


def network_name(gb_id: int) -> str:
    return f"vmkeep-gdrill-{gb_id}"


def mark_text(gb_id: int) -> str:
    """The mark of this process's drill of group backup ``gb_id``."""
    return f"{MARK} of group backup {gb_id} (pid {os.getpid()} on {socket.gethostname()})"


def is_orphan(mark: str, gb_id: int | None) -> bool:
    """A marked domain or network whose drill no longer runs: one of ``gb_id`` (whose lock this
    process holds), or one whose process on this host is gone."""
    if not mark.startswith(MARK):
        return False
    if gb_id is not None and mark.startswith(f"{MARK} of group backup {gb_id} "):
        return True
    owner = _OWNER.search(mark)
    return owner is not None and owner[2] == socket.gethostname() and not pid_alive(int(owner[1]))


def clear_leftovers(ctx: Context, gb_id: int | None = None) -> list[str]:
    """Remove the drill VMs, networks and work folders left by killed group drills (never another
    domain or network: only those with the mark, and only when their drill is gone; a folder
    only when no live process holds its drill's lock). Returns what it removed."""
    removed = []
    for d in ctx.hv.list_domains():
        with contextlib.suppress(VmkeepError):
            if is_orphan(description(ctx.hv.domain_xml(d.name)), gb_id):
                remove_vm(ctx, d.name)
                removed.append(d.name)
    for name, xml in ctx.hv.networks().items():
        if is_orphan(network_mark(xml) or "", gb_id):
            ctx.hv.network_destroy(name)
            removed.append(name)
    for folder in sorted((ctx.config.data_dir / "drills").glob("group-*")):
        owner = folder.name.removeprefix("group-")
        if owner.isdigit() and (int(owner) == gb_id or not _running(ctx, int(owner))):
            clear_work(folder)  # with a killed check's exports and loop devices
            removed.append(str(folder))
    return removed


def _running(ctx: Context, gb_id: int) -> bool:
    """A drill of ``gb_id`` runs: a live process (or one on another host) holds its lock."""
    h = holder(ctx.catalog, f"group-drill:{gb_id}")
    return h is not None and (h.host != socket.gethostname() or pid_alive(h.pid, h.pid_start))


def _members(ctx: Context, gb_id: int) -> tuple[str, list[tuple[str, int, int]]]:
    """The group's name and its members as (vm, backup, increment), in start order."""
    with ctx.catalog.session() as s:
        gb, members = restorable(s, gb_id)
        return gb.group.name, members


def restorable(s: Session, gb_id: int) -> tuple[GroupBackup, list[tuple[str, int, int]]]:
    """A VALID and complete group restore point and its members as (vm, backup, increment),
    in start order: what a group restore and a group drill take."""
    gb = s.get(GroupBackup, gb_id)
    if gb is None:
        raise GroupBackupNotFound(gb_id)
    if gb.status != BackupStatus.VALID:
        raise InvalidValue(
            "group backup",
            gb_id,
            f"it is {gb.status} ({gb.error or 'not finished'}); pick a VALID one "
            "from 'vmkeep group backups'",
        )
    check_complete(gb)
    members = []
    for m in sorted(gb.members, key=lambda m: m.position):
        assert m.backup_id is not None and m.seq is not None  # check_complete
        members.append((m.vm_name, m.backup_id, m.seq))
    return gb, members


def missing_members(gb: GroupBackup) -> dict[str, str]:
    """Members of a group restore point whose point is gone (retention or a delete removed
    it) or DAMAGED (a verify found it so), with which: the other members' points stay
    restorable one by one."""
    s = object_session(gb)
    assert s is not None
    status: dict[tuple[int | None, int | None], str] = {
        (b, q): st
        for b, q, st in s.execute(
            select(Increment.backup_id, Increment.seq, Increment.status).where(
                Increment.backup_id.in_([m.backup_id for m in gb.members])
            )
        )
    }
    out = {}
    for m in gb.members:
        st = status.get((m.backup_id, m.seq))
        if st != BackupStatus.VALID:
            out[m.vm_name] = "removed" if st is None else st
    return out


def check_complete(gb: GroupBackup) -> None:
    """A group restore point whose members all still have a VALID point."""
    missing = missing_members(gb)
    if missing:
        which = ", ".join(f"{vm} ({why})" for vm, why in missing.items())
        raise InvalidValue(
            "group backup",
            gb.id,
            f"the points of member(s) {which} are gone (retention or backups delete) or "
            "damaged; pick a complete one from 'vmkeep group backups', or restore the other "
            "members' points one by one",
        )


def check_members(
    members: list[str], probes: dict[str, str], cross_probe: tuple[str, str] | None
) -> None:
    """Every probe names a member of the group backup."""
    named = [*probes, *([cross_probe[0]] if cross_probe else [])]
    unknown = [m for m in named if m not in members]
    if unknown:
        raise InvalidValue(
            "member", ", ".join(unknown), f"the group backup's members are {', '.join(members)}"
        )


def check_request(
    ctx: Context, gb_id: int, probes: dict[str, str], cross_probe: tuple[str, str] | None
) -> None:
    """What can be refused before a drill is queued: an unknown or unfinished group backup, a
    probe for a VM that is not one of its members."""
    _group, members = _members(ctx, gb_id)
    check_members([m[0] for m in members], probes, cross_probe)


def _host_addresses(bridge: str) -> str:
    proc = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", bridge], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return f"(ip addr show dev {bridge} failed: {proc.stderr.strip()})"
    return proc.stdout.strip()


def _network(ctx: Context, gb_id: int) -> tuple[str, Step]:
    """Create the drill's isolated network and prove it is isolated."""
    name = ctx.hv.network_create(isolated_network_xml(network_name(gb_id), mark_text(gb_id)))
    reaches = network_isolation(ctx.hv.networks().get(name, "<network/>"))
    bridge = ctx.hv.network_bridge(name)
    addresses = _host_addresses(bridge)
    if reaches or addresses:
        detail = f"network {name} on {bridge} is not isolated: {reaches} {addresses}".strip()
        return name, Step(None, "network", False, detail)
    detail = f"{name} on bridge {bridge}: no <forward>, no <ip>, no host address on the bridge"
    return name, Step(None, "network", True, detail)


def group_drill(
    ctx: Context,
    gb_id: int,
    probes: dict[str, str] | None = None,
    cross_probe: tuple[str, str] | None = None,
    timeout: float = BOOT_TIMEOUT,
) -> tuple[dict[str, Any], Warnings]:
    """Drill group backup ``gb_id`` (module doc); ``timeout``: seconds each member's guest agent
    has to answer after its start."""
    probes = probes or {}
    group, members = _members(ctx, gb_id)
    check_members([m[0] for m in members], probes, cross_probe)
    with lock(ctx.catalog, f"group-drill:{gb_id}", "group drill", label=f"group backup {gb_id}"):
        clear_leftovers(ctx, gb_id)
        started = datetime.now(UTC)
        steps: list[Step] = []
        _drill(ctx, gb_id, members, probes, cross_probe, timeout, steps)
        failed = next((c for c in steps if not c.ok), None)
        reason = None
        if failed is not None:
            who = f"{failed.member}: " if failed.member else ""
            reason = f"{who}{failed.step}: {failed.detail}"
        row = GroupDrill(
            group_backup_id=gb_id,
            result="FAIL" if failed else "PASS",
            reason=reason,
            checks=[asdict(c) for c in steps],
            started_at=started,
            finished_at=datetime.now(UTC),
        )
        with ctx.catalog.session() as s:
            s.add(row)
            s.flush()
            out = group_drill_dict(row)
    return {"group": group, "members": [m[0] for m in members], **out}, Warnings()


def _drill(
    ctx: Context,
    gb_id: int,
    members: list[tuple[str, int, int]],
    probes: dict[str, str],
    cross_probe: tuple[str, str] | None,
    timeout: float,
    steps: list[Step],
) -> None:
    """The steps, each appended to ``steps``; stops at the first failure. Removes everything it
    made, in every case."""
    root = ctx.config.data_dir / "drills" / f"group-{gb_id}"
    names = {vm: drill_vm_name(vm, gb_id) for vm, _b, _s in members}
    network: str | None = None
    clear_work(root)
    try:
        staged = {}
        for vm, backup_id, seq in members:  # 1. checksums, overlays, file systems
            work = root / vm
            work.mkdir(parents=True)
            checks: list[Check] = []
            try:
                staged[vm] = stage(ctx, point_files(ctx, backup_id, seq), work, checks)
            finally:
                steps.extend(Step(vm, c.step, c.ok, c.detail) for c in checks)
        network, step = _network(ctx, gb_id)  # 2. the isolated network
        steps.append(step)
        if not step.ok:
            raise StepFailed
        for vm, backup_id, _seq in members:  # 3. the drill VMs on it
            steps.append(_define(ctx, gb_id, vm, backup_id, names[vm], staged[vm], network))
        for vm, _b, _s in members:  # 4. boot in start order, each up before the next
            boot = boot_check(ctx, names[vm], timeout)
            steps.append(Step(vm, boot.step, boot.ok, boot.detail))
            if not boot.ok:
                raise StepFailed
        for vm in (m[0] for m in members if m[0] in probes):  # 5. members' probes, in order
            c = probe_check(ctx, names[vm], probes[vm])
            steps.append(Step(vm, c.step, c.ok, c.detail))
            if not c.ok:
                raise StepFailed
        if cross_probe is not None:  # 6. the cut as a whole
            vm, command = cross_probe
            c = probe_check(ctx, names[vm], command)
            steps.append(Step(vm, "cross-probe", c.ok, c.detail))
    except StepFailed:
        pass
    finally:
        for vm, _b, _s in reversed(members):
            remove_vm(ctx, names[vm])
        if network is not None:
            ctx.hv.network_destroy(network)
        clear_work(root)


def _define(
    ctx: Context,
    gb_id: int,
    vm: str,
    backup_id: int,
    name: str,
    staged: tuple[str, dict[str, Any]],
    network: str,
) -> Step:
    stored, overlays = staged
    work = ctx.config.data_dir / "drills" / f"group-{gb_id}" / vm
    xml, _left_out = new_domain_xml(stored, name, overlays, work, no_nic=False, no_ip=False)
    xml, macs = on_network(xml, network)
    xml = with_description(xml, f"{mark_text(gb_id)}; removed when the drill ends")
    check_stored_xml(
        ctx.config, xml, f"group drill of backup {backup_id}", [*overlays.values(), work]
    )
    ctx.hv.define(xml)
    nics = ", ".join(m or "(MAC chosen by libvirt)" for m in macs) or "none"
    return Step(vm, "define", True, f"{name} on {network}, NICs (MAC kept): {nics}")


def check_passed(result: dict[str, Any]) -> None:
    """A FAIL verdict as an error (exit 26, a FAILED job), for every adapter."""
    if result["result"] != "PASS":
        raise GroupDrillFailed(result["group_drill"], result["group_backup"], result["reason"])


def group_drill_dict(d: GroupDrill) -> dict[str, Any]:
    return {
        "group_drill": d.id,
        "group_backup": d.group_backup_id,
        "result": d.result,
        "reason": d.reason,
        "checks": d.checks,
        "started": d.started_at,
        "finished": d.finished_at,
    }


def last_drills(ctx: Context, gb_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The newest group drill of each of these group backups."""
    if not gb_ids:
        return {}
    with ctx.catalog.session() as s:
        rows = s.execute(
            select(GroupDrill).where(GroupDrill.group_backup_id.in_(gb_ids)).order_by(GroupDrill.id)
        ).scalars()
        return {d.group_backup_id: group_drill_dict(d) for d in rows}
