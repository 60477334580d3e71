"""Managing what is stored: delete a chain or its newest increments, copy a chain to a second
datastore (3-2-1), download one file by its URL, and rebuild the catalog from a datastore's
manifests (disaster recovery). Files are removed before catalog rows, so a crash leaves a row
pointing at nothing (caught by verify), never data nobody knows about."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.locks import lock
from vmkeep.catalog.tables import Backup, GroupBackup, GroupBackupMember, Increment, Vm
from vmkeep.checksums import expected_digests, matches, row_digest
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.chains import (
    backup_dict,
    disk_file,
    valid_increments,
    write_manifest,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of, find_datastore
from vmkeep.engine.core.trust import check_domain_xml
from vmkeep.engine.vm.recovery import prune_checkpoints
from vmkeep.errors import (
    AlreadyExists,
    BackupNotFound,
    ChecksumMismatch,
    DatastoreError,
    HypervisorError,
    IncrementNotFound,
    InvalidValue,
    NotFound,
    NotPermitted,
    Refused,
    VmkeepError,
)
from vmkeep.model import BackupStatus, LcmState, VmState
from vmkeep.names import check_chain_key, check_disk_name, check_file_name, check_name

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def _tmp(ctx: Context) -> tempfile.TemporaryDirectory[str]:
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=ctx.config.data_dir, prefix="stored-")


# --- delete --------------------------------------------------------------------------------------
def delete_backup(ctx: Context, backup_id: int, increment: int | None = None) -> dict[str, Any]:
    """Delete a whole chain, or its newest increment; never an increment others are built on."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
        vm_id, vm_name = b.vm_id, b.vm.name
    with lock(ctx.catalog, f"vm:{vm_id}", "delete backup", label=f"VM {vm_name}"):
        with ctx.catalog.session() as s:
            b = s.get(Backup, backup_id)
            if b is None:
                raise BackupNotFound(backup_id)
            if b.status == BackupStatus.RUNNING or any(
                i.status == BackupStatus.RUNNING for i in b.increments
            ):
                raise Refused(
                    f"delete of backup {backup_id}",
                    "a backup of this chain is running",
                    "Wait for it or cancel it with 'vmkeep backup cancel VM'.",
                )
            chain, driver = b.chain, driver_of(b.datastore)
            seqs = sorted(i.seq for i in b.increments)
            if increment is None or seqs == [increment]:
                files = [f for i in b.increments for f in i.files]
                drop = None
            else:
                if increment not in seqs:
                    raise IncrementNotFound(backup_id, increment, ", ".join(map(str, seqs)))
                later = [i.seq for i in b.increments if i.parent == increment]
                if later or increment == 0:
                    raise Refused(
                        f"delete of increment {increment} of backup {backup_id}",
                        f"increments {', '.join(map(str, later or seqs[1:]))} are built on it",
                        "Delete the newest increments first, or the whole chain with "
                        f"'vmkeep backups delete {backup_id}'.",
                    )
                inc = next(i for i in b.increments if i.seq == increment)
                files, drop = list(inc.files), inc
        names = [f["name"] for f in files]
        if drop is None:
            driver.rm(chain)  # files first: a crash leaves a row pointing at nothing
            with ctx.catalog.session() as s:
                for m in s.execute(
                    select(GroupBackupMember).where(GroupBackupMember.backup_id == backup_id)
                ).scalars():
                    m.backup_id = None
                row = s.get(Backup, backup_id)
                if row is not None:
                    s.delete(row)
        else:
            driver.rm(chain, names)
            with ctx.catalog.session() as s:
                row = s.get(Backup, backup_id)
                assert row is not None
                for i in list(row.increments):
                    if i.seq == increment:
                        row.increments.remove(i)
                valid = valid_increments(row)
                # the increment before it is the newest again; its checkpoint was pruned when the
                # deleted one was taken, so the next backup of this chain starts a new full
                if valid and valid[-1].checkpoint not in _live_checkpoints(ctx, vm_name):
                    valid[-1].checkpoint = None
            write_manifest(ctx, driver, backup_id)
        prune_checkpoints(ctx, vm_id, vm_name, missing_ok=True)
    return {
        "backup": backup_id,
        "increment": increment,
        "deleted_files": names,
        "freed_bytes": sum(int(f.get("size") or 0) for f in files),
    }


def _live_checkpoints(ctx: Context, vm_name: str) -> list[str]:
    try:
        return ctx.hv.checkpoints(vm_name)
    except (HypervisorError, NotFound):
        return []


# --- copy ------------------------------------------------------------------------------------------
def copy_backup(ctx: Context, backup_id: int, to_ref: str) -> dict[str, Any]:
    """Copy a chain to another datastore and verify it there. Copying again later copies only the
    increments the copy lacks (or whose content changed, after a retention merge). Holds the
    VM's lock (no backup or retention changes the chain meanwhile); a failure removes what it
    stored and leaves the copy's catalog row as it was minus the increments it was replacing."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
        vm_id, vm_name = b.vm_id, b.vm.name
    with lock(ctx.catalog, f"vm:{vm_id}", "copy", label=f"VM {vm_name}"):
        return _copy_locked(ctx, backup_id, to_ref)


def _copy_locked(ctx: Context, backup_id: int, to_ref: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
        dest_ds = find_datastore(s, to_ref)
        if dest_ds.id == b.datastore_id:
            raise InvalidValue("--to", to_ref, "that is the datastore the backup is on already")
        src_driver, dst_driver = driver_of(b.datastore), driver_of(dest_ds)
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
        dest_id, dest_name = dest_ds.id, dest_ds.name
    todo = [
        seq
        for seq, (_p, files, _f) in sorted(src_rows.items())
        if have.get(seq) != expected_digests(files)
    ]
    copied: list[str] = []
    try:
        with _tmp(ctx) as tmp:
            for seq in todo:
                files = src_rows[seq][1]
                names = [f["name"] for f in files]
                work = Path(tmp) / str(seq)
                local = src_driver.restore(chain, names, work / "in")
                _check_sums(chain, files, local)
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
    }


def _check_sums(where: str, files: list[dict[str, Any]], local: dict[str, Path]) -> None:
    for f in files:
        ok, got = matches(local[f["name"]], row_digest(f))
        if not ok:
            raise ChecksumMismatch(f"{where}/{f['name']}", row_digest(f), got)


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


# --- remove a datastore ----------------------------------------------------------------------------
def remove_datastore(ctx: Context, ref: str, force: bool = False) -> dict[str, Any]:
    """Forget a datastore. Refused while the catalog has backups on it, unless ``force``: then
    their catalog rows go too; the data stays where it is (``datastore scan --import`` brings it
    back)."""
    with ctx.catalog.session() as s:
        ds = find_datastore(s, ref)
        rows = s.execute(select(Backup).where(Backup.datastore_id == ds.id)).scalars().all()
        running = [b.id for b in rows if b.status == BackupStatus.RUNNING]
        if running:
            raise Refused(
                f"removing datastore {ds.name}",
                f"backups {', '.join(map(str, running))} are being written to it",
                "Wait for them to end, or cancel them with 'vmkeep backup cancel VM'.",
            )
        if rows and not force:
            ids = ", ".join(str(b.id) for b in rows[:10])
            raise Refused(
                f"removing datastore {ds.name}",
                f"it holds {len(rows)} backup(s) ({ids})",
                "Delete them with 'vmkeep backups delete ID', or add --force to forget them "
                "(their files stay in the datastore and can be imported again).",
            )
        for b in rows:
            for m in s.execute(
                select(GroupBackupMember).where(GroupBackupMember.backup_id == b.id)
            ).scalars():
                m.backup_id = None
            s.delete(b)
        for gb in s.execute(select(GroupBackup).where(GroupBackup.datastore_id == ds.id)).scalars():
            s.delete(gb)
        name = ds.name
        s.delete(ds)
    return {"datastore": name, "forgotten_backups": [b.id for b in rows]}


# --- disaster recovery: the catalog from the datastore ---------------------------------------
def scan(ctx: Context, ref: str, do_import: bool = False) -> list[dict[str, Any]]:
    """Every chain in the datastore, whether the catalog knows it, and (``do_import``) the
    unknown ones added from their manifests, restorable at once.

    A datastore is untrusted input: every name it gives (chain key, VM, file, disk) passes the
    rules of names.py and every stored domain XML the check of ``vm create`` before anything is
    imported. A chain that fails is refused (its row's ``refused`` says why) and the others
    are imported."""
    with ctx.catalog.session() as s:
        ds = find_datastore(s, ref)
        ds_id, driver = ds.id, driver_of(ds)
        known = set(s.execute(select(Backup.chain).where(Backup.datastore_id == ds_id)).scalars())
    found = []
    with _tmp(ctx) as tmp:
        for chain in driver.chains():
            row: dict[str, Any] = {"chain": chain, "known": chain in known, "imported": None}
            if chain not in known:
                try:
                    check_chain_key("chain key", chain)
                except InvalidValue as err:
                    row["refused"] = str(err)
                    found.append(row)
                    continue
                work = Path(tmp) / chain.replace("/", "-")
                try:
                    path = driver.restore(chain, [MANIFEST], work)
                    manifest = json.loads(path[MANIFEST].read_text())
                except (DatastoreError, ValueError, OSError) as err:
                    row["error"] = f"no readable {MANIFEST}: {err}"
                    found.append(row)
                    continue
                try:
                    row["vm"] = manifest["vm"]
                    row["increments"] = [
                        int(i["id"]) for i in manifest["increments"] if i["status"] == "VALID"
                    ]
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    row["error"] = (
                        f"{MANIFEST} is not a vmkeep manifest ({type(err).__name__}: {err})"
                    )
                    found.append(row)
                    continue
                try:
                    xml_rows = check_manifest(manifest)
                    if do_import:
                        _check_stored_xml(ctx, driver, chain, xml_rows, work / "xml")
                        row["imported"] = _import(ctx, ds_id, driver, chain, manifest)
                except (InvalidValue, NotPermitted, ChecksumMismatch) as err:
                    row["refused"] = str(err)
                    log.warning("datastore %s: chain %s refused: %s", driver.name, chain, err)
                except DatastoreError as err:
                    row["error"] = str(err)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    row["error"] = (
                        f"{MANIFEST} is not a vmkeep manifest ({type(err).__name__}: {err})"
                    )
            found.append(row)
    return found


def check_manifest(m: Any) -> list[dict[str, Any]]:
    """A manifest read from a datastore, checked like user input: the VM's name by the name
    rule, every VALID increment's id and parent numbers, every file's name and disk by the rules
    of names.py (they become paths and QEMU options). InvalidValue naming the first that fails;
    else the rows of the stored domain XML files (one per VALID increment)."""
    if not isinstance(m, dict) or not isinstance(m.get("increments"), list):
        raise InvalidValue(MANIFEST, "(its content)", "not a vmkeep manifest")
    check_name(f"the VM name in {MANIFEST}", m.get("vm"))
    xml_rows = []
    for inc in m["increments"]:
        if not isinstance(inc, dict) or inc.get("status") != "VALID":
            continue
        seq, parent = inc.get("id"), inc.get("parent")
        if type(seq) is not int or seq < 0:
            raise InvalidValue(f"an increment id in {MANIFEST}", seq, "a number 0 or more")
        if parent is not None and (type(parent) is not int or not 0 <= parent < seq):
            raise InvalidValue(
                f"the parent of increment {seq} in {MANIFEST}", parent, "an earlier increment"
            )
        files = inc.get("files") or []
        if not isinstance(files, list):
            raise InvalidValue(f"the files of increment {seq} in {MANIFEST}", "?", "a list")
        for f in files:
            if not isinstance(f, dict):
                raise InvalidValue(f"a file of increment {seq} in {MANIFEST}", "?", "an object")
            disk = f.get("disk")
            if disk is not None:
                check_disk_name(f"a disk of increment {seq} in {MANIFEST}", disk)
            name = check_file_name(f"a file name in {MANIFEST}", f.get("name"))
            if disk is not None:
                if name != disk_file(seq, disk):
                    raise InvalidValue(
                        f"a file name in {MANIFEST}", name, f"disk {disk} of increment {seq} "
                        f"is stored as {disk_file(seq, disk)}"
                    )  # fmt: skip
            elif not f.get("memory"):
                xml_rows.append(f)
    return xml_rows


def _check_stored_xml(
    ctx: Context, driver: DatastoreDriver, chain: str, rows: list[dict[str, Any]], work: Path
) -> None:
    """Every stored domain XML of a chain passes the check of ``vm create`` (a restore defines
    it): NotPermitted naming the file. Each is fetched, matched to its manifest checksum (the
    one a restore verifies) and checked."""
    if not rows:
        return
    local = driver.restore(chain, [f["name"] for f in rows], work)
    for f in rows:
        path = local[f["name"]]
        ok, got = matches(path, row_digest(f))
        if not ok:
            raise ChecksumMismatch(f"{chain}/{f['name']}", row_digest(f), got)
        xml = path.read_text(errors="replace")
        try:
            check_domain_xml(ctx.config, xml, f"importing {chain}/{f['name']}")
        except InvalidValue as err:  # not well-formed XML
            raise InvalidValue(f"{chain}/{f['name']}", "(its content)", str(err)) from None


def _when(value: Any) -> datetime | None:
    """A manifest's time (the catalog keeps aware times: a naive one is UTC)."""
    if not isinstance(value, str):
        return None
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _import(
    ctx: Context, ds_id: int, driver: DatastoreDriver, chain: str, m: dict[str, Any]
) -> int:
    check_manifest(m)  # every name again: _import never trusts its caller for that
    incs = [i for i in m["increments"] if i.get("status") == "VALID"]
    with ctx.catalog.session() as s:
        vm = None
        if m.get("vm_uuid"):
            vm = s.execute(select(Vm).where(Vm.uuid == m["vm_uuid"])).scalar_one_or_none()
        if vm is None:
            vm = s.execute(select(Vm).where(Vm.name == m["vm"])).scalar_one_or_none()
        if vm is None:
            vm = Vm(
                name=m["vm"],
                uuid=m.get("vm_uuid") or str(uuid.uuid4()),
                host_uri=ctx.config.libvirt.uri,
                state=VmState.UNKNOWN,
                lcm_state=LcmState.UNKNOWN,
                backup_config={},
            )
            s.add(vm)
            s.flush()
        b = Backup(
            vm_id=vm.id,
            datastore_id=ds_id,
            chain=chain,
            mode=m.get("mode", "FULL"),
            status=BackupStatus.VALID if incs else BackupStatus.FAILED,
            created_at=_when(m.get("created")) or datetime.now(UTC),
            finished_at=_when(m.get("finished")),
        )
        for i in incs:
            b.increments.append(
                Increment(
                    seq=i["id"],
                    parent=i.get("parent"),
                    status=BackupStatus.VALID,
                    checkpoint=None,  # the checkpoints were on the lost host: never extended
                    size=i.get("size") or 0,
                    consistency=i.get("consistency"),
                    freeze_ms=i.get("freeze_ms"),
                    started_at=_when(i.get("started")),
                    finished_at=_when(i.get("finished")),
                    files=i.get("files") or [],
                )
            )
        s.add(b)
        s.flush()
        new_id = b.id
    write_manifest(ctx, driver, new_id)
    return new_id


def show_with_sizes(ctx: Context, backup_id: int) -> dict[str, Any]:
    """``backups show``: the chain, each file's download URL and each point's restored size."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
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
                with _tmp(ctx) as tmp:
                    inc["restored_size"] = sum(
                        driver.stat(data["chain"], f["name"], Path(tmp)) for f in disks
                    )
            except DatastoreError as err:
                inc["restored_size"] = None
                inc["stat_error"] = str(err)
    return data
