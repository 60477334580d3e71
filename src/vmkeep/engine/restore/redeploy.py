"""Redeploy (``vm recover VM --redeploy``): the VM of a failed host brought up on another host,
as OpenNebula's host-failure hook recreates a VM elsewhere.

A VM may be redeployed when its host failed: the VM is UNKNOWN, or its host is ERROR or OFFLINE,
or the host's daemon is silent. Never two copies of one VM: its old host's libvirt is asked first
(a TCP probe of a few seconds, then libvirt itself); where the VM still runs there, the redeploy
is refused; where it is only defined there, that definition is removed. An old host that cannot
be reached keeps its definition: the result warns about it.

The destination is ``--host`` or ``placement.place`` (the old host passed over); the job runs on
that host's daemon (``actions.runs_on``). From its disks (shared storage: the same paths on every
host), the VM is defined from vmkeep's definition of it (``vms.template``) and started; with
``from_backup``, its newest restore point is written over its disks first (every file checked
against its checksum, as a restore does), and it is defined from the same definition, or from
the point's stored XML with the disks in vmkeep's restore folder for a VM vmkeep holds no
definition of. The VM keeps its name, UUID and catalog id; its row moves to the new host
(``vms.host``, ``host_uri``); the action is in its history. Its checkpoints stayed with the old
host's libvirt: its next backup starts a new full chain (a warning says so).
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select

from vmkeep.catalog import lock
from vmkeep.catalog.tables import Backup, Host, Increment
from vmkeep.checksums import expected_digests, row_digest
from vmkeep.engine.core.chains import disk_file, point, point_files, reset_checkpoints
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.states import OFF_HOST
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.core.trust import check_stored_xml, mark_created
from vmkeep.engine.hosts import placement
from vmkeep.engine.hosts.records import ERROR, OFFLINE, daemon_state
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.restore.point import convert_verified, pick_disks, warn_unsearchable
from vmkeep.engine.vm.inventory import not_here
from vmkeep.engine.vm.record import find_vm, set_fields, set_lcm, sync_state
from vmkeep.errors import DomainNotFound, Refused, VmkeepError
from vmkeep.hypervisor import connect
from vmkeep.hypervisor.domain_xml import parse_disks, with_disks
from vmkeep.model import BackupStatus, LcmState, VmState, Warnings

PROBE_TIMEOUT = 5.0  # seconds a TCP connection to the old host's libvirt may take
PORTS = {"tcp": 16509, "tls": 16514, "ssh": 22, "libssh": 22, "libssh2": 22}


def not_needed(what: str, why: str, fix: str) -> Refused:
    """The refusal of a redeploy the VM needs none of: it is on no host, or its host works, or
    it still runs on its old host (a group's recovery skips such a member; any other refusal
    stops it). A plain Refused for its callers (its error code stays ``Refused``)."""
    err = Refused(what, why, fix)
    err.not_needed = True  # type: ignore[attr-defined]
    return err


def is_not_needed(err: BaseException) -> bool:
    return bool(getattr(err, "not_needed", False))


@dataclass
class Plan:
    """What a redeploy does, decided (and every refusal made) before anything moves."""

    vm_id: int
    name: str
    lcm: str
    old: str
    old_uri: str
    failed: str  # why the old host counts as failed
    dest: str
    template: str | None
    old_libvirt: str  # "running", "defined", "absent" or "unreachable: why"
    uuid: str = ""
    point: tuple[int, int] | None = None  # (backup id, seq) with --from-backup
    warnings: Warnings = field(default_factory=Warnings)


def probe(uri: str, name: str) -> str:
    """What the old host's libvirt says of domain ``name``: "running" (active, paused too),
    "defined" (there but off), "absent", or "unreachable: WHY". A TCP probe of
    ``PROBE_TIMEOUT`` s first, so a host that drops packets does not hang the check."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if parts.hostname and transport in PORTS:
        try:
            socket.create_connection((parts.hostname, parts.port or PORTS[transport]),
                                     timeout=PROBE_TIMEOUT).close()  # fmt: skip
        except OSError as err:
            return f"unreachable: {parts.hostname}: {err.strerror or err}"
    hv = connect(uri)
    try:
        info = hv.domain(name)
    except DomainNotFound:
        return "absent"
    except VmkeepError as err:
        return f"unreachable: {err}"
    finally:
        _close(hv)
    return "running" if info.state == VmState.ACTIVE else "defined"


def failed_why(lcm: str, old: Host | None, old_name: str, silent_after: float) -> str | None:
    """Why the VM's host counts as failed (None: it does not)."""
    if old is None:
        return f"its host {old_name} is no longer in the catalog"
    if old.state in (ERROR, OFFLINE):
        return f"its host {old.name} is {old.state}"
    if daemon_state(old, silent_after) == "silent":
        return f"the daemon of its host {old.name} is silent"
    if lcm == LcmState.UNKNOWN:
        return f"it is UNKNOWN on host {old.name}"
    return None


def newest_point(ctx: Context, vm_id: int) -> tuple[int, int] | None:
    """(backup id, seq) of the VM's newest VALID point on any datastore."""
    with ctx.catalog.session() as s:
        row = s.execute(
            select(Increment.backup_id, Increment.seq)
            .join(Backup, Backup.id == Increment.backup_id)
            .where(Backup.vm_id == vm_id, Increment.status == BackupStatus.VALID)
            .order_by(Increment.finished_at.desc(), Increment.id.desc())
            .limit(1)
        ).first()
    return None if row is None else (int(row[0]), int(row[1]))


def check(ctx: Context, ref: str, pin: str | None = None, from_backup: bool = False) -> Plan:
    """Every refusal of a redeploy, before anything moves; the plan with its destination."""
    plan = failed_member(ctx, ref, from_backup)
    size = placement.size_of(plan.template)  # none: 1 vCPU, 0 KiB until its point is read
    plan.dest = placement.place(ctx, *size, pin=pin, exclude=() if pin else (plan.old,))
    plan.old_libvirt = probe(plan.old_uri, plan.name)
    if plan.dest == plan.old and plan.old_libvirt.startswith("unreachable"):
        raise Refused(
            f"redeploy of VM {plan.name}",
            f"host {plan.old} is its failed host and its libvirt cannot be reached "
            f"({plan.old_libvirt.partition(': ')[2]})",
            "Leave out --host to let placement choose, or name a working host.",
        )
    if plan.old_libvirt == "running":
        raise not_needed(
            f"redeploy of VM {plan.name}",
            f"it still runs on host {plan.old} (its libvirt at {plan.old_uri} says so)",
            "Never two copies of one VM: power it off there first (vmkeep vm poweroff VM "
            "--hard), or move it with 'vmkeep vm migrate VM HOST'.",
        )
    return plan


def failed_member(ctx: Context, ref: str, from_backup: bool = False) -> Plan:
    """The refusals that do not depend on the destination: the VM is on a failed host and
    there is something to bring it up from (its definition, or a restore point)."""
    what = f"redeploy of VM {ref}"
    if not placement.has_hosts(ctx):
        raise Refused(what, "this catalog has no hosts", "Add hosts first (vmkeep host add).")
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        what = f"redeploy of VM {vm.name}"
        if vm.host is None:
            raise not_needed(
                what, "it lives on no host", "Deploy it (vmkeep vm deploy VM --host H)."
            )
        if vm.state in OFF_HOST:
            raise not_needed(
                what,
                f"it is {vm.state}: not on a host",
                "Deploy it on another host instead (vmkeep vm deploy VM --host H).",
            )
        old = s.execute(select(Host).where(Host.name == vm.host)).scalar_one_or_none()
        failed = failed_why(vm.lcm_state, old, vm.host, ctx.config.cluster.silent_after)
        if failed is None:
            raise not_needed(
                what,
                f"it is {vm.lcm_state} on host {vm.host}, which is {old.state if old else '?'} "
                "with its daemon alive",
                "Redeploy is for the VM of a failed host; move a VM between working hosts "
                "with 'vmkeep vm migrate VM HOST'.",
            )
        plan = Plan(vm.id, vm.name, vm.lcm_state, vm.host, old.uri if old else vm.host_uri,
                    failed, "", vm.template, "", vm.uuid)  # fmt: skip
    if from_backup:
        plan.point = newest_point(ctx, plan.vm_id)
        if plan.point is None:
            raise Refused(what, "it has no VALID restore point", "Redeploy it from its disks "
                          "(leave out --from-backup).")  # fmt: skip
    elif not plan.template:
        raise Refused(
            what,
            "vmkeep holds no definition of it (it was imported; its definition was on host "
            f"{plan.old})",
            "Add --from-backup: it is defined from its newest restore point.",
        )
    return plan


def redeploy(
    ctx: Context,
    ref: str,
    pin: str | None = None,
    from_backup: bool = False,
    *,
    origin: str = "cli",
    who: str = "",
) -> tuple[dict[str, Any], Warnings]:
    """Bring the VM of a failed host up on another host (this process's: it runs on the
    destination's daemon)."""
    plan = check(ctx, ref, pin, from_backup)
    if not ctx.here(plan.dest):
        raise not_here(ctx, plan.dest, f"the redeploy of VM {plan.name} runs on its destination")
    with lock(ctx.catalog, f"vm:{plan.vm_id}", "recover", label=f"VM {plan.name}"):
        plan = check(ctx, str(plan.vm_id), plan.dest, from_backup)  # again, under the lock
        detail = {
            "opts": {"redeploy": True, "host": plan.dest, "from_backup": from_backup},
            "from": plan.lcm,
            "old_host": plan.old,
            "why": plan.failed,
        }
        hid = dispatch._begin_history(ctx, plan.vm_id, "recover", origin, who, detail)
        set_lcm(ctx, plan.vm_id, LcmState.BOOT)
        try:
            result = _bring_up(ctx, plan)
        except BaseException as err:
            set_lcm(ctx, plan.vm_id, LcmState(plan.lcm), error=f"redeploy failed: {err}")
            dispatch._end_history(ctx, hid, err)
            raise
        placement.move_to(ctx, str(plan.vm_id), plan.dest)
        sync_state(ctx, plan.vm_id, plan.name)
        set_fields(ctx, plan.vm_id, error=None)
        dispatch._end_history(ctx, hid, None)
    with ctx.catalog.session() as s:
        row = find_vm(s, str(plan.vm_id))
        out = {"vm": row.name, "action": "recover", "redeploy": True, "from_host": plan.old,
               "host": row.host, "state": row.state, "lcm_state": row.lcm_state}  # fmt: skip
    return out | result, plan.warnings


def _bring_up(ctx: Context, plan: Plan) -> dict[str, Any]:
    w = plan.warnings
    if plan.old_libvirt == "defined":  # its old host is back: one definition of it, here
        try:
            hv = connect(plan.old_uri)
            try:
                hv.undefine(plan.name)
            finally:
                _close(hv)
        except VmkeepError as err:
            w.add(f"its definition on host {plan.old} could not be removed ({err}): never "
                  "start it there")  # fmt: skip
    elif plan.old_libvirt.startswith("unreachable"):
        w.add(
            f"host {plan.old} could not be asked ({plan.old_libvirt.partition(': ')[2]}): its "
            f"libvirt may still hold a definition of {plan.name}; remove it there once the host "
            f"is back (virsh -c {plan.old_uri} undefine {plan.name}), never start it there"
        )
    if _already_there(ctx, plan):
        return {"from": "already running there"}
    with _keeping_destination_clean(ctx, plan.name):
        if plan.point is not None:
            xml, result = _from_point(ctx, plan)
        else:
            assert plan.template is not None
            xml, result = plan.template, {"from": "disks"}
        _check_disks(xml, plan.name)
        dispatch.vmm_of(ctx).deploy(plan.name, xml)
    if plan.point is not None:
        set_fields(ctx, plan.vm_id, template=xml)  # its disks are where the point went
    with ctx.catalog.session() as s:
        chained = s.execute(
            select(Increment.id)
            .join(Backup, Backup.id == Increment.backup_id)
            .where(Backup.vm_id == plan.vm_id, Increment.checkpoint.is_not(None))
            .limit(1)
        ).first()
    reset_checkpoints(ctx, plan.vm_id, plan.name)
    if chained is not None:
        w.add(
            f"VM {plan.name} was redeployed: its checkpoints stayed with host {plan.old}, so "
            "its next backup starts a new full chain"
        )
    return result


def _already_there(ctx: Context, plan: Plan) -> bool:
    """Whether the VM already runs on the destination (an earlier redeploy whose process died
    before the catalog was written): kept as it is. Another domain of that name there, or this
    one defined there, is refused or replaced before anything is written."""
    try:
        there = ctx.hv.domain(plan.name)
    except DomainNotFound:
        return False
    if there.uuid != plan.uuid:
        raise Refused(
            f"redeploy of VM {plan.name}",
            f"host {plan.dest} has another domain of that name (UUID {there.uuid}, the VM's is "
            f"{plan.uuid})",
            "Rename or remove that domain there, or redeploy on another host (--host).",
        )
    if there.state != VmState.ACTIVE:
        return False  # this VM's own definition, off: defined again below
    plan.warnings.add(f"VM {plan.name} already ran on host {plan.dest} (an earlier redeploy "
                      "that did not finish): kept running there")  # fmt: skip
    return True


def _close(hv: object) -> None:
    with suppress(Exception):
        getattr(hv, "close", lambda: None)()


def _check_disks(xml: str, name: str) -> None:
    missing = [
        f"{d.target} ({d.path})"
        for d in parse_disks(xml)
        if d.device == "disk" and d.path and not Path(d.path).exists()
    ]
    if missing:
        raise Refused(
            f"redeploy of VM {name}",
            f"its disks are not reachable from this host: {', '.join(missing)}",
            "Redeploy from disks needs storage every host shares; add --from-backup to write "
            "its newest restore point instead.",
        )


@contextmanager
def _keeping_destination_clean(ctx: Context, name: str) -> Iterator[None]:
    """A redeploy that fails leaves no definition of the VM on the destination."""
    try:
        yield
    except BaseException:
        with suppress(VmkeepError):
            if ctx.hv.domain(name).state != VmState.ACTIVE:
                ctx.hv.undefine(name)
        raise


def _from_point(ctx: Context, plan: Plan) -> tuple[str, dict[str, Any]]:
    """The newest point's disks written (checked) where the VM's definition has them, or in
    vmkeep's restore folder for a VM without one; its definition with those disks."""
    assert plan.point is not None
    backup_id, seq = plan.point
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        assert b is not None
        target, chain = point(b, seq)
        disks = pick_disks(target, None)
        chain_key, driver = b.chain, driver_of(b.datastore)
        expected = expected_digests(point_files(chain, disks))
        xml_entry = next(f for f in target.files if f["disk"] is None and not f.get("memory"))
        expected[xml_entry["name"]] = row_digest(xml_entry)
        has_memory = any(f.get("memory") for f in target.files)
    if has_memory:
        plan.warnings.add(f"point {seq} of backup {backup_id} holds memory state: the VM boots "
                          "cold from its disks")  # fmt: skip
    if plan.template:
        own = {d.target: Path(d.path) for d in parse_disks(plan.template) if d.path}
        paths = {d: own[d] for d in disks if d in own}
        for d in sorted(set(disks) - set(paths)):
            plan.warnings.add(f"disk {d} of the point is not in the VM's definition: left out")
    else:
        folder = ctx.config.data_dir / "restores" / plan.name
        paths = {d: folder / f"{d}.qcow2" for d in disks}
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
        local = driver.restore(chain_key, list(expected), Path(tmp))
        stored = local[xml_entry["name"]].read_text()
        dests = {disk_file(seq, d): p for d, p in paths.items()}
        if plan.template:
            xml = with_disks(plan.template, paths, "qcow2")
        else:
            xml = with_disks(stored, paths, "qcow2")
            check_stored_xml(ctx.config, xml, f"redeploy of {plan.name}", paths.values())
        convert_verified(ctx, backup_id, chain_key, expected, local, dests)
    for p in paths.values():
        mark_created(p)
    if not plan.template:  # the data dir's restores/: opened to QEMU's group, as a restore does
        warn_unsearchable(ctx, folder, plan.warnings)
    return xml, {"from": "backup", "backup": backup_id, "increment": seq,
                 "disks": {d: str(p) for d, p in paths.items()}}  # fmt: skip
