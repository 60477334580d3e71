"""Memory state: the guest's downtime during a backup that saves its RAM (BACKUP_CONFIG memory),
on a lab VM with 256 MiB of RAM of which --fill-mib hold random data (tmpfs), against the same VM
in the same run:

* a suspend-mode backup without memory (what the disks alone cost), and
* stoney's / ``virsh save`` + ``virsh restore`` (the classic way to keep a guest's memory: the
  guest is stopped for the whole save and restore).

    .venv/bin/python bench/memory.py [--rounds 3] [--fill-mib 128]

Downtime = the time the guest's vCPUs were paused (vmkeep records it per increment). Cold = page
cache dropped before each timed command. Target (issue 12): <= 1 s for a 256 MiB guest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time

from common import PREFIX, drop_caches, lab_workspace, runner, spread  # bench/ is on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fill-mib", type=int, default=64)
    args = ap.parse_args()
    work, env, lab = lab_workspace()
    hv = lab.hv
    vmkeep = runner(env)
    name = f"{PREFIX}mem"

    def backup_downtime() -> tuple[float, int]:
        res = json.loads(vmkeep("backup", name, "-d", "ds", "--reset", "--json"))
        inc = res["increments"][-1]
        size = sum(f["size"] for f in inc["files"] if f.get("memory"))
        return float(inc["freeze_ms"]), size

    rows: dict[str, list[float]] = {}
    sizes: list[int] = []
    try:
        lab.create(name, [1 << 30], memory_mib=256)
        lab.sh(
            name, f"dd if=/dev/urandom of=/tmp/fill bs=1048576 count={args.fill_mib} 2>/dev/null"
        )
        lab.write_random(name, "/mnt/vda/data", 256)
        vmkeep("datastore", "add", "ds", "--path", str(work / "ds"))
        vmkeep("vm", "import", name)
        vmkeep("vm", "config", name, "--keep-last", "1")
        state = work / "save.state"
        for _ in range(args.rounds):
            for cold in (False, True):
                tag = "cold" if cold else "warm"
                vmkeep("vm", "config", name, "--memory", "yes")
                if cold:
                    drop_caches()
                ms, size = backup_downtime()
                rows.setdefault(f"memory backup, {tag}", []).append(ms)
                sizes.append(size)
                vmkeep("vm", "config", name, "--memory", "no", "--fs-freeze", "suspend")
                if cold:
                    drop_caches()
                rows.setdefault(f"suspend backup, no memory, {tag}", []).append(
                    backup_downtime()[0]
                )
                if cold:
                    drop_caches()
                t0 = time.perf_counter()
                subprocess.run(["virsh", "-q", "save", name, str(state)], check=True,
                               capture_output=True)  # fmt: skip
                subprocess.run(["virsh", "-q", "restore", str(state)], check=True,
                               capture_output=True)  # fmt: skip
                rows.setdefault(f"virsh save + restore, {tag}", []).append(
                    (time.perf_counter() - t0) * 1000
                )
                state.unlink()
                while not hv.guest_ping(name, 2):  # resumed, not booted: no READY line
                    time.sleep(0.2)
        base = {t: statistics.median(rows[f"virsh save + restore, {t}"]) for t in ("warm", "cold")}
        print()
        print(f"{'guest downtime (ms)':<40} {'min / median / max':>24}  {'/ save+restore':>14}")
        for label, values in rows.items():
            ratio = statistics.median(values) / base[label.rsplit(", ", 1)[1]]
            print(f"{label:<40} {spread(values):>24}  {ratio:>14.2f}")
        print(f"\nmemory state file: {statistics.median(sizes) / (1 << 20):.0f} MiB (median); "
              "target: memory backup downtime <= 1000 ms")  # fmt: skip
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
