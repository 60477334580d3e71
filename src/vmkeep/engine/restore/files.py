"""File-level restore (what ``vmkeep files`` and the API call): ``ls`` lists a folder of a
restore point, ``get`` copies files out of it (the copy is vmkeep's user's alone), ``stream``
reads one file in chunks, ``mount``/``umount`` keep a point mounted at a private mount point.

``ls``, ``get`` and ``stream`` open and close a point per call; ``mount``/``umount`` keep it
open, with its state in ``<data_dir>/mounts/`` so ``umount`` (or the next ``mount``) can undo it.
The point itself is exposed and mounted read-only by ``export``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.engine.core.context import Context
from vmkeep.engine.restore.export import Opened, close, exposed, mount_fs, partitions
from vmkeep.errors import AlreadyExists, InvalidValue


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
    close(o)
    state.unlink()
    return {"mountpoint": str(mountpoint), "unmounted": True}
