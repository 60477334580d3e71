"""Instant restore (Proxmox "live-restore"): the restored VM runs within seconds on qcow2 overlays
whose backing chain is the backup's own files, opened read-only by QEMU and never written. While
the guest runs, libvirt's block pull copies the backing data into the overlays in the VM's folder;
when every pull is done the VM no longer depends on the datastore.

Cancel (Ctrl-C, ``jobs cancel``) or a failed pull aborts the copying only: the VM keeps running on
its overlays (still backed by the backup, which stays untouched), and the result says so.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkeep.checksums import expected_digests, row_digest
from vmkeep.datastores.base import DatastoreDriver, qemu_img_info
from vmkeep.datastores.dir import DirDriver
from vmkeep.engine.core.chains import disk_file, find_backup, point
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.core.trust import check_restore_destination, mark_created
from vmkeep.engine.restore.point import (
    RestoreOptions,
    check_new_vm_name,
    check_place,
    new_vm_xml,
    pick_disks,
    verify_files,
    vm_folder,
    warn_unsearchable,
)
from vmkeep.engine.vm import inventory
from vmkeep.errors import VmkeepError
from vmkeep.model import Warnings

Progress = Callable[[int, int], None]
POLL = 0.2


def make_overlay(backing: Path, overlay: Path) -> None:
    """A qcow2 overlay over ``backing`` (which it never writes)."""
    proc = subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(backing),
            str(overlay),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise VmkeepError(f"qemu-img create overlay {overlay.name}: {proc.stderr.strip()}")


def local_folder(driver: DatastoreDriver, fetched_into: Path | None) -> Path | None:
    """vmkeep's folder holding a point's files that QEMU opens under an overlay: a ``dir``
    datastore's own folder (its files are used in place), else where they were fetched."""
    return driver.root if isinstance(driver, DirDriver) else fetched_into


def backing_of(image: Path) -> str | None:
    value = qemu_img_info(image).get("backing-filename")
    return str(value) if value else None


def instant_restore(
    ctx: Context,
    backup_id: int,
    opts: RestoreOptions,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], Warnings]:
    warnings = Warnings()
    t0 = time.monotonic()
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        target, chain = point(b, opts.increment)
        disks = pick_disks(target, None)
        chain_key, vm_name, driver = b.chain, b.vm.name, driver_of(b.datastore)
        expected = expected_digests(f for inc in chain for f in inc.files if f["disk"])
        xml_entry = next(f for f in target.files if f["disk"] is None and not f.get("memory"))
        expected[xml_entry["name"]] = row_digest(xml_entry)
        seq = target.seq
    new_name = opts.name or f"{vm_name}-instant-{backup_id}-{seq}"
    check_new_vm_name(ctx, new_name)
    check_place(ctx, opts, ctx.config.data_dir / "restores" / new_name)
    folder = vm_folder(opts.path, ctx.config.data_dir / "restores" / new_name, opts.force)
    check_restore_destination(ctx.config, opts.by, folder, opts.force)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    warn_unsearchable(ctx, folder, warnings, folder if created else None)
    # a local datastore's files are used where they are; a remote one's are fetched first
    fetched = folder / ".backing"
    overlays = {d: folder / f"{d}.qcow2" for d in disks}
    try:
        local = driver.restore(chain_key, list(expected), fetched)
        verify_files(ctx, backup_id, chain_key, expected, local)
        for d, ov in overlays.items():
            backing = local[disk_file(seq, d)]
            # QEMU opens the backup's files read-only under the overlay: fetched ones are in
            # the VM's folder; a dir datastore's are used where they are, in its folder
            warn_unsearchable(
                ctx, backing.parent, warnings, local_folder(driver, folder if created else None)
            )
            make_overlay(backing.resolve(), ov)
            mark_created(ov)
        stored = local[xml_entry["name"]].read_text()
        what = f"instant restore of backup {backup_id}"
        xml = new_vm_xml(ctx, stored, new_name, overlays, folder, opts, warnings, what)
        (folder / "domain.xml").write_text(xml)
        ctx.hv.define(xml)
        ctx.hv.start(new_name)
    except BaseException:
        with contextlib.suppress(VmkeepError):
            ctx.hv.destroy(new_name)
            ctx.hv.undefine(new_name)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for p in [*overlays.values(), folder / "domain.xml"]:
                p.unlink(missing_ok=True)
            shutil.rmtree(fetched, ignore_errors=True)
        raise
    inventory.import_vm(ctx, new_name)
    started_s = time.monotonic() - t0
    result: dict[str, Any] = {
        "backup": backup_id,
        "increment": seq,
        "vm": new_name,
        "path": str(folder),
        "disks": {d: str(p) for d, p in overlays.items()},
        "running_after_s": round(started_s, 3),
        "instant": True,
    }
    try:
        pull_disks(ctx, new_name, disks, opts.copy_bwlimit, progress)
    except BaseException as err:
        for d in disks:
            ctx.hv.block_job_abort(new_name, d)
        result["independent"] = False
        warnings.add(
            f"VM {new_name} runs, but its disks still read from backup {backup_id} "
            f"({type(err).__name__}: {err}); run the restore's copy again later or keep the backup"
        )
        if isinstance(err, KeyboardInterrupt | SystemExit):  # JobCancelled is one too
            raise  # a cancelled copy: the VM runs on, still backed by the untouched backup
        return result, warnings
    left = {d: bf for d in disks if (bf := backing_of(overlays[d]))}
    result["independent"] = not left
    if left:
        warnings.add(f"disks {', '.join(left)} still have a backing file after the pull")
    else:
        shutil.rmtree(fetched, ignore_errors=True)  # a remote datastore's fetched files
    result["copied_after_s"] = round(time.monotonic() - t0, 3)
    return result, warnings


def pull_disks(
    ctx: Context, name: str, disks: list[str], bwlimit: int, progress: Progress | None
) -> dict[str, tuple[int, int]]:
    """Copy each disk's backing data into its overlay (libvirt's block pull), one disk at a
    time: QEMU 7.2 crashed (in ``bdrv_refresh_filename``, answering libvirt's
    ``query-named-block-nodes``) when the pulls of two disks ran and ended close together.
    Returns each disk's last (done, total)."""
    last: dict[str, tuple[int, int]] = {}
    for d in disks:
        ctx.hv.block_pull(name, d, bwlimit)
        _wait_pulls(ctx, name, [d], progress, last)
    return last


def _wait_pulls(
    ctx: Context,
    name: str,
    disks: list[str],
    progress: Progress | None,
    last: dict[str, tuple[int, int]],
) -> None:
    """Until the pulls of ``disks`` end; ``progress`` gets the sums over ``last`` (every disk
    pulled so far)."""
    while True:
        running = False
        for d in disks:
            info = ctx.hv.block_job(name, d)
            if info is not None:
                running = True
                last[d] = info
            elif d in last:
                last[d] = (last[d][1], last[d][1])
        if progress is not None and last:
            progress(sum(c for c, _ in last.values()), sum(e for _, e in last.values()))
        if not running:
            return
        time.sleep(POLL)
