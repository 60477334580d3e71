"""Reading the backup catalog: list and show (JSON rows carry the increments)."""

from __future__ import annotations

from typing import Any

from vmkeep.catalog.tables import Backup
from vmkeep.engine.core.chains import backup_dict, backup_dicts
from vmkeep.engine.core.context import Context
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import BackupNotFound


def list_backups(ctx: Context, vm_ref: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        if vm_ref is None:
            return backup_dicts(s)
        return backup_dicts(s, Backup.vm_id == find_vm(s, vm_ref).id)


def show_backup(ctx: Context, backup_id: int) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
        return backup_dict(b)
