"""The job queue: every long action is a row in ``jobs``, whatever started it (docs/architecture.md, "How a job flows").

QUEUED -> RUNNING -> DONE | FAILED | CANCELLED. The CLI runs its action in-process and records it
(``recorded``); the API enqueues and a daemon worker claims and runs it (``claim`` + ``execute``).
Claiming is atomic: every claimer first bumps the ``claim`` counter row, which holds the others
off until it commits (a row lock on PostgreSQL, the write lock on SQLite); it then picks by
priority within the limits (``limits.py``).

Cancel is a flag on the row (``cancel_requested``) that the running action polls through its
progress callback; it then unwinds through the engine's normal cancel path (job aborted, partial
data and checkpoint removed). After a crash the daemon marks its host's dead RUNNING jobs FAILED
(``recover``); the VMs themselves were already recovered by their guard process.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from vmkeep import errors, jsontext
from vmkeep.catalog.locks import pid_alive, proc_start
from vmkeep.catalog.tables import BackupJob, BackupJobRun, Counter, Datastore, Host, Job
from vmkeep.config import LimitsConfig
from vmkeep.engine.core import limits
from vmkeep.engine.core.cancel import Cancellation
from vmkeep.engine.core.context import Context
from vmkeep.errors import JobNotFound, TooManyRequests, VmkeepError, WrongState
from vmkeep.faults import failpoint
from vmkeep.model import JobState

log = logging.getLogger(__name__)

# the states a job ends in
FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
PROGRESS_EVERY = 0.5  # seconds between progress writes (and cancel checks)
DEFAULT_PRIORITY = 50  # 0-99, as OpenNebula's backup jobs: higher starts first

Runner = Callable[
    [Context, dict[str, Any], Callable[[int, int], None]], tuple[dict[str, Any], list[str]]
]


class JobCancelled(KeyboardInterrupt):
    """Raised inside a running action when its job was cancelled: the engine's Ctrl-C path."""


# Set when this process queues a job: the daemon's idle workers claim it at once instead of at
# their next look at the queue (jobs queued by other processes wait for that look).
WAKE = threading.Event()
# Notified when a job of this process ends: a client waiting for it (``wait``) answers at once.
ENDED = threading.Condition()
WAIT_MAX = 30.0  # seconds a request may wait for a job's end


def job_dict(j: Job) -> dict[str, Any]:
    return {
        "id": j.id,
        "kind": j.kind,
        "target": j.target,
        "state": j.state,
        "origin": j.origin,
        "who": j.who,
        "params": j.params,
        "done_bytes": j.done_bytes,
        "total_bytes": j.total_bytes,
        "result": j.result,
        "error": {"code": j.error_code, "message": j.error} if j.error else None,
        "exit_code": exit_code(j.state, j.error_code, j.result),
        "cancel_requested": j.cancel_requested,
        "host": j.host,
        "runs_on": j.runs_on,
        "pid": j.pid,
        "priority": j.priority,
        "waiting": j.wait_reason if j.state == JobState.QUEUED else None,
        "datastore": j.datastore,
        "run": j.run_id,
        "created": j.created_at,
        "started": j.started_at,
        "finished": j.finished_at,
    }


def exit_code(state: str, error_code: str | None, result: Any) -> int | None:
    """The exit code of the command that ran (or followed) the job: 0 done, 1 done with
    warnings, the error's own code (``errors.py``), EXIT_INTERRUPTED when cancelled; None while
    it runs."""
    if state == JobState.DONE:
        return 1 if isinstance(result, dict) and result.get("warnings") else 0
    if state == JobState.CANCELLED:
        return errors.EXIT_INTERRUPTED
    if state == JobState.FAILED:
        return errors.exit_code_of(error_code)
    return None


def local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def enqueue(
    ctx: Context,
    kind: str,
    target: str,
    params: dict[str, Any],
    origin: str,
    who: str,
    max_queued: int | None = None,
    priority: int = DEFAULT_PRIORITY,
    run_id: int | None = None,
    runs_on: str | None = None,
) -> dict[str, Any]:
    """A new QUEUED job (``runs_on``: only that host's daemon runs it; None: any daemon). ``max_queued``: the QUEUED jobs ``who`` (of this ``origin``) may have
    at once (the API passes ``[api] max_queued_per_token`` for a token); TooManyRequests
    beyond. Running and ended jobs do not count. ``priority`` 0-99 (higher starts first) and
    ``run_id`` (the backup-job run it belongs to): ``limits.py``."""
    with ctx.catalog.session() as s:
        if max_queued is not None:
            waiting = queued_by(s, origin, who)
            if waiting >= max_queued:
                raise TooManyRequests("queued jobs", who, max_queued, "[api] max_queued_per_token")
        extra = {"priority": priority, "run_id": run_id, "runs_on": runs_on}
        job = job_dict(_add(s, kind, target, params, origin, who, **extra))
    WAKE.set()
    return job


def queued_by(s: Session, origin: str, who: str) -> int:
    """How many QUEUED jobs ``who`` has queued through ``origin``."""
    q = select(func.count()).select_from(Job)
    q = q.where(Job.state == JobState.QUEUED, Job.origin == origin, Job.who == who)
    return int(s.execute(q).scalar() or 0)


def _add(
    s: Session, kind: str, target: str, params: dict[str, Any], origin: str, who: str, **fields: Any
) -> Job:
    """A new job row: QUEUED for any worker unless ``fields`` say otherwise."""
    j = Job(kind=kind, target=target, params=params, origin=origin, who=who,
            datastore=limits.writes_to(kind, params),
            **({"state": JobState.QUEUED, "host": "", "pid": 0} | fields))  # fmt: skip
    s.add(j)
    s.flush()
    return j


def get(ctx: Context, job_id: int) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        j = s.get(Job, job_id)
        if j is None:
            raise JobNotFound(job_id)
        return job_dict(j)


def wait(ctx: Context, job_id: int, seconds: float) -> dict[str, Any]:
    """The job once it has ended, or as it is after ``seconds`` (at most WAIT_MAX): a client
    follows a job with one request per period instead of polling, and learns its end at once
    when this process runs it (jobs of other processes are looked at every 0.25 s)."""
    deadline = time.monotonic() + min(max(seconds, 0.0), WAIT_MAX)
    while (job := get(ctx, job_id))["state"] not in FINAL:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with ENDED:
            ENDED.wait(min(left, 0.25))
    return job


def list_jobs(
    ctx: Context, state: str | None = None, limit: int = 200, after: int | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs (in ``state``), newest first; ``after``: those older than the
    job with this id (the next page)."""
    with ctx.catalog.session() as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            q = q.where(Job.state == state.upper())
        if after is not None:
            q = q.where(Job.id < after)
        return [job_dict(j) for j in s.execute(q).scalars()]


def changes_since(
    ctx: Context, since: datetime | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], datetime]:
    """Jobs and VMs changed after ``since`` (all of them when None), and the new watermark."""
    from vmkeep.catalog.tables import Vm

    with ctx.catalog.session() as s:
        now = s.execute(select(func.max(Job.updated_at))).scalar()
        vm_now = s.execute(select(func.max(Vm.updated_at))).scalar()
        q_jobs = select(Job).order_by(Job.id)
        q_vms = select(Vm).order_by(Vm.id)
        if since is not None:
            q_jobs = q_jobs.where(Job.updated_at > since)
            q_vms = q_vms.where(Vm.updated_at > since)
        changed_jobs = [job_dict(j) for j in s.execute(q_jobs).scalars()]
        changed_vms = [
            {"id": v.id, "name": v.name, "state": v.state, "lcm_state": v.lcm_state}
            for v in s.execute(q_vms).scalars()
        ]
    marks = [m for m in (now, vm_now, since) if m is not None]
    return changed_jobs, changed_vms, max(marks) if marks else datetime.now(UTC)


def claim(
    ctx: Context, only: int | None = None, one_per_target: Collection[str] = ()
) -> int | None:
    """Take the next QUEUED job this process may start (``limits.py``: priority, then the
    oldest, within the limits); None when there is none (``only``: that job, if it may start).
    A job of a kind in ``one_per_target`` (the actions that lock their VM: the action table's
    ``ONE_PER_VM``) waits while such a job of its target runs, instead of failing on the VM's
    lock: a night's backup queued while the last one still runs goes after it.
    Claimers (threads, daemons on one catalog) take turns on the ``claim`` counter, so each job
    is won once and the limits are counted exactly. A job passed over keeps the reason on its
    row.

    What holds a job back depends only on its kind, its datastore and (a sequential run) its
    run: jobs alike wait for the same reason. So each kind of waiting job is asked about once,
    the oldest of the highest priority first, and its reason is written on all of them: a
    thousand jobs of one run waiting for a restic repository never hide a job behind them that
    may start."""
    queued_now = (Job.state == JobState.QUEUED) & _runs_here(ctx)
    if only is not None:
        queued_now = queued_now & (Job.id == only)
    with ctx.catalog.session() as s:  # the common case, nothing queued: one read, no write
        if s.execute(select(Job.id).where(queued_now).limit(1)).first() is None:
            return None
    host = socket.gethostname()
    with ctx.catalog.session() as s:
        s.execute(update(Counter).where(Counter.name == "claim").values(value=Counter.value + 1))
        running = limits.Running()
        q = select(Job.id, Job.kind, Job.target, Job.host, Job.runs_on, Job.datastore,
                   Job.run_id, Job.pid, Job.pid_start, Job.origin)  # fmt: skip
        busy: dict[str, int] = {}  # target -> its running job, for one_per_target's kinds
        for row in s.execute(q.where(Job.state == JobState.RUNNING)).all():
            if (
                row.host == host
                and row.pid != os.getpid()
                and not pid_alive(row.pid, row.pid_start)
            ):
                _died(s, row.id, row.pid, row.origin)  # a killed command's row holds no slot
                continue
            running.add(row.kind, row.runs_on or row.host, row.datastore, row.run_id)
            if row.kind in one_per_target:
                busy[row.target] = row.id
        limit_cfg, limit_host = _host_limits(ctx, s, host)
        cols = (Job.id, Job.kind, Job.target, Job.datastore, Job.run_id, Job.wait_reason)
        queued = s.execute(
            select(*cols).where(queued_now).order_by(Job.priority.desc(), Job.id)
        ).all()
        one_writer = _one_writer_stores(s, {r.datastore for r in queued if r.datastore})
        sequential = _sequential_runs(s, {r.run_id for r in queued if r.run_id is not None})
        reasons: dict[tuple[bool, str | None, int | None], str] = {}
        stale: dict[str, list[int]] = {}
        for r in queued:
            if r.kind in one_per_target and r.target in busy:
                after = f"waits for job {busy[r.target]} of VM {r.target} to end"
                if r.wait_reason != after:
                    stale.setdefault(after, []).append(r.id)
                continue
            run = r.run_id if r.run_id in sequential else None
            alike = (r.kind in limits.BACKUP_KINDS, r.datastore, run)
            if alike not in reasons:
                why = limits.blocker(limit_cfg, running, r.kind, r.datastore, limit_host,
                                     r.datastore in one_writer, run)  # fmt: skip
                if why is None:
                    won = s.execute(  # type: ignore[attr-defined]
                        update(Job)
                        .where(Job.id == r.id, Job.state == JobState.QUEUED)  # not cancelled
                        .values(
                            state=JobState.RUNNING,
                            host=host,
                            pid=os.getpid(),
                            pid_start=proc_start(os.getpid()),
                            started_at=datetime.now(UTC),
                            wait_reason=None,
                        )
                    ).rowcount
                    if won == 1:
                        _mark_waiting(s, stale)
                        return int(r.id)
                    continue  # cancelled meanwhile: the next one alike is asked again
                reasons[alike] = why
            if r.wait_reason != reasons[alike]:
                stale.setdefault(reasons[alike], []).append(r.id)
        _mark_waiting(s, stale)
        return None


def running_on(ctx: Context, target: str, kinds: Collection[str]) -> int | None:
    """The RUNNING job of one of ``kinds`` on ``target`` (a VM's name), if one runs."""
    with ctx.catalog.session() as s:
        found = s.execute(
            select(Job.id).where(
                Job.state == JobState.RUNNING, Job.target == target, Job.kind.in_(list(kinds))
            )
        ).first()
    return None if found is None else int(found[0])


def _runs_here(ctx: Context) -> Any:
    """The queued jobs this process may run: those for any daemon, and its host's."""
    if ctx.host is None:
        return Job.runs_on.is_(None)
    return Job.runs_on.is_(None) | (Job.runs_on == ctx.host)


def _host_limits(ctx: Context, s: Session, machine: str) -> tuple[LimitsConfig, str]:
    """The limits a claim counts against, and the host it counts for: this process's host
    (its ``max_backups`` over ``[limits] max_backups_host``), else the machine."""
    if ctx.host is None:
        return ctx.config.limits, machine
    cap = s.execute(select(Host.max_backups).where(Host.name == ctx.host)).scalar()
    if cap is None:
        return ctx.config.limits, ctx.host
    return ctx.config.limits.model_copy(update={"max_backups_host": int(cap)}), ctx.host


def _mark_waiting(s: Session, stale: dict[str, list[int]]) -> None:
    """Write each passed-over job's new reason (only where it changed)."""
    for why, ids in stale.items():
        for chunk in range(0, len(ids), 500):
            s.execute(
                update(Job).where(Job.id.in_(ids[chunk : chunk + 500])).values(wait_reason=why)
            )


def _one_writer_stores(s: Session, names: set[str]) -> set[str]:
    """The datastores among ``names`` whose driver takes one writer at a time."""
    if not names:
        return set()
    from vmkeep.datastores import REGISTRY

    rows = s.execute(select(Datastore.name, Datastore.driver).where(Datastore.name.in_(names)))
    return {
        name
        for name, driver in rows
        if "one-writer" in getattr(REGISTRY.get(driver), "capabilities", ())
    }


def _sequential_runs(s: Session, run_ids: set[int]) -> set[int]:
    """The runs among ``run_ids`` whose backup job runs its VMs one after another."""
    if not run_ids:
        return set()
    q = (
        select(BackupJobRun.id)
        .join(BackupJob, BackupJob.id == BackupJobRun.backup_job_id)
        .where(BackupJobRun.id.in_(run_ids), BackupJob.execution == "sequential")
    )
    return set(s.execute(q).scalars())


def cancel(ctx: Context, job_id: int) -> dict[str, Any]:
    """QUEUED: cancelled at once. RUNNING: the action is asked to stop and cleans up."""
    with ctx.catalog.session() as s:
        j = s.get(Job, job_id)
        if j is None:
            raise JobNotFound(job_id)
        if j.state in FINAL:
            raise WrongState(f"job {job_id}", j.state, "cancel", "QUEUED or RUNNING")
        if j.state == JobState.QUEUED:
            j.state, j.finished_at = JobState.CANCELLED, datetime.now(UTC)
        else:
            j.cancel_requested = True
        s.flush()
        return job_dict(j)


def running_in(ctx: Context, pid: int, machine: str | None = None) -> list[dict[str, Any]]:
    """The RUNNING jobs of process ``pid`` on this host (``machine``: on that one): one for a
    CLI action it records, those of its workers for a daemon (origin other than "cli")."""
    where = machine or socket.gethostname()
    with ctx.catalog.session() as s:
        rows = s.execute(
            select(Job).where(Job.state == JobState.RUNNING, Job.host == where, Job.pid == pid)
        ).scalars()
        return [job_dict(j) for j in rows]


class _Progress:
    """The progress callback of a running job: writes bytes done/total (every PROGRESS_EVERY s)
    and raises JobCancelled once the job's cancel flag is set. An action that calls it seldom
    is told by ``cancellation``'s watcher instead (``cancel.py``)."""

    def __init__(self, ctx: Context, job_id: int) -> None:
        self.ctx, self.job_id = ctx, job_id
        self.last_write = 0.0
        self.done = self.total = 0
        self.result: dict[str, Any] = {}  # set by an in-process caller (``recorded``)
        self.cancellation = Cancellation(self.cancel_asked, JobCancelled, PROGRESS_EVERY)

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        if now - self.last_write < PROGRESS_EVERY:
            return
        self.last_write = now
        if self.write() and self.cancellation.tell():
            raise JobCancelled

    def cancel_asked(self) -> bool:
        with self.ctx.catalog.session() as s:
            q = select(Job.cancel_requested).where(Job.id == self.job_id)
            return bool(s.execute(q).scalar())

    @contextmanager
    def watched(self) -> Iterator[None]:
        """The action runs in the block; a cancel reaches it even when it calls no progress
        (a late one, after it has finished, is dropped)."""
        self.cancellation.start()
        finished = False
        try:
            yield
            finished = True
        finally:
            try:
                self.cancellation.close()
            except JobCancelled:
                if not finished:
                    raise

    def write(self) -> bool:
        """Store the progress; True when the job was asked to cancel."""
        with self.ctx.catalog.session() as s:
            j = s.get(Job, self.job_id)
            if j is None:
                return False
            j.done_bytes, j.total_bytes = self.done, self.total
            j.progress = self.done / self.total if self.total else 0.0
            return bool(j.cancel_requested)


def _finish(
    ctx: Context,
    job_id: int,
    state: JobState,
    result: dict[str, Any] | None = None,
    progress: _Progress | None = None,
    err: BaseException | None = None,
) -> None:
    with ctx.catalog.session() as s:
        j = s.get(Job, job_id)
        if j is None:
            return
        j.state, j.finished_at = state, datetime.now(UTC)
        if progress is not None:  # the last bytes done/total, in the same transaction
            j.done_bytes, j.total_bytes = progress.done, progress.total
        if result is not None:
            j.result = jsontext.plain(result)  # as the CLI's --json writes it (dates ISO)
            j.progress = 1.0
        if err is not None and state == JobState.FAILED:
            if err_result := getattr(err, "result", None):
                j.result = jsontext.plain(err_result)
            j.error = str(err)
            j.error_code = type(err).__name__
        if state == JobState.CANCELLED:
            j.error, j.error_code = "cancelled", "Cancelled"
    with ENDED:
        ENDED.notify_all()


def execute(ctx: Context, job_id: int, runners: dict[str, Runner]) -> dict[str, Any]:
    """Run a claimed job to its end state; never raises for the action's own errors."""
    with ctx.catalog.session() as s:
        j = s.get(Job, job_id)
        assert j is not None
        kind, params = j.kind, dict(j.params)
    runner = runners.get(kind)
    try:
        if runner is None:
            raise VmkeepError(f"unknown job kind {kind!r}")
        progress = _Progress(ctx, job_id)
        failpoint("job")  # the fault suite slows jobs down to watch several workers share a queue
        with progress.watched():
            result, warnings = runner(ctx, params, progress)
        result = result | ({"warnings": warnings} if warnings else {})
        _finish(ctx, job_id, JobState.DONE, result, progress)
    except KeyboardInterrupt:
        _finish(ctx, job_id, JobState.CANCELLED)
    except VmkeepError as err:
        _finish(ctx, job_id, JobState.FAILED, err=err)
    except Exception as err:  # a bug: recorded, logged with its traceback, the worker goes on
        log.exception("job %s (%s) crashed", job_id, kind)
        _finish(ctx, job_id, JobState.FAILED, err=err)
    return get(ctx, job_id)


@contextmanager
def recorded(
    ctx: Context, kind: str, target: str, params: dict[str, Any], origin: str = "cli"
) -> Iterator[_Progress]:
    """An in-process action (the CLI) recorded as a job; yields its progress callback, whose
    ``result`` the caller sets. Cancelling the job (``jobs cancel``) stops the action. First,
    this host's jobs left RUNNING by dead processes (a killed command) are marked FAILED: a
    machine without a daemon gets them ended by its next command."""
    recover(ctx)
    with ctx.catalog.session() as s:  # one transaction: created RUNNING, by this process
        pid = os.getpid()
        here = {"host": socket.gethostname(), "pid": pid, "pid_start": proc_start(pid),
                "started_at": datetime.now(UTC)}  # fmt: skip
        job_id = _add(
            s, kind, target, params, origin, local_user(), state=JobState.RUNNING, **here
        ).id
    progress = _Progress(ctx, job_id)
    try:
        with progress.watched():
            yield progress
    except KeyboardInterrupt:
        _finish(ctx, job_id, JobState.CANCELLED)
        raise
    except BaseException as err:
        _finish(ctx, job_id, JobState.FAILED, err=err)
        raise
    _finish(ctx, job_id, JobState.DONE, progress.result, progress)


def recover(ctx: Context) -> list[int]:
    """Mark this host's RUNNING jobs whose process is gone FAILED (daemon restarted, CLI killed):
    run by a daemon as it starts and by every in-process action (``recorded``); a claim does the
    same for the rows it counts against the limits."""
    host = socket.gethostname()
    failed = []
    with ctx.catalog.session() as s:
        rows = s.execute(
            select(Job).where(Job.state == JobState.RUNNING, Job.host == host)
        ).scalars()
        for j in list(rows):
            if j.pid != os.getpid() and not pid_alive(j.pid, j.pid_start):
                _died(s, j.id, j.pid, j.origin)
                failed.append(j.id)
    return failed


def _died(s: Session, job_id: int, pid: int, origin: str) -> None:
    """A RUNNING job of this host whose process is gone: FAILED (its VM was recovered by the
    guard process)."""
    died = f"the vmkeep process running it (pid {pid}) died"
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(
            state=JobState.FAILED,
            finished_at=datetime.now(UTC),
            error_code="ProcessDied",
            error=died if origin == "cli" else f"daemon restarted: {died}",
        )  # fmt: skip
    )
