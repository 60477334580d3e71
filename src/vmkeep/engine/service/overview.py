"""The dashboard's facts: every VM's protection at a glance (``vm_states``) and the summary the
overview page and ``GET /v1/overview`` show (``summary``), each from a few set-based queries
whatever the number of VMs and points (1,000 VMs and 10,000 points: no query per VM).

A VM is
- ``protected``: its newest VALID point (a VALID increment of a VALID chain, on any datastore;
  ``listing.newest_point``'s rule) is younger than its policy interval;
- ``stale``: it has such a point, older than that;
- ``unprotected``: it has none.
Its ``failed`` flag: its newest backup job (kind ``backup``, target the VM) FAILED.

The policy interval of a VM is the period of the schedules of the enabled backup jobs that back
it up (the shortest when several do: the time between two slots of its schedule), or
``DEFAULT_INTERVAL`` when none does. Which VMs a backup job backs up is its selector's rule
(``backupjobs.selection``): the VMs it names, its group's members, its pool's or every VM's,
without those its pool or ``--all`` leaves out by their policy (``exclude``).

Times are ISO 8601 text (UTC); the job dicts are ``jobs.job_dict``'s, as ``jobs.list_jobs``
gives them.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import (
    Backup,
    BackupJob,
    Datastore,
    Drill,
    Group,
    GroupMember,
    Increment,
    Job,
    Vm,
)
from vmkeep.engine.core import jobs, schedules, stores
from vmkeep.engine.core.context import Context
from vmkeep.engine.vm.policy import Policies
from vmkeep.errors import VmkeepError
from vmkeep.model import BackupStatus, JobState

DEFAULT_INTERVAL = timedelta(hours=24)  # a VM no enabled backup job backs up
FAILURES_SINCE = timedelta(hours=24)  # the failures the overview lists ("last night's")
FAILURES_MAX = 20
RUNNING_MAX = 200  # running jobs shown (the job limits keep far fewer running)
MONITOR_TTL = 10.0  # seconds a datastore's free bytes are reused (a remote store is asked once)
STATES = ("protected", "stale", "unprotected")


def vm_states(ctx: Context, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per VM (those ``names`` gives that are in the catalog, or all): ``state`` (protected,
    stale or unprotected), ``last_point`` (ISO time of its newest VALID point, or None),
    ``last_size`` (that point's bytes), ``last_drill`` (its newest drill of any point:
    ``{"drill", "result", "reason", "at", "backup", "increment"}``, or None) and ``failed``
    (its newest backup job FAILED)."""
    now = datetime.now(UTC)
    with ctx.catalog.session() as s:
        return _vm_states(ctx, s, names, now)


def summary(ctx: Context, max_age: float = 0.0) -> dict[str, Any]:
    """The overview: VM counts by state (and how many failed their last backup), each
    datastore's points and bytes, the running jobs and the failures of the last 24 h (newest
    first, at most ``FAILURES_MAX``), made at ``generated``.

    ``max_age``: seconds an overview this process made of the same catalog may be answered
    again instead (a dashboard that many clients poll: one ~30 ms computation per second for
    1,000 VMs and 10,000 points, not one per request; and the same body, so its ETag
    matches)."""
    key = ctx.config.catalog_url
    if max_age <= 0:
        return _made_now(ctx, key)
    with _making:  # one thread makes it; the requests that came meanwhile take that one
        hit = _made.get(key)
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
        return _made_now(ctx, key)


_made: dict[str, tuple[float, dict[str, Any]]] = {}  # catalog URL -> (when, the overview)
_making = threading.Lock()


def _made_now(ctx: Context, key: str) -> dict[str, Any]:
    started = time.monotonic()
    out = _summary(ctx)
    _made[key] = (started, out)
    return out


def _summary(ctx: Context) -> dict[str, Any]:
    now = datetime.now(UTC)
    with ctx.catalog.session() as s:
        states = _vm_states(ctx, s, None, now)
        counts = dict.fromkeys(("total", *STATES, "failed"), 0)
        counts["total"] = len(states)
        for st in states.values():
            counts[st["state"]] += 1
            counts["failed"] += st["failed"]
        datastores = _datastores(s)
        running = [
            jobs.job_dict(j)
            for j in s.execute(
                select(Job).where(Job.state == JobState.RUNNING).order_by(Job.id).limit(RUNNING_MAX)
            ).scalars()
        ]
        failures = [
            jobs.job_dict(j)
            for j in s.execute(
                select(Job)
                .where(Job.state == JobState.FAILED, Job.finished_at >= now - FAILURES_SINCE)
                .order_by(Job.finished_at.desc(), Job.id.desc())
                .limit(FAILURES_MAX)
            ).scalars()
        ]
    return {
        "vms": counts,
        "datastores": datastores,
        "running": running,
        "failures": failures,
        "generated": now.isoformat(),
    }


# --- per VM ------------------------------------------------------------------------------------
def _vm_states(
    ctx: Context, s: Session, names: list[str] | None, now: datetime
) -> dict[str, dict[str, Any]]:
    q = select(Vm.id, Vm.name, Vm.pool, Vm.backup_config).order_by(Vm.id)
    if names is not None:
        q = q.where(Vm.name.in_(list(names)))
    vms = s.execute(q).all()
    if not vms:
        return {}
    ids = [v.id for v in vms] if names is not None else None
    points = _newest_points(s, ids)
    drills = _newest_drills(s, ids)
    failed = _failed_last(s, None if names is None else [v.name for v in vms])
    intervals = _intervals(ctx, s, now)
    out: dict[str, dict[str, Any]] = {}
    for v in vms:
        point = points.get(v.id)
        if point is None:
            state = "unprotected"
        else:
            interval = intervals.get(v.name, DEFAULT_INTERVAL)
            state = "protected" if now - point[0] < interval else "stale"
        out[v.name] = {
            "state": state,
            "last_point": None if point is None else point[0].isoformat(),
            "last_size": None if point is None else point[1],
            "last_drill": drills.get(v.id),
            "failed": v.name in failed,
        }
    return out


def _newest_points(s: Session, vm_ids: list[int] | None) -> dict[int, tuple[datetime, int]]:
    """Per VM id, (started, size) of its newest VALID point on any datastore: the newest by
    (started, backup id, seq), ``listing.newest_point``'s order, in one windowed query."""
    rank = (
        func.row_number()
        .over(
            partition_by=Backup.vm_id,
            order_by=(Increment.started_at.desc(), Backup.id.desc(), Increment.seq.desc()),
        )
        .label("rank")
    )
    inner = (
        select(Backup.vm_id, Increment.started_at, Increment.size, rank)
        .join(Increment, Increment.backup_id == Backup.id)
        .where(Backup.status == BackupStatus.VALID, Increment.status == BackupStatus.VALID)
    )
    if vm_ids is not None:
        inner = inner.where(Backup.vm_id.in_(vm_ids))
    sub = inner.subquery()
    rows = s.execute(select(sub.c.vm_id, sub.c.started_at, sub.c.size).where(sub.c.rank == 1))
    return {vm_id: (started, int(size)) for vm_id, started, size in rows}


def _newest_drills(s: Session, vm_ids: list[int] | None) -> dict[int, dict[str, Any]]:
    """Per VM id, its newest drill of any of its points (the highest drill id)."""
    newest = (
        select(func.max(Drill.id))
        .join(Increment, Increment.id == Drill.increment_id)
        .join(Backup, Backup.id == Increment.backup_id)
        .group_by(Backup.vm_id)
    )
    if vm_ids is not None:
        newest = newest.where(Backup.vm_id.in_(vm_ids))
    q = (
        select(
            Backup.vm_id,
            Backup.id,
            Increment.seq,
            Drill.id,
            Drill.result,
            Drill.reason,
            Drill.started_at,
            Drill.finished_at,
        )  # fmt: skip
        .join(Increment, Increment.id == Drill.increment_id)
        .join(Backup, Backup.id == Increment.backup_id)
        .where(Drill.id.in_(newest.scalar_subquery()))
    )
    out = {}
    for vm_id, backup_id, seq, drill_id, result, reason, started, finished in s.execute(q):
        took = (finished - started).total_seconds() if finished else None
        out[vm_id] = {
            "drill": drill_id,
            "result": result,
            "reason": reason,
            "at": finished.isoformat() if finished else None,
            "duration_s": None if took is None else round(took, 1),
            "backup": backup_id,
            "increment": seq,
        }
    return out


def _failed_last(s: Session, names: list[str] | None) -> set[str]:
    """The VMs (by name) whose newest backup job FAILED."""
    newest = select(func.max(Job.id)).where(Job.kind == "backup").group_by(Job.target)
    if names is not None:
        newest = newest.where(Job.target.in_(names))
    q = select(Job.target).where(Job.id.in_(newest.scalar_subquery()), Job.state == JobState.FAILED)
    return set(s.execute(q).scalars())


def _intervals(ctx: Context, s: Session, now: datetime) -> dict[str, timedelta]:
    """Per VM name, its policy interval: the shortest period of the enabled backup jobs (task
    backup, a repeating schedule) that back it up. VMs none backs up are not in it."""
    backup_jobs = s.execute(
        select(BackupJob.selector, BackupJob.schedule, BackupJob.timezone).where(
            BackupJob.enabled.is_(True), BackupJob.task == "backup"
        )
    ).all()
    periods = [(sel, p) for sel, sched, tz in backup_jobs if (p := _period(sched, tz, now))]
    if not periods:
        return {}
    everyone: list[tuple[str, str | None, bool]] | None = None
    members: dict[str, list[str]] | None = None
    out: dict[str, timedelta] = {}
    for sel, period in periods:
        if "vms" in sel:
            covered = list(sel["vms"])
        elif "group" in sel:
            if members is None:
                members = _group_members(s)
            covered = members.get(sel["group"], [])
        else:
            if everyone is None:
                everyone = _excluded(ctx, s)
            pool = sel.get("pool")
            covered = [n for n, p, ex in everyone if not ex and (pool is None or p == pool)]
        for name in covered:
            if name not in out or period < out[name]:
                out[name] = period
    return out


def _period(schedule: str, timezone: str, now: datetime) -> timedelta | None:
    """The time between two slots of a stored schedule after ``now`` (None: a one-shot)."""
    spec = schedules.stored(schedule)
    if spec.is_once:
        return None
    try:
        tz = schedules.zone(timezone)
        first = schedules.next_after(spec, now, tz)
        second = None if first is None else schedules.next_after(spec, first, tz)
    except (VmkeepError, ValueError):
        return None
    if first is None or second is None:
        return None
    return second - first


def _group_members(s: Session) -> dict[str, list[str]]:
    rows = s.execute(
        select(Group.name, Vm.name)
        .join(GroupMember, GroupMember.group_id == Group.id)
        .join(Vm, Vm.id == GroupMember.vm_id)
    )
    out: dict[str, list[str]] = {}
    for group, vm in rows:
        out.setdefault(group, []).append(vm)
    return out


def _excluded(ctx: Context, s: Session) -> list[tuple[str, str | None, bool]]:
    """Every VM's (name, pool, excluded by its policy): what ``--all``/``--pool`` jobs skip."""
    policies = Policies(ctx, s)
    rows = s.execute(select(Vm.name, Vm.pool, Vm.backup_config)).all()
    return [(n, p, bool(policies.config(cfg, p)["exclude"])) for n, p, cfg in rows]


# --- datastores --------------------------------------------------------------------------------
_free_cache: dict[str, tuple[float, int | None]] = {}
_free_lock = threading.Lock()


def _datastores(s: Session) -> list[dict[str, Any]]:
    """Each datastore's name, driver, the bytes its points take (the catalog's sizes of every
    point not FAILED or CANCELLED), its free bytes (the driver's monitor, reused for
    ``MONITOR_TTL`` s; None when it cannot tell) and its VALID points."""
    kept = Increment.status.not_in((BackupStatus.FAILED, BackupStatus.CANCELLED))
    valid = (Backup.status == BackupStatus.VALID) & (Increment.status == BackupStatus.VALID)
    q = (
        select(
            Backup.datastore_id,
            func.sum(case((kept, Increment.size), else_=0)),
            func.sum(case((valid, 1), else_=0)),
        )
        .join(Increment, Increment.backup_id == Backup.id)
        .group_by(Backup.datastore_id)
    )
    figures = {ds_id: (int(used or 0), int(points or 0)) for ds_id, used, points in s.execute(q)}
    out = []
    for ds in s.execute(select(Datastore).order_by(Datastore.id)).scalars():
        used, points = figures.get(ds.id, (0, 0))
        out.append(
            {
                "name": ds.name,
                "driver": ds.driver,
                "used_bytes": used,
                "free_bytes": _free(ds),
                "points": points,
            }
        )
    return out


def _free(ds: Datastore) -> int | None:
    now, key = time.monotonic(), f"{ds.id} {ds.name} {ds.driver} {sorted(ds.options.items())}"
    with _free_lock:
        hit = _free_cache.get(key)
    if hit is not None and now - hit[0] < MONITOR_TTL:
        return hit[1]
    try:
        free: int | None = stores.monitor_once(stores.driver_of(ds))[1]
    except VmkeepError:
        free = None
    with _free_lock:
        _free_cache[key] = (now, free)
    return free
