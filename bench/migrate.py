"""Live migration: total time and the guest's downtime of ``vmkeep vm migrate --live`` against
``virsh migrate --live`` of the same guest in the same run, on the two-host lab (``vmkeep lab
hosts up 2``: this machine's libvirtd and a second one in its own namespaces, storage shared).

    .venv/bin/python bench/migrate.py [--rounds 5] [--fill-mib 32]

A lab VM with 192 MiB of RAM (``--fill-mib`` of it random data in its tmpfs, and a counter
writing every 0.2 s so some pages stay dirty) goes host 1 -> host 2 -> host 1 with each tool,
alternating, ``--rounds`` times. Per move: the command's wall time (a vmkeep command includes its
Python start and catalog work), libvirt's elapsed time of the migration job and its downtime
(the last pause; ``virsh domjobinfo --completed`` on the destination for virsh, the VM's history
for vmkeep). Target (issue 28): vmkeep <= 1.1 x virsh.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import time

from common import PREFIX, lab_workspace, runner, spread  # bench/ is on sys.path
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import records
from vmkeep.hypervisor import connect
from vmkeep.lab import hosts

COUNTER = (
    "(i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.2; done)"
    " >/dev/null 2>&1 </dev/null &"
)


def virsh(*argv: str) -> str:
    return subprocess.run(["virsh", *argv], check=True, capture_output=True, text=True).stdout


def job_ms(dest_uri: str, name: str) -> tuple[float, float]:
    """(elapsed, downtime) in ms of the domain's last completed migration, on its destination."""
    out = virsh("-c", dest_uri, "domjobinfo", name, "--completed")

    def field(label: str) -> float:
        m = re.search(rf"^{label}:\s+([\d.]+)\s+ms", out, re.M)
        if m is None:
            raise SystemExit(f"no {label!r} in virsh domjobinfo:\n{out}")
        return float(m.group(1))

    return field("Time elapsed"), field("Total downtime")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fill-mib", type=int, default=32)
    args = ap.parse_args()
    work, env, lab = lab_workspace()
    with (work / "c.toml").open("a") as f:
        f.write('[vmm]\nimported_vms_actions = ["migrate"]\n')
    before = {r["number"] for r in hosts.list() if r["alive"]}
    up = {h.number: h for h in hosts.up(2)}
    uris = {n: h.uri for n, h in up.items()}
    ctx = Context(load_config(environ=env))
    for n, uri in uris.items():
        records.add(ctx, f"host{n}", uri)
    vmkeep = {n: runner(dict(env, VMKEEP_CLUSTER_HOST=f"host{n}")) for n in uris}
    name = f"{PREFIX}migrate"
    rows: dict[str, list[float]] = {}
    try:
        lab.create(name, [64 << 20])
        lab.sh(
            name, f"dd if=/dev/urandom of=/tmp/fill bs=1048576 count={args.fill_mib} 2>/dev/null"
        )
        lab.sh(name, COUNTER)
        vmkeep[1]("vm", "import", name)

        def by_vmkeep(src: int, dest: int) -> None:
            t0 = time.perf_counter()
            out = vmkeep[src]("vm", "migrate", name, f"host{dest}", "--live", "--json")
            wall = (time.perf_counter() - t0) * 1000
            m = json.loads(out)["migration"]
            rows.setdefault("vmkeep wall", []).append(wall)
            rows.setdefault("vmkeep libvirt elapsed", []).append(float(m["total_ms"]))
            rows.setdefault("vmkeep downtime", []).append(float(m["downtime_ms"]))

        def by_virsh(src: int, dest: int) -> None:
            address = up[dest].address
            t0 = time.perf_counter()
            virsh("-c", uris[src], "migrate", "--live", "--unsafe", "--persistent",
                  "--undefinesource", name, uris[dest], f"tcp://{address}")  # fmt: skip
            wall = (time.perf_counter() - t0) * 1000
            elapsed, down = job_ms(uris[dest], name)
            rows.setdefault("virsh wall", []).append(wall)
            rows.setdefault("virsh libvirt elapsed", []).append(elapsed)
            rows.setdefault("virsh downtime", []).append(down)

        for r in range(args.rounds):
            order = (by_vmkeep, by_virsh) if r % 2 == 0 else (by_virsh, by_vmkeep)
            for move in order:
                move(1, 2)
                move(2, 1)
        counter = int(lab.sh(name, "cat /run/counter").strip())
        assert counter > 0, "the guest's counter stopped"
    finally:
        for uri in uris.values():  # wherever a failure left it
            hv = connect(uri)
            hv.destroy(name)
            hv.undefine(name)
        lab.down()
        if not {1, 2} <= before:
            hosts.down()
        shutil.rmtree(work, ignore_errors=True)
    moves = len(rows["vmkeep wall"])
    print(f"{moves} moves each way-pair per tool ({args.rounds} rounds), ms min / median / max:")
    for key, values in rows.items():
        print(f"  {key:24} {spread(values, '{:.0f}')}")
    for what in ("wall", "libvirt elapsed", "downtime"):
        ratios = [v / w for v, w in zip(rows[f"vmkeep {what}"], rows[f"virsh {what}"], strict=True)]
        med = statistics.median(rows[f"vmkeep {what}"]) / statistics.median(rows[f"virsh {what}"])
        print(f"  vmkeep / virsh, {what:16} {spread(ratios)} (of medians {med:.2f})")


if __name__ == "__main__":
    main()
