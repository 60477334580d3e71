"""What each lifecycle action does once ``dispatch.run_action`` has checked and locked the VM:
the VMM driver calls, and the storage-level steps no driver action covers (cold disk resize with
qemu-img, deleting disks on terminate); the snapshot actions are in ``snapshots.py``. A handler
returns its result; it raises on failure (the runner then sets the failure state)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Vm
from vmkeep.datastores.base import qemu_img_info
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import qemu_img
from vmkeep.engine.core.trust import (
    ACTOR,
    LOCAL_ADMIN,
    check_image_source,
    mark_created,
    may_delete_disk,
)
from vmkeep.engine.lifecycle import migration
from vmkeep.engine.lifecycle.snapshots import (
    disk_snapshot_create,
    disk_snapshot_delete,
    disk_snapshot_revert,
    drop_checkpoints,
    snapshot_create,
    snapshot_delete,
    snapshot_revert,
)
from vmkeep.engine.vm.record import set_fields
from vmkeep.errors import DomainNotFound, InvalidValue
from vmkeep.hypervisor.domain_xml import mac_addresses, parse_disks, with_cpu_memory
from vmkeep.hypervisor.reach import open_to_qemu
from vmkeep.hypervisor.vmm import DiskSpec, NicSpec, Vmm
from vmkeep.model import LcmState, VmState, Warnings
from vmkeep.paths import within

Handler = Callable[[Context, Vmm, Vm, dict[str, Any], Warnings], dict[str, Any]]
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    raw = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1] if raw and raw[-1] in SIZE_UNITS else ""
    number = raw[: -1 if unit else None]
    if not number.isdigit() or int(number) == 0:
        raise InvalidValue("--size", text, "use a size like 512M, 4G or a byte count")
    return int(number) * SIZE_UNITS[unit]


def _state_file(ctx: Context, name: str) -> Path:
    folder = ctx.config.data_dir / "states"
    folder.mkdir(parents=True, exist_ok=True)
    open_to_qemu(folder, ctx.config.data_dir, ctx.hv)  # its group alone, never other users
    return folder / f"{name}.state"


# --- power ----------------------------------------------------------------------------------------
def deploy(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    if not vm.template:
        raise InvalidValue("deploy", vm.name, "vmkeep holds no definition of this VM")
    deploy_id = vmm.deploy(vm.name, vm.template)
    return {"deploy_id": deploy_id}


def poweroff(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    (vmm.cancel if opts.get("hard") else vmm.shutdown)(vm.name)
    return {"hard": bool(opts.get("hard"))}


def reboot(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    (vmm.reset if opts.get("hard") else vmm.reboot)(vm.name)
    return {"hard": bool(opts.get("hard"))}


def suspend(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    file = _state_file(ctx, vm.name)
    vmm.save(vm.name, str(file))
    set_fields(ctx, vm.id, state_file=str(file))
    return {"state_file": str(file)}


def resume(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    if vm.state_file:  # SUSPENDED or STOPPED: its memory comes back
        vmm.restore(vm.state_file)
        Path(vm.state_file).unlink(missing_ok=True)
        set_fields(ctx, vm.id, state_file=None)
        return {"memory": True}
    if vm.lcm_state == LcmState.SUSPENDED:  # vCPUs paused outside vmkeep
        ctx.hv.resume(vm.name)
        return {"memory": True}
    vmm.deploy(vm.name, ctx.hv.domain_xml(vm.name, inactive=True))  # POWEROFF: a boot
    return {"memory": False}


def stop(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    # the definition (with its checkpoints) leaves the host: drop them while QEMU still runs, or
    # their bitmaps would come back with the memory and block a later snapshot revert
    drop_checkpoints(ctx, vm, w, f"VM {vm.name} leaves the host")
    template = ctx.hv.domain_xml(vm.name, inactive=True)
    file = _state_file(ctx, vm.name)
    set_fields(ctx, vm.id, template=template)
    vmm.save(vm.name, str(file))
    set_fields(ctx, vm.id, state_file=str(file))
    vmm.undefine(vm.name)
    return {"state_file": str(file)}


def undeploy(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    template = ctx.hv.domain_xml(vm.name, inactive=True)
    set_fields(ctx, vm.id, template=template)
    if ctx.hv.domain(vm.name).state == VmState.ACTIVE:
        (vmm.cancel if opts.get("hard") else vmm.shutdown)(vm.name)
    drop_checkpoints(ctx, vm, w, f"VM {vm.name} leaves the host")
    vmm.undefine(vm.name)
    return {"hard": bool(opts.get("hard"))}


def terminate(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    try:
        xml: str | None = ctx.hv.domain_xml(vm.name, inactive=True)
    except DomainNotFound:
        xml = None
    if xml is not None:
        if ctx.hv.domain(vm.name).state == VmState.ACTIVE:
            (vmm.cancel if opts.get("hard") else vmm.shutdown)(vm.name)
        vmm.undefine(vm.name)
    source = xml or vm.template
    deleted: list[str] = []
    kept: list[str] = []
    if source and not opts.get("keep_disks"):
        for d in parse_disks(source):
            if d.device != "disk" or not d.path or not Path(d.path).exists():
                continue
            if may_delete_disk(ctx.config, d.path):
                Path(d.path).unlink()
                deleted.append(d.path)
            else:  # a file vmkeep did not create (docs/security.md): never deleted by vmkeep
                kept.append(d.path)
                w.add(f"kept {d.path}: vmkeep did not create it; delete it yourself if unused")
    if vm.state_file:
        Path(vm.state_file).unlink(missing_ok=True)
    set_fields(ctx, vm.id, state_file=None)
    return {
        "deleted_disks": deleted,
        "kept_disks": bool(opts.get("keep_disks")),
        **({"not_created_by_vmkeep": kept} if kept else {}),
    }


def state_only(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    """hold and release: no driver work, the rule's state change is the whole action."""
    return {}


# --- devices --------------------------------------------------------------------------------------
def disk_attach(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    disks = [d for d in ctx.hv.domain(vm.name).disks]
    used = {d.target for d in disks}
    target = opts.get("target") or next(
        f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in used
    )
    if target in used:
        raise InvalidValue("--target", target, f"VM {vm.name} already has {target}")
    source = opts.get("source")
    created = False
    known: str | None = None  # the image's format, once something has read it
    if source is None:
        if not opts.get("size"):
            raise InvalidValue("disk attach", None, "give --source IMAGE or --size SIZE (new)")
        folder = Path(disks[0].path).parent if disks and disks[0].path else ctx.config.data_dir
        source = str(folder / f"{vm.name}-{target}.qcow2")
        check_image_source(
            ctx.config, opts.get(ACTOR, LOCAL_ADMIN), source, "qcow2"
        )  # before it says "exists"
        if Path(source).exists():
            raise InvalidValue("--size", opts["size"], f"{source} exists; attach it with --source")
        qemu_img("create", "-q", "-f", "qcow2", source, str(parse_size(opts["size"])))
        mark_created(Path(source))
        created, known = True, "qcow2"
    elif not Path(source).is_file():
        raise InvalidValue("--source", source, "no such image file")
    else:  # again, under the VM's lock: the file may have changed since the API's check
        actor = opts.get(ACTOR, LOCAL_ADMIN)
        known = check_image_source(ctx.config, actor, source, opts.get("format"))
    # the image stays 0600: libvirt's dynamic ownership lends it to QEMU's user while attached;
    # a folder of the data dir on the way (restores/, images/) is opened to QEMU's group
    parent, data = Path(source).resolve().parent, ctx.config.data_dir.resolve()
    if within(parent, data):
        open_to_qemu(parent, data, ctx.hv)
    fmt = opts.get("format") or known or _format_of(source)  # probed once under the lock
    spec = DiskSpec(source=source, target=target, index=len(disks), fmt=fmt)
    try:
        vmm.attach_disk(vm.name, spec)
    except BaseException:
        if created:
            Path(source).unlink(missing_ok=True)
        raise
    return {"target": target, "source": source, "created": created}


def _format_of(path: str) -> str:
    return str(qemu_img_info(path, check=False).get("format", "raw"))


def disk_detach(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    disks = list(ctx.hv.domain(vm.name).disks)
    target = opts.get("target")
    found = next(((i, d) for i, d in enumerate(disks) if d.target == target), None)
    if found is None:
        have = ", ".join(d.target for d in disks)
        raise InvalidValue("--target", target, f"VM {vm.name} has disks {have}")
    i, d = found
    vmm.detach_disk(vm.name, DiskSpec(source=d.path, target=d.target, index=i, fmt=d.fmt))
    return {"target": d.target, "source": d.path}


def nic_attach(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    mac = opts.get("mac") or "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in "abc")
    nic = NicSpec(mac=mac, bridge=opts.get("bridge") or "", model=opts.get("model") or "virtio")
    vmm.attach_nic(vm.name, nic)
    return {"mac": mac, "bridge": nic.bridge or None}


def nic_detach(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    mac = str(opts.get("mac") or "")
    macs = mac_addresses(ctx.hv.domain_xml(vm.name))
    if mac not in macs:
        raise InvalidValue("--mac", mac, f"VM {vm.name} has NICs {', '.join(map(str, macs))}")
    vmm.detach_nic(vm.name, mac)
    return {"mac": mac}


def resize(ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings) -> dict[str, Any]:
    """vCPUs and memory in the definition: libvirt's for a powered-off VM, the template of an
    undeployed one (no VMM action: it applies at the next boot)."""
    vcpus, memory = opts.get("vcpus"), opts.get("memory")
    if vcpus is None and memory is None:
        raise InvalidValue("resize", None, "give --vcpus N and/or --memory MIB")
    on_host = vm.lcm_state != LcmState.UNDEPLOYED
    xml = ctx.hv.domain_xml(vm.name, inactive=True) if on_host else (vm.template or "")
    new = with_cpu_memory(xml, vcpus, memory)
    if on_host:
        ctx.hv.define(new)
    set_fields(ctx, vm.id, template=new)
    out: dict[str, Any] = {"vcpus": vcpus, "memory_mib": memory}
    if not on_host:  # no domain for the hypervisor to say anything of: it stays UNDEPLOYED
        out[migration.LANDS] = (VmState.UNDEPLOYED, LcmState.UNDEPLOYED)
    return out


def disk_resize(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], w: Warnings
) -> dict[str, Any]:
    size = parse_size(opts.get("size") or "")
    target = opts.get("disk")
    disks = [d for d in ctx.hv.domain(vm.name).disks if d.device == "disk" and d.path]
    d = next((d for d in disks if d.target == target), disks[0] if target is None else None)
    if d is None:
        raise InvalidValue(
            "--disk", target, f"VM {vm.name} has {', '.join(x.target for x in disks)}"
        )
    running = ctx.hv.domain(vm.name).state == VmState.ACTIVE
    now = (
        ctx.hv.disk_size(vm.name, d.target)[0]
        if running
        else int(qemu_img_info(d.path)["virtual-size"])
    )
    if size < now:  # a running disk would be cut under the guest's file system
        raise InvalidValue(
            "--size",
            opts.get("size"),
            f"disk {d.target} of VM {vm.name} is {now} bytes and disk-resize only grows a disk "
            "(shrinking it would cut off the guest's data)",
        )
    if running:
        vmm.resize_disk(vm.name, d.target, size)
    else:
        qemu_img("resize", "-f", d.fmt, d.path, str(size))
    return {"disk": d.target, "size": size}


HANDLERS: dict[str, Handler] = {
    "deploy": deploy,
    "hold": state_only,
    "release": state_only,
    "poweroff": poweroff,
    "reboot": reboot,
    "suspend": suspend,
    "resume": resume,
    "stop": stop,
    "undeploy": undeploy,
    "terminate": terminate,
    "snapshot-create": snapshot_create,
    "snapshot-revert": snapshot_revert,
    "snapshot-delete": snapshot_delete,
    "disk-snapshot-create": disk_snapshot_create,
    "disk-snapshot-revert": disk_snapshot_revert,
    "disk-snapshot-delete": disk_snapshot_delete,
    "disk-attach": disk_attach,
    "disk-detach": disk_detach,
    "nic-attach": nic_attach,
    "nic-detach": nic_detach,
    "resize": resize,
    "disk-resize": disk_resize,
    "migrate": migration.migrate,
}
