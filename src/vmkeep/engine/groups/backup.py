"""Group-consistent backup (after Nova's quiesce spec; docs/architecture.md).

1. lock the group, then every member in group order; each must be RUNNING or POWEROFF;
2. plan each member: full, or an increment of its own chain (catalog rows RUNNING);
3. freeze the members in group order (all at once with ``parallel_freeze``). A member whose
   FS_FREEZE is SUSPEND is suspended instead; a powered-off member is started paused and has
   nothing to freeze. An agent that is missing or silent fails the group: no silent crash cut;
4. ``backupBegin`` on each member as soon as it is frozen (in a thread, while the next member
   freezes); what the freeze holds still (the guest's frozen file systems; all of a suspended
   or paused guest) does not change from its freeze to its thaw, so its cut equals the moment
   every member is frozen;
5. when every job has begun, thaw in reverse order (concurrently with ``parallel_freeze``), in
   ``finally``, with retries.
   A watchdog process thaws them too if this process dies while they are frozen;
6. wait for all jobs together, then checksum/store the members in parallel (CPU count);
7. one group backup = one restore point naming each member's backup and increment, with the
   freeze window per member and for the group (first freeze -> last thaw).

Any failure before the end thaws every frozen member (reverse order), aborts the jobs already
started, removes partial data, deletes the new checkpoints (libvirt merges their bitmaps into
the parent, so every chain stays usable), and records the attempt FAILED with member and reason.
The group backup's catalog rows (step 7, and FAILED) are written by ``records``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from vmkeep.catalog import lock
from vmkeep.catalog.tables import Vm
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of, find_datastore
from vmkeep.engine.groups.manage import find_group
from vmkeep.engine.groups.records import Timing, close_abandoned, record_end, record_start
from vmkeep.engine.protect.member import (
    MemberJob,
    ProgressFn,
    after_success,
    begin_job,
    fail_job,
    finish_job,
    plan_job,
    prepare_job,
    wait_jobs,
)
from vmkeep.engine.vm.inventory import vm_action
from vmkeep.engine.vm.policy import check_overrides
from vmkeep.engine.vm.quiesce import (
    Quiesce,
    freeze_guest,
    freeze_intent,
    guarding,
    undo_with_retries,
)
from vmkeep.engine.vm.record import set_lcm, sync_state
from vmkeep.errors import BackupFailed, GroupBackupFailed, HypervisorError, InvalidValue
from vmkeep.model import BackupStatus, Consistency, FsFreeze, LcmState, Warnings

log = logging.getLogger(__name__)
T = TypeVar("T")


class MemberFailed(Exception):
    """A step failed for one member; carries the member's name for the FAILED record."""

    def __init__(self, vm: str, err: BaseException) -> None:
        super().__init__(vm, err)
        self.vm, self.err = vm, err


@contextmanager
def _member(name: str) -> Iterator[None]:
    try:
        yield
    except (MemberFailed, KeyboardInterrupt):
        raise
    except Exception as err:
        raise MemberFailed(name, err) from err


@dataclass
class GroupOutcome:
    result: dict[str, Any]
    warnings: Warnings = field(default_factory=Warnings)


def _each(
    fn: Callable[[MemberJob], T],
    jobs: Sequence[MemberJob],
    parallel: bool,
    *,
    stop_on_error: bool = True,
) -> list[T]:
    """``fn`` on every job (in order, or concurrently); raises the first failure in job order
    only after every call has returned, so the caller knows exactly what succeeded. In order,
    the first failure stops the rest unless ``stop_on_error`` is False (thaw: try them all)."""
    results: list[tuple[MemberJob, T | None, BaseException | None]] = []
    if parallel and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=len(jobs)) as ex:
            futures = [(j, ex.submit(fn, j)) for j in jobs]
            for j, f in futures:
                try:
                    results.append((j, f.result(), None))
                except BaseException as err:  # noqa: BLE001 (re-raised below)
                    results.append((j, None, err))
    else:
        for j in jobs:
            try:
                results.append((j, fn(j), None))
            except BaseException as err:
                results.append((j, None, err))
                if stop_on_error:
                    break
    errors = [e for _, _, e in results if e is not None]
    if errors:
        raise _Partial([(j, r) for j, r, e in results if e is None], errors[0])
    return [r for _, r, _ in results]  # type: ignore[misc]


class _Partial(Exception):
    def __init__(self, ok: list[tuple[MemberJob, Any]], err: BaseException) -> None:
        super().__init__(err)
        self.ok, self.err = ok, err


# --- the cut ---------------------------------------------------------------------------------------
def _freeze(ctx: Context, job: MemberJob, timing: Timing) -> Callable[[], object]:
    """Freeze (or, for FS_FREEZE=SUSPEND, suspend) one member; returns how to undo it.
    Unlike a single backup, a member that cannot be frozen fails the group."""
    mode = FsFreeze.SUSPEND if job.cfg.fs_freeze == FsFreeze.SUSPEND else FsFreeze.AGENT
    timing.frozen[job.name] = timing.now()
    with _member(job.name), job.steps.step("freeze"):
        consistency, undo = freeze_guest(ctx, job.vm_id, job.name, mode)
    job.q = Quiesce(consistency)
    return undo


def _begin(ctx: Context, job: MemberJob, warnings: Warnings) -> None:
    """``backupBegin`` of a member that is frozen (or offline): its part of the cut is fixed."""
    consistency = Consistency.OFFLINE if job.offline else job.q.consistency
    with _member(job.name), job.steps.step("begin"):
        begin_job(ctx, job, FsFreeze.NONE, warnings)  # already frozen by _freeze
    job.q = Quiesce(consistency)


def _settle(futures: list[Future[None]]) -> None:
    """Wait until every call has returned, through Ctrl-C too (raised again after): a guest is
    never thawed, nor a job aborted, while its backupBegin may still start the job."""
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            wait(futures)
            break
        except KeyboardInterrupt as err:
            interrupted = err
    if interrupted is not None:
        raise interrupted


def _cut(
    ctx: Context, jobs: list[MemberJob], parallel: bool, timing: Timing, warnings: Warnings
) -> None:
    """Freeze the online members (in group order, or all at once), begin each member's backup
    job as soon as that member is frozen (an offline one at once), and thaw (in reverse order,
    or all at once) only when every job has begun: what each freeze holds still is then cut at
    a moment when all members were frozen together."""
    online = [j for j in jobs if not j.offline]
    frozen: dict[str, Callable[[], object]] = {}  # name -> how to undo its freeze

    def freeze_and_begin(j: MemberJob) -> None:
        frozen[j.name] = _freeze(ctx, j, timing)
        _begin(ctx, j, warnings)

    with freeze_intent(ctx, [j.vm_id for j in online]):
        timing.t0 = time.monotonic()
        ok = False
        try:
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                started = [pool.submit(_begin, ctx, j, warnings) for j in jobs if j.offline]
                try:
                    if parallel:
                        started += [pool.submit(freeze_and_begin, j) for j in online]
                    else:
                        for j in online:  # the first failure stops the rest
                            if any(f.done() and f.exception() for f in started):
                                break  # a member's backupBegin failed: freeze no more
                            frozen[j.name] = _freeze(ctx, j, timing)
                            started.append(pool.submit(_begin, ctx, j, warnings))
                finally:
                    _settle(started)  # no backupBegin still under way when the guests thaw
            for f in started:
                f.result()  # the first failure, in the order the calls were made
            ok = True
        finally:
            done = [(j, frozen[j.name]) for j in online if j.name in frozen]
            _thaw(ctx, done, parallel, timing, report=ok)
    for j in online:
        j.q.freeze_ms = timing.thawed[j.name] - timing.frozen[j.name]


def _thaw(
    ctx: Context,
    frozen: list[tuple[MemberJob, Callable[[], object]]],
    parallel: bool,
    timing: Timing,
    *,
    report: bool,
) -> None:
    undo = dict((j.name, u) for j, u in frozen)

    def thaw(j: MemberJob) -> None:
        try:
            with _member(j.name), j.steps.step("thaw"):
                undo_with_retries(ctx, j.vm_id, j.name, undo[j.name])
        finally:
            timing.thawed[j.name] = timing.now()

    try:
        _each(thaw, [j for j, _ in reversed(frozen)], parallel, stop_on_error=False)
    except _Partial as p:
        # Raised unless an earlier error is already on its way out (that one names the cause).
        log.error("thaw failed: %s", p.err)
        if report:
            raise p.err from None


# --- the command ---------------------------------------------------------------------------------------
def run_group_backup(
    ctx: Context,
    group_ref: str,
    ds_ref: str,
    *,
    parallel_freeze: bool = False,
    reset: bool = False,
    progress: ProgressFn | None = None,
    overrides: dict[str, Any] | None = None,
    bwlimit: int | None = None,
) -> GroupOutcome:
    """Back up a group's members as one consistent cut. ``overrides``: backup policy keys set
    over every member's effective ones for this backup only (``policy.effective``)."""
    overrides = check_overrides(overrides)
    out = GroupOutcome({})
    warnings = out.warnings
    with ctx.catalog.session() as s:
        g = find_group(s, group_ref)
        group_id, group_name = g.id, g.name
        refs = [str(m.vm_id) for m in g.members]
        ds = find_datastore(s, ds_ref)
        driver, ds_id = driver_of(ds, bwlimit), ds.id
    if not refs:
        raise InvalidValue(
            "group", group_name, "it has no members; add VMs with 'vmkeep group add'"
        )
    t_start = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(
            lock(ctx.catalog, f"group:{group_id}", "group backup", label=f"group {group_name}")
        )
        close_abandoned(ctx, group_id)
        vms = [stack.enter_context(vm_action(ctx, r, "group backup")) for r in refs]
        gb_id = record_start(ctx, group_id, ds_id, vms, parallel_freeze)
        # If this process dies from here on, the guard thaws, resumes and cleans up every member.
        stack.enter_context(guarding(ctx, [vm.id for vm in vms]))
        jobs: list[MemberJob] = []
        timing = Timing()
        try:
            try:
                _run(
                    ctx,
                    driver,
                    vms,
                    ds_id,
                    reset,
                    jobs,
                    parallel_freeze,
                    timing,
                    warnings,
                    progress,
                    overrides,
                )
            except BaseException as err:
                _fail_all(ctx, gb_id, group_name, jobs, timing, err)
            out.result = record_end(ctx, gb_id, jobs, timing, BackupStatus.VALID)
            for j in jobs:
                after_success(ctx, j)
        finally:
            for vm in vms:
                sync_state(ctx, vm.id, vm.name)
    out.result["seconds"] = round(time.monotonic() - t_start, 3)
    out.result["steps_ms"] = {j.name: j.steps.ms() for j in jobs}
    return out


def _run(
    ctx: Context,
    driver: DatastoreDriver,
    vms: list[Vm],
    ds_id: int,
    reset: bool,
    jobs: list[MemberJob],
    parallel: bool,
    timing: Timing,
    warnings: Warnings,
    progress: ProgressFn | None,
    overrides: dict[str, Any] | None = None,
) -> None:
    for vm in vms:
        with _member(vm.name):
            job = prepare_job(ctx, vm, ds_id, driver, reset, warnings, overrides)
            if job.memory:  # its agent freeze would be saved in the RAM and come back frozen
                job.memory = False
                warnings.add(
                    f"VM {vm.name}: memory state is not saved in a group backup (the group's "
                    "freeze would be restored with it); its disks are backed up as usual"
                )
            jobs.append(job)
            set_lcm(ctx, vm.id, LcmState.BACKUP_POWEROFF if job.offline else LcmState.BACKUP)
            plan_job(ctx, job, warnings)
    try:
        for j in jobs:
            if j.offline:
                with _member(j.name):
                    ctx.hv.start(j.name, paused=True)
        _cut(ctx, jobs, parallel, timing, warnings)
        try:
            wait_jobs(ctx, [j.name for j in jobs], progress)
        except BackupFailed as err:
            raise MemberFailed(str(err.args[0]), err) from err
    finally:
        for j in jobs:
            if j.offline:
                with suppress(HypervisorError):
                    ctx.hv.destroy(j.name)

    def finish(j: MemberJob) -> None:
        with _member(j.name):
            finish_job(ctx, j)

    workers = min(len(jobs), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for f in [ex.submit(finish, j) for j in jobs]:
            f.result()


def _fail_all(
    ctx: Context,
    gb_id: int,
    group_name: str,
    jobs: list[MemberJob],
    timing: Timing,
    err: BaseException,
) -> NoReturn:
    """Undo every member's attempt, record the group FAILED (or CANCELLED), and raise."""
    cause = err.err if isinstance(err, MemberFailed) else err
    failed_vm = err.vm if isinstance(err, MemberFailed) else None
    cancelled = isinstance(cause, KeyboardInterrupt)
    reason = "cancelled" if cancelled else str(cause) or type(cause).__name__
    for j in jobs:
        try:
            fail_job(ctx, j, cause)
        except Exception as e:  # keep cleaning up the other members
            log.error("clean-up of %s failed: %s", j.name, e)
    status = BackupStatus.CANCELLED if cancelled else BackupStatus.FAILED
    record_end(ctx, gb_id, jobs, timing, status, failed_vm, reason)
    if cancelled:
        raise KeyboardInterrupt
    raise GroupBackupFailed(gb_id, group_name, failed_vm or "-", reason) from cause
