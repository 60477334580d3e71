"""One VM's backup in flight (``MemberJob``) and its steps, in the order they run: prepare, plan
(rows, staging folder, target images), space check, begin (``backupBegin``, quiesced), wait for
the push jobs, finish (checksum, store, VALID) or fail (undo), then clean-up and retention.
``run_backup`` drives one job; a group backup drives several, with its own freeze around begin."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Backup, Vm
from vmkeep.checksums import digest_file
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core import space
from vmkeep.engine.core.backup_config import BackupConfig
from vmkeep.engine.core.chains import backup_dict, disk_file, memory_file, write_manifest
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import qemu_img
from vmkeep.engine.core.steps import Steps
from vmkeep.engine.points.merge import apply_retention
from vmkeep.engine.protect.plan import (
    Plan,
    abandon_plan,
    bitmapless_disk,
    plan_backup,
    select_disks,
)
from vmkeep.engine.protect.staging import canonical, prepare_staging
from vmkeep.engine.vm.policy import effective
from vmkeep.engine.vm.quiesce import Quiesce, quiesced
from vmkeep.engine.vm.record import find_vm
from vmkeep.engine.vm.recovery import Attempt, discard_attempt, prune_checkpoints
from vmkeep.errors import BackupFailed, CheckpointInvalid, VmkeepError
from vmkeep.faults import failpoint
from vmkeep.hypervisor.backup_xml import backup_xml, checkpoint_xml
from vmkeep.model import BackupStatus, Consistency, DiskInfo, FsFreeze, VmState, Warnings

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


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
    excluded: list[str] = field(default_factory=list)  # disks left out by EXCLUDE_DISKS


def prepare_job(
    ctx: Context,
    vm: Vm,
    ds_id: int,
    driver: DatastoreDriver,
    reset: bool,
    warnings: Warnings,
    overrides: dict[str, Any] | None = None,
) -> MemberJob:
    """Read the domain, resolve the VM's effective BACKUP_CONFIG (``policy.effective``: the
    backup job's ``overrides`` over the VM, its pool and ``[backup]``) and pick the disks (no
    catalog rows yet). The config stays on the job: plan, quiesce and retention use it."""
    info = ctx.hv.domain(vm.name)
    if info.uuid != vm.uuid:
        warnings.add(f"domain {vm.name} was recreated (UUID changed); starting a new full chain")
        reset = True
        with ctx.catalog.session() as s:
            find_vm(s, str(vm.id)).uuid = info.uuid
    cfg, _sources = effective(ctx, vm, overrides)
    disks, excluded = select_disks(info, cfg)
    offline = info.state == VmState.POWEROFF
    memory = cfg.memory and not offline
    return MemberJob(
        vm.id, vm.name, ds_id, cfg, disks, offline, driver, reset, memory=memory, excluded=excluded
    )


def plan_job(ctx: Context, job: MemberJob, warnings: Warnings) -> None:
    """Full or increment (catalog rows in RUNNING), staging folder, domain XML."""
    # Checkpoints no chain needs (left by a failed attempt or a lost catalog) go first: a
    # leftover with the planned name would make backupBegin fail.
    prune_checkpoints(ctx, job.vm_id, job.name)
    job.plan = plan_backup(ctx, job.vm_id, job.ds_id, job.cfg, job.disks, job.reset, warnings)
    job.staging = prepare_staging(ctx, job.driver, job.plan)
    _create_targets(ctx, job)
    job.domain_xml = ctx.hv.domain_xml(job.name, inactive=True)


def _create_targets(ctx: Context, job: MemberJob) -> None:
    """The backup job's target images, made here so that backupBegin (inside the freeze window)
    only opens them: libvirt creating them itself took ~0.1 s per disk of frozen time. A full's
    target (a new chain's, or a disk's that joins the chain) is an empty image of the disk's
    size; an increment's names its parent's file (in the chain's folder, next to it once stored)
    as its backing file. libvirt opens a reused target without its backing chain, so QEMU never
    looks for that file in the staging folder. A disk grown since the parent point gets a target
    of its new size over the smaller parent: what lies past the parent's end reads as zeros."""
    plan = job.plan
    assert plan is not None and job.staging is not None
    for d in job.disks:
        size, job.allocated[d.target] = ctx.hv.disk_size(job.name, d.target)
        job.capacity[d.target] = size
        _create_target(job, d.target)


def _create_target(job: MemberJob, disk: str) -> None:
    plan = job.plan
    assert plan is not None and job.staging is not None
    target = job.staging / disk_file(plan.seq, disk)
    target.unlink(missing_ok=True)
    create = ["create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
    if plan.parent is not None and not plan.is_full(disk):
        # -u: the parent is not where this file is being made
        create += ["-u", "-b", disk_file(plan.parent, disk), "-F", "qcow2"]
    size = str(job.capacity[disk])
    qemu_img(*create, str(target), size, error=partial(BackupFailed, job.name))


def check_space(ctx: Context, job: MemberJob) -> None:
    """Refuse early when staging or datastore cannot hold the backup (domain must be active)."""
    plan = job.plan
    assert plan is not None and job.staging is not None
    since = [d for d in job.disks if not plan.is_full(d.target)]
    whole = [d for d in job.disks if plan.is_full(d.target)]
    need: int | None = 0
    for disks, base in ((since, plan.incremental_from), (whole, None)):
        part = space.estimate(ctx, job.name, disks, base, job.allocated) if disks else 0
        need = None if need is None or part is None else need + part
    space.check(ctx, job.driver, job.staging, need)


def begin_job(ctx: Context, job: MemberJob, fs_freeze: FsFreeze, warnings: Warnings) -> None:
    """``backupBegin`` (quiesced per ``fs_freeze``). When libvirt names one disk whose bitmap
    of the parent's checkpoint is missing or broken (its image was replaced under the same
    target, or QEMU died before it saved the bitmap), that disk is copied whole and the others
    stay incremental; any other invalid checkpoint starts a new chain."""
    assert job.plan is not None and job.staging is not None
    while True:
        try:
            job.q = _begin(ctx, job, fs_freeze, warnings)
            return
        except CheckpointInvalid as err:
            if job.plan.incremental_from is None:
                raise
            reason = str(err)
        disk = bitmapless_disk(reason, [d.target for d in job.disks], job.plan)
        if disk is None:
            break
        warnings.add(f"{reason}; disk {disk} is copied whole in this increment")
        job.plan.full_disks = (*job.plan.full_disks, disk)
        _create_target(job, disk)
    warnings.add(f"{reason}; starting a new full backup chain")
    abandon_plan(ctx, job.plan)
    shutil.rmtree(job.staging, ignore_errors=True)
    job.plan, job.staging, job.reset = None, None, True
    plan_job(ctx, job, warnings)
    assert job.plan is not None and job.staging is not None
    job.q = _begin(ctx, job, fs_freeze, warnings)


def _begin(ctx: Context, job: MemberJob, fs_freeze: FsFreeze, warnings: Warnings) -> Quiesce:
    plan, disks, name = job.plan, job.disks, job.name
    assert plan is not None and job.staging is not None
    targets = {d.target: str(job.staging / disk_file(plan.seq, d.target)) for d in disks}
    bxml = backup_xml(targets, plan.incremental_from, plan.full_disks)
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


def finish_job(ctx: Context, job: MemberJob) -> None:
    assert job.plan is not None and job.staging is not None
    _finish(ctx, job)
    shutil.rmtree(job.staging, ignore_errors=True)


def fail_job(ctx: Context, job: MemberJob, err: BaseException) -> None:
    if job.plan is not None:
        _fail(ctx, job.driver, job.name, job.plan, err)


def _finish(ctx: Context, job: MemberJob) -> None:
    plan, disks, staging, q, steps = job.plan, job.disks, job.staging, job.q, job.steps
    driver = job.driver
    assert plan is not None and staging is not None
    files: list[dict[str, Any]] = []
    staged: list[Path] = []
    with steps.step("canonical"):
        canonical(driver, plan, disks, staging, staged)
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
            row: dict[str, Any] = {
                "disk": target,
                "name": f.name,
                "size": f.stat().st_size,
                "digest": digest_file(f),
            }
        if target is not None:  # the restored size (``backups show``), without asking the store
            row["virtual_size"] = job.capacity[target]
            if plan.is_full(target):  # no backing file: the disk's chain starts here
                row["full"] = True
        elif f == xml_file:  # the disks the VM had but this point leaves out (EXCLUDE_DISKS)
            row["excluded_disks"] = list(job.excluded)
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


def after_success(ctx: Context, job: MemberJob) -> dict[str, Any]:
    """Checkpoint clean-up and retention; returns the backup record."""
    assert job.plan is not None
    prune_checkpoints(ctx, job.vm_id, job.name)
    removed = apply_retention(ctx, job.vm_id, job.ds_id, job.cfg)
    for msg in removed:
        log.info(msg)
    if removed:  # a deleted chain's last checkpoint is no base of anything now
        prune_checkpoints(ctx, job.vm_id, job.name)
    with ctx.catalog.session() as s:
        b = s.get(Backup, job.plan.backup_id)
        assert b is not None
        return backup_dict(b) | {"increment": job.plan.seq}
