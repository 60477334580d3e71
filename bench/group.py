"""Group freeze-window benchmark: one VM vs three (ordered and --parallel-freeze), same run.

    .venv/bin/python bench/group.py [--rounds 5]

For each case the freeze window is what vmkeep stores (first freeze -> last thaw). The
guest-visible write stall is measured inside every member: a loop appends /proc/uptime to a
file on the frozen file system, and the longest gap between two appends during the backup is the
stall the application saw (minus the loop's normal gap, measured without a backup).

Target: 3 VMs without order constraint <= 1.5 x one VM's window.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import spread, workspace  # bench/ is on sys.path when run as a script
from vmkeep.hypervisor import connect
from vmkeep.lab import Lab

LAB_DIR = Path("/var/lib/vmkeep/lab")
PREFIX = "vmkeep-bench-g"
# 20 ms between appends: fine enough to see a stall, light enough not to starve TCG guests
LOOP = "while :; do cat /proc/uptime >> /mnt/vda/stall; usleep 20000; done"


def vk(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "vmkeep.cli.main", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode not in (0, 1):
        sys.exit(f"vmkeep {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def start_loops(lab: Lab, vms: list[str]) -> None:
    for vm in vms:
        lab.sh(vm, f"rm -f /mnt/vda/stall; ({LOOP}) >/dev/null 2>&1 & echo $! > /run/stall.pid")


def stop_loops(lab: Lab, vms: list[str], since: dict[str, float]) -> dict[str, float]:
    """Longest gap (ms) between two appends after ``since`` (the guest's uptime) per VM."""
    gaps = {}
    for vm in vms:
        lab.sh(vm, "kill $(cat /run/stall.pid)")
        stamps = [
            float(line.split()[0]) for line in lab.sh(vm, "cat /mnt/vda/stall").split("\n") if line
        ]
        inside = [t for t in stamps if t >= since[vm]] or stamps
        gaps[vm] = max((b - a for a, b in zip(inside, inside[1:], strict=False)), default=0) * 1000
    return gaps


def uptime(lab: Lab, vm: str) -> float:
    return float(lab.sh(vm, "cat /proc/uptime").split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    work, env = workspace()
    lab = Lab(connect("qemu:///system"), LAB_DIR, prefix=PREFIX)
    lab.down()
    vms = [f"{PREFIX}{i}" for i in (1, 2, 3)]
    try:
        for vm in vms:
            lab.create(vm, [256 << 20])
            lab.write_random(vm, "/mnt/vda/data", 64)
            vk(env, "vm", "import", vm)
            vk(env, "vm", "config", vm, "--mode", "increment")
        vk(env, "datastore", "add", "ds", "--path", str(work / "ds"))
        vk(env, "group", "create", "one", vms[0])
        vk(env, "group", "create", "three", *vms)
        # the loop's normal gap, no backup running
        t_from = {vm: uptime(lab, vm) for vm in vms}
        start_loops(lab, vms)
        time.sleep(3)
        idle = stop_loops(lab, vms, t_from)
        cases = {
            "1 VM": ("one", []),
            "3 VMs ordered": ("three", []),
            "3 VMs --parallel-freeze": ("three", ["--parallel-freeze"]),
        }
        results: dict[str, dict[str, list[float]]] = {}
        breakdown: dict[str, dict[str, list[float]]] = {}
        for label, (group, extra) in cases.items():
            members = vms[:1] if group == "one" else vms
            res = results.setdefault(label, {"window": [], "stall": []})
            parts = breakdown.setdefault(label, {})
            vk(env, "group", "backup", group, "-d", "ds", *extra)  # warm-up; chains exist
            for _ in range(args.rounds):
                start_loops(lab, members)
                since = {vm: uptime(lab, vm) for vm in members}
                time.sleep(0.5)
                out = json.loads(vk(env, "group", "backup", group, "-d", "ds", "--json", *extra))
                time.sleep(0.5)
                gaps = stop_loops(lab, members, since)
                res["window"].append(out["freeze_window_ms"])
                for member in out["steps_ms"].values():  # each member's freeze, begin, thaw
                    for step in ("freeze", "begin", "thaw"):
                        parts.setdefault(step, []).append(member.get(step, 0))
                res["stall"].append(max(gaps[vm] - idle[vm] for vm in members))
        one = statistics.median(results["1 VM"]["window"])
        print(f"{'case':<26}{'window ms':>10}{'ratio':>8}{'stall ms':>10}   target")
        for label, res in results.items():
            w = statistics.median(res["window"])
            s = statistics.median(res["stall"])
            target = "<= 1.5x" if "parallel" in label else ""
            met = "" if not target else (" met" if w / one <= 1.5 else " NOT met")
            print(f"{label:<26}{w:>10.1f}{w / one:>7.2f}x{s:>10.1f}   {target}{met}")
        print(f"(median of {args.rounds} rounds; loop's idle gap {max(idle.values()):.1f} ms)")
        print("\nper member, ms, min / median / max over members and rounds:")
        for label, parts in breakdown.items():
            cells = [f"{k} {spread(v)}" for k, v in parts.items()]
            print(f"  {label}: " + "; ".join(cells))
    finally:
        lab.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
