"""The daemon's scheduler: fires each backup job at its slots (``schedules.py``).

Each look (every ``[schedule] tick`` s) takes every enabled backup job's newest due slot; one
that has not been fired is fired: a ``backup_job_runs`` row, unique per job and slot (two
daemons on one catalog: the second insert fails and that daemon leaves it), then one queued job
per VM (a group: one group backup) through the action table, with the backup job's priority,
its run's id and its policy keys. A slot that came due before this daemon's previous look (or,
at its first look, more than a minute ago) was missed (no daemon ran then): it runs once now,
however many slots were missed (``repeat_missed``, the default), or is recorded SKIPPED. The clock is injectable (``Clock``): tests run a night in seconds.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from vmkeep.catalog.tables import BackupJob, BackupJobRun
from vmkeep.config import Config
from vmkeep.engine.core import schedules
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import Actor
from vmkeep.engine.service import actions, backupjobs, notify
from vmkeep.errors import CatalogError, VmkeepError

log = logging.getLogger(__name__)
GRACE = 60.0  # seconds after its slot that a fire is on time, not a missed slot run late
LATE = 900.0  # no look takes this long: a slot older than this was missed, whatever


class Clock(Protocol):
    speed: float  # clock seconds per real second

    def now(self) -> datetime: ...


class SystemClock:
    speed = 1.0

    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class FastClock:
    """Reads ``start`` at the real time ``since`` (a Unix time; default: when it is made) and
    runs ``speed`` times faster than the real clock. Tests: a night in seconds; two daemons
    given the same ``since`` share one clock, as two hosts synchronised by NTP do
    (``vmkeep daemon --clock START,SPEED[,SINCE]``)."""

    start: datetime
    speed: float
    since: float = field(default_factory=time.time)

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(time.time() - self.since) * self.speed)


def parse_clock(text: str) -> FastClock:
    start, _, rest = text.partition(",")
    speed, _, since = rest.partition(",")
    try:
        at = datetime.fromisoformat(start)
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        return FastClock(at, float(speed or 1), float(since) if since else time.time())
    except ValueError:
        raise VmkeepError(
            f"--clock {text!r}: use START,SPEED[,SINCE], e.g. 2026-12-05T01:50,600"
        ) from None


# --- firing ----------------------------------------------------------------------------------
def fire(
    ctx: Context, bj_id: int, slot: datetime, origin: str, who: str = "", skip: bool = False
) -> dict[str, Any] | None:
    """Fire one slot of a backup job: its run row and its queued jobs (``skip``: a missed slot
    recorded, nothing queued). None when the slot was fired already (by another daemon)."""
    try:
        with ctx.catalog.session() as s:
            bj = s.get(BackupJob, bj_id)
            if bj is None:
                return None
            run = BackupJobRun(backup_job_id=bj.id, slot_at=slot, origin=origin,
                               state="SKIPPED" if skip else "FIRED",
                               host=socket.gethostname(), who=who or "scheduler", skipped=[])  # fmt: skip
            s.add(run)
            s.flush()
            run_id, name, role, priority = run.id, bj.name, bj.role, bj.priority
            targets, skipped = ([], []) if skip else backupjobs.selection(ctx, s, bj)
    except CatalogError as err:
        if isinstance(err.__cause__, IntegrityError):
            return None  # fired by another daemon: the unique slot row is theirs
        raise
    actor = Actor(f"backupjob:{name}", role)
    excluded = [x for x in skipped if x.get("excluded")]  # by their policy: not reported
    left_out = [x for x in skipped if not x.get("excluded")]  # vanished VMs, refusals: reported
    for kind, params in targets:
        a = actions.action(kind)
        what = backupjobs.target_name(params)
        try:
            p = actions.parse(a, params)
            actions.enqueue(ctx, a, p, actor, origin="schedule" if origin != "manual" else "api",
                            priority=priority, run_id=run_id)  # fmt: skip
        except VmkeepError as err:  # refused now (a VM in a state that allows no backup, ...)
            left_out.append({"vm": what, "reason": str(err)})
        except Exception as err:  # a bug: recorded on the run, the other VMs still go
            log.exception("backup job %s: queueing %s failed", name, what)
            left_out.append({"vm": what, "reason": f"not queued: {type(err).__name__}: {err}"})
    skipped = excluded + left_out
    notify.run_left_out(ctx, name, run_id, left_out)
    with ctx.catalog.session() as s:
        r = s.get(BackupJobRun, run_id)
        assert r is not None
        r.skipped = skipped
        s.flush()
        out = backupjobs.run_dict(s, r)
    log.info("backup job %s: run %s (%s, slot %s): %d jobs queued, %d skipped", name, run_id,
             origin, slot.isoformat(), len(out["jobs"]), len(skipped))  # fmt: skip
    return out


def run_now(ctx: Context, name: str, who: str) -> dict[str, Any]:
    """``backupjob run NAME``: a run now, outside the schedule (it does not count as a slot)."""
    with ctx.catalog.session() as s:
        bj_id = backupjobs.find(s, name).id
    run = fire(ctx, bj_id, datetime.now(UTC), "manual", who)
    assert run is not None  # a manual slot is this instant: no other run has it
    return run


def tick(
    ctx: Context,
    now: datetime,
    grace: float = GRACE,
    since: datetime | None = None,
    late_after: float = LATE,
) -> list[dict[str, Any]]:
    """One look: fire every enabled backup job whose newest due slot has not been fired.
    ``since``: when the previous look was (its clock time): a slot that came due after it is on
    time however long the looks take (a large run's queueing); one from before it was missed.
    The first look after a start has no previous one: a slot older than ``grace`` s was missed.
    A slot older than ``late_after`` s was missed whatever (the catalog was down for hours).
    Raises the first error after firing every other job: the caller keeps its ``since``, so a
    slot that failed to fire is still on time at the next look."""
    fired, errors = [], []
    with ctx.catalog.session() as s:
        due = []
        last = backupjobs.last_slots(s)  # one query a look, not one per job
        for bj in s.execute(select(BackupJob).where(BackupJob.enabled.is_(True))).scalars():
            spec, tz = schedules.stored(bj.schedule), schedules.zone(bj.timezone)
            slot = schedules.latest_due(spec, now, tz)
            if slot is not None and backupjobs.unfired(bj, slot, tz, last.get(bj.id)):
                due.append((bj.id, bj.name, bj.repeat_missed, slot))
    for bj_id, name, repeat, slot in due:
        age = (now - slot).total_seconds()
        missed = age > late_after or (slot < since if since is not None else age > grace)
        try:
            run = fire(ctx, bj_id, slot, "missed" if missed else "schedule",
                       skip=missed and not repeat)  # fmt: skip
        except VmkeepError as err:
            log.error("backup job %s: firing slot %s failed: %s", name, slot.isoformat(), err)
            errors.append(err)
            continue
        if run is not None:
            if missed:
                log.warning("backup job %s: slot %s was missed (no daemon ran then): %s", name,
                            slot.isoformat(), "run now" if repeat else "skipped")  # fmt: skip
            fired.append(run)
    if errors:
        raise errors[0]
    return fired


def loop(config: Config, stop: threading.Event, clock: Clock | None = None) -> None:
    """The daemon's scheduler thread: a look every ``[schedule] tick`` s until ``stop``."""
    ctx = Context(config)
    clock = clock or SystemClock()
    # the first look: a slot is on time within a minute, or within three looks of a fast clock
    grace = max(GRACE, 3 * config.schedule.tick * clock.speed)
    late_after = max(LATE * clock.speed, grace)
    since: datetime | None = None
    while not stop.is_set():
        now = clock.now()
        try:
            tick(ctx, now, grace, since, late_after)
            since = now
        except VmkeepError as err:
            log.error("scheduler: %s", err)
        except Exception:  # a bug: logged with its traceback, the scheduler goes on
            log.exception("scheduler look failed")
        stop.wait(config.schedule.tick)
