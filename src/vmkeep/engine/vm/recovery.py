"""Clean-up after a backup attempt that failed, was cancelled, or whose vmkeep process died.

``discard_attempt`` undoes one attempt (libvirt job, new checkpoint, staging folder, partial files
in the datastore, catalog rows -> FAILED/CANCELLED). ``recover_vm`` does that for every attempt a
dead process left behind and brings the guest back (thawed, resumed; a powered-off VM that was
started paused for its backup is powered off again) and its state from libvirt. It runs

* in the guard process the moment the owner dies (``engine/vm/watchdog.py``),
* in the next command that takes the VM's lock and finds such leftovers (``inventory.vm_action``),
* in ``backup cancel`` when no live process runs the backup,

so no failure needs a manual step. The caller holds the VM's lock.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from vmkeep.catalog.locks import drop_if_dead
from vmkeep.catalog.tables import Backup, GroupBackup, GroupBackupMember, Vm
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core import jobs
from vmkeep.engine.core.chains import (
    CHECKPOINT_PREFIX,
    MERGE_PREFIX,
    chain_disks,
    checkpoint_name,
    checkpoints_to_keep,
    increment_file_names,
    running_increments,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import PARTIAL
from vmkeep.engine.core.states import STALE_STATES
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.vm.quiesce import Thawed, ensure_thawed, freeze_lock, spawn
from vmkeep.engine.vm.record import sync_state
from vmkeep.errors import HypervisorUnreachable, NotFound, VmkeepError
from vmkeep.model import BackupStatus, LcmState, VmState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One increment being written: enough to undo it."""

    backup_id: int
    seq: int
    chain: str
    new_chain: bool
    checkpoint: str | None


def staging_dirs(ctx: Context, driver: DatastoreDriver, backup_id: int, seq: int) -> list[Path]:
    """Where an attempt may be staged, first choice first: on the datastore's file system (its
    driver's ``staging_root``: storing is then a rename), else in vmkeep's data dir."""
    roots = [driver.staging_root(), ctx.config.data_dir / "staging"]
    return [r / f"{backup_id}-{seq}" for r in roots if r is not None]


def discard_attempt(
    ctx: Context,
    driver: DatastoreDriver,
    name: str,
    attempt: Attempt,
    status: BackupStatus,
    reason: str,
) -> None:
    """Leave catalog, checkpoints and datastore consistent after a failed or cancelled attempt."""
    try:
        ctx.hv.abort_job(name)
    except HypervisorUnreachable:
        # libvirtd went away (restart): wait for it, or the checkpoint cannot be removed.
        with suppress(VmkeepError):
            ctx.hv.reconnect()
            ctx.hv.abort_job(name)
    except VmkeepError:
        pass
    for staging in staging_dirs(ctx, driver, attempt.backup_id, attempt.seq):
        shutil.rmtree(staging, ignore_errors=True)
        with suppress(OSError):  # the staging root too, when no other backup uses it
            staging.parent.rmdir()
    if attempt.checkpoint:
        # libvirt merges the new checkpoint's bitmap into its parent: the chain stays usable.
        try:
            ctx.hv.delete_checkpoint(name, attempt.checkpoint)
        except NotFound:
            pass
        except VmkeepError as e:
            log.error("could not delete checkpoint %s of %s: %s", attempt.checkpoint, name, e)
    now = datetime.now(UTC)
    with ctx.catalog.session() as s:
        b = s.get(Backup, attempt.backup_id)
        if b is None:
            return
        for inc in b.increments:
            if inc.seq == attempt.seq:
                inc.status, inc.error, inc.finished_at = status, reason, now
        if attempt.new_chain:
            b.status, b.error, b.finished_at = status, reason, now
        disks = chain_disks(s, attempt.backup_id)
    try:
        if attempt.new_chain:
            driver.rm(attempt.chain)
        else:
            driver.rm(attempt.chain, increment_file_names(disks, attempt.seq))
    except VmkeepError as err:
        log.error("could not remove the partial files of %s: %s", attempt.chain, err)


def recover_vm(ctx: Context, vm_id: int, why: str) -> list[str]:
    """Undo what a dead vmkeep process left on this VM; returns what was done (empty: nothing)."""
    with ctx.catalog.session() as s:
        vm = s.get(Vm, vm_id)
        if vm is None:
            return []
        name, lcm = vm.name, vm.lcm_state
        stale = [
            (Attempt(b.id, i.seq, b.chain, i.seq == 0, checkpoint_name(b.id, i.seq)), b.datastore)
            for b, i in running_increments(s, vm_id)
        ]
        drivers = {ds.id: driver_of(ds) for _, ds in stale}
        stale_ids = [(a, ds.id) for a, ds in stale]
    done: list[str] = _clear_interrupted_flatten(ctx, vm_id)
    if drop_if_dead(ctx.catalog, freeze_lock(vm_id)):
        done.append(f"{name}: freeze lock of a dead process released")
    if not stale_ids and lcm not in STALE_STATES:
        return done
    for attempt, ds_id in stale_ids:
        discard_attempt(ctx, drivers[ds_id], name, attempt, BackupStatus.FAILED, why)
        done.append(f"backup {attempt.backup_id} increment {attempt.seq} of {name}: {why}")
    _close_group_backups(ctx, vm_id, why)
    if lcm == LcmState.RESTORE:
        done += revert_disk_swap(ctx, name)
    done += _bring_back(ctx, vm_id, name, lcm)
    sync_state(ctx, vm_id, name)
    done += [f"job {j} of a dead process marked FAILED" for j in jobs.recover(ctx)]
    for msg in done:
        log.warning("recovered: %s", msg)
    return done


# an in-place restore writes NEW beside each disk, then renames the disk to OLD and NEW into place
SWAP_NEW = ".vmkeep-restore.partial"
SWAP_OLD = ".vmkeep-before-restore"


def revert_disk_swap(ctx: Context, name: str) -> list[str]:
    """An in-place restore that died midway: every disk put aside goes back, partial images go.
    The VM is as it was before the restore (the restore can simply be run again)."""
    try:
        disks = [d for d in ctx.hv.domain(name).disks if d.path]
    except NotFound:
        return []
    out = []
    for d in disks:
        path = Path(d.path)
        aside, new = path.with_name(path.name + SWAP_OLD), path.with_name(path.name + SWAP_NEW)
        if aside.exists():
            aside.replace(path)
            out.append(f"{name}: disk {d.target} put back as it was before an interrupted restore")
        new.unlink(missing_ok=True)
        new.with_name(new.name + PARTIAL).unlink(missing_ok=True)  # killed while it was written
    return out


def _clear_interrupted_flatten(ctx: Context, vm_id: int) -> list[str]:
    """A retention merge rewrites copies and stores them before it updates the catalog; a flag
    left set means it died on the way. Killed before the store, the old files and rows are
    intact; after it, the rows name the stored files' checksums as ``pending`` (verify and the
    next merge take them: engine/points/merge.py). Either way: clear it, the next run merges."""
    with ctx.catalog.session() as s:
        rows = s.execute(
            select(Backup).where(Backup.vm_id == vm_id, Backup.active_flatten.is_(True))
        ).scalars()
        out = []
        for b in rows:
            b.active_flatten = False
            roots = [driver_of(b.datastore).staging_root(), ctx.config.data_dir]
            for root in (r for r in roots if r is not None and r.is_dir()):
                for left in root.glob(f"{MERGE_PREFIX}{b.id}-*"):
                    shutil.rmtree(left, ignore_errors=True)
            out.append(f"backup {b.id}: an interrupted retention merge is left to the next run")
        return out


def _bring_back(ctx: Context, vm_id: int, name: str, lcm: str) -> list[str]:
    try:
        info = ctx.hv.domain(name)
    except NotFound:
        return []
    if info.state != VmState.ACTIVE:
        return []
    if lcm == LcmState.BACKUP_POWEROFF:
        ctx.hv.destroy(name)  # started paused for its backup only
        return [f"{name} was started paused for an offline backup: powered off again"]
    out = []
    if info.paused:
        ctx.hv.resume(name)
        out.append(f"{name} resumed")
    thawed = ensure_thawed(ctx, name)
    if thawed == Thawed.SILENT:
        spawn(ctx, [vm_id], pending=True)
        out.append(f"the guest agent of {name} does not answer: a guard thaws it once it does")
    return out


def _close_group_backups(ctx: Context, vm_id: int, why: str) -> None:
    with ctx.catalog.session() as s:
        rows = s.execute(
            select(GroupBackup)
            .join(GroupBackupMember)
            .where(GroupBackupMember.vm_id == vm_id, GroupBackup.status == BackupStatus.RUNNING)
        ).scalars()
        for gb in rows:
            gb.status, gb.error, gb.finished_at = BackupStatus.FAILED, why, datetime.now(UTC)
            for m in gb.members:
                if m.status == BackupStatus.RUNNING:
                    m.status = BackupStatus.FAILED


def prune_checkpoints(ctx: Context, vm_id: int, name: str, missing_ok: bool = False) -> None:
    """Keep only checkpoints that are the base of a future increment of some VALID chain
    (``missing_ok``: the domain may not be on this host, e.g. for an imported chain)."""
    with ctx.catalog.session() as s:
        keep = checkpoints_to_keep(s, vm_id)
    try:
        for cp in ctx.hv.checkpoints(name):
            if cp.startswith(CHECKPOINT_PREFIX) and cp not in keep:
                ctx.hv.delete_checkpoint(name, cp)
    except NotFound:
        if not missing_ok:
            raise
