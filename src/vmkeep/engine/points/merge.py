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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup, GroupBackupMember
from vmkeep.checksums import digest_file, matches, row_digest
from vmkeep.engine.core.backup_config import BackupConfig
from vmkeep.engine.core.chains import (
    MERGE_PREFIX,
    PENDING,
    disk_file,
    mark_damaged,
    pending_entry,
    write_manifest,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import backing_name, check_backing_names, flatten, qemu_img
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.points.delete import forget_chain
from vmkeep.engine.points.retention import ChainPlan, Plan, plan
from vmkeep.errors import BackupFailed, ChecksumMismatch, VmkeepError
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


@dataclass
class _Rewritten:
    """What ``_rewrite`` leaves for the catalog: per file name its new (digest, size), and
    per disk file of a relinked point whether it is a full of its disk now."""

    sums: dict[str, tuple[str, int]] = field(default_factory=dict)
    fulls: dict[str, bool] = field(default_factory=dict)


def _merge(ctx: Context, c: ChainPlan) -> None:
    with ctx.catalog.session() as s:
        b = s.get(Backup, c.backup)
        assert b is not None
        driver = driver_of(b.datastore)
        files = {i.seq: [dict(f) for f in i.files] for i in b.increments}
        valid = [i.seq for i in b.increments if i.status == BackupStatus.VALID]
        if c.relink:
            b.active_flatten = True
    new = _Rewritten()
    if c.relink:
        try:
            new = _rewrite(ctx, driver, c, files, valid)
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
                inc.files = [_recorded(f, new) for f in inc.files]
                inc.parent = c.relink[inc.seq]
                inc.size = sum(f["size"] for f in inc.files if f["disk"])
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


def _recorded(f: dict[str, Any], new: _Rewritten) -> dict[str, Any]:
    """A file row as the catalog keeps it after the merge."""
    out = {k: v for k, v in f.items() if k != PENDING}
    if f["name"] in new.sums:
        out.pop("sha256", None)
        out["digest"], out["size"] = new.sums[f["name"]]
    if f["name"] in new.fulls:
        if new.fulls[f["name"]]:
            out["full"] = True  # restore reads no file below it
        else:
            out.pop("full", None)
    return out


def _rewrite(
    ctx: Context,
    driver: DatastoreDriver,
    c: ChainPlan,
    files: dict[int, list[dict[str, Any]]],
    valid: list[int],
) -> _Rewritten:
    """Rewrite the disk files of the relinked points in a scratch folder (on the datastore's
    own file system when it has one) and store them. The stored files are written by
    ``driver.backup`` alone: a driver that reads in place (``dir``) gets symlinks to its files
    in the scratch folder, and a file is copied before it is rebased. Every file read is
    checked first: its backing name one of the chain's, its checksum the catalog's (or the
    one a merge killed after its store recorded as pending: taken as it is)."""
    top = max(c.relink)
    rows = {str(f["name"]): f for q in valid if q <= top for f in files[q] if f.get("disk")}
    root = driver.staging_root() or ctx.config.data_dir
    root.mkdir(parents=True, exist_ok=True)
    out = _Rewritten()
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{MERGE_PREFIX}{c.backup}-") as tmp:
        work = Path(tmp) / "work"
        fetched = driver.restore(c.chain, list(rows), Path(tmp) / "in")
        work.mkdir()
        for name, path in fetched.items():  # one folder: backing files found by their names
            (work / name).symlink_to(path.resolve())
        check_backing_names({name: work / name for name in fetched})
        out.sums = _checked(ctx, c, work, rows)
        changed: list[Path] = []
        for n in sorted(c.relink):
            below = c.relink[n]
            below_names = {str(f["name"]) for f in files[below]} if below is not None else set()
            for f in files[n]:
                if not f.get("disk"):
                    continue
                path = work / str(f["name"])
                if backing_name(path) is not None:
                    _relink_file(c, path, disk_file(below, f["disk"]) if below is not None
                                 else None, below_names)  # fmt: skip
                    changed.append(path)
                out.fulls[path.name] = backing_name(path) is None
        out.sums |= {p.name: (digest_file(p), p.stat().st_size) for p in changed}
        failpoint("retention")
        if changed:
            _mark_pending(ctx, c.backup, {p.name: out.sums[p.name] for p in changed})
            driver.backup(c.chain, changed)
            failpoint("retention-stored")  # stored, the catalog not yet told (the fault suite)
    return out


def _relink_file(c: ChainPlan, path: Path, target: str | None, below_names: set[str]) -> None:
    """``path`` (a symlink or a fetched copy) replaced by a file that reads the same on top of
    ``target`` (rebased), or on nothing (flattened: the new base, or a disk the point below
    does not have)."""
    new = path.with_name(path.name + ".new")
    try:
        if target is not None and target in below_names:
            shutil.copyfile(path, new)  # the stored file is only read
            qemu_img("rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", target, str(new),
                     what=f"rebase {path.name}")  # fmt: skip
        else:
            flatten(path, new)
        new.replace(path)  # the symlink (or fetched copy) gives way to the new file
    except (VmkeepError, OSError) as err:
        raise BackupFailed(c.chain, f"merge of {path.name}: {err}") from err


def _checked(
    ctx: Context, c: ChainPlan, work: Path, rows: dict[str, dict[str, Any]]
) -> dict[str, tuple[str, int]]:
    """Each file against its catalog checksum before it is merged into another: a mismatch
    marks its point (and those built on it) DAMAGED and stops the merge. A file that has the
    checksum a killed merge recorded as pending was stored by it: returned, to be recorded."""
    adopted = {}
    for name, row in rows.items():
        path = work / name
        ok, got = matches(path, row_digest(row))
        if ok:
            continue
        entry = pending_entry(path, got, row.get(PENDING))
        if entry is not None:
            adopted[name] = (entry["digest"], entry["size"])
            continue
        mark_damaged(ctx, c.backup, name, f"retention: {name} does not match its checksum")
        raise ChecksumMismatch(f"{c.chain}/{name}", row_digest(row), got)
    return adopted


def _mark_pending(ctx: Context, backup_id: int, sums: dict[str, tuple[str, int]]) -> None:
    """Before the store: each rewritten file's new checksum on its row, so that a merge killed
    between the store and the catalog update leaves rows that name both (``_checked`` and
    recovery take a stored file that has the pending one)."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        assert b is not None
        for inc in b.increments:
            if any(f["name"] in sums for f in inc.files):
                inc.files = [
                    f | {PENDING: {"digest": sums[f["name"]][0], "size": sums[f["name"]][1]}}
                    if f["name"] in sums
                    else f
                    for f in inc.files
                ]
