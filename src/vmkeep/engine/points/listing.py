"""Reading the backup catalog: list and show (JSON rows carry the increments); ``backups show``
adds each file's download URL and each point's restored size (``show_with_sizes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Backup
from vmkeep.engine.core.chains import backup_dict, backup_dicts, find_backup
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.points.scratch import scratch
from vmkeep.engine.vm.record import find_vm
from vmkeep.errors import DatastoreError


def list_backups(ctx: Context, vm_ref: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        if vm_ref is None:
            return backup_dicts(s)
        return backup_dicts(s, Backup.vm_id == find_vm(s, vm_ref).id)


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
