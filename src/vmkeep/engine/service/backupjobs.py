"""Backup jobs (OpenNebula's backup jobs, Proxmox's backup schedules): which VMs (a list, a
group, a pool or all), which datastore (and a second one to copy to), when (``schedules.py``),
how urgent (priority 0-99), one VM at a time or all at once, and the policy keys they set over
the VMs' own. Here: defining them and showing them with their runs; firing them is
``scheduler.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import BackupJob, BackupJobRun, Datastore, GroupBackup, Job, Vm
from vmkeep.engine.core import backup_config, jobs, schedules, stores
from vmkeep.engine.core.context import Context
from vmkeep.engine.groups.drill import missing_members
from vmkeep.engine.groups.manage import find_group
from vmkeep.engine.points.listing import newest_point, verify_due
from vmkeep.engine.vm import policy
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import AlreadyExists, BackupJobNotFound, InvalidValue, NotFound
from vmkeep.model import BackupStatus, JobState
from vmkeep.names import check_name

EXECUTIONS = ("sequential", "parallel")
# what a run does to each VM it names: a backup (retention after it, with the job's keys), a
# prune (retention alone), a verify of the points not verified lately, a drill of the newest
TASKS = ("backup", "prune", "verify", "drill")
# the policy keys a backup job may set over its VMs' (backup_config.KEYS but exclude: a job
# names its VMs itself)
OPTION_KEYS = ("mode", "fs_freeze", *backup_config.KEEP_KEYS, "memory", "backup_volatile")
SELECTORS = ("vms", "group", "pool", "all")


def find(s: Session, name: str) -> BackupJob:
    bj = s.execute(select(BackupJob).where(BackupJob.name == name)).scalar_one_or_none()
    if bj is None:
        raise BackupJobNotFound(name)
    return bj


def selector_text(sel: dict[str, Any]) -> str:
    if "vms" in sel:
        return "vms " + ",".join(sel["vms"])
    if "group" in sel:
        return f"group {sel['group']}"
    if "pool" in sel:
        return f"pool {sel['pool']}"
    return "all"


def _selector(s: Session, sel: dict[str, Any]) -> dict[str, Any]:
    """Exactly one of vms / group / pool / all, each naming what exists (names canonical)."""
    given = [k for k in SELECTORS if sel.get(k)]
    if len(given) != 1:
        raise InvalidValue("backup job", "--vm/--group/--pool/--all", "give exactly one of them")
    kind = given[0]
    if kind == "vms":
        return {"vms": list(dict.fromkeys(find_vm(s, str(v)).name for v in sel["vms"]))}
    if kind == "group":
        return {"group": find_group(s, str(sel["group"])).name}
    if kind == "pool":
        return {"pool": policy.find_pool(s, str(sel["pool"])).name}
    return {"all": True}


# the options each task takes (a backup's: its policy keys over the VMs' and bwlimit)
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "backup": (*OPTION_KEYS, "bwlimit"),
    "prune": backup_config.KEEP_KEYS,
    "verify": ("reverify_after",),  # days: a point verified since is not read again
    "drill": ("probe", "timeout", "cross_probe"),  # cross_probe: a group's, MEMBER=CMD
}


def _options(options: dict[str, Any], task: str = "backup") -> dict[str, Any]:
    out: dict[str, Any] = {}
    allowed = TASK_OPTIONS[task]
    for key, value in options.items():
        if key not in allowed:
            raise InvalidValue(
                f"{task} job option", key, f"a {task} job takes {', '.join(allowed)}"
            )
        if value is None:
            continue
        if key == "reverify_after":
            out[key] = _whole(key, value, 0, 36500, "days, a whole number >= 0")
            continue
        if key == "timeout":
            out[key] = _whole(key, value, 1, 86400, "seconds the guest has to answer, 1-86400")
            continue
        if key == "cross_probe":
            member, _, command = str(value).partition("=")
            if not member or not command or len(command) > 4096:
                raise InvalidValue("--cross-probe", value, "use MEMBER=CMD (a group's member)")
            out[key] = str(value)
            continue
        if key == "probe":
            if not isinstance(value, str) or not 1 <= len(value) <= 4096:
                raise InvalidValue("--probe", value, "give a command of 1-4096 characters")
            out[key] = value
            continue
        if key == "bwlimit":  # KiB/s to a restic or rsync datastore (not a policy key)
            try:
                out[key] = int(value)
            except (TypeError, ValueError):
                out[key] = 0
            if not 1 <= out[key] <= 1 << 30:
                raise InvalidValue("--bwlimit", value, "use KiB/s, a whole number >= 1")
            continue
        checked = backup_config.validate(key, value)
        out[key] = str(checked) if hasattr(checked, "value") else checked
    return out


def _whole(key: str, value: Any, low: int, high: int, hint: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = low - 1
    if not low <= n <= high:
        raise InvalidValue("--" + key.replace("_", "-"), value, f"use {hint}")
    return n


def _check(s: Session, bj: BackupJob) -> None:
    """Every field of ``bj`` valid and canonical (the schedule checked and stored canonical)."""
    stores.find_datastore(s, bj.datastore)
    if bj.copy_to is not None and stores.find_datastore(s, bj.copy_to).name == bj.datastore:
        raise InvalidValue("--copy-to", bj.copy_to, "name a datastore other than --datastore")
    if bj.task not in TASKS:
        raise InvalidValue("--task", bj.task, f"use one of {', '.join(TASKS)}")
    if bj.copy_to is not None and bj.task != "backup":
        raise InvalidValue("--copy-to", bj.copy_to, "only a backup job copies its new points")
    _options(bj.options, bj.task)  # each option one this task takes
    if not 0 <= bj.priority <= 99:
        raise InvalidValue("--priority", bj.priority, "use 0-99 (higher runs first)")
    if bj.execution not in EXECUTIONS:
        raise InvalidValue("--execution", bj.execution, f"use {' or '.join(EXECUTIONS)}")


def create(
    ctx: Context,
    name: str,
    selector: dict[str, Any],
    datastore: str,
    schedule: str,
    *,
    priority: int = jobs.DEFAULT_PRIORITY,
    execution: str = "sequential",
    options: dict[str, Any] | None = None,
    copy_to: str | None = None,
    repeat_missed: bool = True,
    enabled: bool = True,
    task: str = "backup",
    owner: str = "",
    role: str = "admin",
    now: datetime | None = None,
) -> dict[str, Any]:
    """A new backup job; ``owner``/``role``: who made it (its runs act with that role)."""
    check_name("backup job name", name)
    now = now or datetime.now(UTC)
    tz_name = schedules.zone_name(ctx.config.schedule.timezone)
    tz = schedules.zone(tz_name)
    with ctx.catalog.session() as s:
        if s.execute(select(BackupJob.id).where(BackupJob.name == name)).first() is not None:
            raise AlreadyExists(f"backup job {name!r}")
        bj = BackupJob(
            name=name,
            selector=_selector(s, selector),
            datastore=stores.find_datastore(s, datastore).name,
            copy_to=stores.find_datastore(s, copy_to).name if copy_to else None,
            schedule=schedules.parse(schedule, now, tz).text,
            priority=priority,
            execution=execution,
            options=_options(options or {}, task if task in TASKS else "backup"),
            task=task,
            repeat_missed=repeat_missed,
            enabled=enabled,
            owner=owner,
            role=role,
            created_at=now,
            active_since=now,
            timezone=tz_name,
        )
        _check(s, bj)
        s.add(bj)
        s.flush()
        return _dict(s, bj, now)


def edit(
    ctx: Context,
    name: str,
    changes: dict[str, Any],
    now: datetime | None = None,
    by: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Change the given fields (the same names as ``create``'s; a selector replaces the old).
    ``by``: (owner, role) of who edits: the job's runs act with that role from now on (never
    with the role of whoever made it, if that was more)."""
    now = now or datetime.now(UTC)
    with ctx.catalog.session() as s:
        bj = find(s, name)
        if by is not None:
            bj.owner, bj.role = by
        tz = schedules.zone(bj.timezone)
        sel = {k: changes.pop(k) for k in SELECTORS if changes.get(k)}
        if sel:
            bj.selector = _selector(s, sel)
        if changes.get("task") is not None:  # first: the options that follow are its own
            bj.task = changes.pop("task")
            if bj.task in TASKS:  # options the new task does not take are dropped
                bj.options = {k: v for k, v in bj.options.items() if k in TASK_OPTIONS[bj.task]}
        for key, value in changes.items():
            if value is None:
                continue
            if key == "schedule":
                text = schedules.parse(value, now, tz).text
                if text != bj.schedule:  # the old schedule's slots are not the new one's
                    bj.schedule, bj.active_since = text, now
            elif key == "options":
                bj.options = {**bj.options, **_options(value, bj.task)}
                bj.options = {k: v for k, v in bj.options.items() if value.get(k, "") is not None}
            elif key == "datastore":
                bj.datastore = stores.find_datastore(s, value).name
            elif key == "copy_to":
                bj.copy_to = stores.find_datastore(s, value).name if value else None
            elif key == "enabled":
                if value and not bj.enabled:  # slots while it was disabled do not run now
                    bj.active_since = now
                bj.enabled = bool(value)
            elif key in ("priority", "execution", "repeat_missed"):
                setattr(bj, key, value)
            else:
                raise InvalidValue("backup job field", key, "see 'vmkeep backupjob edit --help'")
        _check(s, bj)
        return _dict(s, bj, now)


def set_enabled(ctx: Context, name: str, enabled: bool) -> dict[str, Any]:
    return edit(ctx, name, {"enabled": enabled})


def remove(ctx: Context, name: str) -> dict[str, Any]:
    """Delete a backup job and its runs' records; its QUEUED jobs are cancelled (running ones
    finish; jobs keep their run's id)."""
    with ctx.catalog.session() as s:
        bj = find(s, name)
        shown = _dict(s, bj, datetime.now(UTC))
        run_ids = select(BackupJobRun.id).where(BackupJobRun.backup_job_id == bj.id)
        for j in s.execute(
            select(Job).where(Job.run_id.in_(run_ids), Job.state == JobState.QUEUED)
        ).scalars():
            j.state, j.finished_at = JobState.CANCELLED, datetime.now(UTC)
            j.error, j.error_code = f"backup job {name} was deleted", "Cancelled"
        s.execute(delete(BackupJobRun).where(BackupJobRun.backup_job_id == bj.id))
        s.delete(bj)
        return shown


def next_run(bj: BackupJob, now: datetime, last: datetime | None) -> datetime | None:
    """When the scheduler fires it next (None: disabled, or a one-shot that has fired);
    ``last``: its newest fired slot (``last_slots``)."""
    if not bj.enabled:
        return None
    spec = schedules.stored(bj.schedule)
    tz = schedules.zone(bj.timezone)
    due = schedules.latest_due(spec, now, tz)
    if due is not None and unfired(bj, due, tz, last):
        return due  # due now: the scheduler's next look fires it
    return schedules.next_after(spec, max(now, bj.active_since), tz)


def unfired(bj: BackupJob, slot: datetime, tz: tzinfo, last: datetime | None) -> bool:
    """Whether the scheduler has yet to fire ``slot``, the newest due one: not from before the
    job was made, enabled or given a new schedule; newer than ``last``, the newest slot fired;
    and not the same wall-clock time as it (the hour a night's clocks go back repeats: one
    slot)."""
    if slot < bj.active_since:
        return False
    if last is None:
        return True
    same = slot.astimezone(tz).replace(tzinfo=None) == last.astimezone(tz).replace(tzinfo=None)
    return slot > last and not same


def last_slots(s: Session, ids: list[int] | None = None) -> dict[int, datetime]:
    """Per backup job (those of ``ids``, or all) the newest slot the scheduler fired or skipped,
    in one query; manual runs do not count."""
    q = select(BackupJobRun.backup_job_id, func.max(BackupJobRun.slot_at)).where(
        BackupJobRun.origin != "manual"
    )
    if ids is not None:
        q = q.where(BackupJobRun.backup_job_id.in_(ids))
    return {bj_id: last for bj_id, last in s.execute(q.group_by(BackupJobRun.backup_job_id))}


def run_dict(s: Session, r: BackupJobRun) -> dict[str, Any]:
    rows = s.execute(select(Job).where(Job.run_id == r.id).order_by(Job.id)).scalars()
    return {
        "id": r.id,
        "slot": r.slot_at,
        "origin": r.origin,
        "state": r.state,
        "host": r.host,
        "who": r.who,
        "created": r.created_at,
        "skipped": list(r.skipped or []),
        "jobs": [
            {
                "id": j.id,
                "target": j.target,
                "state": j.state,
                "waiting": j.wait_reason if j.state == JobState.QUEUED else None,
                "error": j.error,
                "exit_code": jobs.exit_code(j.state, j.error_code, j.result),
            }
            for j in rows
        ],
    }


def get_run(ctx: Context, run_id: int) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        r = s.get(BackupJobRun, run_id)
        if r is None:
            raise NotFound(f"backup job run {run_id}")
        return run_dict(s, r)


def _dict(
    s: Session, bj: BackupJob, now: datetime, slots: dict[int, datetime] | None = None
) -> dict[str, Any]:
    """``slots``: ``last_slots`` of every job listed (read here for this one when None)."""
    slots = last_slots(s, [bj.id]) if slots is None else slots
    last = s.execute(
        select(BackupJobRun)
        .where(BackupJobRun.backup_job_id == bj.id)
        .order_by(BackupJobRun.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return {
        "id": bj.id,
        "name": bj.name,
        "task": bj.task,
        "selector": dict(bj.selector),
        "target": selector_text(bj.selector),
        "datastore": bj.datastore,
        "copy_to": bj.copy_to,
        "schedule": bj.schedule,
        "priority": bj.priority,
        "execution": bj.execution,
        "options": dict(bj.options),
        "repeat_missed": bj.repeat_missed,
        "enabled": bj.enabled,
        "owner": bj.owner,
        "role": bj.role,
        "created": bj.created_at,
        "timezone": bj.timezone,
        "next_run": next_run(bj, now, slots.get(bj.id)),
        "last_run": run_dict(s, last) if last is not None else None,
    }


def list_all(ctx: Context, now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    with ctx.catalog.session() as s:
        rows = s.execute(select(BackupJob).order_by(BackupJob.name)).scalars()
        slots = last_slots(s)
        return [_dict(s, bj, now, slots) for bj in rows]


def show(ctx: Context, name: str, now: datetime | None = None) -> dict[str, Any]:
    """One backup job, its last runs, and per VM its last result or why it was left out."""
    now = now or datetime.now(UTC)
    with ctx.catalog.session() as s:
        bj = find(s, name)
        out = _dict(s, bj, now)
        runs = s.execute(
            select(BackupJobRun)
            .where(BackupJobRun.backup_job_id == bj.id)
            .order_by(BackupJobRun.id.desc())
            .limit(10)
        ).scalars()
        out["runs"] = [run_dict(s, r) for r in runs]
        out["vms"] = vm_results(ctx, s, bj)
        return out


# --- what a run does ---------------------------------------------------------------------------
Targets = list[tuple[str, dict[str, Any]]]


def selection(
    ctx: Context, s: Session, bj: BackupJob, now: datetime | None = None
) -> tuple[Targets, list[dict[str, Any]]]:
    """The actions a run of ``bj`` queues (kind, params), and the VMs it leaves out with why:
    not in the catalog any more, or excluded (``vm config VM --exclude yes``, which a ``--pool``
    or ``--all`` job honours; a VM named by ``--vm`` is taken whatever it says). A verify or
    drill job also leaves out a VM with nothing to do (marked ``excluded``: not reported)."""
    if bj.task == "backup" and "group" in bj.selector:
        return [("group-backup", {"group": bj.selector["group"]} | _backup_params(bj))], []
    if bj.task == "drill" and "group" in bj.selector:  # the group's newest cut, booted together
        return _group_drill(s, bj)
    names, skipped = _vms(ctx, s, bj)
    if bj.task == "backup":
        return [("backup", {"vm": v} | _backup_params(bj)) for v in names], skipped
    if bj.task == "prune":
        rules = {k: v for k, v in bj.options.items() if k in backup_config.KEEP_KEYS}
        return [("prune", {"vm": v, "datastore": bj.datastore} | rules) for v in names], skipped
    now = now or datetime.now(UTC)
    out: Targets = []
    for v in names:
        found = _point_targets(s, bj, v, now)
        if isinstance(found, tuple):  # (why, quiet): nothing to do now, or nothing at all
            skipped.append({"vm": v, "reason": found[0]} | ({"excluded": True} if found[1] else {}))
        else:
            out += found
    return out, skipped


def _backup_params(bj: BackupJob) -> dict[str, Any]:
    common: dict[str, Any] = {"datastore": bj.datastore}
    policy_keys = {k: v for k, v in bj.options.items() if k != "bwlimit"}
    if policy_keys:
        common["policy"] = policy_keys
    if bj.options.get("bwlimit"):
        common["bwlimit"] = bj.options["bwlimit"]
    if bj.copy_to:
        common["copy_to"] = bj.copy_to
    return common


def _vms(ctx: Context, s: Session, bj: BackupJob) -> tuple[list[str], list[dict[str, Any]]]:
    """The VMs the job names now (a group's members in their order), and those left out."""
    sel = bj.selector
    if "group" in sel:
        return [m.vm.name for m in find_group(s, sel["group"]).members], []
    if "vms" in sel:
        known = set(s.execute(select(Vm.name).where(Vm.name.in_(sel["vms"]))).scalars())
        skipped = [
            {"vm": v, "reason": "not in the catalog (vm import it, or backupjob edit --vm)"}
            for v in sel["vms"]
            if v not in known
        ]
        return [v for v in sel["vms"] if v in known], skipped
    q = select(Vm).order_by(Vm.name)
    if "pool" in sel:
        q = q.where(Vm.pool == sel["pool"])
    policies = policy.Policies(ctx, s)
    names, skipped = [], []
    for vm in s.execute(q).scalars():
        cfg, sources = policies.of(vm.backup_config, vm.pool)
        if cfg["exclude"]:
            why = f"excluded by its policy ({sources['exclude']}; vm config {vm.name} --exclude no)"
            skipped.append({"vm": vm.name, "reason": why, "excluded": True})
        else:
            names.append(vm.name)
    return names, skipped


def _group_drill(s: Session, bj: BackupJob) -> tuple[Targets, list[dict[str, Any]]]:
    group = find_group(s, bj.selector["group"])
    rows = s.execute(
        select(GroupBackup)
        .join(Datastore, Datastore.id == GroupBackup.datastore_id)
        .where(
            GroupBackup.group_id == group.id,
            Datastore.name == bj.datastore,
            GroupBackup.status == BackupStatus.VALID,
        )
        .order_by(GroupBackup.id.desc())
    ).scalars()
    # the newest whose members all still have their point (retention may have removed one)
    gb = next((g for g in rows if not missing_members(g)), None)
    if gb is None:  # reported: a drill job that drills nothing proves nothing
        return [], [
            {"vm": group.name, "reason": f"no complete VALID group backup on {bj.datastore}"}
        ]
    params: dict[str, Any] = {"group_backup": gb.id}
    if "timeout" in bj.options:
        params["timeout"] = bj.options["timeout"]
    if "probe" in bj.options:  # every member's own probe
        params["probes"] = {m.vm_name: bj.options["probe"] for m in gb.members}
    if "cross_probe" in bj.options:
        member, _, command = bj.options["cross_probe"].partition("=")
        params["cross_probe"] = {"member": member, "command": command}
    return [("group-drill", params)], []


def _point_targets(s: Session, bj: BackupJob, vm: str, now: datetime) -> Targets | tuple[str, bool]:
    """A verify job's chains of ``vm`` due for a verify, or a drill job's newest point of it,
    on the job's datastore; or why there is nothing to do, and whether that goes unreported
    (every point verified lately; no point of a VM of a pool or of all: it may be backed up to
    another datastore) or is reported (no point of a VM the job names: it proves nothing)."""
    newest = newest_point(s, vm, bj.datastore)
    if newest is None:  # reported for a VM the job names (--vm); one of a pool or of all
        return f"no restore point on {bj.datastore}", "vms" not in bj.selector  # may go elsewhere
    if bj.task == "verify":
        days = bj.options.get("reverify_after")
        due = verify_due(s, vm, bj.datastore, days, now)
        if not due:
            return f"every point on {bj.datastore} verified within {days} days", True
        return [("verify", {"backup": b}) for b in due]
    opts = {k: bj.options[k] for k in ("probe", "timeout") if k in bj.options}
    return [("drill", {"backup": newest[0], "increment": newest[1]} | opts)]


# --- what each VM got ------------------------------------------------------------------------
def vm_results(ctx: Context, s: Session, bj: BackupJob) -> list[dict[str, Any]]:
    """Per VM (or group) the backup job names now: its job in the last run that had one for it
    (state, when, error, why it waits), or why the newest run left it out (excluded, refused
    when queued: a state that allows no backup, ...)."""
    targets, skipped = selection(ctx, s, bj)
    runs = list(
        s.execute(
            select(BackupJobRun)
            .where(BackupJobRun.backup_job_id == bj.id)
            .order_by(BackupJobRun.id)
        ).scalars()
    )
    last: dict[str, Job] = {}
    q = select(Job).where(Job.run_id.in_([r.id for r in runs])).order_by(Job.id)
    for row in s.execute(q).scalars():
        last[row.target] = row
    left_out = {x["vm"]: x["reason"] for x in (runs[-1].skipped if runs else [])}
    rows = []
    for _kind, params in targets:
        name = target_name(params)
        j = last.get(name)
        if name in left_out and (j is None or j.run_id != runs[-1].id):
            rows.append(_result(name, None, "SKIPPED", left_out[name]))
        elif j is None:
            rows.append(_result(name, None, "NEVER", None))
        else:
            waits = (
                (j.wait_reason or "waiting for a free worker")
                if j.state == JobState.QUEUED
                else None
            )
            rows.append(_result(name, j, j.state, waits))
    return rows + [_result(x["vm"], None, "SKIPPED", x["reason"]) for x in skipped]


def target_name(params: dict[str, Any]) -> str:
    """What a queued action of a run acts on, as its job's target names it."""
    for key in ("vm", "group", "backup", "group_backup"):
        if params.get(key) is not None:
            return str(params[key])
    return "?"


def _result(vm: str, j: Job | None, state: str, reason: str | None) -> dict[str, Any]:
    return {"vm": vm, "job": j.id if j else None, "state": state,
            "finished": j.finished_at if j else None, "error": j.error if j else None,
            "reason": reason}  # fmt: skip
