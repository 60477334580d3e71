"""A restore point's disk exposed without booting the backup: qemu-storage-daemon's FUSE export
of the qcow2 chain (opened read-only; ``exposed``), the partition table (offsets from ``sfdisk
--json``; GPT and MBR), a read-only loop device over the whole disk or one partition and a
read-only mount (ext4 ``noload``, xfs ``norecovery``: no journal replay writes) of a file system
whose type ``[mount] fs_types`` allows (``mount_fs``). Nothing here can write to the backup
files; ``close`` undoes it all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmkeep.checksums import expected_digests
from vmkeep.engine.core.chains import disk_file, find_backup, point
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.restore.point import pick_disks, verify_files
from vmkeep.errors import InvalidValue, NotPermitted, VmkeepError

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
        b = find_backup(s, backup_id)
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


def close(o: Opened) -> None:
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
        close(o)
        raise
    if not keep:
        close(o)


def mount_fs(o: Opened, partition: int | None, mountpoint: Path, fs_types: list[str]) -> None:
    """Mount the chosen file system of an exposed point at ``mountpoint``: read-only, no
    setuid, device node or program of the guest's usable (``MOUNT_OPTIONS``), its type probed
    and one of ``fs_types``."""
    export = Path(o.export)
    offset, size, o.partition = _pick_partition(export, partition)
    mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
    o.loop = _mount(export, offset, size, mountpoint, fs_types)
    o.mountpoint = str(mountpoint)
