"""qcow2 image operations through qemu-img, shared by backup, restore, retention and the
lifecycle actions."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from vmkeep.datastores.base import QCOW2_MAGIC, qemu_img_info
from vmkeep.errors import VmkeepError

PARTIAL = ".partial"  # flatten's name for an image being written


def qemu_img(
    *args: str, what: str | None = None, error: Callable[[str], Exception] = VmkeepError
) -> None:
    """Run ``qemu-img ARGS``. On failure raise ``error("qemu-img WHAT: <its stderr>")``, WHAT
    being the subcommand (``args[0]``) unless given."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode:
        raise error(f"qemu-img {what or args[0]}: {proc.stderr.strip()}")


def drop_bitmaps(path: Path, prefix: str) -> list[str]:
    """Remove the persistent dirty bitmaps whose name starts with ``prefix`` from a qcow2 image
    no process has open (a powered-off VM's disk); returns their names."""
    info = qemu_img_info(path, check=False)
    if info.get("format") != "qcow2":
        return []
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    names = [str(b["name"]) for b in bitmaps if str(b.get("name", "")).startswith(prefix)]
    for name in names:
        qemu_img("bitmap", "--remove", str(path), name, what=f"bitmap --remove {name}")
    return names


def flatten(src: Path, dest: Path, *, ordered: bool = True, fmt: str = "qcow2") -> None:
    """Write ``src`` with its whole backing chain as one self-contained, sparse image at ``dest``
    (qcow2 v3, or ``fmt``), via a ``.partial`` name: ``dest`` is either absent or complete.
    ``ordered`` lays clusters out in guest order, the same bytes for the same disk (stored files:
    deduplicating stores need it); a restore passes False and lets qemu-img write out of order
    (``-W``, ~20 % faster here)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + PARTIAL)
    argv = ["convert", "-q", "-f", "qcow2", "-O", fmt]
    if fmt == "qcow2":
        argv += ["-o", "compat=1.1"]
    if not ordered:
        argv.append("-W")
    try:
        qemu_img(*argv, str(src), str(tmp), what=f"convert {src.name}")
    except BaseException:  # failed, or interrupted: no half image left beside the destination
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)


def backing_name(path: Path) -> str | None:
    """The backing file a qcow2 image names in its header (None: none), read without qemu-img.
    Raises VmkeepError for a file that is not qcow2 or uses an external data file."""
    with open(path, "rb") as f:
        head = f.read(80)
        if len(head) < 20 or head[:4] != QCOW2_MAGIC:
            raise VmkeepError(f"{path.name} is not a qcow2 image")
        version, offset, size = struct.unpack(">IQI", head[4:20])
        if version >= 3 and len(head) >= 80 and struct.unpack(">Q", head[72:80])[0] & 0x4:
            raise VmkeepError(f"{path.name} names an external data file")
        if not offset:
            return None
        f.seek(offset)
        return f.read(size).decode("utf-8", "replace")


def check_backing_names(files: dict[str, Path]) -> None:
    """Every qcow2 file among ``files`` (name -> path) backed by nothing or by another of them,
    named plainly (no folder, no protocol): what vmkeep writes."""
    for name, path in files.items():
        if not name.endswith(".qcow2"):
            continue
        backing = backing_name(path)
        if backing is not None and (backing not in files or "/" in backing or ":" in backing):
            raise VmkeepError(
                f"{name} names {backing!r} as its backing file, which is not a file of its "
                "chain: the backup was altered outside vmkeep; it is not restored"
            )
