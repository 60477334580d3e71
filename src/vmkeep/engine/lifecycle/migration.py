"""``vm migrate VM HOST [--live] [--copy-storage]``: the VM moves to another host of the catalog
(OpenNebula's migrate and live-migrate), through the VM's host's VMM driver.

``dispatch.run_action`` checks the rule (RUNNING or POWEROFF), locks the VM, records the history
and holds MIGRATE while the driver works; ``check_destination`` refuses, before any of that, an
unknown destination or one that takes no VMs (DISABLED, OFFLINE, ERROR); ``migrate`` (the
handler) refuses the VM's own host, calls the driver with the destination's libvirt URI, and on
success writes the VM's new host (its queued jobs follow it) and lands it in the state it had.
A cancel aborts libvirt's migration job: the VM stays on its host as it was.

The backup chain: the driver carries the checkpoints to the destination when it can; when it
cannot, it says why, the reason goes in the history (``detail.migration.chain_break``) and in a
warning, and the next backup (``protect/plan.py``, ``chain_break_since``) starts a new full chain
with a warning that gives that reason: never a silent broken chain.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Job, Vm, VmHistory
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts.records import DISABLED, ERROR, OFFLINE, find_host
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import DomainNotFound, HypervisorError, Refused
from vmkeep.hypervisor import connect
from vmkeep.hypervisor.vmm import Progress, Vmm
from vmkeep.model import JobState, LcmState, VmState, Warnings

PROGRESS = "_progress"  # the options' key of the job's progress callback (never stored)
LANDS = "_lands"  # the result's key of where a success leaves the VM (run_action pops it)
REFUSED_STATES = {
    DISABLED: "it is DISABLED (an admin's: nothing new goes there)",
    OFFLINE: "it is OFFLINE (taken out by an admin)",
    ERROR: "its monitoring failed (ERROR)",
}


def check_destination(ctx: Context, host: str, vm_ref: str | None = None) -> tuple[str, str]:
    """(name, libvirt URI) of a destination that takes VMs and is not VM ``vm_ref``'s host;
    HostNotFound or Refused naming it."""
    with ctx.catalog.session() as s:
        row = find_host(s, host)
        name, uri, state, error = row.name, row.uri, row.state, row.error
        vm = find_vm(s, vm_ref) if vm_ref is not None else None
        if vm is not None and (name == vm.host or uri == vm.host_uri):
            raise Refused(
                f"migration of VM {vm.name} to host '{name}'",
                "the VM is on that host already",
                "Name another host (vmkeep host list).",
            )
    if state in REFUSED_STATES:
        why = REFUSED_STATES[state] + (f": {error}" if state == ERROR and error else "")
        fix = (
            f"Enable it (vmkeep host enable {name})"
            if state != ERROR
            else f"Check host {name} (vmkeep host show {name})"
        )
        raise Refused(f"migration to host '{name}'", why, fix + ", or choose another host.")
    return name, uri


def migrate(
    ctx: Context, vmm: Vmm, vm: Vm, opts: dict[str, Any], warnings: Warnings
) -> dict[str, Any]:
    """The handler (``operations.HANDLERS``): the VM is locked and in MIGRATE."""
    dest, dest_uri = check_destination(ctx, str(opts["host"]), str(vm.id))
    source = vm.host or ctx.host
    progress: Progress | None = opts.get(PROGRESS)
    moved = vmm.migrate(
        vm.name,
        dest_uri,
        live=bool(opts.get("live")),
        copy_storage=bool(opts.get("copy_storage")),
        bandwidth_mib=int(opts.get("bandwidth") or 0),
        progress=progress,
    )
    lands = (VmState.ACTIVE, LcmState.RUNNING)
    if vm.lcm_state == LcmState.POWEROFF:
        lands = (VmState.POWEROFF, LcmState.POWEROFF)
    record = {
        "source": source,
        "destination": dest,
        "live": moved.live,
        "copy_storage": bool(opts.get("copy_storage")),
        "total_ms": moved.total_ms,
        "downtime_ms": moved.downtime_ms,
        "data_bytes": moved.data_bytes,
        "checkpoints": list(moved.checkpoints),
        "chain_break": moved.chain_break,
    }
    try:
        _record_move(ctx, vm, source, dest, dest_uri, record)
    except KeyboardInterrupt:  # a cancel now is too late (the VM has moved): the catalog says so
        _record_move(ctx, vm, source, dest, dest_uri, record)
    if moved.chain_break:
        warnings.add(
            f"the checkpoints of VM {vm.name} did not follow it to host {dest}, so its next "
            f"backup starts a new full chain: {moved.chain_break}"
        )
    return {"host": dest, "host_uri": dest_uri, "migration": record, LANDS: lands}


def _record_move(
    ctx: Context, vm: Vm, source: str | None, dest: str, dest_uri: str, record: dict[str, Any]
) -> None:
    """The VM's row on ``dest``, its queued jobs with it, the migration in its history (each
    write idempotent: done again when a cancel interrupted it)."""
    with ctx.catalog.session() as s:
        s.execute(update(Vm).where(Vm.id == vm.id).values(host=dest, host_uri=dest_uri))
        if source is not None:  # its queued jobs go with it
            s.execute(
                update(Job)
                .where(
                    Job.state == JobState.QUEUED,
                    Job.runs_on == source,
                    Job.target.in_([vm.name, str(vm.id)]),
                )
                .values(runs_on=dest)
            )
        row = (
            s.execute(
                select(VmHistory)
                .where(VmHistory.vm_id == vm.id, VmHistory.action == "migrate")
                .order_by(VmHistory.id.desc())
            )
            .scalars()
            .first()
        )
        if row is not None:
            row.detail = {**row.detail, "migration": record}


def moved(ctx: Context, vm_id: int, host: str, before: LcmState) -> None:
    """``vm recover --success`` of a migration whose process died: the VM is on ``host``, in
    the state it had (an admin checked it there)."""
    with ctx.catalog.session() as s:
        uri = find_host(s, host).uri
        vm = s.get(Vm, vm_id)
        assert vm is not None
        vm.host, vm.host_uri, vm.error = host, uri, None
        vm.lcm_state = before
        vm.state = VmState.POWEROFF if before == LcmState.POWEROFF else VmState.ACTIVE


def stop_paused_copy(
    ctx: Context, name: str, host: str | None, before: LcmState, warnings: Warnings
) -> None:
    """``vm recover`` of a migration whose process died: a POWEROFF VM migrated with
    ``--copy-storage`` runs paused for the copy, and stays so (on its host, or on the
    destination ``host`` once it had switched over). Stopped there, as it was: vmkeep never
    leaves a VM paused. A host that cannot be asked is named in a warning."""
    if before != LcmState.POWEROFF:
        return
    uri = ctx.uri
    if not ctx.here(host):
        with ctx.catalog.session() as s:
            uri = find_host(s, str(host)).uri
    hv = ctx.hv if uri == ctx.uri else connect(uri)
    try:
        info = hv.domain(name)
        if info.state == VmState.ACTIVE and info.paused:
            hv.destroy(name)
    except DomainNotFound:
        pass
    except HypervisorError as err:
        warnings.add(f"VM {name} may be left paused on {uri} by the migration ({err}): stop it "
                     f"there (virsh -c {uri} destroy {name})")  # fmt: skip
    finally:
        if hv is not ctx.hv:
            with contextlib.suppress(Exception):
                getattr(hv, "close", lambda: None)()


def chain_break_since(s: Session, vm_id: int, since: datetime | None) -> str | None:
    """Why the VM's checkpoints were left behind by a migration after ``since`` (the newest
    such migration), None when none was."""
    q = (
        select(VmHistory)
        .where(
            VmHistory.vm_id == vm_id,
            VmHistory.action == "migrate",
            VmHistory.result == JobState.DONE,
        )
        .order_by(VmHistory.id.desc())
    )
    for row in s.execute(q).scalars():
        if since is not None and _naive(row.started_at) < _naive(since):
            break
        why = (row.detail.get("migration") or {}).get("chain_break")
        if why:
            dest = row.detail["migration"].get("destination")
            return f"it was migrated to host {dest} on {row.started_at:%Y-%m-%d %H:%M}: {why}"
    return None


def _naive(t: datetime) -> datetime:
    return t.replace(tzinfo=None)
