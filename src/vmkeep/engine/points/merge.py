"""Carrying out a retention plan (``retention.py``): chains deleted whole, points merged away.

Inside a chain, each kept point whose parent goes is rewritten, disk by disk, so that it reads
the same without the points removed below it:

- onto the nearest kept point below it: ``qemu-img rebase`` in safe mode writes into it every
  cluster whose content differs between its old backing chain and the new one;
- with no kept point left below: flattened into a self-contained file, the chain's new base.

A disk file that has no backing file (a disk that joined the chain later, as a full) is left as
it is. The rewritten files are stored first, then the catalog changes (ACTIVE_FLATTEN set while
merging: a process killed before storing leaves the old files and rows, and recovery clears the
flag), then the removed points' files go. Failed or cancelled increments built on a removed
point go with it. The caller holds the VM's lock.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup, GroupBackupMember
from vmkeep.checksums import digest_file
from vmkeep.engine.core.backup_config import BackupConfig
from vmkeep.engine.core.chains import disk_file, write_manifest
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import backing_name, flatten, qemu_img
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.points.delete import forget_chain
from vmkeep.engine.points.retention import ChainPlan, Plan, plan
from vmkeep.errors import BackupFailed, VmkeepError
from vmkeep.faults import failpoint
from vmkeep.model import BackupStatus

if TYPE_CHECKING:
    from vmkeep.datastores import DatastoreDriver


def apply(ctx: Context, plan: Plan) -> list[str]:
    """Carry out ``plan``; one line per chain changed."""
    out = []
    rules = ", ".join(f"{k}={v}" for k, v in plan.rules.items())
    for c in plan.chains:
        if c.delete:
            _delete(ctx, c)
            out.append(f"retention: deleted backup {c.backup} ({rules})")
        else:
            _merge(ctx, c)
            moved = "; ".join(
                f"{n} {'is the new base' if below is None else f'now built on {below}'}"
                for n, below in sorted(c.relink.items())
            )
            out.append(
                f"retention: removed increments {c.remove} of backup {c.backup} ({rules})"
                + (f"; {moved}" if moved else "")
            )
    return out


def apply_retention(ctx: Context, vm_id: int, ds_id: int, cfg: BackupConfig) -> list[str]:
    """Retention after a backup (the VM's lock is held): what it did, one line per chain."""
    if not cfg.keeps():
        return []
    with ctx.catalog.session() as s:
        p = plan(ctx, s, vm_id, ds_id, cfg)
    return apply(ctx, p)


def _delete(ctx: Context, c: ChainPlan) -> None:
    with ctx.catalog.session() as s:
        b = s.get(Backup, c.backup)
        if b is None:
            return
        driver = driver_of(b.datastore)
    driver.rm(c.chain)  # files first: a crash leaves a row pointing at nothing, not orphans
    with ctx.catalog.session() as s:
        forget_chain(s, c.backup)


def _merge(ctx: Context, c: ChainPlan) -> None:
    with ctx.catalog.session() as s:
        b = s.get(Backup, c.backup)
        assert b is not None
        driver = driver_of(b.datastore)
        files = {i.seq: [dict(f) for f in i.files] for i in b.increments}
        valid = [i.seq for i in b.increments if i.status == BackupStatus.VALID]
        if c.relink:
            b.active_flatten = True
    sums: dict[str, tuple[str, int, bool]] = {}
    if c.relink:
        try:
            sums = _rewrite(ctx, driver, c, files, valid)
        except BaseException:
            with ctx.catalog.session() as s:
                row = s.get(Backup, c.backup)
                if row is not None:
                    row.active_flatten = False
            raise
    gone: list[str] = []
    with ctx.catalog.session() as s:
        row = s.get(Backup, c.backup)
        assert row is not None
        removed = set(c.remove)
        for inc in sorted(row.increments, key=lambda i: i.seq):
            if inc.seq in removed or (
                inc.status != BackupStatus.VALID and inc.parent in removed
            ):  # a failed or cancelled increment built on a removed point goes with it
                removed.add(inc.seq)
                gone += [f["name"] for f in inc.files]
                row.increments.remove(inc)
            elif inc.seq in c.relink:
                changed = []
                for f in inc.files:
                    if f["name"] in sums:
                        f = {k: v for k, v in f.items() if k != "sha256"}
                        f.update(digest=sums[f["name"]][0], size=sums[f["name"]][1])
                        if sums[f["name"]][2]:  # restore reads no file below it
                            f["full"] = True
                        else:
                            f.pop("full", None)
                    changed.append(f)
                inc.files, inc.parent = changed, c.relink[inc.seq]
                inc.size = sum(f["size"] for f in changed if f["disk"])
                inc.verified_at = inc.verify_result = None  # new files: not read back yet
        left = [i for i in row.increments if i.status == BackupStatus.VALID]
        if left and removed and max(removed) > left[-1].seq:  # its newer points went: libvirt
            left[-1].checkpoint = None  # dropped its checkpoint when the next one was taken
        row.active_flatten = False
        for m in s.execute(
            select(GroupBackupMember).where(
                GroupBackupMember.backup_id == c.backup, GroupBackupMember.seq.in_(removed)
            )
        ).scalars():
            m.backup_id = None  # that group restore point lost this member's point
    driver.rm(c.chain, gone)
    write_manifest(ctx, driver, c.backup)


def _rewrite(
    ctx: Context,
    driver: DatastoreDriver,
    c: ChainPlan,
    files: dict[int, list[dict[str, Any]]],
    valid: list[int],
) -> dict[str, tuple[str, int, bool]]:
    """Rewrite the disk files of the relinked points in a scratch folder and store them; the
    stored files are written by ``driver.backup`` alone (a driver that reads in place, ``dir``,
    gets symlinks to its files in the scratch folder, and a file is copied before it is
    rebased). Returns (digest, size, a full of its disk) of every disk file of the relinked
    points, rewritten or not: a run after one killed between the store and the catalog update
    finds the files already rewritten and still records them right."""
    top = max(c.relink)
    needed = [str(f["name"]) for q in valid if q <= top for f in files[q] if f.get("disk")]
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
        work = Path(tmp) / "work"
        fetched = driver.restore(c.chain, needed, Path(tmp) / "in")
        work.mkdir()
        for name, path in fetched.items():  # one folder: backing files found by their names
            (work / name).symlink_to(path.resolve())
        changed: list[Path] = []
        for n in sorted(c.relink):
            below = c.relink[n]
            below_names = {str(f["name"]) for f in files[below]} if below is not None else set()
            for f in files[n]:
                if not f.get("disk"):
                    continue
                path = work / str(f["name"])
                if backing_name(path) is None:
                    continue  # a full of its own: nothing below it to merge
                target = disk_file(below, f["disk"]) if below is not None else None
                out = path.with_name(path.name + ".new")
                try:
                    if target in below_names:  # a copy rebased: the stored file is only read
                        shutil.copyfile(path, out)
                        qemu_img("rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", target,
                                 str(out), what=f"rebase {path.name}")  # fmt: skip
                    else:  # the new base, or a disk the point below does not have
                        flatten(path, out)
                except (VmkeepError, OSError) as err:
                    raise BackupFailed(c.chain, f"merge of {path.name}: {err}") from err
                out.replace(path)  # the symlink (or fetched copy) gives way to the new file
                changed.append(path)
        sums = {
            str(f["name"]): (digest_file(p), p.stat().st_size, backing_name(p) is None)
            for n in c.relink
            for f in files[n]
            if f.get("disk") and (p := work / str(f["name"])).exists()
        }
        failpoint("retention")
        if changed:
            driver.backup(c.chain, changed)
    return sums
