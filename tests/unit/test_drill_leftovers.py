"""A drill killed in its file-system check leaves its work folder holding a qemu-storage-daemon's
FUSE export (which ``rmtree`` cannot remove) and a loop device over it; the next drill of that
point clears them (``drill.clear_work``). Real qemu-img, qemu-storage-daemon and losetup; no VM."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from vmkeep.engine.restore import drill
from vmkeep.engine.restore.export import export_disk


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of this test's own child is gone for every purpose here
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_clear_work_stops_a_killed_drills_export_and_loop_device(tmp_path: Path) -> None:
    work = tmp_path / "drills" / "vm-drill-1-0"
    work.mkdir(parents=True)
    image = work / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    export, pid = export_disk(image, work, writable=True, name="vda-fsck")
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(export)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        assert str(export) in Path("/proc/mounts").read_text()
        assert drill._loops_under(work) == [loop]
        assert drill.exports_under(work) == [pid]  # never another process
        assert drill._mounts_under(work) == [str(export)]
        # what the drill did before: the folder survives (a mount in it), the next mkdir fails
        subprocess.run(["rm", "-rf", str(work)], capture_output=True)
        assert export.exists()

        drill.clear_work(work)

        assert not work.exists()
        assert drill._loops_under(work) == []
        assert str(work) not in Path("/proc/mounts").read_text()
        deadline = time.monotonic() + 10
        while alive(pid):
            assert time.monotonic() < deadline, "the export's qemu-storage-daemon still runs"
            time.sleep(0.05)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["umount", "-l", str(export)], capture_output=True)
        subprocess.run(["kill", str(pid)], capture_output=True)


def test_clear_work_of_a_missing_or_plain_folder(tmp_path: Path) -> None:
    drill.clear_work(tmp_path / "none")  # nothing to do
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    (plain / "sub" / "vda.qcow2").write_bytes(b"x")
    drill.clear_work(plain)
    assert not plain.exists()
