"""The action table: every long action vmkeep runs, one entry each. The one door.

An entry names the action's job ``kind``, its typed ``params`` model (``params.py``), the
``policy`` key whose least role may ask for it (``tokens.POLICY``, ``[api.policy]``), the param
that names its ``target``, what it ``locks`` while it runs, its API ``route``, and two engine
calls by name (``runners.py``, imported only when an action runs):

- ``check(ctx, action, params, actor) -> params``: what can be refused before the action is queued (an
  unknown VM, a wrong state, a place outside the actor's); returns the params with references
  made canonical (a VM's name for its id). The runner checks again under its locks.
- ``run(ctx, action, params, progress, caller) -> (result, warnings)``: the engine call itself.

Every adapter goes through here: the API's action routes are generated from the table
(``api/actions.py``); the CLI hands an action to the daemon when one serves the catalog, or runs
it in-process through ``run_here`` (recorded as the same job); the daemon's workers run queued
jobs through ``RUNNERS``. Adding an action: a params model, an entry here, its check and run in
``runners.py``, a CLI command that calls ``cli/output.act`` (docs/architecture.md).

Only the standard library at import: the CLI loads this module on its way to the daemon (the
params models, and pydantic with them, are loaded when an action is validated or run here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmkeep.engine.core.context import Context
    from vmkeep.engine.core.trust import Actor
    from vmkeep.engine.service import params as P
    from vmkeep.model import Warnings

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Caller:
    """Who runs an action and through which door: the actor whose places bound it, the name its
    history and job rows show, and the origin ("cli": in the command's process; "api": a job of
    the daemon, whether the CLI, the API or a schedule queued it)."""

    actor: Actor
    who: str
    origin: str


@dataclass(frozen=True)
class Action:
    kind: str
    params: str  # the name of its model in params.py (loaded when first used: ``model``)
    policy: str
    target: str  # the params field naming what it acts on (the job's target)
    locks: str  # what it holds while it runs: "vm", "point", "group", "datastore"
    route: str  # the API route, "{field}" segments from the params
    check: str  # runners.check_<this>
    run: str  # runners.run_<this>
    summary: str
    method: str = "POST"

    @property
    def path_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.route)

    @property
    def model(self) -> type[P.Params]:
        """The params model (pydantic is loaded then: a command that hands its action to the
        daemon never loads it; the daemon validates)."""
        model: type[P.Params] = getattr(import_module("vmkeep.engine.service.params"), self.params)
        return model

    def path(self, values: Mapping[str, Any], quote: Callable[[str], str]) -> str:
        """The route for these params, each path segment through ``quote``."""
        return self.route.format(**{f: quote(str(values[f])) for f in self.path_fields})

    def body(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The params the route takes in its body (or query, for DELETE): all but the path's,
        and none that is None."""
        return {k: v for k, v in values.items() if k not in self.path_fields and v is not None}

    def target_of(self, p: P.Params | Mapping[str, Any]) -> str:
        return str(p[self.target] if isinstance(p, Mapping) else getattr(p, self.target))


def _vm(kind: str, params: str, summary: str, policy: str = "vm-action") -> Action:
    """A lifecycle action (engine/lifecycle): ``POST /v1/vms/{vm}/actions/NAME``."""
    return Action(f"vm-{kind}", params, policy, "vm", "vm", f"/v1/vms/{{vm}}/actions/{kind}",
                  "lifecycle", "lifecycle", summary)  # fmt: skip


_TABLE = [
    Action("backup", "BackupParams", "backup", "vm", "vm", "/v1/vms/{vm}/backup",
           "backup", "backup", "Back up a VM (full, or an increment per its backup config)."),
    Action("group-backup", "GroupBackupParams", "group-backup", "group", "group",
           "/v1/groups/{group}/backup", "group_backup", "group_backup",
           "Back up every member at one consistent cut."),
    Action("restore", "RestoreParams", "restore", "backup", "point",
           "/v1/backups/{backup}/restore", "restore", "restore",
           "Restore a point: new VM, one disk, in place, or instant."),
    Action("verify", "PointParams", "verify", "backup", "point", "/v1/backups/{backup}/verify",
           "point", "verify", "Check every stored file against its checksum."),
    Action("copy", "CopyParams", "copy", "backup", "point", "/v1/backups/{backup}/copy",
           "copy", "copy", "Copy a chain to a second datastore and verify it there."),
    Action("delete", "DeleteParams", "backup-delete", "backup", "point", "/v1/backups/{backup}",
           "delete", "delete", "Delete a chain, or its newest increment.", method="DELETE"),
    Action("drill", "DrillParams", "drill", "backup", "point", "/v1/backups/{backup}/drill",
           "point", "drill", "Boot a point as an isolated VM and check it."),
    Action("prune", "PruneParams", "prune", "vm", "vm", "/v1/vms/{vm}/prune", "prune", "prune",
           "Apply retention now (or --dry-run: say what it would keep and remove, and why)."),
    Action("scan", "ScanParams", "datastore-scan", "datastore", "datastore",
           "/v1/datastores/{datastore}/scan", "datastore", "scan",
           "List the chains a datastore holds; import unknown ones."),
    Action("quiesce", "VmParams", "quiesce", "vm", "vm", "/v1/vms/{vm}/quiesce",
           "vm_state", "quiesce", "Freeze the guest file systems."),
    Action("unquiesce", "VmParams", "unquiesce", "vm", "vm", "/v1/vms/{vm}/unquiesce",
           "vm_state", "unquiesce", "Thaw the guest file systems."),
    Action("reset-state", "VmParams", "reset-state", "vm", "vm", "/v1/vms/{vm}/reset-state",
           "vm", "reset_state", "Thaw/resume the guest, take the state from libvirt."),
    Action("group-start", "GroupStartParams", "group-start", "group", "group",
           "/v1/groups/{group}/start", "group", "group_start",
           "Start the members in start order."),
    Action("group-stop", "GroupStopParams", "group-stop", "group", "group",
           "/v1/groups/{group}/stop", "group", "group_stop", "Stop the members in stop order."),
    Action("group-recover", "GroupRecoverParams", "group-recover", "group", "group",
           "/v1/groups/{group}/recover", "group_recover", "group_recover",
           "Redeploy the members on failed hosts on another host, in start order."),
    Action("group-restore", "GroupRestoreParams", "group-restore", "group_backup", "group",
           "/v1/group-backups/{group_backup}/restore", "group_point", "group_restore",
           "Restore every member of a group backup as new VMs."),
    Action("group-drill", "GroupDrillParams", "group-drill", "group_backup", "group",
           "/v1/group-backups/{group_backup}/drill", "group_drill", "group_drill",
           "Boot a group backup's members together on an isolated network and probe them."),
    _vm("deploy", "DeployParams", "Define and boot a PENDING or UNDEPLOYED VM (--host: there)."),
    _vm("hold", "VmParams", "Keep a PENDING VM from being deployed."),
    _vm("release", "VmParams", "Let a HOLD VM be deployed."),
    _vm("poweroff", "HardParams", "Shut the guest down (hard: pull the plug)."),
    _vm("reboot", "HardParams", "Reboot the guest (hard: reset)."),
    _vm("suspend", "VmParams", "Save the guest's memory on the host and stop it."),
    _vm("resume", "VmParams", "Bring a SUSPENDED or STOPPED VM back; boot a POWEROFF one."),
    _vm("stop", "VmParams", "Save the memory to a state file, take the VM off the host."),
    _vm("undeploy", "HardParams", "Take the VM off the host, disks kept."),
    _vm("terminate", "TerminateParams", "Destroy the VM and delete its disks.", "vm-terminate"),
    _vm("resize", "ResizeParams", "Change vCPUs and memory of a stopped VM."),
    _vm("disk-resize", "DiskResizeParams", "Grow a disk."),
    _vm("migrate", "MigrateParams", "Move a VM to another host (--live, --copy-storage)."),
    _vm("snapshot-create", "SnapshotCreateParams", "Take a system snapshot."),
    _vm("snapshot-revert", "SnapshotParams", "Go back to a system snapshot."),
    _vm("snapshot-delete", "SnapshotParams", "Delete a system snapshot."),
    _vm("disk-snapshot-create", "DiskSnapshotCreateParams",
        "Snapshot one disk of a powered-off VM."),
    _vm("disk-snapshot-revert", "SnapshotParams", "Put one disk back to its snapshot."),
    _vm("disk-snapshot-delete", "SnapshotParams", "Delete a disk snapshot."),
    _vm("disk-attach", "DiskAttachParams", "Attach a disk."),
    _vm("disk-detach", "DiskDetachParams", "Detach a disk (its image stays)."),
    _vm("nic-attach", "NicAttachParams", "Attach a NIC."),
    _vm("nic-detach", "NicDetachParams", "Detach a NIC."),
    _vm("recover", "RecoverParams", "Admin: leave a *_FAILURE or stuck state; --redeploy: "
        "bring the VM of a failed host up on another.", "vm-recover"),
]  # fmt: skip

ACTIONS: dict[str, Action] = {a.kind: a for a in _TABLE}


def action(kind: str) -> Action:
    from vmkeep.errors import InvalidValue

    if kind not in ACTIONS:
        raise InvalidValue("kind", kind, f"use one of {', '.join(ACTIONS)}")
    return ACTIONS[kind]


def _call(name: str, a: Action) -> Callable[..., Any]:
    runners = import_module("vmkeep.engine.service.runners")
    fn: Callable[..., Any] = getattr(runners, f"{name}_{getattr(a, name)}")
    return fn


def parse(a: Action, data: dict[str, Any], *, options: bool = False) -> P.Params:
    """The action's params from plain values; InvalidValue names the first one out of range
    (``options``: as the CLI calls it, ``--copy-bwlimit`` or the argument ``BACKUP``)."""
    from pydantic import ValidationError

    from vmkeep.errors import InvalidValue, MissingValue

    try:
        return a.model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or a.kind
        if options and where in a.model.model_fields:
            where = where.upper() if where == a.target else "--" + where.replace("_", "-")
        if first.get("type") == "missing":  # its input is the whole request: not shown
            raise MissingValue(where, f"{a.kind} needs it") from None
        raise InvalidValue(where, first.get("input"), first.get("msg", "")) from None


def check(ctx: Context, a: Action, p: P.Params, actor: Actor) -> P.Params:
    """The action's checks before it is queued or run: refusals now, not a failed job later."""
    checked: P.Params = _call("check", a)(ctx, a, p, actor)
    return checked


def run(
    ctx: Context, a: Action, p: P.Params, progress: Progress, caller: Caller
) -> tuple[dict[str, Any], Warnings]:
    """The action itself (its own checks again, under its locks)."""
    from vmkeep.model import Warnings

    result, warnings = _call("run", a)(ctx, a, p, progress, caller)
    return result, warnings if isinstance(warnings, Warnings) else Warnings(list(warnings))


def enqueue(
    ctx: Context,
    a: Action,
    p: P.Params,
    actor: Actor,
    max_queued: int | None = None,
    origin: str = "api",
    **job: Any,
) -> dict[str, Any]:
    """Check, then queue the action as a daemon's job (``who``: the actor's name). The job's
    params carry the actor's role, so the runner bounds it by the same places. ``origin``:
    "api", or "schedule" for a backup job's run; ``job``: ``jobs.enqueue``'s priority and run."""
    from vmkeep.engine.core import jobs, trust

    p = check(ctx, a, p, actor)
    stored = p.model_dump(mode="json", by_alias=True, exclude_none=True)
    stored |= {trust.ROLE_KEY: actor.role, "actor": actor.name}
    job.setdefault("runs_on", runs_on(ctx, a, p))
    target = job_target(ctx, a, p)
    return jobs.enqueue(ctx, a.kind, target, stored, origin, actor.name, max_queued, **job)


def job_target(ctx: Context, a: Action, p: P.Params) -> str:
    """The job row's target: a VM's name however it was given (an id or its name: the
    overview's failed backups, ``backup cancel`` and notifications find a VM's jobs by its
    name), anything else as given."""
    typed = a.target_of(p)
    if a.target != "vm":
        return typed
    from vmkeep.engine.vm.record import find_vm
    from vmkeep.errors import VmNotFound

    with ctx.catalog.session() as s:
        try:
            return find_vm(s, typed).name
        except VmNotFound:
            return typed  # the action says so when it runs


def runs_on(ctx: Context, a: Action, p: P.Params) -> str | None:
    """The host whose daemon must run the action: its VM's (a VM's action, an in-place
    restore; a deploy's once its check placed the VM: ``route``), its group's members' (a
    group action), the destination of a redeploy (chosen by its check); None: any daemon (a
    point's or a datastore's action, a restore as a new VM: on the host of the daemon that
    runs it)."""
    from vmkeep.engine.hosts import placement

    if a.kind == "group-recover" or (a.kind == "vm-recover" and getattr(p, "redeploy", False)):
        return getattr(p, "host", None)  # the destination: its check chose it
    if a.locks == "vm":
        return placement.host_of_vm(ctx, a.target_of(p))
    if a.locks == "group" and a.kind in ("group-backup", "group-start", "group-stop"):
        return placement.host_of_group(ctx, a.target_of(p))
    if a.kind == "restore" and getattr(p, "in_place", False):
        return placement.host_of_point(ctx, int(a.target_of(p)))
    return None


# the actions whose host their check chooses: a deploy's placement (or --host), a redeploy's
# destination
PLACED_BY_CHECK = frozenset({"vm-deploy", "vm-recover", "group-recover"})


def route(ctx: Context, a: Action, p: P.Params, actor: Actor) -> tuple[P.Params, str | None]:
    """For a process without a daemon: the params and the host whose daemon must run the action
    (``runs_on``). Where its check chooses the host (``PLACED_BY_CHECK``, in a catalog with
    hosts) the check runs first, so the host is the one the job will need, not the VM's before
    it is placed or moved."""
    from vmkeep.engine.hosts import placement

    if a.kind in PLACED_BY_CHECK and placement.has_hosts(ctx):
        p = check(ctx, a, p, actor)
    return p, runs_on(ctx, a, p)


def run_here(
    ctx: Context, a: Action, p: P.Params, progress: Progress
) -> tuple[dict[str, Any], Warnings]:
    """Run the action in this process (the CLI without a daemon), recorded as a job of this
    process: listed, cancellable (``jobs cancel``), with the same result and warnings. No check
    beforehand: the action checks as it starts, and a refusal is its job's error."""
    from vmkeep.engine.core import jobs, trust

    who = jobs.local_user()
    stored = p.model_dump(mode="json", by_alias=True, exclude_none=True)
    with jobs.recorded(ctx, a.kind, job_target(ctx, a, p), stored) as job:

        def both(done: int, total: int) -> None:
            progress(done, total)
            job(done, total)

        result, warnings = run(ctx, a, p, both, Caller(trust.LOCAL_ADMIN, who, "cli"))
        job.result = result | ({"warnings": warnings.items} if warnings else {})
    return result, warnings


def _job_runner(
    a: Action, ctx: Context, stored: dict[str, Any], progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    """A queued job of kind ``a.kind``, as a daemon worker runs it (``jobs.execute``)."""
    from vmkeep.engine.core import trust

    actor = trust.actor_of(stored)
    fields = {k: v for k, v in stored.items() if k not in (trust.ROLE_KEY, "actor")}
    p = parse(a, fields)
    result, warnings = run(ctx, a, p, progress, Caller(actor, actor.name, "api"))
    return result, warnings.items


RUNNERS: dict[str, Callable[[Context, dict[str, Any], Progress], Any]] = {
    a.kind: partial(_job_runner, a) for a in _TABLE
}
# the actions that lock the VM they name: a daemon runs one of them per VM at a time, the next
# waits for it (``jobs.claim``'s one_per_target) instead of failing on the VM's lock. Not the
# ways out of a stuck VM, which must never wait behind what is stuck: a thaw, reset-state,
# recover.
ONE_PER_VM = frozenset(
    a.kind
    for a in _TABLE
    if a.locks == "vm"
    and a.target == "vm"
    and a.kind not in ("unquiesce", "reset-state", "vm-recover")
)
