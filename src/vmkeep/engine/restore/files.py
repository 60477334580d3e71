"""File-level restore without booting the backup: a restore point's disk exposed read-only by
qemu-storage-daemon (FUSE export of the qcow2 chain, opened read-only), a read-only loop device
over the whole disk or one partition (offsets from ``sfdisk --json``; GPT and MBR), and a
read-only mount (ext4 ``noload``, xfs ``norecovery``: no journal replay writes). Nothing here can
write to the backup files.

``files ls`` and ``files get`` open and close a point per command; ``mount``/``umount`` keep it
open, with its state in ``<data_dir>/mounts/`` so ``umount`` (or the next ``mount``) can undo it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.catalog.tables import Backup
from vmkeep.checksums import expected_digests
from vmkeep.engine.core.chains import disk_file, point
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.restore.point import pick_disks, verify_files
from vmkeep.errors import (
    AlreadyExists,
    BackupNotFound,
    InvalidValue,
    NotPermitted,
    VmkeepError,
)

SECTOR = 512
# a guest's setuid files, device nodes and programs stay inert on the host
MOUNT_OPTIONS = "ro,nosuid,nodev,noexec"


@dataclass
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str
    fstype: str | None


@dataclass
class Opened:
    """What one open restore point holds (saved as JSON for ``umount``)."""

    backup: int
    increment: int
    disk: str
    workdir: str
    export: str
    qsd_pid: int
    loop: str | None = None
    mountpoint: str | None = None
    partition: int | None = None


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VmkeepError(f"{what}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


# --- exposing a point --------------------------------------------------------------------------
def _materialize(
    ctx: Context, backup_id: int, increment: int | None, disk: str | None, workdir: Path
) -> tuple[Path, int, str]:
    """The point's disk file with its backing chain, verified, readable locally."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise BackupNotFound(backup_id)
        target, chain = point(b, increment)
        chosen = pick_disks(target, disk)[0]
        expected = expected_digests(f for i in chain for f in i.files if f["disk"] == chosen)
        chain_key, driver, seq = b.chain, driver_of(b.datastore), target.seq
    local = driver.restore(chain_key, list(expected), workdir / "chain")
    verify_files(ctx, backup_id, chain_key, expected, local)
    return local[disk_file(seq, chosen)], seq, chosen


def export_disk(
    image: Path, workdir: Path, writable: bool = False, name: str = "disk"
) -> tuple[Path, int]:
    """A FUSE file showing the guest's disk as raw bytes, backing chain included; read-only unless
    ``writable`` (a drill's throw-away overlay: its backing files are still opened read-only)."""
    export = workdir / f"{name}.raw"
    on = "on" if writable else "off"
    ro = "off" if writable else "on"
    export.touch()
    pidfile = workdir / f"{name}.qsd.pid"
    # QEMU's options are comma-separated: a comma in a path is doubled, never a new option
    image_opt, export_opt = (str(p).replace(",", ",,") for p in (image, export))
    _run(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,filename={image_opt},node-name=file0,read-only={ro}",
            "--blockdev",
            f"driver=qcow2,file=file0,node-name=disk0,read-only={ro}",
            "--export",
            f"type=fuse,id=exp0,node-name=disk0,mountpoint={export_opt},writable={on}",
            "--daemonize",
            "--pidfile",
            str(pidfile),
        ],
        "qemu-storage-daemon (FUSE export of the backup)",
    )
    return export, int(pidfile.read_text().strip())


def partitions(export: Path) -> list[Partition]:
    """The partition table (GPT or MBR) of the exported disk; empty for a whole-disk file system."""
    proc = subprocess.run(["sfdisk", "--json", str(export)], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    table = json.loads(proc.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    out = []
    for n, p in enumerate(table.get("partitions", []), start=1):
        start, size = int(p["start"]) * sector, int(p["size"]) * sector
        out.append(Partition(n, start, size, str(p.get("type", "")), _fstype(export, start, size)))
    return out


def _fstype(export: Path, offset: int, size: int) -> str | None:
    proc = subprocess.run(
        [
            "blkid",
            "-p",
            "-O",
            str(offset),
            "-S",
            str(size),
            "-o",
            "value",
            "-s",
            "TYPE",
            str(export),
        ],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def _pick_partition(export: Path, partition: int | None) -> tuple[int, int, int | None]:
    """(offset, size, number) of the file system to mount."""
    parts = partitions(export)
    size = export.stat().st_size
    if not parts:
        if partition is not None:
            raise InvalidValue("--partition", partition, "this disk has no partition table")
        return 0, size, None
    with_fs = [p for p in parts if p.fstype]
    if partition is None and len(with_fs) == 1:
        p = with_fs[0]
        return p.start, p.size, p.number
    listed = "; ".join(
        f"{p.number}: {p.size // (1 << 20)} MiB {p.fstype or 'no file system'}" for p in parts
    )
    if partition is None:
        raise InvalidValue(
            "--partition", None, f"the disk has several partitions ({listed}); choose one"
        )
    chosen = next((p for p in parts if p.number == partition), None)
    if chosen is None or not chosen.fstype:
        raise InvalidValue("--partition", partition, f"choose one with a file system ({listed})")
    return chosen.start, chosen.size, chosen.number


def check_fs_type(fstype: str | None, fs_types: list[str]) -> str:
    """The probed file-system type, if ``[mount] fs_types`` lets a guest's image reach that
    kernel driver (the image, not the kernel's guess, would otherwise choose the parser)."""
    if fstype is None or fstype not in fs_types:
        raise NotPermitted(
            f"mounting {'a ' + fstype if fstype else 'an unrecognised'} file system",
            f"[mount] fs_types allows {', '.join(fs_types) or 'no type'}",
            "An admin may add the type to [mount] fs_types.",
        )
    return fstype


def _mount(export: Path, offset: int, size: int, mountpoint: Path, fs_types: list[str]) -> str:
    fstype = check_fs_type(_fstype(export, offset, size), fs_types)
    loop = _run(
        ["losetup", "-r", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), str(export)],
        "losetup",
    ).strip()
    opts = MOUNT_OPTIONS
    if fstype in ("ext3", "ext4"):
        opts += ",noload"  # no journal replay: it would write
    elif fstype == "xfs":
        opts += ",norecovery"
    try:
        _run(
            ["mount", "-t", fstype, "-o", opts, loop, str(mountpoint)],
            f"mounting the {fstype} file system",
        )
    except VmkeepError:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        raise
    return loop


def _close(o: Opened) -> None:
    """Undo ``open_point`` in reverse; each step tolerates a step already undone."""
    if o.mountpoint:
        subprocess.run(["umount", o.mountpoint], capture_output=True)
    if o.loop:
        subprocess.run(["losetup", "-d", o.loop], capture_output=True)
    stop_export(o.qsd_pid, Path(o.export))
    shutil.rmtree(o.workdir, ignore_errors=True)


def stop_export(pid: int, export: Path) -> None:
    """Stop the qemu-storage-daemon of an export (it flushes and closes the image) and make sure
    its FUSE mount is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    subprocess.run(["umount", "-l", str(export)], capture_output=True)  # a killed daemon's FUSE


@contextlib.contextmanager
def exposed(
    ctx: Context, backup_id: int, increment: int | None, disk: str | None, keep: bool = False
) -> Iterator[Opened]:
    """The point's disk as a read-only raw FUSE file (``Opened.export``); closed at the end of
    the block, or on an error only when ``keep`` (``mount``)."""
    root = ctx.config.data_dir / "mounts"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # its mounts are vmkeep's alone
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{backup_id}-"))
    try:
        image, seq, chosen = _materialize(ctx, backup_id, increment, disk, work)
        export, pid = export_disk(image, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    o = Opened(backup_id, seq, chosen, str(work), str(export), pid)
    try:
        yield o
    except BaseException:
        _close(o)
        raise
    if not keep:
        _close(o)


def mount_fs(o: Opened, partition: int | None, mountpoint: Path, fs_types: list[str]) -> None:
    """Mount the chosen file system of an exposed point at ``mountpoint``: read-only, no
    setuid, device node or program of the guest's usable (``MOUNT_OPTIONS``), its type probed
    and one of ``fs_types``."""
    export = Path(o.export)
    offset, size, o.partition = _pick_partition(export, partition)
    mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
    o.loop = _mount(export, offset, size, mountpoint, fs_types)
    o.mountpoint = str(mountpoint)


# --- files ls / get ------------------------------------------------------------------------------
def _inside(root: Path, rel: str) -> Path:
    """``rel`` inside the mounted file system; a symlink may not lead out of it (to the host)."""
    if "\x00" in rel:
        raise InvalidValue("PATH", rel, "a path has no NUL character")
    path = Path(os.path.realpath(root / rel.lstrip("/")))
    if path != root and root not in path.parents:
        raise InvalidValue("PATH", rel, "it leads out of the backup's file system (a symlink)")
    if not os.path.lexists(path):
        raise InvalidValue("PATH", rel, "no such file or folder in this restore point")
    return path


def _private_copy(dest: Path) -> None:
    """A copy of a guest's files is vmkeep's user's alone: the guest's group and other bits are
    dropped from every file and folder (0644 -> 0600, 0755 -> 0700); links are left as they are."""
    for top, dirs, files in os.walk(dest) if dest.is_dir() and not dest.is_symlink() else []:
        for name in [*dirs, *files]:
            _owner_only(Path(top) / name)
    _owner_only(dest)


def _owner_only(path: Path) -> None:
    st = path.lstat()
    if not stat.S_ISLNK(st.st_mode):
        path.chmod(stat.S_IMODE(st.st_mode) & 0o700)


def _copy_regular(src: str, dest: str) -> None:
    """copytree's copy: regular files only (a FIFO or device node of the guest is skipped), the
    owner's bits of their mode only and no extended attributes: a guest's setuid bit or file
    capability never lands on a root-owned file of the host, not even for a moment."""
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dest, follow_symlinks=False)
        os.chmod(dest, stat.S_IMODE(st.st_mode) & 0o700)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def _source(root: Path, rel: str) -> Path:
    """A path to copy: its folder must resolve inside the file system; the last component
    itself is not followed (a symlink is copied as a link)."""
    rel = rel.strip("/")
    if not rel:
        return root
    if "\x00" in rel:
        raise InvalidValue("PATH", rel, "a path has no NUL character")
    parent = _inside(root, os.path.dirname(rel) or "/")
    src = parent / os.path.basename(rel)
    if not os.path.lexists(src):
        raise InvalidValue("PATH", rel, "no such file or folder in this restore point")
    return src


def _entry(root: Path, p: Path) -> dict[str, Any]:
    st = p.lstat()
    kind = (
        "dir"
        if stat.S_ISDIR(st.st_mode)
        else "link"
        if stat.S_ISLNK(st.st_mode)
        else "file"
        if stat.S_ISREG(st.st_mode)
        else "other"
    )
    row: dict[str, Any] = {
        "path": "/" + str(p.relative_to(root)) if p != root else "/",
        "type": kind,
        "size": st.st_size,
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "mtime": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(),
    }
    if kind == "link":
        row["target"] = os.readlink(p)
    return row


def ls(
    ctx: Context,
    backup_id: int,
    path: str = "/",
    increment: int | None = None,
    disk: str | None = None,
    partition: int | None = None,
) -> dict[str, Any]:
    """Entries of a folder (or one file) of a restore point. A disk with several file systems
    and no ``partition`` lists its partitions instead."""
    with exposed(ctx, backup_id, increment, disk) as o:
        info = {"backup": o.backup, "increment": o.increment, "disk": o.disk, "path": path}
        parts = partitions(Path(o.export))
        if partition is None and len([p for p in parts if p.fstype]) > 1:
            return info | {"partition": None, "partitions": [asdict(p) for p in parts]}
        mount_fs(o, partition, Path(o.workdir) / "fs", ctx.config.mount.fs_types)
        mnt = Path(str(o.mountpoint))
        target = _inside(mnt, path)
        items = (
            sorted(target.iterdir()) if target.is_dir() and not target.is_symlink() else [target]
        )
        return info | {"partition": o.partition, "entries": [_entry(mnt, p) for p in items]}


def get(
    ctx: Context,
    backup_id: int,
    paths: list[str],
    to: Path,
    increment: int | None = None,
    disk: str | None = None,
    partition: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Copy files or folders of a restore point into ``to`` (never over existing ones unless
    ``force``); symlinks are copied as links, never followed."""
    to = Path(os.path.abspath(to))
    if to.exists() and not to.is_dir():
        raise InvalidValue("--to", str(to), "it is a file; give a folder")
    copied = []
    with exposed(ctx, backup_id, increment, disk) as o:
        mount_fs(o, partition, Path(o.workdir) / "fs", ctx.config.mount.fs_types)
        mnt = Path(str(o.mountpoint))
        sources = [_source(mnt, p) for p in paths]
        for src in sources:
            dest = to / src.name
            if os.path.lexists(dest) and not force:
                raise AlreadyExists(f"{dest} (add --force to overwrite it)")
        to.mkdir(parents=True, exist_ok=True)
        for src in sources:
            dest = to / src.name
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(
                    src, dest, symlinks=True, dirs_exist_ok=force, copy_function=_copy_regular
                )
            else:
                if os.path.lexists(dest):
                    dest.unlink()
                if src.is_symlink():
                    os.symlink(os.readlink(src), dest)  # a link is copied as a link
                else:
                    _copy_regular(str(src), str(dest))
            _private_copy(dest)
            copied.append({"from": "/" + str(src.relative_to(mnt)), "to": str(dest)})
        return {"backup": o.backup, "increment": o.increment, "disk": o.disk, "copied": copied}


def stream(
    ctx: Context,
    backup_id: int,
    path: str,
    increment: int | None = None,
    disk: str | None = None,
    partition: int | None = None,
    chunk: int = 1 << 20,
) -> Iterator[bytes]:
    """One regular file of a restore point, in chunks (API downloads). The first item is b""
    once the point is open and the file found, so errors come before any data; the point is
    closed when the iteration ends or is abandoned."""
    with exposed(ctx, backup_id, increment, disk) as o:
        mount_fs(o, partition, Path(o.workdir) / "fs", ctx.config.mount.fs_types)
        src = _source(Path(str(o.mountpoint)), path)
        if src.is_symlink() or not src.is_file():
            raise InvalidValue("path", path, "not a regular file (list folders with files ls)")
        with open(src, "rb") as f:
            yield b""
            while data := f.read(chunk):
                yield data


# --- mount / umount ------------------------------------------------------------------------------
def private_mountpoint(mountpoint: Path) -> None:
    """Only vmkeep's user may enter a mount. A mounted file system shows its own root folder's
    mode at the mount point (the guest's, often 0755), so the mount point's mode cannot keep the
    other users out: a folder above it must be closed to them (no group or other search bit;
    missing folders are made 0700). Refused otherwise. The mount point itself is made, or set,
    0700: what shows there while nothing is mounted."""
    closed = any(not p.exists() or not p.stat().st_mode & 0o011 for p in mountpoint.parents)
    if not closed:
        raise InvalidValue(
            "MOUNTPOINT",
            str(mountpoint),
            "other users can reach it, and through it the guest's files (a mount point shows the "
            "guest's folder mode, not its own); mount inside a folder closed to them, e.g. "
            "'mkdir -m 700 /root/mnt' and a mount point in it",
        )
    for folder in [*reversed(mountpoint.parents), mountpoint]:
        if not folder.exists():
            folder.mkdir(mode=0o700)
    mountpoint.chmod(0o700)


def _state_file(ctx: Context, mountpoint: Path) -> Path:
    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return ctx.config.data_dir / "mounts" / f"{key}.json"


def mount(
    ctx: Context,
    backup_id: int,
    mountpoint: Path,
    increment: int | None = None,
    disk: str | None = None,
    partition: int | None = None,
) -> dict[str, Any]:
    mountpoint = Path(os.path.abspath(mountpoint))
    if mountpoint.exists() and (not mountpoint.is_dir() or any(mountpoint.iterdir())):
        raise InvalidValue("MOUNTPOINT", str(mountpoint), "give an empty folder")
    private_mountpoint(mountpoint)
    state = _state_file(ctx, mountpoint)
    if state.exists():
        raise AlreadyExists(f"a vmkeep mount at {mountpoint} (umount it first)")
    with exposed(ctx, backup_id, increment, disk, keep=True) as o:
        mount_fs(o, partition, mountpoint, ctx.config.mount.fs_types)
        state.write_text(json.dumps(asdict(o)))
    return asdict(o)


def umount(ctx: Context, mountpoint: Path) -> dict[str, Any]:
    mountpoint = Path(os.path.abspath(mountpoint))
    state = _state_file(ctx, mountpoint)
    if not state.exists():
        raise InvalidValue("MOUNTPOINT", str(mountpoint), "no vmkeep mount there")
    o = Opened(**json.loads(state.read_text()))
    _close(o)
    state.unlink()
    return {"mountpoint": str(mountpoint), "unmounted": True}
