"""Jobs per second through the queue with one and with two daemons on one PostgreSQL catalog.

    .venv/bin/python bench/hosts.py [--jobs 100] [--workers 2] [--rounds 3]

A throwaway PostgreSQL 15 (``vmkeep.lab.postgres``) holds hosts h1 and h2, each with --jobs
catalog-only VMs. Each round queues --jobs cheap real jobs (``prune --dry-run`` of a VM without
points: the VM's lock, its policy, the catalog reads, the job's rows; each on its own VM, so no
two jobs wait for one lock), the way the API queues them (``actions.enqueue``: checks, the job's
host), while the daemons are stopped (SIGSTOP), so that the queue, not the queueing, is measured; then
lets them go on (SIGCONT) and waits for all the jobs to end (each must be DONE). Throughput =
jobs / (last ``finished_at`` - the SIGCONT). Per round, in the same run:

- ``1 daemon``: ``vmkeep daemon --host h1 --workers W``, the jobs on h1's VMs;
- ``1 daemon, 2W``: the same daemon with twice the workers (what two daemons add in workers);
- ``2 daemons``: ``--host h1`` and ``--host h2``, W workers each, half of the jobs on each host's
  VMs: each daemon runs only its host's (checked: every job's pid is its host's daemon's).

Prints min / median / max of jobs per second over the rounds, and the two-daemon ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from common import VK, spread, stop, workspace  # bench/ is on sys.path when run as a script
from vmkeep.catalog.tables import Job, Vm
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.trust import LOCAL_ADMIN
from vmkeep.engine.hosts import records
from vmkeep.engine.service import actions
from vmkeep.lab import postgres

HOSTS = ("h1", "h2")


@contextmanager
def daemon(env: dict[str, str], host: str, workers: int, work: Path) -> Iterator[int]:
    """``vmkeep daemon --host HOST``, its own data dir; yields its pid once it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / f"{host}-{uuid.uuid4().hex[:6]}.log"
    data = work / f"data-{host}"
    argv = [*VK, "daemon", "--host", host, "--listen", f"127.0.0.1:{port}", "--workers",
            str(workers)]  # fmt: skip
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, env=env | {"VMKEEP_DATA_DIR": str(data)}, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while "listening" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon {host} did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield proc.pid
    finally:
        stop(proc, 120)


def one_round(ctx: Context, targets: list[str], pids: dict[str, int]) -> float:
    """Queue a prune of each VM in ``targets`` while the daemons are stopped (SIGSTOP: the jobs
    are all there when they go on), let them go on, wait for all; jobs per second from then."""
    prune = actions.action("prune")
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        ids = [
            actions.enqueue(ctx, prune, actions.parse(prune, {"vm": vm, "dry_run": True}),
                            LOCAL_ADMIN)["id"]
            for vm in targets
        ]  # fmt: skip
    finally:
        start = datetime.now(UTC)
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 600
    busy = Job.id.in_(ids) & Job.state.in_(["QUEUED", "RUNNING"])
    while True:
        with ctx.catalog.session() as s:
            left = s.execute(select(func.count()).where(busy)).scalar()
        if not left:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{left} jobs did not end within 600 s")
        time.sleep(0.05)
    with ctx.catalog.session() as s:
        rows = s.execute(
            select(Job.state, Job.runs_on, Job.pid, Job.error, Job.finished_at)
            .where(Job.id.in_(ids))
        ).all()  # fmt: skip
    bad = [r for r in rows if r.state != "DONE" or pids.get(r.runs_on) != r.pid]
    if bad:
        raise SystemExit(f"{len(bad)} jobs not DONE by their host's daemon, e.g. {bad[0]}")
    return len(ids) / (max(r.finished_at for r in rows) - start).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--jobs", type=int, default=100, help="jobs per round")
    ap.add_argument("--workers", type=int, default=2, help="workers per daemon")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work, env = workspace()
    try:
        measure(args, work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    with postgres.server() as url:
        env |= {"VMKEEP_CATALOG_URL": url}
        env = {k: v for k, v in env.items() if k != "VMKEEP_FAILPOINTS"}
        ctx = Context(load_config(environ=env))
        vms: dict[str, list[str]] = {}
        with ctx.catalog.session() as s:
            for host in HOSTS:
                vms[host] = [f"{host}-vm-{n:04d}" for n in range(args.jobs)]
                s.add_all(
                    Vm(name=n, uuid=str(uuid.uuid4()), host_uri="qemu:///system", host=host,
                       state="POWEROFF", lcm_state="POWEROFF", backup_config={})
                    for n in vms[host]
                )  # fmt: skip
        for host in HOSTS:
            records.add(ctx, host, "qemu:///system")
        half = args.jobs // 2
        cases = {
            "1 daemon": ({"h1": args.workers}, vms["h1"]),
            f"1 daemon, {2 * args.workers} workers": ({"h1": 2 * args.workers}, vms["h1"]),
            "2 daemons": (dict.fromkeys(HOSTS, args.workers),
                          vms["h1"][:half] + vms["h2"][: args.jobs - half]),
        }  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, (daemons, targets) in cases.items():
                with ExitStack() as stack:
                    pids = {
                        host: stack.enter_context(daemon(env, host, w, work))
                        for host, w in daemons.items()
                    }
                    rate = one_round(ctx, targets, pids)
                rates[name].append(rate)
                print(f"round {r + 1}: {name}: {rate:.1f} jobs/s", file=sys.stderr)
    print(f"{args.jobs} jobs per round, {args.workers} workers per daemon, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs; jobs per second (min / median / max):")  # fmt: skip
    for name, values in rates.items():
        print(f"  {name:<24} {spread(values, '{:.1f}')}")
    ratio = [b / a for a, b in zip(rates["1 daemon"], rates["2 daemons"], strict=True)]
    print(f"  2 daemons / 1 daemon     {spread(ratio)}")


if __name__ == "__main__":
    main()
