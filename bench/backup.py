"""Backup/restore benchmark: vmkeep against its baselines and peers, side by side in one run.

    .venv/bin/python bench/backup.py [--data-mib 1024] [--runs 3] [--peers] [--only warm|cold]

A running lab VM with --data-mib of random data in a 4 GiB qcow2. Every scenario runs --runs
times warm (the source in the page cache, which stands for fast NVMe) and cold (``sync; echo 3 >
/proc/sys/vm/drop_caches`` before each timed command); each run times vmkeep and its baseline
back to back, and the result is the ratio per run, printed as min / median / max. Raw seconds and
vmkeep's own per-step breakdown (``steps_ms`` of ``backup --json``) follow the table.

Baselines: ``qemu-img convert -O qcow2`` of the VM's disk, alone and followed by an fsync of its
output (a backup is durable when it finishes; QEMU's backup job and vmkeep flush, qemu-img does
not), libvirt's raw push backup job (``backupBegin`` and wait, no vmkeep code), and the QEMU job
inside the same vmkeep backup (its ``copy`` step: the time vmkeep adds around it, free of the
run-to-run swings of this machine's disk and memory). --peers adds
virtnbdbackup (``-l copy``, Debian's package) and restic 0.14 (``restic backup`` of the same disk
image into a local repository) on the same VM in the same run.

The CLI commands above run with ``VMKEEP_NO_DAEMON=1`` (each process loads what it needs and runs
the action itself, as without a daemon). Then, per run, a ``vmkeep daemon`` is started for the
``(daemon)`` rows: the same commands (restore of the same point, a full, an increment, ``backups
list``) as a user types them, which hand the action to the daemon over its socket and follow its
job; timed start to exit like the CLI rows. A raw push job is timed next to the daemon's full.

Order: within a run, the full and the raw push job it is compared with run back to back, and
which of the two goes first alternates from run to run (the page cache and this VM's memory
make whichever writes second measurably faster or slower, depending on the run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import libvirt

from common import (  # bench/ is on sys.path
    PREFIX,
    VK,
    daemon,
    drop_caches,
    fsync,
    lab_workspace,
    push_job,
    spread,
)
from vmkeep.cli.remote import UnixConnection

NAME = f"{PREFIX}4g"


class Bench:
    def __init__(self, work: Path, env: dict[str, str], cold: bool) -> None:
        self.work, self.env, self.cold = work, env, cold

    def timed(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
        if self.cold:
            drop_caches()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env or self.env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode not in (0, 1):  # 1: finished with warnings
            sys.exit(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr}")
        return dt, str(proc.stdout)

    def vmkeep(self, *args: str) -> tuple[float, dict]:  # type: ignore[type-arg]
        dt, out = self.timed([*VK, *args, "--json"])
        return dt, json.loads(out) if out.strip() else {}

    def convert(self, src: Path, *, sync: bool) -> float:
        out = self.work / "convert.qcow2"
        out.unlink(missing_ok=True)
        if self.cold:
            drop_caches()
        t0 = time.perf_counter()
        argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(src), str(out)]
        subprocess.run(argv, check=True)
        if sync:
            fsync(out)
        dt = time.perf_counter() - t0
        out.unlink()
        return dt

    def push_job(self, dom: libvirt.virDomain) -> float:
        """libvirt's push backup job alone: backupBegin to a new qcow2, wait for it."""
        target = self.work / "push.qcow2"
        target.unlink(missing_ok=True)
        if self.cold:
            drop_caches()
        t0 = time.perf_counter()
        push_job(dom, target)
        dt = time.perf_counter() - t0
        target.unlink()
        return dt


def api(env: dict[str, str], method: str, path: str, body: dict | None = None) -> dict:
    """The daemon's answer over its socket (the local socket needs no token)."""
    conn = UnixConnection(str(Path(env["VMKEEP_DATA_DIR"]) / "vmkeep.sock"), timeout=600)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status >= 400:
        sys.exit(f"{method} {path}: HTTP {resp.status}: {out}")
    return out


def through_daemon(env: dict[str, str], kind: str, took: tuple[float, dict]) -> tuple[float, dict]:
    """``took`` (a vmkeep command's time and JSON), checked to be the daemon's newest job."""
    job = api(env, "GET", "/v1/jobs")[0]
    if job["kind"] != kind or job["who"] != "@local" or job["state"] != "DONE":
        sys.exit(f"vmkeep {kind} did not run as the daemon's job: {job}")
    return took


def ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--change-mib", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers", action="store_true", help="also virtnbdbackup and restic")
    ap.add_argument("--only", choices=("warm", "cold"))
    args = ap.parse_args()
    if args.peers and not shutil.which("virtnbdbackup"):
        sys.exit("--peers needs virtnbdbackup: apt-get install virtnbdbackup")

    work, env_daemon, lab = lab_workspace()
    env = dict(env_daemon, VMKEEP_NO_DAEMON="1")  # the CLI rows: no daemon answers for them
    pop = work / "pop"
    pop.mkdir()
    block = os.urandom(1 << 20)
    with open(pop / "data.bin", "wb") as f:
        for i in range(args.data_mib):
            f.write(block[i % 251 :] + block[: i % 251])
    table: list[tuple[str, str, str, list[float]]] = []  # (mode, scenario, target, values)
    raw: dict[str, dict[str, list[float]]] = {}
    steps: dict[str, dict[str, list[int]]] = {}
    d_steps: dict[str, dict[str, list[int]]] = {}
    inc_steps: dict[str, dict[str, list[int]]] = {}
    try:
        lab.create(NAME, [4 << 30], populate=pop)
        shutil.rmtree(pop)
        disk = lab.vm_dir(NAME) / "disk0.qcow2"
        warm = Bench(work, env, cold=False)
        for a in (
            ("datastore", "add", "ds", "--path", str(work / "ds")),
            ("vm", "import", NAME),
            ("vm", "config", NAME, "--mode", "increment"),
        ):
            warm.vmkeep(*a)
        if args.peers:
            restic_repo = work / "restic"
            env_r = dict(env, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "rcache"))
            subprocess.run(["restic", "init", "-q", "-r", str(restic_repo)], env=env_r, check=True)
        dom = libvirt.open("qemu:///system").lookupByName(NAME)
        modes = [m for m in ("warm", "cold") if args.only in (None, m)]
        for mode in modes:
            b = Bench(work, env, cold=(mode == "cold"))
            t: dict[str, list[float]] = {k: [] for k in ("convert", "convert+fsync", "push", "full", "inc", "noop", "restore", "restore-convert", "version", "virtnbdbackup", "restic", "d-full", "d-push", "d-inc", "d-noop", "d-restore", "job", "d-job")}  # fmt: skip
            st: dict[str, list[int]] = {}
            d_st: dict[str, list[int]] = {}
            inc_st: dict[str, list[int]] = {}
            for run in range(args.runs):
                print(f"{mode} run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                t["noop"].append(b.timed([*VK, "backups", "list"])[0])
                t["version"].append(b.timed([*VK, "--version"])[0])
                t["convert"].append(b.convert(disk, sync=False))
                t["convert+fsync"].append(b.convert(disk, sync=True))
                if run % 2 == 0:
                    t["push"].append(b.push_job(dom))
                dt, res = b.vmkeep("backup", NAME, "-d", "ds", "--reset")
                t["full"].append(dt)
                t["job"].append(res["steps_ms"]["copy"] / 1000)
                if run % 2 == 1:
                    t["push"].append(b.push_job(dom))
                for k, v in res["steps_ms"].items():
                    st.setdefault(k, []).append(v)
                bid = res["id"]
                for k in range(3):
                    mib = args.change_mib if k == 0 else args.change_mib // 4
                    lab.write_random(NAME, "/mnt/vda/data.bin", mib, seek_mib=100 * (k + 1))
                    dt, res = b.vmkeep("backup", NAME, "-d", "ds")
                    if k == 0:
                        t["inc"].append(dt)
                        for step, v in res["steps_ms"].items():
                            inc_st.setdefault(step, []).append(v)
                chain_top = next((work / "ds").glob(f"*/{bid}")) / "3.vda.qcow2"
                t["restore-convert"].append(b.convert(chain_top, sync=False))
                dest = work / "restored.qcow2"
                argv = ["restore", str(bid), "--disk", "vda", "--path", str(dest), "--force"]
                t["restore"].append(b.vmkeep(*argv)[0])
                dest.unlink()
                if args.peers:
                    out = work / "vnb"
                    shutil.rmtree(out, ignore_errors=True)
                    argv = ["virtnbdbackup", "-d", NAME, "-l", "copy", "-o", str(out)]
                    t["virtnbdbackup"].append(b.timed(argv)[0])
                    shutil.rmtree(out)
                    argv = ["restic", "backup", "-q", "-r", str(restic_repo), str(disk)]
                    t["restic"].append(b.timed(argv, env=env_r)[0])
                with daemon(env_daemon):  # only for its own rows: its polls disturb no other
                    d = Bench(work, env_daemon, cold=b.cold)  # commands go through the daemon
                    t["d-noop"].append(d.timed([*VK, "backups", "list"])[0])
                    argv = ["restore", str(bid), "--disk", "vda", "--path", str(dest), "--force"]
                    t["d-restore"].append(through_daemon(env_daemon, "restore", d.vmkeep(*argv))[0])
                    dest.unlink()
                    if run % 2 == 0:
                        t["d-push"].append(b.push_job(dom))
                    dt, res = through_daemon(env_daemon, "backup", d.vmkeep("backup", NAME, "-d", "ds", "--reset"))  # fmt: skip
                    t["d-full"].append(dt)
                    t["d-job"].append(res["steps_ms"]["copy"] / 1000)
                    for k, v in res["steps_ms"].items():
                        d_st.setdefault(k, []).append(v)
                    if run % 2 == 1:
                        t["d-push"].append(b.push_job(dom))
                    lab.write_random(NAME, "/mnt/vda/data.bin", args.change_mib, seek_mib=500)
                    dt, res = through_daemon(env_daemon, "backup", d.vmkeep("backup", NAME, "-d", "ds"))  # fmt: skip
                    t["d-inc"].append(dt)
                for chain in (bid, res["id"]):
                    vmkeep_rm = [*VK, "backups", "delete", str(chain)]
                    subprocess.run(vmkeep_rm, env=env, capture_output=True, check=False)
            raw[mode], steps[mode], d_steps[mode], inc_steps[mode] = t, st, d_st, inc_st
            noop, d_noop = statistics.median(t["noop"]), statistics.median(t["d-noop"])
            net = [max(x - noop, 1e-3) for x in t["full"]]
            rows: list[tuple[str, str, list[float]]] = [
                ("full / qemu-img convert", "<= 1.0 cold, <= 2 warm", ratios(t["full"], t["convert"])),
                ("full / convert + fsync", "", ratios(t["full"], t["convert+fsync"])),
                ("full / raw libvirt push job", "<= 1.1", ratios(t["full"], t["push"])),
                ("full / its own QEMU job (copy step)", "", ratios(t["full"], t["job"])),
                ("push job / qemu-img convert", "(QEMU's own limit)", ratios(t["push"], t["convert"])),
                (f"incremental ({args.change_mib} MiB) / full, net of no-op", "<= 0.08",
                 ratios([max(x - noop, 0.0) for x in t["inc"]], net)),
                ("restore full+3 inc / qemu-img convert", "<= 1.5", ratios(t["restore"], t["restore-convert"])),
                ("no-op command (backups list), s", "<= 0.25", t["noop"]),
                ("vmkeep --version, s", "<= 0.15", t["version"]),
                ("(daemon) full / raw libvirt push job", "<= 1.1", ratios(t["d-full"], t["d-push"])),
                ("(daemon) full / its own QEMU job (copy step)", "", ratios(t["d-full"], t["d-job"])),
                ("(daemon) full / qemu-img convert", "<= 1.0 cold, <= 2 warm", ratios(t["d-full"], t["convert"])),
                (f"(daemon) incremental ({args.change_mib} MiB) / full, net of no-op", "<= 0.08",
                 ratios([max(x - d_noop, 0.0) for x in t["d-inc"]], [max(x - d_noop, 1e-3) for x in t["d-full"]])),
                ("(daemon) restore full+3 inc / qemu-img convert", "<= 1.5", ratios(t["d-restore"], t["restore-convert"])),
                ("(daemon) no-op command (backups list), s", "<= 0.25", t["d-noop"]),
            ]  # fmt: skip
            if args.peers:
                rows.insert(3, ("full / virtnbdbackup", "<= 0.5", ratios(t["full"], t["virtnbdbackup"])))  # fmt: skip
                rows.insert(4, ("full / restic backup of the image", "", ratios(t["full"], t["restic"])))  # fmt: skip
            table += [(mode, label, target, values) for label, target, values in rows]
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.data_mib} MiB of data in a 4 GiB qcow2, running VM, {args.runs} runs per mode")
    print(f"{'mode':<5} {'scenario':<46} {'min / median / max':<20} target")
    for mode, label, target, values in table:
        print(f"{mode:<5} {label:<46} {spread(values):<20} {target}")
    print("\nraw seconds, median (min-max):")
    for mode, t in raw.items():
        cells = [f"{k} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in t.items() if v]  # fmt: skip
        print(f"  {mode}: " + "; ".join(cells))
    for what, table_ in (
        ("full backup", steps),
        ("full backup (daemon)", d_steps),
        (f"incremental ({args.change_mib} MiB)", inc_steps),
    ):
        print(f"\nvmkeep {what}, per step, median ms (backup --json steps_ms):")
        for mode, st in table_.items():
            cells = ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in st.items())
            print(f"  {mode}: {cells} (sum {sum(statistics.median(v) for v in st.values()):.0f})")


if __name__ == "__main__":
    main()
