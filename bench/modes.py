"""QEMU's ways to copy a running VM's disk for a full backup, side by side in one run (issue 13).

    apt-get install libnbd-bin                   # nbdcopy
    .venv/bin/python bench/modes.py [--data-mib 1024] [--runs 3]

A running lab VM with --data-mib of random data in a 4 GiB qcow2. No vmkeep code runs in the
timed part: this measures the data paths vmkeep could build a full on, warm (the source in the
page cache) and cold (``sync; echo 3 > /proc/sys/vm/drop_caches`` before each), each run timing
every way back to back in an order that rotates from run to run, printed as ratios to the push
job vmkeep uses (min / median / max):

- push, new target: ``backupBegin`` in push mode, libvirt creates the qcow2 (the libvirt default);
- push, pre-created target (``REUSE_EXTERNAL``, what vmkeep does: the target is made before the
  freeze), default 64 KiB clusters, and with 2 MiB clusters;
- pull + ``qemu-img convert -m 8 -W``: ``backupBegin`` in pull mode (an NBD export on a Unix
  socket, a scratch file for copy-before-write) read into a qcow2 by qemu-img with 8 coroutines,
  out of order; then the job is aborted, as a pull backup ends;
- pull + ``nbdcopy``: the same export copied by libnbd's nbdcopy into a qcow2 served by qemu-nbd;
- ``qemu-img convert`` of the disk image (no job, no guest: the storage's speed).

Every target is fsynced before the clock stops (a backup is durable when it ends; the push job
flushes its target itself); the output's allocated size is checked to hold the data (sparse, not
the 4 GiB virtual size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from common import (  # bench/ is on sys.path
    PREFIX,
    drop_caches,
    fsync,
    lab_workspace,
    push_job,
    spread,
    wait_no_job,
)

NAME = f"{PREFIX}modes"
SIZE = 4 << 30


class Modes:
    def __init__(self, work: Path, dom: libvirt.virDomain, data_mib: int) -> None:
        self.work, self.dom, self.data_mib = work, dom, data_mib
        self.out = work / "out.qcow2"

    def _checked(self, t0: float) -> float:
        fsync(self.out)
        dt = time.perf_counter() - t0
        allocated = self.out.stat().st_blocks * 512 >> 20
        if not self.data_mib <= allocated < self.data_mib + 256:
            sys.exit(f"{self.out}: {allocated} MiB allocated for {self.data_mib} MiB of data")
        self.out.unlink()
        return dt

    def push(self, cluster: str | None) -> float:
        """Push mode; ``cluster``: pre-create the target with this cluster size (REUSE_EXTERNAL)."""
        self.out.unlink(missing_ok=True)
        flags = 0
        if cluster is not None:
            opts = f"compat=1.1,cluster_size={cluster}"
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(self.out), str(SIZE)]
            subprocess.run(argv, check=True)
            flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
        t0 = time.perf_counter()
        push_job(self.dom, self.out, flags)
        return self._checked(t0)

    def pull(self, reader: str) -> float:
        run = self.work / "pull"  # QEMU (an unprivileged user) binds the export's socket here
        run.mkdir(mode=0o1777, exist_ok=True)
        run.chmod(0o1777)
        sock, scratch = run / "nbd.sock", run / "scratch.qcow2"
        for p in (sock, scratch, self.out):
            p.unlink(missing_ok=True)
        xml = (
            f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
            "<disk name='vda' backup='yes' type='file'>"
            f"<scratch file='{scratch}'/><driver type='qcow2'/></disk></disks></domainbackup>"
        )
        uri = f"nbd+unix:///vda?socket={sock}"
        t0 = time.perf_counter()
        self.dom.backupBegin(xml, None, 0)
        try:
            if reader == "convert":
                argv = ["qemu-img", "convert", "-m", "8", "-W", "-f", "raw", "-O", "qcow2"]
                subprocess.run([*argv, uri, str(self.out)], check=True)
            else:
                make = ["qemu-img", "create", "-q", "-f", "qcow2", str(self.out), str(SIZE)]
                subprocess.run(make, check=True)
                served = ["qemu-nbd", "-f", "qcow2", "--cache=unsafe", str(self.out)]
                argv = ["nbdcopy", "--destination-is-zero", uri, "--", "[", *served, "]"]
                subprocess.run(argv, check=True)
        finally:
            self.dom.abortJob()  # a pull backup ends when its reader is done
            wait_no_job(self.dom)
        dt = self._checked(t0)
        scratch.unlink(missing_ok=True)
        return dt

    def convert(self, disk: Path) -> float:
        self.out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(disk), str(self.out)]
        subprocess.run(argv, check=True)
        return self._checked(t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not shutil.which("nbdcopy"):
        sys.exit("bench/modes.py needs nbdcopy: apt-get install libnbd-bin")
    work, _env, lab = lab_workspace()
    pop = work / "pop"
    pop.mkdir()
    with open(pop / "data.bin", "wb") as f:
        for _ in range(args.data_mib):
            f.write(os.urandom(1 << 20))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        lab.create(NAME, [SIZE], populate=pop)
        shutil.rmtree(pop)
        disk = lab.vm_dir(NAME) / "disk0.qcow2"
        m = Modes(work, libvirt.open("qemu:///system").lookupByName(NAME), args.data_mib)
        ways: dict[str, Callable[[], float]] = {
            "push, new target (libvirt's default)": lambda: m.push(None),
            "push, pre-created target (vmkeep's)": lambda: m.push("64k"),
            "push, pre-created, 2 MiB clusters": lambda: m.push("2M"),
            "pull + qemu-img convert -m 8 -W": lambda: m.pull("convert"),
            "pull + nbdcopy into qemu-nbd": lambda: m.pull("nbdcopy"),
            "qemu-img convert of the image": lambda: m.convert(disk),
        }
        names = list(ways)
        for mode in ("warm", "cold"):
            t: dict[str, list[float]] = {n: [] for n in names}
            for run in range(args.runs):
                print(f"{mode} run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                k = run % len(names)
                for name in names[k:] + names[:k]:  # the order rotates from run to run
                    if mode == "cold":
                        drop_caches()
                    t[name].append(ways[name]())
            results[mode] = t
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    base = "push, pre-created target (vmkeep's)"
    print(f"\n{args.data_mib} MiB of data in a 4 GiB qcow2, running VM, {args.runs} runs per mode")
    print(f"{'mode':<5} {'way / ' + base:<62} {'min / median / max':<20} seconds (median)")
    for mode, t in results.items():
        for name in names:
            ratio = [a / b for a, b in zip(t[name], t[base], strict=True)]
            print(f"{mode:<5} {name:<62} {spread(ratio):<20} {statistics.median(t[name]):.2f}")


if __name__ == "__main__":
    main()
