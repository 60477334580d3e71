"""A full datastore or a full staging area is refused before anything is written (free-space
pre-check, exit 21 InsufficientSpace naming which one); nothing is left behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import Harness


@contextmanager
def small_fs(image: Path, mountpoint: Path, mib: int) -> Iterator[Path]:
    """A real, small ext4 file system, loop-mounted."""
    subprocess.run(["truncate", "-s", f"{mib}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        mountpoint.chmod(0o755)
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        image.unlink()


def test_datastore_full_is_refused_before_writing(harness: Harness) -> None:
    h = harness
    h.backup_and_check()
    h.write(mib=48)  # more than the small datastore holds
    with small_fs(h.work / "small.img", h.work / "small", 32) as small:
        h.run("datastore", "add", "small", "--driver", "dir", "--path", str(small))
        res = h.run("backup", h.vm, "-d", "small", check=21)
        assert "datastore 'small'" in res.err and "free" in res.err, res.err
        assert "staging" not in res.err
        assert [p for p in small.iterdir() if p.name != "lost+found"] == []
        h.assert_healthy()
    h.backup_and_check()


def test_staging_full_is_refused_and_named_as_staging(harness: Harness) -> None:
    h = harness
    h.write(mib=48)
    staging = h.data / "staging"
    # staged in the data dir (by default a dir datastore QEMU reaches is staged in itself)
    local = ["--path", str(h.work / "local"), "--opt", "stage_in_data_dir=true"]
    h.run("datastore", "add", "local", *local)
    with small_fs(h.work / "staging.img", staging, 32):
        res = h.run("backup", h.vm, "-d", "local", check=21)
        assert "staging area" in res.err and "not the datastore" in res.err, res.err
        assert [p for p in staging.iterdir() if p.name != "lost+found"] == []
        shown = h.run("vm", "show", h.vm, "--json").json()
        assert shown["lcm_state"] == "RUNNING"
    h.assert_healthy()
    h.backup_and_check()
    for p in h.points:
        h.restore_matches(p)
