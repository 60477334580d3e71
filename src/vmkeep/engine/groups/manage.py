"""Groups of VMs: ordered membership, ordered start/stop (stoney SequenceStart/SequenceStop) and
restore of a whole group restore point. The group backup itself is in ``group_backup.py``.

A member's ``position`` is the freeze order and the start order. The stop order is
``stop_position`` when the group was given one, else the reverse of the start order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Group, GroupBackup, GroupBackupMember, GroupDrill, GroupMember
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import backup_jobs_using
from vmkeep.engine.groups.drill import last_drills, missing_members, restorable
from vmkeep.engine.hosts import placement
from vmkeep.engine.restore import redeploy
from vmkeep.engine.restore.point import RestoreOptions, restore
from vmkeep.engine.vm.inventory import vm_action
from vmkeep.engine.vm.record import find_vm, sync_state
from vmkeep.errors import (
    AlreadyExists,
    DomainNotFound,
    GroupBackupNotFound,
    GroupNotFound,
    HypervisorError,
    InvalidValue,
    Refused,
    VmkeepError,
)
from vmkeep.model import LcmState, VmState, Warnings
from vmkeep.names import check_name, is_id

log = logging.getLogger(__name__)


def find_group(s: Session, ref: str) -> Group:
    query = (
        select(Group).where(Group.id == int(ref))
        if is_id(ref)
        else select(Group).where(Group.name == ref)
    )
    g = s.execute(query).scalar_one_or_none()
    if g is None:
        raise GroupNotFound(ref)
    return g


def _check_name(name: str) -> None:
    check_name("group name", name)


def _stop_order(g: Group) -> list[GroupMember]:
    if all(m.stop_position is not None for m in g.members) and g.members:
        return sorted(g.members, key=lambda m: m.stop_position or 0)
    return list(reversed(g.members))


def group_dict(g: Group, s: Session | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": g.id,
        "name": g.name,
        "members": [m.vm.name for m in g.members],
        "start_order": [m.vm.name for m in g.members],
        "stop_order": [m.vm.name for m in _stop_order(g)],
        "created": g.created_at,
    }
    if s is not None:
        last = (
            s.execute(
                select(GroupBackup)
                .where(GroupBackup.group_id == g.id)
                .order_by(GroupBackup.id.desc())
            )
            .scalars()
            .first()
        )
        out["last_backup"] = group_backup_dict(last) if last else None
    return out


def _set_members(s: Session, g: Group, vm_refs: list[str], stop_order: list[str] | None) -> None:
    vms = [find_vm(s, r) for r in vm_refs]
    dupes = {v.name for v in vms if sum(w.id == v.id for w in vms) > 1}
    if dupes:
        raise InvalidValue("members", ", ".join(sorted(dupes)), "a VM can be in a group only once")
    stop_pos: dict[int, int] = {}
    if stop_order:
        stop_vms = [find_vm(s, r) for r in stop_order]
        if sorted(v.id for v in stop_vms) != sorted(v.id for v in vms):
            raise InvalidValue(
                "--stop-order",
                ",".join(stop_order),
                "it must name every member exactly once",
            )
        stop_pos = {v.id: i for i, v in enumerate(stop_vms)}
    g.members.clear()
    s.flush()
    for i, v in enumerate(vms):
        g.members.append(GroupMember(vm_id=v.id, position=i, stop_position=stop_pos.get(v.id)))
    s.flush()
    for m in g.members:
        s.refresh(m)


def create_group(
    ctx: Context, name: str, vm_refs: list[str], stop_order: list[str] | None = None
) -> dict[str, Any]:
    _check_name(name)
    if not vm_refs:
        raise InvalidValue("members", "", "name at least one VM (in freeze/start order)")
    try:
        with ctx.catalog.session() as s:
            if s.execute(select(Group).where(Group.name == name)).scalar_one_or_none():
                raise AlreadyExists(f"group '{name}'")
            g = Group(name=name)
            s.add(g)
            s.flush()
            _set_members(s, g, vm_refs, stop_order)
            return group_dict(g)
    except IntegrityError as err:
        raise AlreadyExists(f"group '{name}'") from err


def list_groups(
    ctx: Context, limit: int | None = None, after: int | None = None
) -> list[dict[str, Any]]:
    """The groups in id order (``limit`` of them, those after id ``after``: a page)."""
    with ctx.catalog.session() as s:
        q = select(Group).order_by(Group.id).limit(limit)
        if after is not None:
            q = q.where(Group.id > after)
        groups = s.execute(q).scalars().all()
        return [group_dict(g, s) for g in groups]


def show_group(ctx: Context, ref: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        g = find_group(s, ref)
        out = group_dict(g, s)
        out["backups"] = [
            group_backup_dict(b)
            for b in s.execute(
                select(GroupBackup).where(GroupBackup.group_id == g.id).order_by(GroupBackup.id)
            ).scalars()
        ]
    out["backups"] = _with_drills(ctx, out["backups"])
    return out


def add_members(
    ctx: Context, ref: str, vm_refs: list[str], position: int | None = None
) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        g = find_group(s, ref)
        names = [m.vm.name for m in g.members]
        new = [find_vm(s, r).name for r in vm_refs]
        clash = [n for n in new if n in names]
        if clash:
            raise AlreadyExists(f"VM {', '.join(clash)} in group '{g.name}'")
        at = len(names) if position is None else max(0, min(position, len(names)))
        _set_members(s, g, names[:at] + new + names[at:], None)
        return group_dict(g)


def remove_members(ctx: Context, ref: str, vm_refs: list[str]) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        g = find_group(s, ref)
        names = [m.vm.name for m in g.members]
        gone = [find_vm(s, r).name for r in vm_refs]
        missing = [n for n in gone if n not in names]
        if missing:
            raise InvalidValue(
                "VM", ", ".join(missing), f"not a member of group '{g.name}' ({', '.join(names)})"
            )
        _set_members(s, g, [n for n in names if n not in gone], None)
        return group_dict(g)


def delete_group(ctx: Context, ref: str) -> dict[str, Any]:
    """Remove the group; its members' backups stay (they are ordinary per-VM chains)."""
    with ctx.catalog.session() as s:
        g = find_group(s, ref)
        if users := backup_jobs_using(s, group=g.name):
            raise Refused(
                f"deleting group {g.name}",
                f"backup jobs {', '.join(users)} back it up",
                "Delete them first with 'vmkeep backupjob delete NAME', or point them at "
                "other VMs with 'vmkeep backupjob edit NAME --vm VM'.",
            )
        out = {"id": g.id, "name": g.name, "deleted": True}
        for b in s.execute(select(GroupBackup).where(GroupBackup.group_id == g.id)).scalars():
            s.execute(delete(GroupDrill).where(GroupDrill.group_backup_id == b.id))
            s.delete(b)
        s.delete(g)
        return out


# --- group backups (records) ----------------------------------------------------------------------
def group_backup_dict(b: GroupBackup) -> dict[str, Any]:
    return {
        "id": b.id,
        "group": b.group.name,
        "datastore": b.datastore.name,
        "status": b.status,
        "parallel_freeze": b.parallel_freeze,
        "freeze_window_ms": b.freeze_window_ms,
        "failed_vm": b.failed_vm,
        "error": b.error,
        "created": b.created_at,
        "finished": b.finished_at,
        "members": [member_dict(m) for m in b.members],
        # every member still has its point (retention or a delete may have removed one)
        "complete": not missing_members(b),
    }


def member_dict(m: GroupBackupMember) -> dict[str, Any]:
    return {
        "vm": m.vm_name,
        "position": m.position,
        "backup": m.backup_id,
        "increment": m.seq,
        "status": m.status,
        "consistency": m.consistency,
        "frozen_at_ms": m.frozen_at_ms,
        "thawed_at_ms": m.thawed_at_ms,
        "freeze_ms": m.freeze_ms,
        "error": m.error,
    }


def list_group_backups(ctx: Context, group_ref: str | None = None) -> list[dict[str, Any]]:
    """Group backups, each with its last group drill (``last_drill``, None: never drilled)."""
    with ctx.catalog.session() as s:
        q = select(GroupBackup).order_by(GroupBackup.id)
        if group_ref is not None:
            q = q.where(GroupBackup.group_id == find_group(s, group_ref).id)
        rows = [group_backup_dict(b) for b in s.execute(q).scalars()]
    return _with_drills(ctx, rows)


def _with_drills(ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drills = last_drills(ctx, [r["id"] for r in rows])
    return [r | {"last_drill": drills.get(r["id"])} for r in rows]


def show_group_backup(ctx: Context, gb_id: int) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        b = s.get(GroupBackup, gb_id)
        if b is None:
            raise GroupBackupNotFound(gb_id)
        row = group_backup_dict(b)
    return _with_drills(ctx, [row])[0]


# --- restore ---------------------------------------------------------------------------------------
def restore_group(
    ctx: Context, gb_id: int, suffix: str | None = None, *, start: bool = False
) -> tuple[dict[str, Any], Warnings]:
    """Restore every member of a VALID group restore point as a new domain named VM+suffix."""
    warnings = Warnings()
    suffix = f"-g{gb_id}" if suffix is None else suffix
    with ctx.catalog.session() as s:
        _gb, members = restorable(s, gb_id)
    if not suffix:
        raise InvalidValue(
            "--suffix", suffix, "restored VMs need names that differ from the originals"
        )
    for name, _, _ in members:
        try:
            ctx.hv.domain(name + suffix)
        except DomainNotFound:
            continue
        raise AlreadyExists(f"libvirt domain '{name + suffix}' (choose another --suffix)")
    restored = []
    for name, backup_id, seq in members:
        res, w = restore(
            ctx, backup_id, RestoreOptions(increment=seq, name=name + suffix, start=False)
        )
        warnings.extend(w)
        restored.append(res | {"from": name})
    if start:  # in the group's start order, each up before the next (as ``group start``)
        later = "they are restored and off: start them with 'vmkeep vm resume VM'"
        _start_in_order(ctx, [r["vm"] for r in restored], True, 120.0, later)
    return {
        "group_backup": gb_id,
        "suffix": suffix,
        "members": restored,
        "started": start,
    }, warnings


# --- ordered start / stop -------------------------------------------------------------------------
def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.25)
    return cond()


def start_group(
    ctx: Context, ref: str, *, wait_agent: bool = True, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Start members in start order; each must be up (agent answering, when it has one) before
    the next one starts."""
    with ctx.catalog.session() as s:
        order = [str(m.vm_id) for m in find_group(s, ref).members]
    later = "--no-wait-agent starts them without waiting"
    return _start_in_order(ctx, order, wait_agent, timeout, later)


def _start_in_order(
    ctx: Context, refs: list[str], wait_agent: bool, timeout: float, later: str
) -> list[dict[str, Any]]:
    """Start the VMs ``refs`` one by one, each up (agent answering, when it has one) before the
    next; the first that does not come up stops the rest (``later``: what to do about them)."""
    out = []
    for ref in refs:
        with vm_action(ctx, ref, "start") as vm:
            name = vm.name
            if vm.lcm_state == LcmState.RUNNING:
                out.append({"vm": name, "action": "already running"})
                continue
            ctx.hv.start(name)

            def up(n: str = name) -> bool:
                return ctx.hv.guest_ping(n, 2.0)

            if wait_agent and ctx.hv.domain(name).has_agent_channel and not _wait(up, timeout):
                sync_state(ctx, vm.id, name)
                raise HypervisorError(
                    f"VM {name} started but its guest agent did not answer within "
                    f"{timeout:.0f} s; later members were not started ({later})"
                )
            sync_state(ctx, vm.id, name)
            out.append({"vm": name, "action": "started"})
    return out


def stop_group(
    ctx: Context, ref: str, *, force: bool = False, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Shut members down in stop order; each must be off before the next one is asked.
    ``force``: destroy a member that does not power off within ``timeout``."""
    with ctx.catalog.session() as s:
        order = [(m.vm_id, m.vm.name) for m in _stop_order(find_group(s, ref))]
    out = []
    for vm_id, name in order:
        with vm_action(ctx, str(vm_id), "group stop") as vm:
            if vm.lcm_state == LcmState.POWEROFF:
                out.append({"vm": name, "action": "already off"})
                continue

            def off(n: str = name) -> bool:
                return ctx.hv.domain(n).state == VmState.POWEROFF

            ctx.hv.resume(name)
            ctx.hv.shutdown(name)
            action = "shut down"
            if not _wait(off, timeout):
                if not force:
                    sync_state(ctx, vm.id, name)
                    raise HypervisorError(
                        f"VM {name} did not power off within {timeout:.0f} s; later members "
                        "were not stopped (--force destroys it after the timeout)"
                    )
                ctx.hv.destroy(name)
                action = "destroyed after timeout"
            sync_state(ctx, vm.id, name)
            out.append({"vm": name, "action": action})
    return out


def recover_group(
    ctx: Context,
    ref: str,
    host: str | None = None,
    from_backup: bool = False,
    *,
    origin: str = "cli",
    who: str = "",
) -> tuple[dict[str, Any], Warnings]:
    """``group recover GROUP --redeploy``: every member on a failed host redeployed on ``host``
    (``recover_host``'s choice when None), in the group's start order. A member that needs no
    redeploy (its host works, it is not on a host, it still runs there) is skipped with the
    reason; a member whose redeploy is refused (nothing to bring it up from) or fails stops the
    recovery (later members may need it), naming those done."""
    with ctx.catalog.session() as s:
        g = find_group(s, ref)
        name, order = g.name, [m.vm.name for m in g.members]
    dest = host if host is not None else recover_host(ctx, name, from_backup)
    warnings = Warnings()
    out: list[dict[str, Any]] = []
    for vm in order:
        try:
            redeploy.check(ctx, vm, dest, from_backup)
        except Refused as err:
            if redeploy.is_not_needed(err):
                out.append({"vm": vm, "action": "skipped", "why": str(err)})
                continue
            # on a failed host and cannot be redeployed: later members wait (raised again by
            # redeploy below, naming those done)
        try:
            result, w = redeploy.redeploy(ctx, vm, dest, from_backup, origin=origin, who=who)
        except VmkeepError as err:
            done = [r["vm"] for r in out if r["action"] == "redeployed"]
            raise Refused(
                f"recover of group {name}",
                f"the redeploy of member {vm} failed ({err}); redeployed before it: "
                + (", ".join(done) or "none"),
                "Fix the cause and run it again: members already on a working host are skipped.",
            ) from err
        warnings.extend(w)
        out.append({"vm": vm, "action": "redeployed", "host": result["host"],
                    "from": result.get("from"), "from_host": result["from_host"]})  # fmt: skip
    return {"group": name, "host": dest, "members": out}, warnings


def recover_host(ctx: Context, ref: str, from_backup: bool = False) -> str:
    """The one host a group's members on failed hosts are redeployed on (the job runs on its
    daemon): placed for all of them together (their vCPUs' maximum, their memory's sum), their
    old hosts passed over. Refused when no member needs a redeploy."""
    with ctx.catalog.session() as s:
        g = find_group(s, ref)
        name, members = g.name, [(m.vm.name, m.vm.template, m.vm.host) for m in g.members]
    need = []
    for vm, template, old in members:
        try:
            redeploy.failed_member(ctx, vm, from_backup)
        except Refused as err:
            if redeploy.is_not_needed(err):
                continue
            raise  # nothing to bring it up from: the recovery is refused before anything moves
        need.append((placement.size_of(template), old))
    if not need:
        raise Refused(
            f"recover of group {name}",
            "none of its members is on a failed host",
            "Nothing to redeploy (vmkeep vm list shows each member's host and state).",
        )
    vcpus = max(size[0] for size, _ in need)
    memory = sum(size[1] for size, _ in need)
    return placement.place(ctx, vcpus, memory, exclude={old for _, old in need if old})
