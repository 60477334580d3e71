"""Copying a chain to a second datastore (3-2-1), verified there and incremental on a later copy
(``copy_backup``), and downloading one stored file by its URL (``download``, ``parse_url``)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup, Increment
from vmkeep.checksums import expected_digests, matches, row_digest
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.chains import (
    PENDING,
    adopt_pending,
    adopted_row,
    chain_locked,
    find_backup,
    needed_by_protected,
    pending_entry,
    valid_increments,
    write_manifest,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of, find_datastore
from vmkeep.engine.points.scratch import scratch
from vmkeep.errors import (
    AlreadyExists,
    ChecksumMismatch,
    InvalidValue,
    Refused,
    VmkeepError,
)
from vmkeep.model import BackupStatus
from vmkeep.names import check_chain_key, check_file_name

log = logging.getLogger(__name__)


def copy_backup(
    ctx: Context, backup_id: int, to_ref: str, bwlimit: int | None = None
) -> dict[str, Any]:
    """Copy a chain to another datastore and verify it there. Copying again later copies only the
    increments the copy lacks (or whose content changed, after a retention merge). Holds the
    VM's lock (no backup or retention changes the chain meanwhile); a failure removes what it
    stored and leaves the copy's catalog row as it was minus the increments it was replacing."""
    with chain_locked(ctx, backup_id, "copy"):
        return _copy_locked(ctx, backup_id, to_ref, bwlimit)


def _copy_locked(
    ctx: Context, backup_id: int, to_ref: str, bwlimit: int | None = None
) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        dest_ds = find_datastore(s, to_ref)
        if dest_ds.id == b.datastore_id:
            raise InvalidValue("--to", to_ref, "that is the datastore the backup is on already")
        src_driver, dst_driver = driver_of(b.datastore), driver_of(dest_ds, bwlimit)
        chain, vm_id, mode, created = b.chain, b.vm_id, b.mode, b.created_at
        source = {i.seq: i for i in valid_increments(b)}
        if not source:
            raise Refused(f"copy of backup {backup_id}", "it has no VALID increment", "")
        src_rows = {
            seq: (i.parent, [dict(f) for f in i.files], _inc_fields(i)) for seq, i in source.items()
        }
        copy = _copy_row(s, dest_ds.id, chain)
        existed = copy is not None
        have = {i.seq: expected_digests(i.files) for i in valid_increments(copy)} if copy else {}
        kept = needed_by_protected(copy) if copy else set()
        dest_id, dest_name = dest_ds.id, dest_ds.name
    todo = [
        seq
        for seq, (_p, files, _f) in sorted(src_rows.items())
        if have.get(seq) != expected_digests(files)
    ]
    if overwritten := sorted(set(todo) & set(have) & kept):
        # the source was merged since (retention): copying would replace protected points
        raise Refused(
            f"copy of backup {backup_id} to {dest_name}",
            f"its points {', '.join(map(str, overwritten))} there are protected (or needed by "
            "a protected point) and the source's have changed since",
            "Unprotect them there ('vmkeep backups unprotect ID --increment N' on the copy), "
            "or copy into another datastore.",
        )
    copied: list[str] = []
    try:
        with scratch(ctx) as tmp:
            for seq in todo:
                files = src_rows[seq][1]
                names = [f["name"] for f in files]
                work = Path(tmp) / str(seq)
                local = src_driver.restore(chain, names, work / "in")
                if adopted := _check_sums(chain, files, local):  # as verify and restore do
                    adopt_pending(ctx, backup_id, adopted)
                    files[:] = [adopted_row(f, adopted[f["name"]]) if f["name"] in adopted
                                else f for f in files]  # fmt: skip
                (work / "stage").mkdir(parents=True)
                staged = []
                for n in names:  # the driver may move staged files: never hand it the source's
                    if "local" in src_driver.capabilities:
                        shutil.copyfile(local[n], work / "stage" / n)
                    else:
                        local[n].rename(work / "stage" / n)
                    staged.append(work / "stage" / n)
                copied += names
                dst_driver.backup(chain, staged)
                back = dst_driver.restore(chain, names, work / "check")
                _check_sums(f"{dest_name}:{chain}", files, back)
                shutil.rmtree(work, ignore_errors=True)  # one increment's data at a time
        with ctx.catalog.session() as s:
            copy = _copy_row(s, dest_id, chain)
            if copy is None:
                copy = Backup(
                    vm_id=vm_id,
                    datastore_id=dest_id,
                    chain=chain,
                    mode=mode,
                    status=BackupStatus.VALID,
                    created_at=created,  # its age is the source's (retention orders by it)
                )
                s.add(copy)
                s.flush()
            _drop_increments(s, copy, todo)
            for seq in todo:
                parent, files, fields = src_rows[seq]
                copy.increments.append(
                    Increment(seq=seq, parent=parent, files=files, checkpoint=None, **fields)
                )
            for inc in copy.increments:  # a note changed since the last copy
                if inc.seq in src_rows:
                    inc.note = src_rows[inc.seq][2]["note"]
            copy.status = BackupStatus.VALID
            copy.finished_at = max((r[2]["finished_at"] for r in src_rows.values()), default=None)
            copy_id = copy.id
    except BaseException:
        _undo_copy(ctx, dst_driver, dest_id, chain, existed, copied, todo)
        raise
    write_manifest(ctx, dst_driver, copy_id)
    return {
        "backup": backup_id,
        "copy": copy_id,
        "datastore": dest_name,
        "copied_increments": todo,
        "copied_files": copied,
        "verified": True,
    }


def _copy_row(s: Any, ds_id: int, chain: str) -> Backup | None:
    return (
        s.execute(select(Backup).where(Backup.datastore_id == ds_id, Backup.chain == chain))
        .scalars()
        .first()
    )


def _drop_increments(s: Any, copy: Backup, seqs: list[int]) -> None:
    for inc in [i for i in copy.increments if i.seq in seqs]:
        copy.increments.remove(inc)
    s.flush()


def _undo_copy(
    ctx: Context,
    driver: DatastoreDriver,
    ds_id: int,
    chain: str,
    existed: bool,
    copied: list[str],
    todo: list[int],
) -> None:
    """A failed copy: remove what it stored; an earlier copy keeps its untouched increments."""
    try:
        if not existed:
            driver.rm(chain)
            return
        driver.rm(chain, copied)
        with ctx.catalog.session() as s:
            copy = _copy_row(s, ds_id, chain)
            if copy is not None:
                _drop_increments(s, copy, todo)
                copy_id = copy.id
        write_manifest(ctx, driver, copy_id)
    except VmkeepError as err:
        log.error("cleaning up the failed copy of %s on %s: %s", chain, driver.name, err)


def _inc_fields(i: Increment) -> dict[str, Any]:
    return {
        "status": BackupStatus.VALID,
        "size": i.size,
        "consistency": i.consistency,
        "freeze_ms": i.freeze_ms,
        "started_at": i.started_at,
        "finished_at": i.finished_at,
        "note": i.note,  # the note goes with the copy; protection does not (docs/policies.md)
    }


def _check_sums(
    where: str, files: list[dict[str, Any]], local: dict[str, Path]
) -> dict[str, dict[str, Any]]:
    """Each file against its row's checksum, or the pending one a retention merge killed before
    its catalog update recorded (those are returned, for ``adopt_pending``)."""
    adopted = {}
    for f in files:
        ok, got = matches(local[f["name"]], row_digest(f))
        entry = None if ok else pending_entry(local[f["name"]], got, f.get(PENDING))
        if entry is not None:
            adopted[f["name"]] = entry
        elif not ok:
            raise ChecksumMismatch(f"{where}/{f['name']}", row_digest(f), got)
    return adopted


# --- download ----------------------------------------------------------------------------------
def parse_url(url: str) -> tuple[str, str, str, str]:
    """``<driver>://<datastore>/<vm>/<backup>/<file>`` -> (driver, datastore, chain, file)."""
    driver, sep, rest = url.partition("://")
    parts = rest.split("/")
    if not sep or len(parts) != 4 or not all(parts):
        raise InvalidValue(
            "URL", url, "expected <driver>://<datastore>/<vm>/<backup>/<file> (see backups show)"
        )
    chain = check_chain_key("the URL's chain", f"{parts[1]}/{parts[2]}")
    return driver, parts[0], chain, check_file_name("the URL's file", parts[3])


def download(ctx: Context, url: str, dest: Path, force: bool = False) -> dict[str, Any]:
    driver_name, ds_name, chain, name = parse_url(url)
    with ctx.catalog.session() as s:
        ds = find_datastore(s, ds_name)
        if ds.driver != driver_name:
            raise InvalidValue("URL", url, f"datastore {ds_name} uses the {ds.driver} driver")
        driver = driver_of(ds)
    target = dest / name if dest.is_dir() else dest
    if target.exists() and not force:
        raise AlreadyExists(f"{target} (add --force to overwrite it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".vmkeep-download-") as tmp:
        local = driver.restore(chain, [name], Path(tmp))[name]
        part = Path(tmp) / (name + ".part")
        shutil.copyfile(local, part)
        part.chmod(0o600)  # a guest's disk: readable by vmkeep's user alone
        part.replace(target)
    return {"url": url, "path": str(target), "size": target.stat().st_size}
