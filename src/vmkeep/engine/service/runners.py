"""The engine calls behind the action table (``actions.py``): for each entry a ``check_*`` (what
can be refused before the action is queued, references made canonical) and a ``run_*`` (the
action itself). Loaded only when an action is checked or run: it imports every room.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkeep.engine.core import stores, trust
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.groups import backup as group_backup
from vmkeep.engine.groups import drill as group_drill
from vmkeep.engine.groups import manage
from vmkeep.engine.hosts import placement
from vmkeep.engine.lifecycle import dispatch, snapshots
from vmkeep.engine.points import copy, delete, listing, prune, scan, verify
from vmkeep.engine.protect import backup
from vmkeep.engine.restore import drill, inplace, point, redeploy
from vmkeep.engine.service import params as P
from vmkeep.engine.service import tokens
from vmkeep.engine.vm import inventory, policy
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import DrillFailed, Forbidden, VmkeepError, WrongState
from vmkeep.model import Warnings

if TYPE_CHECKING:
    from vmkeep.engine.service.actions import Action, Caller, Progress

Outcome = tuple[dict[str, Any], Warnings | list[str]]


# --- checks before queueing ------------------------------------------------------------------
def _check_policy(ctx: Context, p: P.BackupParams | P.GroupBackupParams, actor: Actor) -> None:
    """Policy keys over the VM's are a backup job's (``backupjob-edit``): a lower keep_last
    deletes restore points, so the same role must ask for them in a backup's body."""
    if p.policy:
        tokens.authorize(actor.name, actor.role, "backupjob-edit", ctx.config.api.policy)
    policy.check_overrides(p.policy)  # a bad key or value: refused now, named with its layer


def check_backup(ctx: Context, _a: Action, p: P.BackupParams, actor: Actor) -> P.Params:
    """The VM's state allows a backup, or a backup (or prune) job of this VM runs: a backup
    queued while the last one still runs waits for it (``jobs.claim``) and checks the state
    as it starts; the datastores exist."""
    from vmkeep.engine.core import jobs

    _check_policy(ctx, p, actor)
    try:
        name = inventory.check_action(ctx, p.vm, "backup")
    except WrongState as err:
        with ctx.catalog.session() as s:
            name = find_vm(s, p.vm).name
        if jobs.running_on(ctx, name, ("backup", "prune")) is None:
            raise err from None
    stores.check_exists(ctx, p.datastore)  # 404 now, not a failed job later
    if p.copy_to:
        stores.check_exists(ctx, p.copy_to)
    return p.model_copy(update={"vm": name})


def check_group_backup(ctx: Context, _a: Action, p: P.GroupBackupParams, actor: Actor) -> P.Params:
    _check_policy(ctx, p, actor)
    name = manage.show_group(ctx, p.group)["name"]
    stores.check_exists(ctx, p.datastore)
    if p.copy_to:
        stores.check_exists(ctx, p.copy_to)
    return p.model_copy(update={"group": name})


def check_restore(ctx: Context, _a: Action, p: P.RestoreParams, actor: Actor) -> P.Params:
    if p.path is not None:  # outside the actor's places: a 403 now (the job checks again)
        dest = Path(p.path)
        trust.check_restore_destination(ctx.config, actor, dest, p.force and dest.is_file())
    shown = listing.show_backup(ctx, p.backup)
    if p.in_place:  # a VM that is not powered off is a 409 now, not a failed job later
        inventory.check_action(ctx, str(shown["vm_id"]), "restore in place")
    elif p.name is not None:  # so is a new VM's name that is taken
        point.check_new_vm_name(ctx, p.name)
    return p


def check_point(ctx: Context, _a: Action, p: P.PointParams, _actor: Actor) -> P.Params:
    listing.show_backup(ctx, p.backup)
    return p


def check_delete(ctx: Context, _a: Action, p: P.DeleteParams, actor: Actor) -> P.Params:
    _check_force(actor, p)
    delete.check_delete(ctx, p.backup, p.increment, p.force)  # a 409 now, not a failed job
    return p


def _check_force(actor: Actor, p: P.DeleteParams) -> None:
    """Deleting protected points (``--force``) is an admin's, even where ``[api.policy]`` lets
    a lower role delete."""
    if p.force and not actor.is_admin:
        raise Forbidden(actor.name, actor.role, "backups delete --force", "admin")


def check_prune(ctx: Context, _a: Action, p: P.PruneParams, actor: Actor) -> P.Params:
    if p.rules() and not p.dry_run:  # rules other than the policy's remove what it keeps
        tokens.authorize(actor.name, actor.role, "backup-delete", ctx.config.api.policy)
    with ctx.catalog.session() as s:
        name = find_vm(s, p.vm).name
    if p.datastore is not None:
        stores.check_exists(ctx, p.datastore)
    return p.model_copy(update={"vm": name})


def check_copy(ctx: Context, _a: Action, p: P.CopyParams, _actor: Actor) -> P.Params:
    listing.show_backup(ctx, p.backup)
    stores.check_exists(ctx, p.to)
    return p


def check_datastore(ctx: Context, _a: Action, p: P.ScanParams, _actor: Actor) -> P.Params:
    stores.check_exists(ctx, p.datastore)
    return p


def check_vm_state(ctx: Context, a: Action, p: P.VmParams, _actor: Actor) -> P.Params:
    """The VM's state allows the action (quiesce, unquiesce)."""
    return p.model_copy(update={"vm": inventory.check_action(ctx, p.vm, a.kind)})


def check_vm(ctx: Context, _a: Action, p: P.VmParams, _actor: Actor) -> P.Params:
    """The VM exists (an action allowed in any state)."""
    with ctx.catalog.session() as s:
        return p.model_copy(update={"vm": find_vm(s, p.vm).name})


def check_group(ctx: Context, _a: Action, p: P.GroupParams, _actor: Actor) -> P.Params:
    return p.model_copy(update={"group": manage.show_group(ctx, p.group)["name"]})


def check_group_recover(
    ctx: Context, _a: Action, p: P.GroupRecoverParams, _actor: Actor
) -> P.Params:
    """The group exists and has members to redeploy; the destination chosen (runs_on)."""
    name = manage.show_group(ctx, p.group)["name"]
    host = p.host or manage.recover_host(ctx, name, p.from_backup)
    return p.model_copy(update={"group": name, "host": host})


def check_group_point(ctx: Context, _a: Action, p: P.GroupRestoreParams, _actor: Actor) -> P.Params:
    manage.show_group_backup(ctx, p.group_backup)
    return p


def _probes(p: P.GroupDrillParams) -> tuple[dict[str, str], tuple[str, str] | None]:
    cross = p.cross_probe
    return dict(p.probes), (cross.member, cross.command) if cross else None


def check_group_drill(ctx: Context, _a: Action, p: P.GroupDrillParams, _actor: Actor) -> P.Params:
    group_drill.check_request(ctx, p.group_backup, *_probes(p))  # a 4xx now, not a failed job
    return p


def _lifecycle(a: Action, p: P.VmParams) -> tuple[str, dict[str, Any]]:
    """The lifecycle action's name and its options (those given, not the defaults)."""
    return a.kind.removeprefix("vm-"), p.model_dump(exclude={"vm"}, exclude_defaults=True)


def check_lifecycle(ctx: Context, a: Action, p: P.VmParams, actor: Actor) -> P.Params:
    """Unknown VM, refused or wrong state, a place outside the actor's: before queueing (one
    catalog read and one look at libvirt; ``run_action`` checks again under the VM's lock)."""
    name, opts = _lifecycle(a, p)
    dispatch.check_places(ctx, name, opts, actor, p.vm)
    if isinstance(p, P.RecoverParams) and p.redeploy:  # its destination, for actions.runs_on
        dispatch.check_allowed(ctx, p.vm, name)
        plan = redeploy.check(ctx, p.vm, p.host, p.from_backup)
        return p.model_copy(update={"vm": plan.name, "host": plan.dest})
    if name == "recover":  # any stuck state: it only has to be known
        dispatch.check_allowed(ctx, p.vm, name)
        return p
    row = dispatch.check_allowed(ctx, p.vm, name, state=True)
    snapshots.check_new_name(ctx, row, name, opts)  # a name taken: refused before queueing
    if isinstance(p, P.DeployParams):  # placed now: the job goes to that host's daemon
        placement.deploy_host(ctx, row.name, p.host)
    return p.model_copy(update={"vm": row.name})


# --- the actions -----------------------------------------------------------------------------
def run_backup(
    ctx: Context, _a: Action, p: P.BackupParams, progress: Progress, _c: Caller
) -> Outcome:
    out = backup.run_backup(
        ctx,
        p.vm,
        p.datastore,
        reset=p.reset,
        progress=progress,
        overrides=p.policy or None,
        bwlimit=p.bwlimit,
    )
    if p.copy_to:
        out.result["copy"] = _copy_new_point(
            ctx, out.result["id"], p.copy_to, out.warnings, p.bwlimit
        )
    return out.result, out.warnings


def run_group_backup(
    ctx: Context, _a: Action, p: P.GroupBackupParams, progress: Progress, _c: Caller
) -> Outcome:
    out = group_backup.run_group_backup(
        ctx,
        p.group,
        p.datastore,
        parallel_freeze=p.parallel_freeze,
        reset=p.reset,
        progress=progress,
        overrides=p.policy or None,
        bwlimit=p.bwlimit,
    )
    if p.copy_to:
        out.result["copies"] = [
            _copy_new_point(ctx, m["backup"], p.copy_to, out.warnings, p.bwlimit)
            for m in out.result.get("members", [])
            if m.get("backup") is not None
        ]
    return out.result, out.warnings


def _copy_new_point(
    ctx: Context, backup_id: int, to: str, warnings: Warnings, bwlimit: int | None
) -> dict[str, Any]:
    """A backup job's ``--copy-to``: the chain's new point copied to a second datastore and
    verified there (only what the copy lacks). A failed copy is a warning: the backup itself
    is stored and stays; the next run copies what is missing."""
    try:
        return copy.copy_backup(ctx, backup_id, to, bwlimit=bwlimit)
    except VmkeepError as err:
        warnings.add(f"copy of backup {backup_id} to {to} failed: {err}; the backup is stored")
        return {"backup": backup_id, "datastore": to, "error": str(err)}


def run_restore(
    ctx: Context, _a: Action, p: P.RestoreParams, progress: Progress, c: Caller
) -> Outcome:
    opts = point.RestoreOptions(**p.model_dump(exclude={"backup"}), by=c.actor)
    return inplace.run_restore(ctx, p.backup, opts, progress)


def run_verify(ctx: Context, _a: Action, p: P.PointParams, _pr: Progress, _c: Caller) -> Outcome:
    return verify.verify(ctx, p.backup), []


def run_copy(ctx: Context, _a: Action, p: P.CopyParams, _pr: Progress, _c: Caller) -> Outcome:
    return copy.copy_backup(ctx, p.backup, p.to), []


def run_delete(ctx: Context, _a: Action, p: P.DeleteParams, _pr: Progress, c: Caller) -> Outcome:
    _check_force(c.actor, p)  # a job queued before a policy change, or run here
    return delete.delete_backup(ctx, p.backup, p.increment, p.force), []


def run_drill(ctx: Context, _a: Action, p: P.DrillParams, _pr: Progress, _c: Caller) -> Outcome:
    result, warnings = drill.run_drill(ctx, p.backup, p.increment, p.probe, p.timeout)
    try:
        drill.check_passed(result)  # a FAIL verdict is a FAILED job, for every adapter
    except DrillFailed as err:
        err.result = result  # the evidence stays on the job and is shown with the error
        raise
    return result, warnings


def run_prune(ctx: Context, _a: Action, p: P.PruneParams, _pr: Progress, _c: Caller) -> Outcome:
    out = prune.prune(ctx, p.vm, p.datastore, dry_run=p.dry_run, rules=p.rules() or None)
    return out, []


def run_scan(ctx: Context, _a: Action, p: P.ScanParams, _pr: Progress, _c: Caller) -> Outcome:
    return {"datastore": p.datastore, "chains": scan.scan(ctx, p.datastore, p.import_)}, []


def run_quiesce(ctx: Context, _a: Action, p: P.VmParams, _pr: Progress, _c: Caller) -> Outcome:
    return inventory.quiesce(ctx, p.vm), []


def run_unquiesce(ctx: Context, _a: Action, p: P.VmParams, _pr: Progress, _c: Caller) -> Outcome:
    return inventory.unquiesce(ctx, p.vm), []


def run_reset_state(ctx: Context, _a: Action, p: P.VmParams, _pr: Progress, _c: Caller) -> Outcome:
    return inventory.reset_state(ctx, p.vm), []


def run_group_start(
    ctx: Context, _a: Action, p: P.GroupStartParams, _pr: Progress, _c: Caller
) -> Outcome:
    rows = manage.start_group(ctx, p.group, wait_agent=p.wait_agent, timeout=p.timeout)
    return {"group": p.group, "members": rows}, []


def run_group_stop(
    ctx: Context, _a: Action, p: P.GroupStopParams, _pr: Progress, _c: Caller
) -> Outcome:
    rows = manage.stop_group(ctx, p.group, force=p.force, timeout=p.timeout)
    return {"group": p.group, "members": rows}, []


def run_group_recover(
    ctx: Context, _a: Action, p: P.GroupRecoverParams, _pr: Progress, c: Caller
) -> Outcome:
    return manage.recover_group(ctx, p.group, p.host, p.from_backup, origin=c.origin, who=c.who)


def run_group_restore(
    ctx: Context, _a: Action, p: P.GroupRestoreParams, _pr: Progress, _c: Caller
) -> Outcome:
    return manage.restore_group(ctx, p.group_backup, p.suffix, start=p.start)


def run_group_drill(
    ctx: Context, _a: Action, p: P.GroupDrillParams, _pr: Progress, _c: Caller
) -> Outcome:
    result, warnings = group_drill.group_drill(ctx, p.group_backup, *_probes(p), p.timeout)
    try:
        group_drill.check_passed(result)  # a FAIL verdict is a FAILED job, for every adapter
    except DrillFailed as err:
        err.result = result  # the evidence stays on the job and is shown with the error
        raise
    return result, warnings


def run_lifecycle(ctx: Context, a: Action, p: P.VmParams, pr: Progress, c: Caller) -> Outcome:
    name, opts = _lifecycle(a, p)
    if isinstance(p, P.RecoverParams) and p.redeploy:
        return redeploy.redeploy(ctx, p.vm, p.host, p.from_backup, origin=c.origin, who=c.who)
    if name == "recover":
        return dispatch.recover(ctx, p.vm, opts["how"], origin=c.origin, who=c.who)
    if isinstance(p, P.DeployParams):  # placed by the check, or here when run in-process
        placement.deploy_host(ctx, p.vm, p.host)
    return dispatch.run_action(
        ctx, p.vm, name, opts, origin=c.origin, who=c.who, actor=c.actor, progress=pr
    )
