"""Backup/restore benchmark: vmkeep vs ``qemu-img convert`` measured side by side in one run.

    .venv/bin/python bench/backup.py [--data-mib 1024]

Scenarios (targets in DESIGN.md):
  full backup, 4 GiB qcow2 with 1 GiB data, running VM      <= 1.2 x qemu-img convert -O qcow2
  same data in a 64 GiB disk                                 <= 1.1 x the 4 GiB time
  incremental after writing 1 % of the disk                  <= 8 % of the full (both net of no-op)
  no-op command (vmkeep backups list)                        <= 0.5 s
  restore full + 3 increments to a new qcow2                 <= 1.5 x qemu-img convert; sparse
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

from common import PREFIX, VK, lab_workspace  # bench/ is on sys.path when run as a script


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return dt, proc.stdout


def best(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--change-mib", type=int, default=40)
    args = ap.parse_args()

    work, env, lab = lab_workspace()
    vk = VK
    pop = work / "pop"
    pop.mkdir()
    block = os.urandom(1 << 20)
    with open(pop / "data.bin", "wb") as f:
        for i in range(args.data_mib):
            f.write(block[i % 251 :] + block[: i % 251])
    rows: list[tuple[str, float, float, str, str]] = []
    try:
        subprocess.run(
            [*vk, "datastore", "add", "ds", "--path", str(work / "ds")],
            env=env,
            check=True,
            capture_output=True,
        )
        noop = best(5, lambda: timed([*vk, "backups", "list"], env)[0])
        results: dict[str, float] = {}
        for size_gib in (4, 64):
            name = f"{PREFIX}{size_gib}g"
            lab.create(name, [size_gib << 30], populate=pop)
            subprocess.run([*vk, "vm", "import", name], env=env, check=True, capture_output=True)
            subprocess.run(
                [*vk, "vm", "config", name, "--mode", "increment"],
                env=env,
                check=True,
                capture_output=True,
            )
            disk = lab.vm_dir(name) / "disk0.qcow2"
            out = work / f"convert-{size_gib}.qcow2"

            def run_convert(src: Path = disk, dst: Path = out) -> float:
                dst.unlink(missing_ok=True)
                argv = ["qemu-img", "convert", "-U", "-O", "qcow2", str(src), str(dst)]
                return timed(argv, env)[0]

            convert = best(2, run_convert)
            out.unlink(missing_ok=True)
            full, _ = timed([*vk, "backup", name, "-d", "ds"], env)
            results[f"full{size_gib}"] = full
            results[f"convert{size_gib}"] = convert
            if size_gib == 4:
                incs = []
                for k in range(3):
                    lab.write_random(
                        name,
                        "/mnt/vda/data.bin",
                        args.change_mib // 4 if k else args.change_mib,
                        seek_mib=100 * (k + 1),
                    )
                    dt, o = timed([*vk, "backup", name, "-d", "ds", "--json"], env)
                    incs.append((dt, json.loads(o)))
                inc_time, inc_json = incs[0]
                results["inc"] = inc_time
                results["inc_size"] = inc_json["increments"][1]["size"]
                bid = inc_json["id"]
                target = work / "restored.qcow2"
                restore, _ = timed(
                    [*vk, "restore", str(bid), "--disk", "vda", "--path", str(target), "--force"],
                    env,
                )
                results["restore"] = restore
                info = json.loads(
                    subprocess.run(
                        ["qemu-img", "info", "--output=json", str(target)],
                        capture_output=True,
                        text=True,
                    ).stdout
                )
                results["restored_alloc"] = info["actual-size"]
                results["restored_virtual"] = info["virtual-size"]
            lab.remove(name)
        rows = [
            ("no-op command (backups list)", noop, 0.5, "s", "<= 0.5 s"),
            (
                "full 4 GiB / qemu-img convert",
                results["full4"] / results["convert4"],
                1.2,
                "x",
                "<= 1.2",
            ),
            ("full 64 GiB / full 4 GiB", results["full64"] / results["full4"], 1.1, "x", "<= 1.1"),
            (
                f"incremental ({args.change_mib} MiB) / full, net of no-op",
                (results["inc"] - noop) / (results["full4"] - noop),
                0.08,
                "x",
                "<= 0.08",
            ),
            (
                "restore full+3 inc / qemu-img convert",
                results["restore"] / results["convert4"],
                1.5,
                "x",
                "<= 1.5",
            ),
        ]
        print()
        print(f"{'scenario':<48} {'value':>8}  target   ok")
        for label, value, limit, unit, target_text in rows:
            ok = "yes" if value <= limit else "NO"
            print(f"{label:<48} {value:>7.3f}{unit}  {target_text:<8} {ok}")
        print()
        print(
            f"raw seconds: qemu-img convert 4G {results['convert4']:.2f}, 64G {results['convert64']:.2f}; "
            f"vmkeep full 4G {results['full4']:.2f}, 64G {results['full64']:.2f}; incremental "
            f"{results['inc']:.2f} ({results['inc_size'] / 2**20:.1f} MiB stored); restore "
            f"{results['restore']:.2f}; no-op {noop:.3f}"
        )
        print(
            f"restored image: {results['restored_alloc'] / 2**20:.0f} MiB allocated of "
            f"{results['restored_virtual'] / 2**30:.0f} GiB virtual (sparse)"
        )
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
