"""Retention (KEEP_LAST). FULL mode deletes the oldest backups; INCREMENT mode flattens the oldest
increments into the base (ACTIVE_FLATTEN while merging) so that KEEP_LAST restore points remain.

Increment ids are stable: after a flatten the chain's base is its lowest remaining id.

Protected points (``points/protect.py``) are never pruned, and neither are the points they are
built on (``chains.needed_by_protected``). FULL mode skips a chain holding a protected point and
does not count it against KEEP_LAST (as Proxmox Backup Server's prune skips protected
snapshots); INCREMENT mode stops the merge before the first point a protected one needs, keeping
more than KEEP_LAST points, and says so.
"""

from __future__ import annotations

import logging
import tempfile
from itertools import takewhile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup
from vmkeep.checksums import digest_file
from vmkeep.engine.core.backup_config import BackupConfig
from vmkeep.engine.core.chains import (
    disk_file,
    increment_file_names,
    latest_chain,
    needed_by_protected,
    protected_seqs,
    valid_increments,
    write_manifest,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import flatten
from vmkeep.engine.core.stores import driver_of
from vmkeep.errors import BackupFailed, VmkeepError
from vmkeep.faults import failpoint
from vmkeep.model import BackupMode, BackupStatus

log = logging.getLogger(__name__)


def chains_to_delete(
    chain_ids: list[int], keep_last: int | None, age: dict[int, Any] | None = None
) -> list[int]:
    """Oldest first; keep the newest ``keep_last``. Age is ``age[id]`` (when the backup was
    taken: a copied or imported chain gets a new, higher id but keeps its age), else the id."""
    if keep_last is None or len(chain_ids) <= keep_last:
        return []
    ordered = sorted(chain_ids, key=lambda i: (age[i], i) if age else i)
    return ordered[: len(chain_ids) - keep_last]


def increments_to_merge(seqs: list[int], keep_last: int | None) -> tuple[list[int], int | None]:
    """(increments to drop, new base) so that ``keep_last`` restore points remain."""
    seqs = sorted(seqs)
    if keep_last is None or len(seqs) <= keep_last:
        return [], None
    cut = len(seqs) - keep_last
    return seqs[:cut], seqs[cut]


def stop_at_protected(drop: list[int], seqs: list[int], needed: set[int]) -> tuple[list[int], int]:
    """``increments_to_merge``'s plan (``drop``, a prefix of the sorted ``seqs``) cut short
    before the first increment a protected point needs: (increments to drop, new base). Nothing
    to drop when the base itself is needed."""
    kept = list(takewhile(lambda q: q not in needed, drop))
    return kept, sorted(seqs)[len(kept)]


def apply_retention(ctx: Context, vm_id: int, ds_id: int, cfg: BackupConfig) -> list[str]:
    if cfg.keep_last is None:
        return []
    if cfg.mode == BackupMode.FULL:
        return _retain_full(ctx, vm_id, ds_id, cfg.keep_last)
    return _retain_increments(ctx, vm_id, ds_id, cfg.keep_last)


def _retain_full(ctx: Context, vm_id: int, ds_id: int, keep: int) -> list[str]:
    with ctx.catalog.session() as s:
        rows = (
            s.execute(
                select(Backup).where(
                    Backup.vm_id == vm_id,
                    Backup.datastore_id == ds_id,
                    Backup.status == BackupStatus.VALID,
                    Backup.mode == BackupMode.FULL,
                )
            )
            .scalars()
            .all()
        )
        protected = sorted(b.id for b in rows if needed_by_protected(b))
        rows = [b for b in rows if b.id not in protected]  # skipped, and not counted
        by_id = {b.id: (b.chain, b.datastore) for b in rows}
        age = {b.id: b.created_at for b in rows}
    messages = []
    if protected and len(protected) + len(by_id) > keep:  # said only when it keeps more
        messages.append(
            f"retention: kept protected backups {protected} besides KEEP_LAST={keep} "
            "(protected points are never pruned and not counted)"
        )
    for bid in chains_to_delete(list(by_id), keep, age):
        chain, ds = by_id[bid]
        driver_of(ds).rm(
            chain
        )  # files first: a crash leaves a row pointing at nothing, not orphans
        with ctx.catalog.session() as s:
            b = s.get(Backup, bid)
            if b is not None:
                s.delete(b)
        messages.append(f"retention: deleted backup {bid} (KEEP_LAST={keep})")
    return messages


def _retain_increments(ctx: Context, vm_id: int, ds_id: int, keep: int) -> list[str]:
    with ctx.catalog.session() as s:
        b = latest_chain(s, vm_id, ds_id)
        if b is None:
            return []
        valid = valid_increments(b)
        seqs = [i.seq for i in valid]
        drop, base = increments_to_merge(seqs, keep)
        if base is None:
            return []
        notes = []
        held = needed_by_protected(b)
        if held & set(drop):
            planned = len(drop)
            drop, base = stop_at_protected(drop, seqs, held)
            notes.append(
                f"retention: kept {len(seqs) - len(drop)} points of backup {b.id}, "
                f"{planned - len(drop)} more than KEEP_LAST={keep}: protected increments "
                f"{protected_seqs(b)} need increments {sorted(held)} (lift it with "
                f"'vmkeep backups unprotect {b.id} --increment N')"
            )
            if not drop:
                return notes
        bid, chain, ds = b.id, b.chain, b.datastore
        disks = [f["disk"] for f in next(i for i in valid if i.seq == base).files if f["disk"]]
        b.active_flatten = True
    driver = driver_of(ds)
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
        work = Path(tmp)
        new_files = []
        needed = [disk_file(q, d) for q in [*drop, base] for d in disks]
        local = driver.restore(chain, needed, work / "in")
        for d in disks:
            src = local[disk_file(base, d)]
            out = work / disk_file(base, d)
            try:
                flatten(src, out)  # follows the backing chain down to the oldest increment
            except VmkeepError as err:
                with ctx.catalog.session() as s:
                    row = s.get(Backup, bid)
                    assert row is not None
                    row.active_flatten = False
                raise BackupFailed(chain, f"flatten of {src.name}: {err}") from err
            new_files.append(out)
        failpoint("retention")
        sums = {p.name: (digest_file(p), p.stat().st_size) for p in new_files}
        driver.backup(chain, new_files)
    with ctx.catalog.session() as s:
        row = s.get(Backup, bid)
        assert row is not None
        for inc in list(row.increments):
            if inc.seq in drop:
                row.increments.remove(inc)
            elif inc.seq == base:
                files = []
                for f in inc.files:
                    if f["name"] in sums:
                        f = {k: v for k, v in f.items() if k != "sha256"}
                        f.update(digest=sums[f["name"]][0], size=sums[f["name"]][1])
                    files.append(f)
                inc.files, inc.parent = files, None
                inc.size = sum(f["size"] for f in files if f["disk"])
        # Cancelled/failed increments older than the new base have nothing left to refer to.
        for inc in list(row.increments):
            if inc.seq < base and inc.status != BackupStatus.VALID:
                row.increments.remove(inc)
        row.active_flatten = False
    driver.rm(chain, [name for q in drop for name in increment_file_names(disks, q)])
    write_manifest(ctx, driver, bid)
    return [
        f"retention: merged increments {drop} into {base} of backup {bid} (KEEP_LAST={keep})",
        *notes,
    ]
