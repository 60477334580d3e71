"""Reading the backup catalog: list and show (JSON rows carry the increments)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup
from vmkeep.engine.chains import BACKUP_ROW, backup_dict, backup_dicts
from vmkeep.engine.context import Context
from vmkeep.engine.vmstate import find_vm
from vmkeep.errors import BackupNotFound


def list_backups(ctx: Context, vm_ref: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        q = select(Backup).options(*BACKUP_ROW).order_by(Backup.id)
        if vm_ref is not None:
            q = q.where(Backup.vm_id == find_vm(s, vm_ref).id)
        return backup_dicts(s, s.execute(q).scalars().all())


def show_backup(ctx: Context, backup_id: int) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
        return backup_dict(b)
