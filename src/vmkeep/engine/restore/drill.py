"""Restore drills (Veeam's SureBackup): prove that a restore point comes back, without touching it.

``vmkeep drill ID [--increment N] [--probe CMD]``:

1. every file of the point's chain is checked against its checksum;
2. each disk gets a throw-away qcow2 overlay over the backup's files (opened read-only, never
   written); each file system on it (whole disk, or GPT/MBR partitions) is checked on the host:
   the journal is replayed into the overlay (as a boot would), then ``e2fsck -fn``,
   ``xfs_repair -n`` or ``fsck.vfat -n`` report without repairing;
3. the point boots as an isolated VM (no NICs) on those overlays, and its guest agent must answer
   within the boot timeout;
4. the optional probe command runs in the guest through the agent and must exit 0.

The first failed step ends the drill with FAIL and names the reason; the evidence of every step
is recorded on the increment (``backups show``). The VM and its overlays are removed in every
case.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.catalog.locks import lock, pid_alive
from vmkeep.catalog.tables import Drill
from vmkeep.checksums import expected_digests, row_digest
from vmkeep.datastores import DatastoreDriver
from vmkeep.engine.core.chains import disk_file, find_backup, point
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.core.trust import check_stored_xml
from vmkeep.engine.restore.export import export_disk, partitions, stop_export
from vmkeep.engine.restore.instant import local_folder, make_overlay
from vmkeep.engine.restore.point import pick_disks, verify_files
from vmkeep.errors import DrillFailed, HypervisorError, VmkeepError
from vmkeep.faults import failpoint
from vmkeep.hypervisor.domain_xml import description, new_domain_xml, with_description
from vmkeep.hypervisor.reach import open_to_qemu, unreachable_why
from vmkeep.model import Warnings

BOOT_TIMEOUT = 300.0
PROBE_TIMEOUT = 120.0
MARK = "vmkeep restore drill"  # in the drill VM's <description>: a leftover is recognised by it
# e2fsck -n findings that a crash-consistent copy of a mounted ext4 has (the superblock's free
# counters are only written at unmount/freeze): not damage (e2fsck 1.47 itself exits 0 for them)
BENIGN = ("Free blocks count wrong", "Free inodes count wrong")


@dataclass
class Check:
    step: str
    ok: bool
    detail: str


class StepFailed(Exception):
    """A drill step failed: its evidence is the last ``Check`` appended."""


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


# --- file systems ----------------------------------------------------------------------------------
def _e2fsck(dev: str) -> tuple[bool, str]:
    _run(["e2fsck", "-E", "journal_only", "-p", dev])  # replay into the overlay, as a boot would
    proc = _run(["e2fsck", "-fn", dev])
    return e2fsck_verdict(proc.returncode, proc.stdout + proc.stderr)


def e2fsck_verdict(code: int, out: str) -> tuple[bool, str]:
    """``e2fsck -fn``'s exit code and output as (sound, evidence)."""
    if code == 0:
        return True, "e2fsck -fn: clean"
    problems, previous = [], ""
    for line in (raw.strip() for raw in out.splitlines()):
        if line.endswith("? no"):  # "Fix? no" on its own line answers the line before it
            problems.append(previous if line.count(" ") <= 1 else line)
        elif line:
            previous = line
    if code == 4 and problems and all(p.startswith(BENIGN) for p in problems):
        return True, "e2fsck -fn: clean apart from the superblock's free counters"
    return False, f"e2fsck -fn exited {code}: {_tail(out)}"


def _xfs_repair(dev: str, work: Path) -> tuple[bool, str]:
    proc = _run(["xfs_repair", "-n", dev])
    if proc.returncode != 0 and "log" in proc.stderr.lower():
        mnt = work / "xfs-log"  # replay the log into the overlay, as a boot would
        mnt.mkdir(exist_ok=True)
        if _run(["mount", "-t", "xfs", dev, str(mnt)]).returncode == 0:
            _run(["umount", str(mnt)])
        proc = _run(["xfs_repair", "-n", dev])
    if proc.returncode == 0:
        return True, "xfs_repair -n: clean"
    return False, f"xfs_repair -n exited {proc.returncode}: {_tail(proc.stdout + proc.stderr)}"


def _fsck_vfat(dev: str) -> tuple[bool, str]:
    proc = _run(["fsck.vfat", "-n", dev])
    if proc.returncode == 0:
        return True, "fsck.vfat -n: clean"
    return False, f"fsck.vfat -n exited {proc.returncode}: {_tail(proc.stdout + proc.stderr)}"


def _check_fs(export: Path, offset: int, size: int, fstype: str, work: Path) -> tuple[bool, str]:
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), str(export)],
        capture_output=True,
        text=True,
    )
    if loop.returncode != 0:
        raise VmkeepError(f"losetup {export}: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        failpoint("drill-fsck")  # the fault hook: killed with the export and loop device up
        if fstype in ("ext2", "ext3", "ext4"):
            return _e2fsck(dev)
        if fstype == "xfs":
            return _xfs_repair(dev, work)
        if fstype == "vfat":
            return _fsck_vfat(dev)
        return True, f"{fstype}: no checker in vmkeep, not checked"
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def check_disk(disk: str, overlay: Path, work: Path) -> list[Check]:
    """Every file system of one disk (whole disk or partitions), checked on its overlay."""
    export, pid = export_disk(overlay, work, writable=True, name=f"{disk}-fsck")
    try:
        parts = partitions(export)
        if parts:
            targets = [(f"{disk}p{p.number}", p.start, p.size, p.fstype) for p in parts]
        else:
            fstype = _blkid(export)
            targets = [(disk, 0, export.stat().st_size, fstype)]
        checks = []
        for label, offset, size, fstype in targets:
            if fstype is None:
                checks.append(Check(f"fsck {label}", True, "no file system found, not checked"))
                continue
            ok, detail = _check_fs(export, offset, size, fstype, work)
            checks.append(Check(f"fsck {label}", ok, f"{fstype}: {detail}"))
        return checks
    finally:
        stop_export(pid, export)


def _blkid(export: Path) -> str | None:
    proc = _run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(export)])
    return proc.stdout.strip() or None


# --- the drill -------------------------------------------------------------------------------------
def drill_name(vm_name: str, backup_id: int, seq: int) -> str:
    return f"{vm_name}-drill-{backup_id}-{seq}"


def remove_vm(ctx: Context, name: str) -> None:
    with contextlib.suppress(VmkeepError):
        ctx.hv.destroy(name)
        ctx.hv.undefine(name)


def _loops_under(work: Path) -> list[str]:
    """The loop devices whose backing file lies in ``work``."""
    proc = _run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"])
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    inside = f"{work}/"
    return [
        str(d["name"])
        for d in json.loads(proc.stdout).get("loopdevices", [])
        if str(d.get("back-file") or "").startswith(inside)
    ]


def exports_under(work: Path) -> list[int]:
    """The qemu-storage-daemon processes serving a file of ``work``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"qemu-storage-daemon") and f"{work}/".encode() in b" ".join(argv):
            found.append(int(proc.name))
    return found


def _mounts_under(work: Path) -> list[str]:
    """The mount points (a FUSE export is one) inside ``work``."""
    inside = f"{work}/"
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 1:
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
            if where.startswith(inside):
                points.append(where)
    return points


def clear_work(work: Path) -> None:
    """Remove a drill's work folder with what a killed drill left in it: the file-system
    check's loop devices, its qemu-storage-daemon exports (FUSE mounts on files of the folder,
    which ``rmtree`` cannot remove) and their processes."""
    if not work.exists():
        return
    for dev in _loops_under(work):
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    exports = exports_under(work)
    for pid in exports:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # it flushes and unmounts its export
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in exports) and time.monotonic() < deadline:
        time.sleep(0.05)
    for mountpoint in _mounts_under(work):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


def _isolated_xml(xml: str, name: str, overlays: dict[str, Path], work: Path, seq: int) -> str:
    """The point's domain as a new VM without NICs, on the overlays, marked as a drill."""
    rewritten, _left_out = new_domain_xml(xml, name, overlays, work, no_nic=True, no_ip=False)
    return with_description(rewritten, f"{MARK} (point {seq}); removed when the drill ends")


def _clear_leftover(ctx: Context, name: str) -> None:
    """A drill VM of the same point left by a killed drill is removed (never another domain)."""
    try:
        xml = ctx.hv.domain_xml(name)
    except VmkeepError:
        return
    if MARK in description(xml):
        remove_vm(ctx, name)


def boot_check(ctx: Context, name: str, timeout: float) -> Check:
    t0 = time.monotonic()
    ctx.hv.start(name)
    while time.monotonic() - t0 < timeout:
        if ctx.hv.guest_ping(name, 5):
            return Check(
                "boot", True, f"guest agent answered {time.monotonic() - t0:.1f} s after start"
            )
        time.sleep(1)
    return Check("boot", False, f"the guest agent did not answer within {timeout:.0f} s of start")


def probe_check(ctx: Context, name: str, command: str) -> Check:
    try:
        res = ctx.hv.guest_exec(name, ["/bin/sh", "-c", command], PROBE_TIMEOUT)
    except HypervisorError as err:
        return Check("probe", False, f"{command!r} could not run: {err}")
    out = _tail(f"{res.stdout}\n{res.stderr}", 500)
    return Check("probe", res.exit_code == 0, f"{command!r} exited {res.exit_code}: {out}")


def _check_reachable(ctx: Context, images: list[Path], own: Path | None) -> None:
    """QEMU (an unprivileged user) reads the backup files through the overlays: their folders
    up to ``own`` (vmkeep's: the drill's work folder, a ``dir`` datastore's) are opened to its
    group (``hypervisor/reach.py``); say so before any work when a folder on the way still keeps
    it out (a setup problem, not the point's)."""
    for image in images:
        blocked = open_to_qemu(image.resolve().parent, own, ctx.hv)
        if blocked is not None:
            raise VmkeepError(
                f"QEMU cannot reach the backup file {image}: {unreachable_why(blocked, ctx.hv)}"
            )


@dataclass
class PointFiles:
    """What a drill needs of one restore point, read from the catalog."""

    backup_id: int
    vm_name: str
    seq: int
    increment_id: int
    chain_key: str
    driver: DatastoreDriver
    disks: list[str]
    expected: dict[str, str]  # stored file name -> checksum
    xml_name: str  # the stored domain XML's file name


def point_files(ctx: Context, backup_id: int, increment: int | None) -> PointFiles:
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        target, chain = point(b, increment)
        expected = expected_digests(f for inc in chain for f in inc.files if f["disk"])
        xml_entry = next(f for f in target.files if f["disk"] is None and not f.get("memory"))
        expected[xml_entry["name"]] = row_digest(xml_entry)
        return PointFiles(
            backup_id,
            b.vm.name,
            target.seq,
            target.id,
            b.chain,
            driver_of(b.datastore),
            pick_disks(target, None),
            expected,
            xml_entry["name"],
        )


def stage(
    ctx: Context, pf: PointFiles, work: Path, checks: list[Check]
) -> tuple[str, dict[str, Path]]:
    """Steps 1 and 2 in ``work``: the point's files fetched and checked against their checksums,
    a throw-away overlay per disk, each file system checked on it. Appends each step's evidence
    to ``checks``; raises ``StepFailed`` at the first failed one. Returns the point's domain XML
    (as stored) and the overlays (disk -> file)."""
    local = pf.driver.restore(pf.chain_key, list(pf.expected), work / ".backing")
    try:
        verify_files(ctx, pf.backup_id, pf.chain_key, pf.expected, local)
    except VmkeepError as err:
        checks.append(Check("checksums", False, str(err)))
        raise StepFailed from err
    checks.append(Check("checksums", True, f"{len(pf.expected)} files match their checksums"))
    overlays = {d: work / f"{d}.qcow2" for d in pf.disks}
    _check_reachable(ctx, list(overlays.values()), ctx.config.data_dir)
    _check_reachable(
        ctx, [local[disk_file(pf.seq, d)] for d in pf.disks], local_folder(pf.driver, work)
    )
    for d, ov in overlays.items():
        make_overlay(local[disk_file(pf.seq, d)].resolve(), ov)
        checks += check_disk(d, ov, work)
        if not all(c.ok for c in checks):
            raise StepFailed
    return local[pf.xml_name].read_text(), overlays


def run_drill(
    ctx: Context,
    backup_id: int,
    increment: int | None = None,
    probe: str | None = None,
    boot_timeout: float = BOOT_TIMEOUT,
) -> tuple[dict[str, Any], Warnings]:
    """Boot the point in an isolated VM, check it (``probe``: a command in the guest), remove the
    VM; the verdict is recorded on the point. One drill of a point at a time: a second one is
    refused (``Locked``) instead of removing the first one's VM as a leftover."""
    pf = point_files(ctx, backup_id, increment)
    label = f"backup {backup_id} point {pf.seq}"
    with lock(ctx.catalog, f"drill:{backup_id}-{pf.seq}", "drill", label=label):
        return _drill(ctx, pf, probe, boot_timeout)


def _drill(
    ctx: Context, pf: PointFiles, probe: str | None, boot_timeout: float
) -> tuple[dict[str, Any], Warnings]:
    backup_id, seq, inc_id = pf.backup_id, pf.seq, pf.increment_id
    name = drill_name(pf.vm_name, backup_id, seq)
    work = ctx.config.data_dir / "drills" / name
    _clear_leftover(ctx, name)
    clear_work(work)  # a killed drill's files, exports and loop devices
    work.mkdir(parents=True)
    started = datetime.now(UTC)
    checks: list[Check] = []
    try:
        try:
            stored, overlays = stage(ctx, pf, work, checks)
            xml = _isolated_xml(stored, name, overlays, work, seq)
            own = [*overlays.values(), work]
            check_stored_xml(ctx.config, xml, f"drill of backup {backup_id}", own)
            ctx.hv.define(xml)
            checks.append(boot_check(ctx, name, boot_timeout))
            if not checks[-1].ok:
                raise StepFailed
            if probe is not None:
                checks.append(probe_check(ctx, name, probe))
        except StepFailed:
            pass
    finally:
        remove_vm(ctx, name)
        clear_work(work)
    failed = next((c for c in checks if not c.ok), None)
    result = "FAIL" if failed else "PASS"
    reason = f"{failed.step}: {failed.detail}" if failed else None
    row = Drill(
        increment_id=inc_id,
        result=result,
        reason=reason,
        probe=probe,
        checks=[asdict(c) for c in checks],
        started_at=started,
        finished_at=datetime.now(UTC),
    )
    with ctx.catalog.session() as s:
        s.add(row)
        s.flush()
        out = drill_dict(row)
    return {"backup": backup_id, "increment": seq, **out}, Warnings()


def check_passed(result: dict[str, Any]) -> None:
    """A FAIL verdict as an error (exit 26, a FAILED job), for every adapter."""
    if result["result"] != "PASS":
        raise DrillFailed(result["drill"], result["backup"], result["increment"], result["reason"])


def drill_dict(d: Drill) -> dict[str, Any]:
    return {
        "drill": d.id,
        "result": d.result,
        "reason": d.reason,
        "probe": d.probe,
        "checks": d.checks,
        "started": d.started_at,
        "finished": d.finished_at,
    }
