"""Reading the backup catalog: list and show (JSON rows carry the increments); ``backups show``
adds each file's download URL and each point's restored size (``show_with_sizes``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Backup, Datastore, Increment, Vm
from vmkeep.engine.core.chains import backup_dict, backup_dicts, find_backup
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.points.scratch import scratch
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import DatastoreError
from vmkeep.model import BackupStatus


def list_backups(
    ctx: Context, vm_ref: str | None = None, limit: int | None = None, after: int | None = None
) -> list[dict[str, Any]]:
    """The backups (of the VM ``vm_ref``) in id order, each with its points; ``limit`` of them,
    those after id ``after`` (a page)."""
    with ctx.catalog.session() as s:
        where = [] if vm_ref is None else [Backup.vm_id == find_vm(s, vm_ref).id]
        if after is not None:
            where.append(Backup.id > after)
        if limit is not None:
            q = select(Backup.id).where(*where).order_by(Backup.id).limit(limit)
            ids = list(s.execute(q).scalars())
            if not ids:
                return []
            where = [Backup.id >= ids[0], Backup.id <= ids[-1], *where]
        return backup_dicts(s, *where)


def show_backup(ctx: Context, backup_id: int) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        return backup_dict(b)


def show_with_sizes(ctx: Context, backup_id: int) -> dict[str, Any]:
    """``backups show``: the chain, each file's download URL and each point's restored size."""
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        data = backup_dict(b)
        driver = driver_of(b.datastore)
    for inc in data["increments"]:
        for f in inc["files"]:
            f["url"] = driver.url(data["chain"], f["name"])
        disks = [f for f in inc["files"] if f["disk"]]
        if all("virtual_size" in f for f in disks):
            inc["restored_size"] = sum(int(f["virtual_size"]) for f in disks)
        elif inc["status"] == "VALID":
            try:
                with scratch(ctx) as tmp:
                    inc["restored_size"] = sum(
                        driver.stat(data["chain"], f["name"], Path(tmp)) for f in disks
                    )
            except DatastoreError as err:
                inc["restored_size"] = None
                inc["stat_error"] = str(err)
    return data


def _valid_points(vm: str, datastore: str) -> Any:
    return (
        select(
            Backup.id,
            Increment.seq,
            Increment.started_at,
            Increment.verified_at,
            Increment.verify_result,
        )  # fmt: skip
        .join(Increment, Increment.backup_id == Backup.id)
        .join(Vm, Vm.id == Backup.vm_id)
        .join(Datastore, Datastore.id == Backup.datastore_id)
        .where(
            Vm.name == vm,
            Datastore.name == datastore,
            Backup.status == BackupStatus.VALID,
            Increment.status == BackupStatus.VALID,
        )
    )


def newest_point(s: Session, vm: str, datastore: str) -> tuple[int, int] | None:
    """(backup id, increment) of the VM's newest VALID point on the datastore."""
    rows = s.execute(_valid_points(vm, datastore)).all()
    if not rows:
        return None
    newest = max(rows, key=lambda r: (r.started_at, r.id, r.seq))
    return newest.id, newest.seq


def verify_due(s: Session, vm: str, datastore: str, days: int | None, now: datetime) -> list[int]:
    """The VM's chains on the datastore with a VALID point that no verify read in the last
    ``days`` days (Proxmox Backup Server's "re-verify after"; None: every chain, each time),
    or whose last verify failed."""
    since = None if days is None else now - timedelta(days=days)
    due = set()
    for r in s.execute(_valid_points(vm, datastore)).all():
        if (
            since is None
            or r.verified_at is None
            or r.verified_at < since
            or r.verify_result != "OK"
        ):
            due.add(r.id)
    return sorted(due)
