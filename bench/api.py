"""API benchmark: a real ``vmkeep daemon`` on loopback, 1,000 VMs in its catalog, 50 concurrent
clients for 20 s on ``GET /v1/vms`` and ``GET /v1/jobs``; then the latency from enqueue to
RUNNING of 20 jobs. Targets (issue 9): p99 <= 100 ms, 0 errors, enqueue -> running <= 0.5 s.

    .venv/bin/python bench/api.py [--vms 1000] [--clients 50] [--seconds 20]

The VMs are catalog rows without libvirt domains (state UNKNOWN): the API still asks libvirt for
the live states of all domains once per ``GET /v1/vms``, as it would on a real host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid

import httpx

from common import workspace  # bench/ is on sys.path when run as a script
from vmkeep.catalog.tables import Vm
from vmkeep.config import load_config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(base: str, token: str, clients: int, seconds: float) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {"/v1/vms": [], "/v1/jobs": [], "errors": []}
    end = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as c:

        async def client(i: int) -> None:
            path = "/v1/vms" if i % 2 == 0 else "/v1/jobs"
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    r = await c.get(path)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                (lat[path] if ok else lat["errors"]).append(time.perf_counter() - t0)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    work, env = workspace()
    ctx = Context(load_config(environ=env))
    with ctx.catalog.session() as s:
        for n in range(args.vms):
            s.add(Vm(name=f"bench-vm-{n}", uuid=str(uuid.uuid4()), host_uri="qemu:///system",
                     state="UNKNOWN", lcm_state="UNKNOWN", backup_config={}))  # fmt: skip
    token = tokens.create(ctx, "bench", "viewer")["token"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", "daemon", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if time.monotonic() > deadline:
                sys.exit("daemon did not start")
        lat = asyncio.run(load(base, token, args.clients, args.seconds))
        # enqueue -> RUNNING: jobs that fail fast (no such backup), picked up by idle workers
        waits = []
        for n in range(20):
            job = jobs.enqueue(ctx, "verify", str(n), {"backup": 10**6 + n}, "bench", "bench")
            while (row := jobs.get(ctx, job["id"]))["started"] is None:
                time.sleep(0.005)
            waits.append((row["started"] - row["created"]).total_seconds())
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"API on loopback: {args.vms} VMs in the catalog, {args.clients} clients, "
          f"{args.seconds:.0f} s, {os.cpu_count()} cores (client and server share them)")  # fmt: skip
    for path in ("/v1/vms", "/v1/jobs"):
        v = [x * 1000 for x in lat[path]]
        print(
            f"  GET {path:<9} n={len(v):>6}  p50 {statistics.median(v):7.1f} ms  "
            f"p99 {percentile(v, 0.99):7.1f} ms  max {max(v):7.1f} ms"
        )
    print(f"  errors: {len(lat['errors'])}")
    w = [x * 1000 for x in waits]
    print(
        f"  enqueue -> RUNNING (20 jobs): min {min(w):.0f} ms  median {statistics.median(w):.0f} ms"
        f"  max {max(w):.0f} ms"
    )


if __name__ == "__main__":
    main()
