"""Backup of a running or powered-off VM.

1. lock the VM, check its state, lcm_state = BACKUP (BACKUP_POWEROFF for an off VM);
2. plan: new full chain, or an increment of the last chain when its checkpoint is still there
   (a missing/inconsistent checkpoint falls back to a new full chain with a warning);
3. quiesce (agent freeze / suspend / nothing) around ``backupBegin`` only, undone in ``finally``;
4. wait for the push job with progress; Ctrl-C, SIGTERM or ``backup cancel`` abort it;
5. checksum the written images (an increment's names its parent file as backing file from its
   creation on), hand them to the datastore driver;
6. VALID only after the driver confirmed; then checkpoint clean-up and retention.

A powered-off VM is started *paused* (no guest code runs) so libvirt's backup job and persistent
checkpoints work exactly as for a running VM, and destroyed again in ``finally``: incremental
chains survive power cycles.

This module runs those steps for one VM (``run_backup``) and stops a running backup
(``cancel_backup``); the steps themselves are in ``member``, planning in ``plan`` and the staging
folder in ``staging``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from vmkeep.catalog.locks import holder, lock, pid_alive
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.steps import Steps
from vmkeep.engine.core.stores import driver_of, find_datastore
from vmkeep.engine.protect.member import (
    ProgressFn,
    after_success,
    begin_job,
    check_space,
    fail_job,
    finish_job,
    plan_job,
    prepare_job,
    wait_jobs,
)
from vmkeep.engine.vm import quiesce
from vmkeep.engine.vm.inventory import vm_action
from vmkeep.engine.vm.policy import check_overrides
from vmkeep.engine.vm.record import find_vm, set_lcm, sync_state
from vmkeep.engine.vm.recovery import recover_vm
from vmkeep.errors import BackupFailed, HostUnavailable, VmkeepError, WrongState
from vmkeep.faults import failpoint
from vmkeep.model import LcmState, Warnings

log = logging.getLogger(__name__)


@dataclass
class BackupOutcome:
    result: dict[str, Any]
    warnings: Warnings = field(default_factory=Warnings)


def run_backup(
    ctx: Context,
    vm_ref: str,
    ds_ref: str,
    *,
    reset: bool = False,
    progress: ProgressFn | None = None,
    overrides: dict[str, Any] | None = None,
    bwlimit: int | None = None,
) -> BackupOutcome:
    """Back up one VM to a datastore. ``overrides``: backup policy keys set over the VM's
    effective ones for this backup only (a backup job's options; ``policy.effective``)."""
    overrides = check_overrides(overrides)
    out = BackupOutcome({})
    warnings = out.warnings
    steps = Steps()
    step = steps.step
    with steps.entered("lock", vm_action(ctx, vm_ref, "backup")) as vm:
        with step("prepare"):
            with ctx.catalog.session() as s:
                ds = find_datastore(s, ds_ref)
                driver, ds_id = driver_of(ds, bwlimit), ds.id
            job = prepare_job(ctx, vm, ds_id, driver, reset, warnings, overrides)
            job.steps = steps
            set_lcm(ctx, vm.id, LcmState.BACKUP_POWEROFF if job.offline else LcmState.BACKUP)
        # If this process dies from here on, the guard thaws/resumes and cleans up at once.
        with steps.entered("watchdog", quiesce.guarding(ctx, [vm.id])):
            try:
                try:
                    with step("plan"):
                        plan_job(ctx, job, warnings)
                    failpoint("plan")
                    t0 = time.monotonic()
                    if job.offline:
                        with step("start paused"):
                            ctx.hv.start(vm.name, paused=True)
                    try:
                        with step("space check"):
                            check_space(ctx, job)
                        with step("begin"):
                            begin_job(ctx, job, job.cfg.fs_freeze, warnings)
                        with step("copy"):
                            wait_jobs(ctx, [vm.name], progress)
                    finally:
                        if job.offline:
                            ctx.hv.destroy(vm.name)
                    finish_job(ctx, job)
                    elapsed = time.monotonic() - t0
                except BaseException as err:
                    fail_job(ctx, job, err)
                    if isinstance(err, (VmkeepError, KeyboardInterrupt)):
                        raise
                    raise BackupFailed(vm.name, err) from err
                with step("retention"):
                    out.result = after_success(ctx, job)
            finally:
                with step("state sync"):
                    sync_state(ctx, vm.id, vm.name)
    log.info("backup of %s: %s", vm.name, steps)
    out.result |= {"seconds": round(elapsed, 3), "steps_ms": steps.ms()}
    return out


# --- cancel --------------------------------------------------------------------------------------
def cancel_backup(ctx: Context, vm_ref: str, wait: float = 60.0) -> dict[str, Any]:
    """Cancel the running backup of a VM. A CLI process running it is signalled (it aborts the
    libvirt job and cleans up, as on Ctrl-C); a daemon running it as a job gets the job's cancel
    flag (its worker stops the same way; the daemon and its other jobs go on). If no live
    process runs it, clean up here."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, vm_ref)
        name, vm_id, vm_host = vm.name, vm.id, vm.host
    held = holder(ctx.catalog, f"vm:{vm_id}")
    here = held is not None and held.host == socket.gethostname()
    if held and held.reason == "backup" and (not here or pid_alive(held.pid, held.pid_start)):
        out: dict[str, Any] = {"vm": name, "cancelled": True, "pid": held.pid}
        running = jobs.running_in(ctx, held.pid, held.host)
        served = [j for j in running if j["origin"] != "cli"]
        if here and not served:
            os.kill(held.pid, signal.SIGTERM)
        else:  # a daemon (never signalled), or a process of another machine (another host's
            # daemon): cancel its job of this VM; that process stops it
            job = next((j for j in running if j["kind"] == "backup" and j["target"] == name), None)
            if job is None:
                who = f"the vmkeep daemon (pid {held.pid})" if here else (
                    f"the vmkeep process {held.pid} on {held.host}")  # fmt: skip
                raise BackupFailed(
                    name,
                    f"{who} runs it but no backup job of it is "
                    "RUNNING; see 'vmkeep jobs list --state RUNNING' and cancel it there",
                )
            try:
                jobs.cancel(ctx, job["id"])
            except WrongState:  # it ended between the two looks
                return {"vm": name, "cancelled": False, "reason": "the backup ended meanwhile"}
            out["job"] = job["id"]
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if holder(ctx.catalog, f"vm:{vm_id}") is None:
                return out
            time.sleep(0.2)
        raise BackupFailed(name, f"process {held.pid} did not stop within {wait:.0f} s")
    # No live vmkeep process runs it: undo whatever a dead one left (lock reclaimed if stale),
    # on the VM's own host only (its libvirt holds the backup's job and checkpoint)
    if not ctx.here(vm_host):
        raise HostUnavailable(
            vm_host,
            f"no live vmkeep process runs a backup of VM {name}, which lives there; what a dead "
            "one left is cleaned up on that host",
            f"Run 'vmkeep backup cancel {name}' there ([cluster] host = {vm_host}), or start its "
            "daemon: its next action on the VM cleans up first.",
        )
    with lock(ctx.catalog, f"vm:{vm_id}", "backup cancel", label=f"VM {name}"):
        done = recover_vm(ctx, vm_id, "cancelled after the vmkeep process running it died")
    if not done:
        return {"vm": name, "cancelled": False, "reason": "no backup is running"}
    return {"vm": name, "cancelled": True, "pid": None, "recovered": done}
