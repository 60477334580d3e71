"""Snapshots of a VM, as its lifecycle actions take them: system snapshots (disks and, of a
running VM, its memory) through the VMM driver, and disk snapshots of a powered-off VM with
qemu-img (internal qcow2 snapshots). Each may have a user's name (``label``), unique per VM;
``revert`` and ``delete`` take that name or the snapshot's id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from vmkeep.catalog.tables import Vm, VmSnapshot
from vmkeep.datastores.base import qemu_img_info
from vmkeep.engine.core.chains import CHECKPOINT_PREFIX, reset_checkpoints
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import qemu_img
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import AlreadyExists, InvalidValue, NotFound
from vmkeep.hypervisor.vmm import Vmm
from vmkeep.model import VmState, Warnings
from vmkeep.names import check_name, is_id


def drop_checkpoints(ctx: Context, vm: Vm, warnings: Warnings, why: str) -> None:
    """Before the disks go back in time: drop the checkpoints and their dirty bitmaps (QEMU
    refuses to load a snapshot while a disk has active bitmaps; libvirt removes them only from a
    running domain, so a stopped one's are removed from the images)."""
    dropped = reset_checkpoints(ctx, vm.id, vm.name)
    info = ctx.hv.domain(vm.name)
    if info.state != VmState.ACTIVE:
        for d in info.disks:
            if d.fmt == "qcow2" and d.path and Path(d.path).is_file():
                for bitmap in _bitmaps(d.path):
                    if bitmap.startswith(CHECKPOINT_PREFIX):
                        qemu_img("bitmap", "--remove", d.path, bitmap)
                        dropped.append(bitmap)
    if dropped:
        warnings.add(f"{why}: the VM's checkpoints were dropped, its next backup is a new full")


def _bitmaps(path: str) -> list[str]:
    info = qemu_img_info(path, check=False).get("format-specific", {}).get("data", {})
    return [str(b["name"]) for b in info.get("bitmaps", [])]


def _next_seq(ctx: Context, vm_id: int) -> int:
    with ctx.catalog.session() as s:
        top = s.execute(select(func.max(VmSnapshot.seq)).where(VmSnapshot.vm_id == vm_id))
        return int(top.scalar() or 0) + 1


MAX_SEQ = 2**31 - 1  # VmSnapshot.seq is a 32-bit integer


def _snapshot(ctx: Context, vm: Vm, ref: Any, kind: str) -> VmSnapshot:
    """The VM's ``kind`` snapshot ``ref``: an all-digit ``ref`` is its id, else its name."""
    text = str(ref)
    if is_id(text):
        which = VmSnapshot.seq == (int(text) if int(text) <= MAX_SEQ else 0)
    else:
        which = VmSnapshot.label == text
    with ctx.catalog.session() as s:
        snap = s.execute(
            select(VmSnapshot).where(VmSnapshot.vm_id == vm.id, which)
        ).scalar_one_or_none()
        if snap is None or snap.kind != kind:
            other = "" if snap is None else f"it is a {snap.kind} snapshot; "
            see = f"see 'vmkeep vm snapshot list {vm.name}'"
            raise NotFound(f"{kind} snapshot {text!r} of VM {vm.name} ({other}{see})")
        s.expunge(snap)
        return snap


def _new_name(ctx: Context, vm: Vm, name: Any, cmd: str) -> str | None:
    """The user's name for a new snapshot (None: unnamed): names.py's rule, unique per VM.
    Checked before the hypervisor takes the snapshot, so a refusal leaves nothing behind."""
    if name is None:
        return None
    check_name("snapshot name", name)
    with ctx.catalog.session() as s:
        taken = s.execute(
            select(VmSnapshot.seq).where(VmSnapshot.vm_id == vm.id, VmSnapshot.label == name)
        ).scalar_one_or_none()
    if taken is not None:
        raise AlreadyExists(
            f"snapshot {name!r} of VM {vm.name} (id {taken}; give another name, or delete it "
            f"first: 'vmkeep vm {cmd} delete {vm.name} {name}')"
        )
    return str(name)


# the actions that name a new snapshot, and the command that deletes one
_NAMING = {"snapshot-create": "snapshot", "disk-snapshot-create": "disk-snapshot"}


def check_new_name(ctx: Context, vm: Vm, action: str, opts: dict[str, Any]) -> None:
    """A new snapshot's name, checked before the action is queued (the action checks it again
    as it runs): a name taken is refused at once, not as a failed job later."""
    if action in _NAMING:
        _new_name(ctx, vm, opts.get("name"), _NAMING[action])


def snapshot_create(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    label = _new_name(ctx, vm, opts.get("name"), "snapshot")
    seq = _next_seq(ctx, vm.id)
    running = ctx.hv.domain(vm.name).state == VmState.ACTIVE
    name = vmm.snapshot_create(vm.name, seq)  # the hypervisor's name: never the user's
    with ctx.catalog.session() as s:
        s.add(VmSnapshot(vm_id=vm.id, seq=seq, name=name, label=label, kind="system",
                         memory=running))  # fmt: skip
    return {"snapshot": seq, "name": label, "hypervisor_name": name, "memory": running}


def snapshot_revert(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    snap = _snapshot(ctx, vm, opts.get("snapshot"), "system")
    drop_checkpoints(ctx, vm, w, f"VM {vm.name} goes back to snapshot {snap.seq}")
    vmm.snapshot_revert(vm.name, snap.name)
    return {"snapshot": snap.seq, "name": snap.label, "memory": snap.memory}


def snapshot_delete(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    snap = _snapshot(ctx, vm, opts.get("snapshot"), "system")
    vmm.snapshot_delete(vm.name, snap.name)
    with ctx.catalog.session() as s:
        s.delete(s.get(VmSnapshot, snap.id))
    return {"snapshot": snap.seq, "name": snap.label, "deleted": True}


def snapshot_list(ctx: Context, ref: str) -> dict[str, Any]:
    """``name``: the user's (None: unnamed); ``hypervisor_name``: libvirt's or qemu-img's."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        rows = s.execute(
            select(VmSnapshot).where(VmSnapshot.vm_id == vm.id).order_by(VmSnapshot.seq)
        ).scalars()
        snaps = [
            {"id": r.seq, "name": r.label, "kind": r.kind, "disk": r.disk, "memory": r.memory,
             "created": r.created_at, "hypervisor_name": r.name}
            for r in rows
        ]  # fmt: skip
        return {"vm": vm.name, "snapshots": snaps}


def _disk_path(ctx: Context, vm: Vm, target: str | None) -> tuple[str, str]:
    disks = [d for d in ctx.hv.domain(vm.name).disks if d.device == "disk" and d.path]
    if not disks:
        raise InvalidValue("--disk", target, f"VM {vm.name} has no file disk")
    chosen = disks[0] if target is None else next((d for d in disks if d.target == target), None)
    if chosen is None:
        have = ", ".join(d.target for d in disks)
        raise InvalidValue("--disk", target, f"VM {vm.name} has disks {have}")
    if chosen.fmt != "qcow2":
        raise InvalidValue("--disk", chosen.target, "disk snapshots need a qcow2 disk")
    return chosen.target, chosen.path


def disk_snapshot_create(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    target, path = _disk_path(ctx, vm, opts.get("disk"))
    label = _new_name(ctx, vm, opts.get("name"), "disk-snapshot")
    seq = _next_seq(ctx, vm.id)
    name = f"disk-snap-{seq}"  # qemu-img's name: never the user's
    qemu_img("snapshot", "-c", name, path)
    with ctx.catalog.session() as s:
        s.add(VmSnapshot(vm_id=vm.id, seq=seq, name=name, label=label, kind="disk", disk=target))
    return {"snapshot": seq, "disk": target, "name": label, "hypervisor_name": name}


def disk_snapshot_revert(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    snap = _snapshot(ctx, vm, opts.get("snapshot"), "disk")
    _target, path = _disk_path(ctx, vm, snap.disk)
    drop_checkpoints(ctx, vm, w, f"disk {snap.disk} goes back to snapshot {snap.seq}")
    qemu_img("snapshot", "-a", snap.name, path)
    return {"snapshot": snap.seq, "name": snap.label, "disk": snap.disk}


def disk_snapshot_delete(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    snap = _snapshot(ctx, vm, opts.get("snapshot"), "disk")
    _target, path = _disk_path(ctx, vm, snap.disk)
    qemu_img("snapshot", "-d", snap.name, path)
    with ctx.catalog.session() as s:
        s.delete(s.get(VmSnapshot, snap.id))
    return {"snapshot": snap.seq, "name": snap.label, "deleted": True}
