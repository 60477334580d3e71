"""In-place restore: roll an existing, powered-off VM back to a restore point (OpenNebula's
``restore(vid, img_id, inc_id, disk_id)``). Name, UUID, NICs and the rest of its configuration
stay; only the disk contents change.

Every stored file is checked against its checksum and each new disk image is written beside the
disk it replaces before anything of the VM is touched. Then each current disk is renamed aside,
the new one renamed into place, and only when every disk is in place are the old ones deleted: a
failure at any step puts the old disks back, so a failed restore leaves the VM as it was. The
VM's checkpoints describe the old disks, so they are dropped and the next backup starts a new full
chain (said in a warning).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup
from vmkeep.checksums import row_digest
from vmkeep.engine.core.chains import (
    CHECKPOINT_PREFIX,
    disk_file,
    find_backup,
    point,
    reset_checkpoints,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import drop_bitmaps, flatten
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.restore.instant import instant_restore
from vmkeep.engine.restore.memory import memory_entry, resume
from vmkeep.engine.restore.point import RestoreOptions, pick_disks, restore, verified
from vmkeep.engine.vm.inventory import vm_action
from vmkeep.engine.vm.record import set_lcm, sync_state
from vmkeep.engine.vm.recovery import SWAP_NEW, SWAP_OLD
from vmkeep.errors import InvalidValue
from vmkeep.faults import failpoint
from vmkeep.model import LcmState, Warnings

NEW, OLD = SWAP_NEW, SWAP_OLD  # a process killed mid-swap is undone by recovery.revert_disk_swap


def _same_owner(model: Path, path: Path) -> None:
    st = model.stat()
    os.chown(path, st.st_uid, st.st_gid)
    path.chmod(st.st_mode & 0o7777)


def restore_in_place(
    ctx: Context,
    backup_id: int,
    increment: int | None = None,
    disk: str | None = None,
    *,
    without_memory: bool = False,
) -> tuple[dict[str, Any], Warnings]:
    warnings = Warnings()
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        target, chain = point(b, increment)
        disks = pick_disks(target, disk)
        chain_key, driver, vm_ref = b.chain, driver_of(b.datastore), str(b.vm_id)
        expected = {
            f["name"]: row_digest(f) for inc in chain for f in inc.files if f["disk"] in disks
        }
        seq = target.seq
        mem = None if disk is not None or without_memory else memory_entry(target)
        if mem is not None:
            expected[mem["name"]] = row_digest(mem)
    resumed: bool | None = None
    with vm_action(ctx, vm_ref, "restore in place") as vm:
        vm_id, name = vm.id, vm.name
        current = {d.target: d for d in ctx.hv.domain(name).disks if d.device == "disk"}
        missing = [d for d in disks if d not in current or not current[d].path]
        if missing:
            raise InvalidValue(
                "--disk",
                ",".join(missing),
                f"VM {name} has no such disk now (it has {', '.join(sorted(current))}); "
                "restore it as a new VM or a disk image instead",
            )
        unchanged = sorted(set(current) - set(disks))
        set_lcm(ctx, vm_id, LcmState.RESTORE)
        ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
            try:
                local = driver.restore(chain_key, list(expected), Path(tmp))
                staged: dict[str, Path] = {}
                try:  # new images written while the chain is checked, swapped in once it passed
                    with verified(ctx, backup_id, chain_key, expected, local):
                        _stage(local, seq, disks, current, staged)
                    result = _swap(staged, disks, current)
                finally:
                    for new in staged.values():
                        new.unlink(missing_ok=True)
            finally:
                sync_state(ctx, vm_id, name)
            dropped = reset_checkpoints(ctx, vm_id, name)
            for d in unchanged:  # a disk left as it is keeps the dropped checkpoints' bitmaps
                if current[d].path and (current[d].fmt or "qcow2") == "qcow2":
                    drop_bitmaps(Path(current[d].path), CHECKPOINT_PREFIX)
            if mem is not None:  # the VM running again where it was at that point
                paths = {d: Path(p) for d, p in result.items()}
                resumed = resume(ctx, local[mem["name"]], paths, warnings)
                sync_state(ctx, vm_id, name)
    warnings.add(
        f"VM {name} was rolled back: its checkpoints were dropped, so its next backup starts "
        "a new full chain"
    )
    if unchanged:
        warnings.add(
            f"disks {', '.join(unchanged)} are not in the restore and were left as they are"
        )
    return {
        "backup": backup_id,
        "increment": seq,
        "vm": name,
        "in_place": True,
        "disks": result,
        "checkpoints_dropped": dropped,
        **({} if resumed is None else {"resumed": resumed}),
    }, warnings


def _stage(
    local: dict[str, Path],
    seq: int,
    disks: list[str],
    current: dict[str, Any],
    staged: dict[str, Path],
) -> None:
    """Each new image written beside the disk it replaces (the swap is a rename); ``staged``
    names them as they are started, for the caller to remove on failure."""
    for d in disks:
        path = Path(current[d].path)
        new = path.with_name(path.name + NEW)
        staged[d] = new
        # the point's disk (with its backing chain) as one image in the VM's own format
        flatten(local[disk_file(seq, d)], new, ordered=False, fmt=current[d].fmt or "qcow2")
        _same_owner(path, new)


def _swap(staged: dict[str, Path], disks: list[str], current: dict[str, Any]) -> dict[str, str]:
    moved: list[tuple[Path, Path]] = []  # (the VM's disk, where it was put aside)
    try:
        for d in disks:
            path = Path(current[d].path)
            aside = path.with_name(path.name + OLD)
            os.replace(path, aside)
            moved.append((path, aside))
            failpoint("swap")  # the fault suite kills here: the disk is aside, the new not in
            os.replace(staged[d], path)
    except BaseException:
        for path, aside in reversed(moved):  # the VM's own disks back, as they were
            os.replace(aside, path)
        for new in staged.values():
            new.unlink(missing_ok=True)
        raise
    for _path, aside in moved:
        aside.unlink(missing_ok=True)
    return {d: current[d].path for d in disks}


def run_restore(
    ctx: Context,
    backup_id: int,
    opts: RestoreOptions,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], Warnings]:
    """Every restore entry point (CLI, API job): in place, instant, or as a new VM / disk."""
    if opts.instant:
        clash = [k for k in ("in_place", "disk") if getattr(opts, k) not in (None, False)]
        if clash:
            raise InvalidValue(
                "--instant", "with --" + clash[0].replace("_", "-"), "an instant restore runs "
                "the whole VM as a new one (--name, --path); drop that option"
            )  # fmt: skip
        return instant_restore(ctx, backup_id, opts, progress)
    if not opts.in_place:
        return restore(ctx, backup_id, opts)
    clashing = [
        f"--{k.replace('_', '-')}"
        for k in ("name", "path", "force", "no_nic", "no_ip")
        if getattr(opts, k) not in (None, False)
    ]
    if clashing:
        raise InvalidValue(
            "--in-place",
            "with " + ", ".join(clashing),
            "an in-place restore keeps the VM's name, disks' paths and NICs; drop those options",
        )
    result, warnings = restore_in_place(
        ctx, backup_id, opts.increment, opts.disk, without_memory=opts.without_memory
    )
    if result.get("resumed"):
        result["started"] = True
        return result, warnings
    if opts.start:
        ctx.hv.start(result["vm"])
        with ctx.catalog.session() as s:
            vm_id = s.execute(select(Backup.vm_id).where(Backup.id == backup_id)).scalar_one()
        sync_state(ctx, vm_id, result["vm"])
    result["started"] = opts.start
    return result, warnings
