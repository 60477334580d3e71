"""Deleting what is stored: a whole chain or its newest increment (``delete_backup``), and
forgetting a datastore (``remove_datastore``). Files are removed before catalog rows, so a crash
leaves a row pointing at nothing (caught by verify), never data nobody knows about."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Backup, GroupBackup, GroupBackupMember
from vmkeep.engine.core.chains import (
    chain_locked,
    find_backup,
    needed_by_protected,
    protected_seqs,
    valid_increments,
    write_manifest,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import backup_jobs_using, driver_of, find_datastore
from vmkeep.engine.vm.recovery import prune_checkpoints
from vmkeep.errors import HypervisorError, IncrementNotFound, NotFound, Refused
from vmkeep.model import BackupStatus


def delete_backup(
    ctx: Context, backup_id: int, increment: int | None = None, force: bool = False
) -> dict[str, Any]:
    """Delete a whole chain, or its newest increment; never an increment others are built on.
    A chain holding a protected point, or an increment a protected point needs, only with
    ``force`` (an admin's: ``backup-delete`` is admin's and ``runners.check_delete`` refuses
    ``force`` to anyone else)."""
    with chain_locked(ctx, backup_id, "delete backup"):
        with ctx.catalog.session() as s:
            b = find_backup(s, backup_id)
            vm_id, vm_name = b.vm_id, b.vm.name
            _check_not_written(b)
            chain, driver = b.chain, driver_of(b.datastore)
            seqs = sorted(i.seq for i in b.increments)
            if increment is None or seqs == [increment]:
                files = [f for i in b.increments for f in i.files]
                drop = None
            else:
                if increment not in seqs:
                    raise IncrementNotFound(backup_id, increment, ", ".join(map(str, seqs)))
                later = [i.seq for i in b.increments if i.parent == increment]
                if later or increment == 0:
                    raise Refused(
                        f"delete of increment {increment} of backup {backup_id}",
                        f"increments {', '.join(map(str, later or seqs[1:]))} are built on it",
                        "Delete the newest increments first, or the whole chain with "
                        f"'vmkeep backups delete {backup_id}'.",
                    )
                inc = next(i for i in b.increments if i.seq == increment)
                files, drop = list(inc.files), inc
            _check_protected(b, None if drop is None else increment, force)
        names = [f["name"] for f in files]
        if drop is None:
            driver.rm(chain)  # files first: a crash leaves a row pointing at nothing
            with ctx.catalog.session() as s:
                forget_chain(s, backup_id)
        else:
            driver.rm(chain, names)
            with ctx.catalog.session() as s:
                row = s.get(Backup, backup_id)
                assert row is not None
                for i in list(row.increments):
                    if i.seq == increment:
                        row.increments.remove(i)
                for m in s.execute(
                    select(GroupBackupMember).where(
                        GroupBackupMember.backup_id == backup_id, GroupBackupMember.seq == increment
                    )
                ).scalars():
                    m.backup_id = None  # that group restore point lost this member's point
                valid = valid_increments(row)
                # the increment before it is the newest again; its checkpoint was pruned when the
                # deleted one was taken, so the next backup of this chain starts a new full
                if valid and valid[-1].checkpoint not in _live_checkpoints(ctx, vm_name):
                    valid[-1].checkpoint = None
            write_manifest(ctx, driver, backup_id)
        prune_checkpoints(ctx, vm_id, vm_name, missing_ok=True)
    return {
        "backup": backup_id,
        "increment": increment,
        "deleted_files": names,
        "freed_bytes": sum(int(f.get("size") or 0) for f in files),
    }


def being_written(b: Backup) -> bool:
    """A backup of the chain runs: a new chain, or an increment of a VALID one."""
    return b.status == BackupStatus.RUNNING or any(
        i.status == BackupStatus.RUNNING for i in b.increments
    )


def _check_not_written(b: Backup) -> None:
    if being_written(b):
        raise Refused(
            f"delete of backup {b.id}",
            "a backup of this chain is running",
            "Wait for it or cancel it with 'vmkeep backup cancel VM'.",
        )


def forget_chain(s: Session, backup_id: int) -> None:
    """The chain's catalog rows gone (its files are already): a group restore point that held
    it keeps its record of the member, without the chain."""
    for m in s.execute(
        select(GroupBackupMember).where(GroupBackupMember.backup_id == backup_id)
    ).scalars():
        m.backup_id = None
    row = s.get(Backup, backup_id)
    if row is not None:
        s.delete(row)


def check_delete(ctx: Context, backup_id: int, increment: int | None, force: bool) -> None:
    """Refused now (before a job is queued) when a backup of the chain runs or the delete would
    remove a protected point."""
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        _check_not_written(b)
        whole = increment is None or sorted(i.seq for i in b.increments) == [increment]
        _check_protected(b, None if whole else increment, force)


def _check_protected(b: Backup, increment: int | None, force: bool) -> None:
    """Refused unless ``force``: the whole chain (``increment`` None) while it holds a
    protected point, or an increment a protected point needs."""
    needed = needed_by_protected(b)
    if force or not needed or (increment is not None and increment not in needed):
        return
    protected = protected_seqs(b)
    what = f"increment {increment} of backup" if increment is not None else "backup"
    raise Refused(
        f"delete of {what} {b.id}",
        f"its increments {', '.join(map(str, protected))} are protected",
        f"Lift the protection with 'vmkeep backups unprotect {b.id} --increment "
        f"{protected[-1]}' (for each protected increment), or delete anyway with --force "
        "(admin only).",
    )


def _live_checkpoints(ctx: Context, vm_name: str) -> list[str]:
    try:
        return ctx.hv.checkpoints(vm_name)
    except (HypervisorError, NotFound):
        return []


def remove_datastore(ctx: Context, ref: str, force: bool = False) -> dict[str, Any]:
    """Forget a datastore. Refused while the catalog has backups on it, unless ``force``: then
    their catalog rows go too, protected points and notes with them; the data stays where it
    is (``datastore scan --import`` brings it back, without protection or notes)."""
    with ctx.catalog.session() as s:
        ds = find_datastore(s, ref)
        if users := backup_jobs_using(s, datastore=ds.name):
            raise Refused(
                f"removing datastore {ds.name}",
                f"backup jobs {', '.join(users)} write to it",
                "Point them elsewhere with 'vmkeep backupjob edit NAME --datastore D' (or "
                "--copy-to), or delete them with 'vmkeep backupjob delete NAME'.",
            )
        rows = s.execute(select(Backup).where(Backup.datastore_id == ds.id)).scalars().all()
        running = [b.id for b in rows if being_written(b)]
        if running:
            raise Refused(
                f"removing datastore {ds.name}",
                f"backups {', '.join(map(str, running))} are being written to it",
                "Wait for them to end, or cancel them with 'vmkeep backup cancel VM'.",
            )
        if rows and not force:
            ids = ", ".join(str(b.id) for b in rows[:10])
            raise Refused(
                f"removing datastore {ds.name}",
                f"it holds {len(rows)} backup(s) ({ids})",
                "Delete them with 'vmkeep backups delete ID', or add --force to forget them, "
                "protected points too (their files stay in the datastore and can be imported "
                "again, unprotected).",
            )
        for b in rows:
            for m in s.execute(
                select(GroupBackupMember).where(GroupBackupMember.backup_id == b.id)
            ).scalars():
                m.backup_id = None
            s.delete(b)
        for gb in s.execute(select(GroupBackup).where(GroupBackup.datastore_id == ds.id)).scalars():
            s.delete(gb)
        name = ds.name
        s.delete(ds)
    return {"datastore": name, "forgotten_backups": [b.id for b in rows]}
