"""Instant restore: time from the command to an answering guest agent, against the same lab VM's
plain boot, for a 4 GiB and a 64 GiB virtual disk holding the same data. Target (issue 12): <= 2x.

    .venv/bin/python bench/instant.py [--data-mib 1024] [--rounds 3]

Per round: plain boot = ``virsh start`` of the powered-off lab VM until its agent answers;
instant = ``vmkeep restore ID --instant`` (a dir datastore) until the new VM's agent answers
(its copy goes on afterwards; the command's own end is reported too). Cold = page cache dropped
before each timed command. Ratios min / median / max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import PREFIX, VK, drop_caches, lab_workspace, runner, spread  # bench/ on sys.path


def wait_agent(hv, name: str, t0: float, timeout: float = 300) -> float:  # type: ignore[no-untyped-def]
    while time.perf_counter() - t0 < timeout:
        try:
            if hv.guest_ping(name, 1):
                return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 (the domain may not exist yet)
            pass
        time.sleep(0.05)
    sys.exit(f"{name}: no agent within {timeout} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work, env, lab = lab_workspace()
    hv = lab.hv
    vmkeep = runner(env)
    pop = work / "pop"
    pop.mkdir()
    with open(pop / "data.bin", "wb") as f:
        for _ in range(args.data_mib):
            f.write(os.urandom(1 << 20))

    ratios: dict[str, list[float]] = {}
    raw: list[str] = []
    try:
        vmkeep("datastore", "add", "ds", "--path", str(work / "ds"))
        for gib in (4, 64):
            name = f"{PREFIX}{gib}g"
            lab.create(name, [gib << 30], populate=pop)
            vmkeep("vm", "import", name)
            bid = str(json.loads(vmkeep("backup", name, "-d", "ds", "--json"))["id"])
            for rnd in range(args.rounds):
                for cold in (False, True):
                    tag = "cold" if cold else "warm"
                    hv.destroy(name)
                    if cold:
                        drop_caches()
                    t0 = time.perf_counter()
                    hv.start(name)
                    boot = wait_agent(hv, name, t0)
                    new = f"{PREFIX}i{gib}-{rnd}-{tag}"
                    if cold:
                        drop_caches()
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(
                        [*VK, "restore", bid, "--instant", "--name", new,
                         "--path", str(work / new)],
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                    )  # fmt: skip
                    answer = wait_agent(hv, new, t0)
                    _, err = proc.communicate()
                    done = time.perf_counter() - t0
                    if proc.returncode not in (0, 1):
                        sys.exit(f"instant restore failed: {err}")
                    ratios.setdefault(f"{gib} GiB, {tag}", []).append(answer / boot)
                    raw.append(
                        f"{gib} GiB {tag}: plain boot {boot:.2f} s, instant restore answers "
                        f"after {answer:.2f} s, its copy done after {done:.2f} s"
                    )
                    lab.remove(new)
            lab.remove(name)
        print()
        print(f"{'instant restore to agent / plain boot':<40} {'min / median / max':>20}  target")
        for label, values in ratios.items():
            print(f"{label:<40} {spread(values):>20}  <= 2.0")
        print()
        for line in raw:
            print(line)
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
