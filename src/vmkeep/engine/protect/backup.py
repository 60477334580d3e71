"""Backup of a running or powered-off VM (DESIGN.md "Backup of a running VM").

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
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmkeep.catalog.locks import holder, lock, pid_alive
from vmkeep.catalog.tables import Backup, Datastore, Increment, Vm
from vmkeep.checksums import digest_file
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core import jobs, space
from vmkeep.engine.core.backup_config import BackupConfig, resolve
from vmkeep.engine.core.chains import (
    backup_dict,
    checkpoint_name,
    disk_file,
    latest_chain,
    memory_file,
    new_chain_key,
    valid_increments,
    write_manifest,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import flatten, qemu_img
from vmkeep.engine.core.steps import Steps
from vmkeep.engine.core.stores import driver_of, find_datastore
from vmkeep.engine.points.retention import apply_retention
from vmkeep.engine.vm import quiesce
from vmkeep.engine.vm.inventory import vm_action
from vmkeep.engine.vm.quiesce import Quiesce, quiesced
from vmkeep.engine.vm.record import find_vm, set_lcm, sync_state
from vmkeep.engine.vm.recovery import (
    Attempt,
    discard_attempt,
    prune_checkpoints,
    recover_vm,
    staging_dirs,
)
from vmkeep.errors import (
    BackupFailed,
    CheckpointInvalid,
    VmkeepError,
    WrongState,
)
from vmkeep.faults import failpoint
from vmkeep.hypervisor.backup_xml import backup_xml, checkpoint_xml
from vmkeep.hypervisor.reach import open_to_qemu, unreachable_why
from vmkeep.model import (
    BackupMode,
    BackupStatus,
    Consistency,
    DiskInfo,
    DomainInfo,
    FsFreeze,
    LcmState,
    VmState,
    Warnings,
)
from vmkeep.names import check_disk_name

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass
class Plan:
    backup_id: int
    seq: int
    parent: int | None
    chain: str
    incremental_from: str | None  # checkpoint the increment is taken against
    checkpoint: str | None  # checkpoint this backup creates
    new_chain: bool


@dataclass
class BackupOutcome:
    result: dict[str, Any]
    warnings: Warnings = field(default_factory=Warnings)


def select_disks(info: DomainInfo, cfg: BackupConfig) -> list[DiskInfo]:
    disks = []
    for d in info.disks:
        if d.device != "disk" or not d.path:
            continue
        if d.transient and not cfg.backup_volatile:
            log.info("skipping volatile disk %s (BACKUP_VOLATILE=NO)", d.target)
            continue
        check_disk_name(f"disk target of VM {info.name}", d.target)  # it names stored files
        disks.append(d)
    if not disks:
        raise BackupFailed(info.name, "it has no disk to back up")
    return disks


# --- planning ------------------------------------------------------------------------------------
def _new_chain(s: Session, vm: Vm, ds_id: int, mode: BackupMode) -> Plan:
    b = Backup(vm_id=vm.id, datastore_id=ds_id, mode=mode, status=BackupStatus.RUNNING, chain="")
    s.add(b)
    s.flush()
    ds = s.get(Datastore, ds_id)
    assert ds is not None
    stored = driver_of(ds).chains()  # keys of chains the catalog does not know too
    b.chain = new_chain_key(s, vm.name, b.id, ds_id, stored)
    s.add(Increment(backup_id=b.id, seq=0, parent=None, status=BackupStatus.RUNNING))
    s.flush()
    cp = checkpoint_name(b.id, 0) if mode == BackupMode.INCREMENT else None
    return Plan(b.id, 0, None, b.chain, None, cp, True)


def plan_backup(
    ctx: Context,
    vm_id: int,
    ds_id: int,
    cfg: BackupConfig,
    disks: list[DiskInfo],
    reset: bool,
    warnings: Warnings,
) -> Plan:
    mode = cfg.mode
    raw = [d.target for d in disks if d.fmt != "qcow2"]
    if mode == BackupMode.INCREMENT and raw:
        warnings.add(
            f"disk(s) {', '.join(raw)} are not qcow2; incremental backups need qcow2 v3 "
            "(dirty bitmaps), so this is a full backup"
        )
        mode = BackupMode.FULL
    with ctx.catalog.session() as s:
        vm = s.get(Vm, vm_id)
        assert vm is not None
        if mode == BackupMode.INCREMENT and not reset:
            chain = latest_chain(s, vm_id, ds_id)
            if chain and any(i.status == BackupStatus.DAMAGED for i in chain.increments):
                warnings.add(
                    f"backup {chain.id} of VM {vm.name} has damaged files (a checksum failed); "
                    "starting a new full backup chain instead of extending it"
                )
                chain = None
            last = valid_increments(chain)[-1] if chain and valid_increments(chain) else None
            if chain and last and last.checkpoint:
                if last.checkpoint in ctx.hv.checkpoints(vm.name):
                    seq = max(i.seq for i in chain.increments) + 1
                    s.add(
                        Increment(
                            backup_id=chain.id,
                            seq=seq,
                            parent=last.seq,
                            status=BackupStatus.RUNNING,
                        )
                    )
                    s.flush()
                    return Plan(
                        chain.id,
                        seq,
                        last.seq,
                        chain.chain,
                        last.checkpoint,
                        checkpoint_name(chain.id, seq),
                        False,
                    )
                warnings.add(
                    f"checkpoint {last.checkpoint} of VM {vm.name} is missing (deleted outside "
                    f"vmkeep, or the VM was recreated); starting a new full backup chain"
                )
        return _new_chain(s, vm, ds_id, mode)


def _abandon_plan(ctx: Context, plan: Plan) -> None:
    """Remove the rows of a plan that never started (replaced by a new full chain)."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, plan.backup_id)
        assert b is not None
        if plan.new_chain:
            s.delete(b)
        else:
            for inc in list(b.increments):
                if inc.seq == plan.seq:
                    b.increments.remove(inc)


# --- running -------------------------------------------------------------------------------------
def _begin(ctx: Context, job: MemberJob, fs_freeze: FsFreeze, warnings: Warnings) -> Quiesce:
    plan, disks, name = job.plan, job.disks, job.name
    assert plan is not None and job.staging is not None
    targets = {d.target: str(job.staging / disk_file(plan.seq, d.target)) for d in disks}
    bxml = backup_xml(targets, plan.incremental_from)
    cxml = None
    if plan.checkpoint:
        cxml = checkpoint_xml(
            plan.checkpoint,
            [d.target for d in disks if d.fmt == "qcow2"],
            [d.target for d in disks if d.fmt != "qcow2"],
        )
    if job.offline:
        ctx.hv.backup_begin(name, bxml, cxml, reuse=True)
        return Quiesce(Consistency.OFFLINE)
    if job.memory:
        # RAM and disks at one paused instant. Never with an agent freeze: a guest frozen in
        # its saved RAM would come back frozen when it is restored. backupBegin comes first:
        # saving the RAM leaves QEMU's block nodes inactive until the guest resumes (QEMU 7.2
        # crashed when a backup job and its bitmap were started on them).
        with quiesced(ctx, job.vm_id, name, FsFreeze.SUSPEND, warnings) as q:
            failpoint("freeze")
            ctx.hv.backup_begin(name, bxml, cxml, reuse=True)
            failpoint("begin")
            ctx.hv.save_memory(name, str(job.staging / memory_file(plan.seq)))
        q.consistency = Consistency.MEMORY
        return q
    with quiesced(ctx, job.vm_id, name, fs_freeze, warnings) as q:
        failpoint("freeze")
        ctx.hv.backup_begin(name, bxml, cxml, reuse=True)
        failpoint("begin")
    return q


def wait_jobs(ctx: Context, names: list[str], progress: ProgressFn | None) -> None:
    """Wait for the push jobs of ``names`` (progress summed); BackupFailed names a failed one."""
    failpoint("copy")
    pending = list(names)
    done_b = dict.fromkeys(names, 0)
    total_b = dict.fromkeys(names, 0)
    t0 = time.monotonic()
    while pending:
        for name in list(pending):
            active, done_b[name], total_b[name] = ctx.hv.job_progress(name)
            if not active:
                pending.remove(name)
                ok, msg = ctx.hv.job_result(name)
                if not ok and "No space left" in msg:
                    raise BackupFailed(
                        name,
                        "the staging area (the folder QEMU writes the backup into before it is "
                        f"stored) ran out of space ({msg})",
                    )
                if not ok:
                    raise BackupFailed(name, f"the libvirt backup job failed: {msg}")
                total_b[name] = max(total_b[name], done_b[name])
        if progress is not None:
            progress(sum(done_b.values()), sum(total_b.values()))
        if pending:
            time.sleep(
                poll_delay(sum(done_b.values()), sum(total_b.values()), time.monotonic() - t0)
            )


def poll_delay(done: int, total: int, elapsed: float) -> float:
    """How long to sleep before asking QEMU again: until the job should end at its rate so far,
    within [5 ms, 100 ms]. A job's end is noticed within a few ms instead of a fixed period."""
    if done <= 0 or total <= done or elapsed <= 0:
        return 0.02
    return min(max((total - done) / (done / elapsed), 0.005), 0.1)


def _prepare_staging(ctx: Context, driver: DatastoreDriver, plan: Plan) -> Path:
    """The attempt's staging folder: on the datastore's file system when its driver offers one
    that QEMU (an unprivileged user) can reach, else in vmkeep's data dir."""
    candidates = staging_dirs(ctx, driver, plan.backup_id, plan.seq)
    for staging in candidates:
        root = staging.parent
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError:
            continue  # e.g. a datastore folder vmkeep may not write to yet: the next place
        # QEMU must reach the target files created here: the staging folders and the one
        # holding them (the datastore's folder, or the data dir; the data dir too for a
        # datastore inside it) are opened to QEMU's group alone; folders above never change.
        data = ctx.config.data_dir.resolve()
        own = data if data in root.resolve().parents else root.parent
        blocked = open_to_qemu(staging, own, ctx.hv)
        if blocked is None:
            return staging
        shutil.rmtree(staging, ignore_errors=True)
        if staging != candidates[-1]:
            with suppress(OSError):
                root.rmdir()
            continue
        raise BackupFailed(
            "?",
            f"QEMU cannot reach the staging folder {staging}: "
            f"{unreachable_why(blocked, ctx.hv)} (or set VMKEEP_DATA_DIR "
            "elsewhere)",
        )
    raise BackupFailed("?", f"cannot create a staging folder in {candidates[-1].parent}")


def _canonical(
    driver: DatastoreDriver, plan: Plan, disks: list[DiskInfo], staging: Path, staged: list[Path]
) -> None:
    """The written images, in ``staged``; a full's rewritten in guest order for a deduplicating
    store. (An increment's target names its parent as backing file since it was created.)"""
    for d in disks:
        f = staging / disk_file(plan.seq, d.target)
        if plan.parent is None and "dedup" in driver.capabilities:
            # QEMU's backup job lays clusters out in the order its parallel copies finish, so
            # two fulls of the same disk differ byte-wise; a deduplicating store needs the same
            # bytes for the same disk: rewrite the full in guest order (before it is hashed)
            canonical = f.with_name(f.name + ".canonical")
            flatten(f, canonical)
            canonical.replace(f)
        staged.append(f)


def _finish(ctx: Context, job: MemberJob) -> None:
    plan, disks, staging, q, steps = job.plan, job.disks, job.staging, job.q, job.steps
    driver = job.driver
    assert plan is not None and staging is not None
    files: list[dict[str, Any]] = []
    staged: list[Path] = []
    with steps.step("canonical"):
        _canonical(driver, plan, disks, staging, staged)
    xml_file = staging / f"{plan.seq}.domain.xml"
    xml_file.write_text(job.domain_xml)
    staged.append(xml_file)
    targets: list[str | None] = [d.target for d in disks] + [None]
    memory = staging / memory_file(plan.seq)
    if q.consistency == Consistency.MEMORY:
        staged.append(memory)
        targets.append(None)
    for f, target in zip(staged, targets, strict=True):
        with steps.step("checksum"):
            row = {
                "disk": target,
                "name": f.name,
                "size": f.stat().st_size,
                "digest": digest_file(f),
            }
        if target is not None:  # the restored size (``backups show``), without asking the store
            row["virtual_size"] = job.capacity[target]
        if f == memory:
            row["memory"] = True
        files.append(row)
    with steps.step("store"):
        driver.backup(plan.chain, staged)
    failpoint("store")
    with steps.step("catalog"), ctx.catalog.session() as s:
        b = s.get(Backup, plan.backup_id)
        assert b is not None
        inc = next(i for i in b.increments if i.seq == plan.seq)
        inc.files = files
        inc.size = sum(f["size"] for f in files if f["disk"])
        inc.checkpoint = plan.checkpoint
        inc.consistency = q.consistency
        inc.freeze_ms = q.freeze_ms
        inc.finished_at = datetime.now(UTC)
        inc.status = BackupStatus.VALID
        b.status = BackupStatus.VALID
        b.finished_at = inc.finished_at
    try:
        with steps.step("manifest"):
            write_manifest(ctx, driver, plan.backup_id)
    except VmkeepError as err:  # the increment is stored and VALID: never discard it for this
        log.warning("backup %s: manifest.json not updated (the next store rewrites it): %s",
                    plan.backup_id, err)  # fmt: skip


def _fail(
    ctx: Context,
    driver: DatastoreDriver,
    name: str,
    plan: Plan,
    err: BaseException,
) -> None:
    """Leave catalog, checkpoints and datastore consistent after a failed or cancelled backup."""
    cancelled = isinstance(err, KeyboardInterrupt)
    status = BackupStatus.CANCELLED if cancelled else BackupStatus.FAILED
    attempt = Attempt(plan.backup_id, plan.seq, plan.chain, plan.new_chain, plan.checkpoint)
    discard_attempt(ctx, driver, name, attempt, status, "cancelled" if cancelled else str(err))


@dataclass
class MemberJob:
    """One VM's backup in flight; ``run_backup`` and a group backup drive it step by step."""

    vm_id: int
    name: str
    ds_id: int
    cfg: BackupConfig
    disks: list[DiskInfo]
    offline: bool
    driver: DatastoreDriver  # the datastore's (where to stage and store)
    reset: bool = False
    plan: Plan | None = None
    staging: Path | None = None
    domain_xml: str = ""
    q: Quiesce = field(default_factory=Quiesce)
    memory: bool = False  # save the RAM with the disks (BACKUP_CONFIG memory, a running VM)
    steps: Steps = field(default_factory=Steps)  # wall time per step (result "steps_ms")
    capacity: dict[str, int] = field(default_factory=dict)  # disk target -> virtual size
    allocated: dict[str, int] = field(default_factory=dict)  # disk target -> image allocation


def prepare_job(
    ctx: Context, vm: Vm, ds_id: int, driver: DatastoreDriver, reset: bool, warnings: Warnings
) -> MemberJob:
    """Read the domain, resolve BACKUP_CONFIG and pick the disks (no catalog rows yet)."""
    info = ctx.hv.domain(vm.name)
    if info.uuid != vm.uuid:
        warnings.add(f"domain {vm.name} was recreated (UUID changed); starting a new full chain")
        reset = True
        with ctx.catalog.session() as s:
            find_vm(s, str(vm.id)).uuid = info.uuid
    cfg = resolve(vm.backup_config)
    disks = select_disks(info, cfg)
    offline = info.state == VmState.POWEROFF
    memory = cfg.memory and not offline
    return MemberJob(vm.id, vm.name, ds_id, cfg, disks, offline, driver, reset, memory=memory)


def plan_job(ctx: Context, job: MemberJob, warnings: Warnings) -> None:
    """Full or increment (catalog rows in RUNNING), staging folder, domain XML."""
    # Checkpoints no chain needs (left by a failed attempt or a lost catalog) go first: a
    # leftover with the planned name would make backupBegin fail.
    prune_checkpoints(ctx, job.vm_id, job.name)
    job.plan = plan_backup(ctx, job.vm_id, job.ds_id, job.cfg, job.disks, job.reset, warnings)
    job.staging = _prepare_staging(ctx, job.driver, job.plan)
    _create_targets(ctx, job)
    job.domain_xml = ctx.hv.domain_xml(job.name, inactive=True)


def _create_targets(ctx: Context, job: MemberJob) -> None:
    """The backup job's target images, made here so that backupBegin (inside the freeze window)
    only opens them: libvirt creating them itself took ~0.1 s per disk of frozen time. A full's
    target is an empty image of the disk's size; an increment's names its parent's file (in the
    chain's folder, next to it once stored) as its backing file. libvirt opens a reused target
    without its backing chain, so QEMU never looks for that file in the staging folder."""
    plan = job.plan
    assert plan is not None and job.staging is not None
    for d in job.disks:
        target = job.staging / disk_file(plan.seq, d.target)
        size, job.allocated[d.target] = ctx.hv.disk_size(job.name, d.target)
        job.capacity[d.target] = size
        create = ["create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
        if plan.parent is not None:  # -u: the parent is not where this file is being made
            create += ["-u", "-b", disk_file(plan.parent, d.target), "-F", "qcow2"]
        qemu_img(*create, str(target), str(size), error=partial(BackupFailed, job.name))


def begin_job(ctx: Context, job: MemberJob, fs_freeze: FsFreeze, warnings: Warnings) -> None:
    """``backupBegin`` (quiesced per ``fs_freeze``); an invalid checkpoint starts a new chain."""
    assert job.plan is not None and job.staging is not None
    try:
        job.q = _begin(ctx, job, fs_freeze, warnings)
    except CheckpointInvalid as err:
        if job.plan.incremental_from is None:
            raise
        warnings.add(f"{err}; starting a new full backup chain")
        _abandon_plan(ctx, job.plan)
        shutil.rmtree(job.staging, ignore_errors=True)
        job.plan, job.staging, job.reset = None, None, True
        plan_job(ctx, job, warnings)
        assert job.plan is not None and job.staging is not None
        job.q = _begin(ctx, job, fs_freeze, warnings)


def finish_job(ctx: Context, job: MemberJob) -> None:
    assert job.plan is not None and job.staging is not None
    _finish(ctx, job)
    shutil.rmtree(job.staging, ignore_errors=True)


def fail_job(ctx: Context, job: MemberJob, err: BaseException) -> None:
    if job.plan is not None:
        _fail(ctx, job.driver, job.name, job.plan, err)


def after_success(ctx: Context, job: MemberJob) -> dict[str, Any]:
    """Checkpoint clean-up and retention; returns the backup record."""
    assert job.plan is not None
    prune_checkpoints(ctx, job.vm_id, job.name)
    for msg in apply_retention(ctx, job.vm_id, job.ds_id, job.cfg):
        log.info(msg)
    with ctx.catalog.session() as s:
        b = s.get(Backup, job.plan.backup_id)
        assert b is not None
        return backup_dict(b) | {"increment": job.plan.seq}


def run_backup(
    ctx: Context,
    vm_ref: str,
    ds_ref: str,
    *,
    reset: bool = False,
    progress: ProgressFn | None = None,
) -> BackupOutcome:
    out = BackupOutcome({})
    warnings = out.warnings
    steps = Steps()
    step = steps.step
    with steps.entered("lock", vm_action(ctx, vm_ref, "backup")) as vm:
        with step("prepare"):
            with ctx.catalog.session() as s:
                ds = find_datastore(s, ds_ref)
                driver, ds_id = driver_of(ds), ds.id
            job = prepare_job(ctx, vm, ds_id, driver, reset, warnings)
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


def check_space(ctx: Context, job: MemberJob) -> None:
    """Refuse early when staging or datastore cannot hold the backup (domain must be active)."""
    assert job.plan is not None and job.staging is not None
    need = space.estimate(ctx, job.name, job.disks, job.plan.incremental_from, job.allocated)
    space.check(ctx, job.driver, job.staging, need)


# --- cancel --------------------------------------------------------------------------------------
def cancel_backup(ctx: Context, vm_ref: str, wait: float = 60.0) -> dict[str, Any]:
    """Cancel the running backup of a VM. A CLI process running it is signalled (it aborts the
    libvirt job and cleans up, as on Ctrl-C); a daemon running it as a job gets the job's cancel
    flag (its worker stops the same way; the daemon and its other jobs go on). If no live
    process runs it, clean up here."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, vm_ref)
        name, vm_id = vm.name, vm.id
    held = holder(ctx.catalog, f"vm:{vm_id}")
    if (
        held
        and held.reason == "backup"
        and held.host == socket.gethostname()
        and pid_alive(held.pid)
    ):
        out: dict[str, Any] = {"vm": name, "cancelled": True, "pid": held.pid}
        served = [j for j in jobs.running_in(ctx, held.pid) if j["origin"] != "cli"]
        if not served:
            os.kill(held.pid, signal.SIGTERM)
        else:  # a daemon: never signal it, cancel its job of this VM
            job = next((j for j in served if j["kind"] == "backup" and j["target"] == name), None)
            if job is None:
                raise BackupFailed(
                    name,
                    f"the vmkeep daemon (pid {held.pid}) runs it but no backup job of it is "
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
    # No live vmkeep process runs it: undo whatever a dead one left (lock reclaimed if stale).
    with lock(ctx.catalog, f"vm:{vm_id}", "backup cancel", label=f"VM {name}"):
        done = recover_vm(ctx, vm_id, "cancelled after the vmkeep process running it died")
    if not done:
        return {"vm": name, "cancelled": False, "reason": "no backup is running"}
    return {"vm": name, "cancelled": True, "pid": None, "recovered": done}
