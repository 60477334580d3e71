"""Catalog scale: list commands with 1,000 VMs and 10,000 increments in the catalog.

    .venv/bin/python bench/catalog.py [--vms 1000] [--increments 10] [--runs 5] [--postgres URL]

Fills a fresh catalog (SQLite in a temporary folder, or the PostgreSQL database --postgres names,
which is emptied first) through vmkeep's own tables: --vms VMs, one backup chain each with
--increments points (two files each: a disk and its domain XML), a few restore drills and group
points. Then times whole CLI commands (process start included), against a catalog with one VM
and one backup in the same run, each read by the command itself (``VMKEEP_NO_DAEMON=1``) and
answered by a running ``vmkeep daemon`` (``(daemon)`` rows):

    vmkeep vm list, vmkeep vm list --json, vmkeep backups list, vmkeep backups list --json,
    vmkeep backups show ID, vmkeep backups list --vm NAME

Target (issue 13): every list <= 0.5 s with 1,000 VMs and 10,000 increments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
import uuid
from datetime import UTC, datetime

from common import VK, daemon, spread, workspace  # bench/ is on sys.path when run as a script
from vmkeep.catalog import Catalog
from vmkeep.catalog.tables import (
    Backup,
    Datastore,
    Drill,
    Group,
    GroupBackup,
    GroupBackupMember,
    GroupMember,
    Increment,
    Vm,
)


def fill(url: str, vms: int, increments: int) -> None:
    cat = Catalog(url)
    now = datetime.now(UTC)
    with cat.session() as s:
        ds = Datastore(name="ds", driver="dir", options={"path": "/nonexistent"})
        s.add(ds)
        s.flush()
        group = Group(name="g")
        s.add(group)
        s.flush()
        for n in range(vms):
            vm = Vm(
                name=f"vm-{n:05d}",
                uuid=str(uuid.uuid4()),
                host_uri="qemu:///system",
                state="POWEROFF",
                lcm_state="POWEROFF",
                backup_config={"mode": "increment"} if n % 2 else {},
            )
            s.add(vm)
            s.flush()
            if n < 3:
                s.add(GroupMember(group_id=group.id, vm_id=vm.id, position=n))
            b = Backup(
                vm_id=vm.id,
                datastore_id=ds.id,
                chain=f"{vm.name}/{n + 1}",
                mode="INCREMENT",
                status="VALID",
                finished_at=now,
            )
            s.add(b)
            s.flush()
            for seq in range(increments):
                files = [
                    {"disk": "vda", "name": f"{seq}.vda.qcow2", "size": 1 << 20,
                     "digest": "blake3:" + "0" * 64, "virtual_size": 4 << 30},
                    {"disk": None, "name": f"{seq}.domain.xml", "size": 2500,
                     "digest": "blake3:" + "1" * 64},
                ]  # fmt: skip
                inc = Increment(
                    backup_id=b.id,
                    seq=seq,
                    parent=seq - 1 if seq else None,
                    status="VALID",
                    consistency="AGENT_FROZEN",
                    size=1 << 20,
                    files=files,
                    freeze_ms=12.5,
                    finished_at=now,
                )
                s.add(inc)
                if n % 100 == 0 and seq == increments - 1:
                    s.flush()
                    s.add(Drill(increment_id=inc.id, result="PASS", finished_at=now))
            if n < 3:
                gb = GroupBackup(group_id=group.id, datastore_id=ds.id, status="VALID")
                s.add(gb)
                s.flush()
                member = GroupBackupMember(
                    group_backup_id=gb.id, vm_id=vm.id, vm_name=vm.name, position=n,
                    backup_id=b.id, seq=0, status="VALID",
                )  # fmt: skip
                s.add(member)
    cat.engine.dispose()


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv[2:])} failed ({proc.returncode}): {proc.stderr}")
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--increments", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--postgres", help="a PostgreSQL URL to fill instead of SQLite (emptied!)")
    args = ap.parse_args()
    work, env = workspace()
    try:
        results: dict[str, dict[str, list[float]]] = {}
        for label, vms, incs in (("small", 1, 1), ("large", args.vms, args.increments)):
            if args.postgres:
                url = args.postgres
                cat = Catalog(url, migrate=False)
                with cat.engine.begin() as conn:
                    conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
                cat.engine.dispose()
            else:
                url = f"sqlite:///{work}/{label}.db"
            t0 = time.perf_counter()
            fill(url, vms, incs)
            print(
                f"{label}: {vms} VMs x {incs} increments filled in {time.perf_counter() - t0:.1f} s"
            )
            e = dict(env, VMKEEP_CATALOG_URL=url)
            name = "vm-00000"
            commands = {
                "vm list": [*VK, "vm", "list"],
                "vm list --json": [*VK, "vm", "list", "--json"],
                "backups list": [*VK, "backups", "list"],
                "backups list --json": [*VK, "backups", "list", "--json"],
                "backups list --vm": [*VK, "backups", "list", "--vm", name, "--json"],
                "backups show": [*VK, "backups", "show", "1", "--json"],
            }
            direct = dict(e, VMKEEP_NO_DAEMON="1")
            results[label] = {k: timed(argv, direct, args.runs) for k, argv in commands.items()}
            with daemon(e):  # the same commands, answered by a running daemon
                for k, argv in commands.items():
                    results[label][f"{k} (daemon)"] = timed(argv, e, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{'command':<31} {'small, s (median)':>18} {'large, s (min/median/max)':>28}  <= 0.5 s"
    )
    for cmd, large in results["large"].items():
        small = statistics.median(results["small"][cmd])
        ok = "yes" if statistics.median(large) <= 0.5 else "NO"
        print(f"{cmd:<31} {small:>18.3f} {spread(large):>28}  {ok}")


if __name__ == "__main__":
    os.environ.setdefault("VMKEEP_LIBVIRT_URI", "qemu:///system")
    main()
