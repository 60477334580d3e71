"""Free-space pre-check before a backup stages and stores anything (stoney checks it too).

The estimate: a full backup copies about what the disk images have allocated; an increment about
what the checkpoint's dirty bitmap counts (libvirt's checkpoint XML with sizes). The staging area
(vmkeep's data dir) and the datastore are checked separately, so the error names the one that is
short; when both are on one file system the space is needed once (the dir driver renames), as
when the backup is staged in the datastore itself (a ``dir`` datastore QEMU can reach).
"""

from __future__ import annotations

import os
from pathlib import Path

from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.context import Context
from vmkeep.errors import DatastoreError, InsufficientSpace, VmkeepError
from vmkeep.model import DiskInfo

MARGIN = 1.05  # qcow2 metadata and the domain XML
SLACK = 16 << 20


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def estimate(
    ctx: Context, name: str, disks: list[DiskInfo], since: str | None, allocated: dict[str, int]
) -> int | None:
    """Bytes the backup will write (None when libvirt cannot tell). ``allocated``: each disk's
    allocation (a full copies about that much), read once when the targets were created."""
    total = 0
    for d in disks:
        if not since:
            total += allocated[d.target]
            continue
        try:
            size = ctx.hv.checkpoint_size(name, since, d.target)
        except VmkeepError:
            return None
        if size is None:
            return None
        total += size
    return int(total * MARGIN) + SLACK


def _free(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, os.stat(path).st_dev


def check(ctx: Context, driver: DatastoreDriver, staging: Path, need: int | None) -> None:
    """Raise InsufficientSpace naming the staging area or the datastore that is too small."""
    if need is None:
        return
    free, dev = _free(staging)
    on_datastore = staging.parent == driver.staging_root()  # stored by a rename
    if free < need and on_datastore:
        raise _datastore_short(driver, need, free)
    if free < need:
        raise InsufficientSpace(
            f"the staging area {staging.parent} (in vmkeep's data dir, not the datastore)",
            human(need),
            human(free),
            "Free space there, or move the data dir (data_dir / VMKEEP_DATA_DIR) to a larger "
            "file system.",
        )
    if on_datastore:
        return  # the space the staged files take is the space they are stored in
    if "dedup" in driver.capabilities:
        return  # restic stores only what it has not seen: the need is no bound to check against
    try:
        _total, ds_free = driver.monitor()
    except DatastoreError:
        return  # an unreachable datastore fails the store step with its own error
    root = getattr(driver, "root", None)
    same_fs = isinstance(root, Path) and root.exists() and os.stat(root).st_dev == dev
    if ds_free < need and not same_fs:
        raise _datastore_short(driver, need, ds_free)


def _datastore_short(driver: DatastoreDriver, need: int, free: int) -> InsufficientSpace:
    return InsufficientSpace(
        f"datastore '{driver.name}'",
        human(need),
        human(free),
        "Free space there (delete old backups with 'vmkeep vm config VM --keep-last N'), "
        "or back up to another datastore.",
    )
