"""Restore a whole VM (new domain, new name and UUID) or one disk, from any point of a chain.

Increments are numbered as OpenNebula does (full = 0); without ``increment`` the newest point is
restored. Every file of the chain is checked against its checksum before it is used. A point with
memory state comes back as the VM itself, resumed (``engine/memory.py``), unless
``without_memory``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Increment
from vmkeep.checksums import Stopped, expected_digests, matches, row_digest
from vmkeep.engine.core.chains import (
    adopt_pending,
    disk_file,
    find_backup,
    mark_damaged,
    pending_checksums,
    pending_entry,
    point,
    point_files,
)
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.images import check_backing_names, flatten
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.core.trust import (
    LOCAL_ADMIN,
    Actor,
    check_restore_destination,
    check_stored_xml,
    mark_created,
)
from vmkeep.engine.restore.memory import check_new_vm, memory_entry, resume
from vmkeep.engine.vm import inventory
from vmkeep.errors import (
    AlreadyExists,
    ChecksumMismatch,
    DomainNotFound,
    InvalidValue,
    VmkeepError,
)
from vmkeep.hypervisor.domain_xml import new_domain_xml, with_disks
from vmkeep.hypervisor.reach import open_to_qemu, unreachable_why
from vmkeep.model import Warnings
from vmkeep.names import check_name
from vmkeep.paths import within

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreOptions:
    increment: int | None = None
    disk: str | None = None  # target name (vda) or index (0)
    name: str | None = None
    path: str | Path | None = None  # a str keeps a trailing '/' ("put it in this folder")
    no_nic: bool = False
    no_ip: bool = False
    start: bool = False
    force: bool = False  # overwrite an existing disk file / write into a non-empty folder
    in_place: bool = False  # roll the VM itself back (engine/inplace.py)
    instant: bool = False  # run it on overlays over the backup, then pull (engine/instant.py)
    copy_bwlimit: int = 0  # MiB/s for an instant restore's copy (0: as fast as it goes)
    without_memory: bool = False  # a point with memory state: boot cold instead of resuming
    by: Actor = LOCAL_ADMIN  # who asks: an operator restores only into the admin's places


def warn_left_out(warnings: Warnings, left_out: list[str]) -> None:
    """A warning for each disk of the backed-up domain that the point does not hold."""
    for dev in left_out:
        warnings.add(f"disk {dev} was not in the backup and is left out of the restored VM")


def new_vm_xml(
    ctx: Context,
    stored_xml: str,
    name: str,
    disks: dict[str, Path],
    folder: Path,
    opts: RestoreOptions,
    warnings: Warnings,
    what: str,
) -> str:
    """The domain XML of a new VM from a point's stored XML (``domain_xml.new_domain_xml``):
    a warning for each disk the point does not hold, and every host file it names checked to be
    in vmkeep's places or the new VM's own (``trust.check_stored_xml``)."""
    xml, left_out = new_domain_xml(
        stored_xml, name, disks, folder, no_nic=opts.no_nic, no_ip=opts.no_ip
    )
    warn_left_out(warnings, left_out)
    check_stored_xml(ctx.config, xml, what, [*disks.values(), folder])
    return xml


def resumable_memory(target: Increment, warnings: Warnings) -> dict[str, Any] | None:
    """The point's memory state, unless the point left disks out (EXCLUDE_DISKS): the saved RAM
    knows them, and the restored VM would resume on what they hold now. It then boots cold
    (as with ``--without-memory``), with a warning."""
    mem = memory_entry(target)
    left_out = next((f.get("excluded_disks") for f in target.files if f["disk"] is None
                     and f.get("excluded_disks")), None)  # fmt: skip
    if mem is not None and left_out:
        warnings.add(
            f"point {target.seq} left out disk(s) {', '.join(left_out)}: its memory state is "
            "not resumed without them; the VM is restored powered off (as with --without-memory)"
        )
        return None
    return mem


def pick_disks(target: Increment, disk: str | None) -> list[str]:
    """The disks a point holds (those the VM had then, but the excluded), or the one asked."""
    disks = [f["disk"] for f in target.files if f["disk"]]
    if disk is None:
        return disks
    if disk.isdigit() and int(disk) < len(disks):
        return [disks[int(disk)]]
    if disk in disks:
        return [disk]
    raise InvalidValue(
        "--disk", disk, f"the backup holds disks {', '.join(disks)} (or 0..{len(disks) - 1})"
    )


def verify_files(
    ctx: Context, backup_id: int, chain_key: str, expected: dict[str, str], local: dict[str, Path]
) -> None:
    """Every fetched file against its checksum; a mismatch marks the increment holding it (and
    those built on it) DAMAGED before ChecksumMismatch is raised. Then every qcow2 file's backing
    reference must name another file of the chain (a chain imported from a hostile datastore
    comes with checksums that match: its backing reference must not reach a host file when
    QEMU, qemu-storage-daemon or qemu-img open it). A file a killed retention merge stored
    (its row's pending checksum) is taken and recorded, as ``verify`` does."""
    adopted: dict[str, dict[str, Any]] = {}
    bad = _first_mismatch(expected, local, None, pending_checksums(ctx, backup_id), adopted)
    if bad is not None:
        raise _damaged(ctx, backup_id, chain_key, *bad)
    check_backing_names(local)
    if adopted:
        adopt_pending(ctx, backup_id, adopted)


@contextmanager
def verified(
    ctx: Context, backup_id: int, chain_key: str, expected: dict[str, str], local: dict[str, Path]
) -> Iterator[None]:
    """``verify_files`` in a second thread while the body reads the same files (qemu-img convert
    of the chain): the files are read from storage once, and the restore takes the longer of the
    two instead of their sum. The block ends only when both are done; a mismatch is raised (and
    recorded) even when the body failed too, so the caller removes what the body wrote.

    Before anything reads them, every qcow2 file's backing reference must name another file of
    the chain: a tampered file fails its checksum, but only after qemu-img has opened it, and a
    backing reference to a host path would have it read that path into the restored image."""
    try:
        check_backing_names(local)
    except VmkeepError:
        verify_files(ctx, backup_id, chain_key, expected, local)  # damaged: say which, mark it
        raise
    stop = threading.Event()
    pending = pending_checksums(ctx, backup_id)
    adopted: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
        check = pool.submit(_first_mismatch, expected, local, stop.is_set, pending, adopted)
        try:
            yield
        except KeyboardInterrupt:  # cancelled: stop hashing (within a slice), do not wait for it
            stop.set()
            raise
        except BaseException as err:
            bad = check.result()
            if bad is not None:
                raise _damaged(ctx, backup_id, chain_key, *bad) from err
            raise
        bad = check.result()
        if bad is not None:
            raise _damaged(ctx, backup_id, chain_key, *bad)
        if adopted:
            adopt_pending(ctx, backup_id, adopted)


def convert_verified(
    ctx: Context,
    backup_id: int,
    chain_key: str,
    expected: dict[str, str],
    local: dict[str, Path],
    dests: dict[str, Path],
) -> None:
    """Each chain top in ``dests`` (file name -> destination) flattened while every file of
    ``expected`` is checked; a destination is replaced only after the check passed (an existing
    file overwritten with --force survives a damaged backup)."""
    # written in a folder of vmkeep's own (0700) beside each destination, then renamed: no
    # name another user could have planted (a link) is ever opened for writing
    work: dict[Path, Path] = {}
    try:
        for dest in dests.values():
            if dest.parent not in work:
                dest.parent.mkdir(parents=True, exist_ok=True)
                work[dest.parent] = Path(tempfile.mkdtemp(prefix=".vmkeep-", dir=dest.parent))
        tmps = {name: work[dest.parent] / dest.name for name, dest in dests.items()}
        with verified(ctx, backup_id, chain_key, expected, local):
            for name, tmp in tmps.items():
                flatten(local[name], tmp, ordered=False)
        for name, tmp in tmps.items():
            tmp.replace(dests[name])
    finally:
        for folder in work.values():
            shutil.rmtree(folder, ignore_errors=True)


def _first_mismatch(
    expected: dict[str, str],
    local: dict[str, Path],
    stop: Callable[[], bool] | None = None,
    pending: dict[str, dict[str, Any]] | None = None,
    adopted: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, str, str] | None:
    """The first file not matching its checksum (name, expected, got), or None. A file with its
    row's ``pending`` checksum (a killed retention merge stored it) matches: it goes into
    ``adopted`` for ``adopt_pending``."""
    for name, want in expected.items():
        try:
            ok, got = matches(local[name], want, stop)
            entry = (
                None
                if ok or pending is None
                else pending_entry(local[name], got, pending.get(name), stop)
            )
        except Stopped:
            return None
        if entry is not None and adopted is not None:
            adopted[name] = entry
            continue
        if not ok:
            return name, want, got
    return None


def _damaged(
    ctx: Context, backup_id: int, chain_key: str, name: str, want: str, got: str
) -> ChecksumMismatch:
    err = ChecksumMismatch(f"{chain_key}/{name}", want, got)
    mark_damaged(ctx, backup_id, name, str(err))
    return err


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is a file (it could never be a folder)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def disk_destination(path: str | Path | None, default: Path, force: bool) -> Path:
    """Where one restored disk image goes: ``path`` itself, or ``default``'s name inside it when
    ``path`` is a folder (existing, or written with a trailing '/'). Checked before any work."""
    if path is None:
        dest = default
    else:
        raw = str(path)
        dest = Path(os.path.abspath(os.path.expanduser(raw)))
        if raw.endswith("/") or dest.is_dir():
            dest = dest / default.name
    blocked = _blocking_file(dest)
    if blocked is not None:
        raise InvalidValue("--path", str(path), f"{blocked} is a file, not a folder")
    if dest.is_dir():
        raise InvalidValue("--path", str(path), f"{dest} is a folder; give a file name")
    if dest.exists() and not force:
        raise AlreadyExists(f"{dest} (add --force to overwrite it)")
    return dest


def vm_folder(path: str | Path | None, default: Path, force: bool) -> Path:
    """The folder for a restored VM's disks: must not be a file, nor a non-empty folder
    unless ``force``."""
    folder = default if path is None else Path(os.path.abspath(os.path.expanduser(str(path))))
    if folder.exists() and not folder.is_dir():
        raise InvalidValue("--path", str(path), f"{folder} is a file; give a folder for the disks")
    blocked = _blocking_file(folder)
    if blocked is not None:
        raise InvalidValue("--path", str(path), f"{blocked} is a file, not a folder")
    # vmkeep's own default folder of a VM whose domain is gone may be reused; a user's may not.
    if path is not None and folder.is_dir() and any(folder.iterdir()) and not force:
        raise AlreadyExists(f"folder {folder} is not empty (add --force to write into it)")
    return folder


def check_place(ctx: Context, opts: RestoreOptions, default: Path) -> None:
    """An operator's destination is checked against the admin's places before anything is said
    about it (whether it exists, is a file): a refusal tells nothing of the host's files."""
    where = Path(str(opts.path)) if opts.path is not None else default
    check_restore_destination(ctx.config, opts.by, where, force=False)


def check_new_vm_name(ctx: Context, name: str) -> None:
    check_name("--name", name)
    try:
        ctx.hv.domain(name)
    except DomainNotFound:
        pass
    else:
        raise AlreadyExists(f"libvirt domain {name!r} (choose another --name)")
    # A catalog row with this name but no domain (removed outside vmkeep) is re-bound by import.


def restore(ctx: Context, backup_id: int, opts: RestoreOptions) -> tuple[dict[str, Any], Warnings]:
    """Every check (names, paths, free names) runs before any data moves; a failure removes
    whatever this restore created and nothing else."""
    warnings = Warnings()
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        target, chain = point(b, opts.increment)
        disks = pick_disks(target, opts.disk)
        chain_key, vm_name, driver = b.chain, b.vm.name, driver_of(b.datastore)
        expected = expected_digests(point_files(chain, disks))
        xml_entry = next(f for f in target.files if f["disk"] is None and not f.get("memory"))
        expected[xml_entry["name"]] = row_digest(xml_entry)
        seq, vm_uuid = target.seq, b.vm.uuid
        one_disk = opts.disk is not None and opts.name is None
        mem = None if one_disk or opts.without_memory else resumable_memory(target, warnings)
        if mem is not None:
            expected[mem["name"]] = row_digest(mem)
    restores = ctx.config.data_dir / "restores"
    if one_disk:
        default = restores / f"{vm_name}-{backup_id}-{seq}.{disks[0]}.qcow2"
        check_place(ctx, opts, default)
        dest = disk_destination(opts.path, default, opts.force)
        check_restore_destination(ctx.config, opts.by, dest, opts.force)
        created: list[Path] = [] if dest.exists() else [dest]
        new_name = ""
        folder = dest.parent
    elif mem is not None:
        if opts.no_nic or opts.no_ip:
            raise InvalidValue(
                "--no-nic" if opts.no_nic else "--no-ip",
                "with memory state",
                "a VM resumed from its memory keeps its devices; add --without-memory",
            )
        check_new_vm(ctx, vm_name, vm_uuid, opts.name)
        new_name = vm_name
        check_place(ctx, opts, restores / new_name)
        folder = vm_folder(opts.path, restores / new_name, opts.force)
        check_restore_destination(ctx.config, opts.by, folder, opts.force)
        created = [] if folder.exists() else [folder]
    else:
        new_name = opts.name or f"{vm_name}-restore-{backup_id}-{seq}"
        check_new_vm_name(ctx, new_name)
        check_place(ctx, opts, restores / new_name)
        folder = vm_folder(opts.path, restores / new_name, opts.force)
        check_restore_destination(ctx.config, opts.by, folder, opts.force)
        created = [] if folder.exists() else [folder]
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=ctx.config.data_dir) as tmp:
            local = driver.restore(chain_key, list(expected), Path(tmp))
            if one_disk:
                convert_verified(
                    ctx, backup_id, chain_key, expected, local, {disk_file(seq, disks[0]): dest}
                )
                mark_created(dest)
                return {
                    "backup": backup_id,
                    "increment": seq,
                    "disk": disks[0],
                    "path": str(dest),
                }, warnings
            folder.mkdir(parents=True, exist_ok=True)
            warn_unsearchable(ctx, folder, warnings, folder if folder in created else None)
            paths = {d: folder / f"{d}.qcow2" for d in disks}
            created += [p for p in paths.values() if not p.exists()]
            convert_verified(
                ctx,
                backup_id,
                chain_key,
                expected,
                local,
                {disk_file(seq, d): p for d, p in paths.items()},
            )
            for p in paths.values():
                mark_created(p)
            resumed: bool | None = None
            if mem is not None:  # the VM itself, running again where it was
                xml = with_disks(local[xml_entry["name"]].read_text(), paths, "qcow2")
                check_stored_xml(ctx.config, xml, f"restore of backup {backup_id}", paths.values())
                state = local[mem["name"]]
                resumed = resume(ctx, state, paths, warnings, persistent_xml=xml, fmt="qcow2")
            else:
                stored = local[xml_entry["name"]].read_text()
                what = f"restore of backup {backup_id}"
                xml = new_vm_xml(ctx, stored, new_name, paths, folder, opts, warnings, what)
                ctx.hv.define(xml)
        (folder / "domain.xml").write_text(xml)
        mark_created(folder / "domain.xml")
    except BaseException:
        for p in reversed(created):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise
    started = bool(resumed)
    if opts.start and not started:
        ctx.hv.start(new_name)
        started = True
    result = _imported(ctx, backup_id, seq, new_name, folder, paths, started, resumed)
    return result, warnings


def _imported(
    ctx: Context,
    backup_id: int,
    seq: int,
    name: str,
    folder: Path,
    paths: dict[str, Path],
    started: bool,
    resumed: bool | None = None,
) -> dict[str, Any]:
    inventory.import_vm(ctx, name)
    return {
        "backup": backup_id,
        "increment": seq,
        "vm": name,
        "path": str(folder),
        "disks": {d: str(p) for d, p in paths.items()},
        "started": started,
        **({} if resumed is None else {"resumed": resumed}),
    }


def warn_unsearchable(
    ctx: Context, folder: Path, warnings: Warnings, made: Path | None = None
) -> None:
    """Let QEMU reach the disks in ``folder`` (``hypervisor/reach.py``): it and the folders above
    it up to the data dir (or up to ``made``, a folder outside it that vmkeep made) are opened to
    QEMU's group alone; a warning when a folder on the way still keeps QEMU out."""
    data = ctx.config.data_dir.resolve()
    where = folder.resolve()
    own = data if within(where, data) else made
    blocked = open_to_qemu(where, own, ctx.hv)
    if blocked is not None:
        warnings.add(f"{unreachable_why(blocked, ctx.hv)}: QEMU may not reach the disks")
