"""Off-host datastores: vmkeep vs the plain tool on the same image, side by side in one run.

    .venv/bin/python bench/offhost.py [--data-mib 1024] [--rounds 3]

A running lab VM with ``--data-mib`` of data in a 4 GiB qcow2. Each round, warm and cold
(``echo 3 > /proc/sys/vm/drop_caches`` before each timed command):
  vmkeep full backup to restic (local repository)  / plain ``restic backup`` of the VM's disk image
  vmkeep full backup to rsync (real sshd, loopback) / plain ``rsync -aS -e ssh`` of the disk image
and once: repository growth of a second full of the unchanged VM / the first full's data.
Targets (issue 10): <= 1.2 x, <= 1.2 x, <= 5 %. Ratios are printed as min / median / max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import drop_caches, spread, workspace  # bench/ is on sys.path as a script
from vmkeep.hypervisor import connect
from vmkeep.lab import Lab
from vmkeep.lab.sshd import Sshd

LAB_DIR = Path("/var/lib/vmkeep/lab")
PREFIX = "vmkeep-bench-"


def timed(argv: list[str], env: dict[str, str], cold: bool) -> tuple[float, str]:
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dt, proc.stdout


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work, env = workspace()
    vk = [sys.executable, "-m", "vmkeep.cli.main"]
    lab = Lab(connect("qemu:///system"), LAB_DIR, prefix=PREFIX)
    lab.down()
    pop = work / "pop"
    pop.mkdir()
    with open(pop / "data.bin", "wb") as f:
        for _ in range(args.data_mib):
            f.write(os.urandom(1 << 20))
    password = work / "restic.pass"
    password.write_text(os.urandom(16).hex())
    renv = dict(env, RESTIC_PASSWORD_FILE=str(password), RESTIC_CACHE_DIR=str(work / "cache"))
    sshd = Sshd(work / "sshd").start()
    ssh = (
        f"ssh -p {sshd.port} -i {sshd.client_key} -o BatchMode=yes "
        f"-o UserKnownHostsFile={sshd.known_hosts} -o StrictHostKeyChecking=yes"
    )
    ratios: dict[str, list[float]] = {}
    raw: list[str] = []
    try:
        name = f"{PREFIX}off"
        lab.create(name, [4 << 30], populate=pop)
        disk = lab.vm_dir(name) / "disk0.qcow2"

        def vmkeep(*a: str) -> None:
            subprocess.run([*vk, *a], env=env, check=True, capture_output=True)

        vmkeep("vm", "import", name)
        for rnd in range(args.rounds):
            for cold in (False, True):
                tag = "cold" if cold else "warm"
                # restic: vmkeep into a fresh repository, then plain restic of the same image
                repo = work / f"repo-{rnd}-{tag}"
                ds = f"r{rnd}{tag}"
                vmkeep("datastore", "add", ds, "--driver", "restic", "--opt", f"repo={repo}",
                       "--opt", f"password_file={password}", "--opt", "init=yes")  # fmt: skip
                t_vk, out = timed([*vk, "backup", name, "-d", ds, "--reset", "--json"], env, cold)
                plain_repo = work / f"plain-{rnd}-{tag}"
                subprocess.run(
                    ["restic", "init", "-q", "--repository-version", "2", "-r", str(plain_repo)],
                    env=renv,
                    check=True,
                )
                t_plain, _ = timed(
                    ["restic", "-q", "-r", str(plain_repo), "backup", str(disk)], renv, cold
                )
                ratios.setdefault(f"restic full / restic backup, {tag}", []).append(t_vk / t_plain)
                raw.append(f"restic {tag}: vmkeep {t_vk:.2f} s, plain {t_plain:.2f} s")
                if rnd == 0 and not cold:
                    data = json.loads(out)["increments"][0]["size"]
                    first = du(repo)
                    vmkeep("backup", name, "-d", ds, "--reset")
                    growth = (du(repo) - first) / data
                    raw.append(f"restic repository: first full {first / 2**20:.0f} MiB, "
                               f"second unchanged full +{growth * 100:.2f} %")  # fmt: skip
                    ratios["restic second full growth / data"] = [growth]
                shutil.rmtree(repo, ignore_errors=True)
                shutil.rmtree(plain_repo, ignore_errors=True)
                # rsync over a real sshd on loopback
                remote = work / f"remote-{rnd}-{tag}"
                ds = f"s{rnd}{tag}"
                vmkeep("datastore", "add", ds, "--driver", "rsync", "--opt", f"host={sshd.host}",
                       "--opt", f"port={sshd.port}", "--opt", f"path={remote}",
                       "--opt", f"identity={sshd.client_key}",
                       "--opt", f"known_hosts={sshd.known_hosts}")  # fmt: skip
                t_vk, _ = timed([*vk, "backup", name, "-d", ds, "--reset"], env, cold)
                plain_dir = work / f"plain-rsync-{rnd}-{tag}"
                plain_dir.mkdir()
                t_plain, _ = timed(
                    ["rsync", "-aS", "-e", ssh, str(disk), f"root@{sshd.host}:{plain_dir}/"],
                    env,
                    cold,
                )
                ratios.setdefault(f"rsync full / rsync -aS, {tag}", []).append(t_vk / t_plain)
                raw.append(f"rsync {tag}: vmkeep {t_vk:.2f} s, plain {t_plain:.2f} s")
                shutil.rmtree(remote, ignore_errors=True)
                shutil.rmtree(plain_dir, ignore_errors=True)
        print()
        print(f"{'scenario (min / median / max)':<44} {'ratio':>20}  target")
        targets = {"restic second": "<= 0.05"}
        for label, values in ratios.items():
            target = next((t for k, t in targets.items() if label.startswith(k)), "<= 1.2")
            print(f"{label:<44} {spread(values):>20}  {target}")
        print()
        for line in raw:
            print(line)
    finally:
        lab.down()
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
