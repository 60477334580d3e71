"""The staging folder of a backup attempt (on the datastore's file system when QEMU can reach
it, else in vmkeep's data dir) and the images written there, made canonical (a full in guest
order for a deduplicating store) before they are hashed and stored."""

from __future__ import annotations

import shutil
from contextlib import suppress
from pathlib import Path

from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.chains import disk_file
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import flatten
from vmkeep.engine.protect.plan import Plan
from vmkeep.engine.vm.recovery import staging_dirs
from vmkeep.errors import BackupFailed
from vmkeep.hypervisor.reach import open_to_qemu, unreachable_why
from vmkeep.model import DiskInfo


def prepare_staging(ctx: Context, driver: DatastoreDriver, plan: Plan) -> Path:
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


def canonical(
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
