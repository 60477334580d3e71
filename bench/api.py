"""API benchmark (issue 27): a real ``vmkeep daemon`` on loopback with 1,000 VMs and 10,000
backup points (increments) in its catalog and 50 clients on ``GET /v1/vms`` and
``GET /v1/overview``, in two set-ups measured in the same run:

- baseline, today's behaviour: one HTTP process, the whole VM list (``/v1/vms?limit=1000``);
- paged: ``--http-workers 2``, one page of the VM list (``/v1/vms``: 100 VMs).

Two load models, each for ``--rounds`` rounds (min / median / max reported):

- closed loop: 50 clients, each sending its next request as soon as the last one answered (no
  think time): the server's saturation throughput and the latency at saturation. On 2 cores
  shared with the load generator, p99 <= 100 ms with 50 such clients needs > 500 requests/s;
- open loop: 50 dashboards, each asking for the overview and a page of the VM list every
  ``--period`` s (two connections, as a browser), started at spread offsets; a request's latency
  is counted from the time it was due, so a queue in the server (or a request sent late because
  the previous one on its connection had not answered) shows in the figures.

Then the same while a real backup runs: a lab guest (``--backup lab``: a 2 GiB disk with 512 MiB
of data, backed up in full again and again through the daemon's API) or none (``--backup
none``).

    .venv/bin/python bench/api.py [--vms 1000] [--increments 10] [--clients 50] [--seconds 10]
        [--rounds 3] [--period 2] [--backup lab|none] [--lab-prefix vmkeep-bench-api-]
        [--phase idle|busy|both] [--setup baseline|paged|both]

Target (issue 27): p99 <= 100 ms for a page of the VM list and for the overview with 50
clients. The load generator is a small asyncio HTTP/1.1 client (keep-alive, one connection per
client and route): httpx took more CPU per request than the server's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from catalog import fill  # bench/ is on sys.path when run as a script
from common import LAB_DIR, VK, spread, stop, workspace
from vmkeep.catalog.tables import Job
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens

OVERVIEW = "/v1/overview"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the load generator ------------------------------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection: GET and read the whole answer."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> int:
        if self.rw is None:
            self.rw = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.rw
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {self.token}\r\n\r\n"
            .encode()
        )  # fmt: skip
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            return 0
        return status

    def close(self) -> None:
        if self.rw is not None:
            self.rw[1].close()
            self.rw = None


Latencies = dict[str, list[float]]


async def closed_loop(
    port: int, token: str, paths: list[str], clients: int, seconds: float
) -> tuple[Latencies, int]:
    """``clients`` clients, each on one of ``paths`` in turn, with no think time."""
    lat: Latencies = {p: [] for p in paths}
    errors = 0
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        path, conn = paths[i % len(paths)], Conn(port, token)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            if await conn.get(path) == 200:
                lat[path].append(time.perf_counter() - t0)
            else:
                errors += 1
        conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return lat, errors


async def open_loop(
    port: int, token: str, paths: list[str], clients: int, seconds: float, period: float
) -> tuple[Latencies, int]:
    """``clients`` dashboards, each asking for every one of ``paths`` every ``period`` s (one
    connection per path); latency from the time each request was due."""
    lat: Latencies = {p: [] for p in paths}
    errors = 0
    start = time.monotonic() + 0.5
    rounds = max(1, int(seconds / period))

    async def poller(offset: float, path: str) -> None:
        nonlocal errors
        conn = Conn(port, token)
        for k in range(rounds):
            due = start + offset + k * period
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if await conn.get(path) == 200:
                lat[path].append(time.monotonic() - due)
            else:
                errors += 1
        conn.close()

    offsets = [period * i / clients for i in range(clients)]
    await asyncio.gather(*(poller(o, p) for o in offsets for p in paths))
    return lat, errors


# --- the daemon and the backup -----------------------------------------------------------------
@contextmanager
def daemon(env: dict[str, str], port: int, http_workers: int) -> Iterator[None]:
    argv = [*VK, "daemon", "--listen", f"127.0.0.1:{port}", "--workers", "1",
            "--http-workers", str(http_workers)]  # fmt: skip
    log = Path(env["VMKEEP_DATA_DIR"]).parent / f"daemon-{port}.log"
    proc = subprocess.Popen(argv, env=env, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("vmkeep daemon did not start")
            time.sleep(0.2)
        time.sleep(2 if http_workers > 1 else 0.5)  # every HTTP process up
        if f"pid={proc.pid}," not in sockets(port):  # /healthz answered by another server
            sys.exit(f"port {port} is not this daemon's (pid {proc.pid}):\n{sockets(port)}")
        yield
    finally:
        if proc.poll() is not None:
            print(f"the daemon had exited by itself: exit code {proc.returncode}", file=sys.stderr)
        stop(proc, 300)


def sockets(port: int | None) -> str:
    """What holds ``port`` on loopback right now (listeners and connections, with processes)."""
    argv = ["ss", "-tanp", f"( sport = :{port} or dport = :{port} )"]
    return subprocess.run(argv, capture_output=True, text=True).stdout


class BackupLoop:
    """Full backups of the lab VM through the API, one after the other, while measured."""

    def __init__(self, port: int, token: str, vm: str) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                   headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        self.vm, self.stop = vm, threading.Event()
        self.running = threading.Event()
        self.done: list[tuple[str, float]] = []  # (state, seconds)
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def ask(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request, again on a new connection when a kept-alive one was closed under it."""
        for attempt in range(5):
            try:
                return self.client.request(method, path, **kw)
            except httpx.TransportError as err:
                print(f"  {method} {path}: {err!r} (try {attempt + 1}); the port now:\n"
                      f"{sockets(self.client.base_url.port)}", file=sys.stderr)  # fmt: skip
                if attempt == 4:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def loop(self) -> None:
        while not self.stop.is_set():
            body = {"datastore": "lab", "reset": True}
            r = self.ask("POST", f"/v1/vms/{self.vm}/backup", json=body)
            if r.status_code == 409:  # the last one is still ending
                time.sleep(0.5)
                continue
            if r.status_code != 202:
                sys.exit(f"backup refused: {r.status_code} {r.text}")
            job = r.json()["job"]
            while job["state"] not in ("DONE", "FAILED", "CANCELLED"):
                job = self.ask("GET", f"/v1/jobs/{job['id']}?wait=5").json()
                if job["state"] == "RUNNING":
                    self.running.set()
            took = datetime.fromisoformat(job["finished"]) - datetime.fromisoformat(job["started"])
            self.done.append((job["state"], took.total_seconds()))

    def __enter__(self) -> BackupLoop:
        self.thread.start()
        if not self.running.wait(120):
            port = self.client.base_url.port
            sys.exit(f"the lab backup did not start; on port {port}:\n{sockets(port)}")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=600)
        self.client.close()


def lab_vm(env: dict[str, str], work: Path, prefix: str) -> tuple[Any, str]:
    """A running lab guest with 512 MiB of data, imported, and a datastore ``lab`` for it."""
    from vmkeep.hypervisor import connect
    from vmkeep.lab import Lab

    lab = Lab(connect("qemu:///system"), LAB_DIR, prefix=prefix)
    lab.down()
    pop = work / "pop"
    pop.mkdir()
    (pop / "data.bin").write_bytes(os.urandom(512 << 20))
    name = lab.create(f"{prefix}1", [2 << 30], populate=pop)
    shutil.rmtree(pop)
    direct = dict(env, VMKEEP_NO_DAEMON="1")
    for args in (("datastore", "add", "lab", "--path", str(work / "ds")), ("vm", "import", name)):
        subprocess.run([*VK, *args], env=direct, check=True, capture_output=True)
    return lab, name


# --- the run -----------------------------------------------------------------------------------
def report(title: str, rounds: list[tuple[Latencies, int]], seconds: float) -> None:
    print(f"  {title}")
    for path in rounds[0][0]:
        p50 = [statistics.median(r[0][path]) * 1000 for r in rounds]
        p99 = [percentile(r[0][path], 0.99) * 1000 for r in rounds]
        rate = [len(r[0][path]) / seconds for r in rounds]
        print(f"    GET {path:<22} req/s {spread(rate, '{:.1f}'):<22} p50 ms {spread(p50, '{:.1f}'):<22}"
              f" p99 ms {spread(p99, '{:.1f}')}")  # fmt: skip
    print(f"    errors: {sum(r[1] for r in rounds)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--increments", type=int, default=10)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--period", type=float, default=2.0)
    ap.add_argument("--backup", choices=("lab", "none"), default="lab")
    ap.add_argument("--lab-prefix", default="vmkeep-bench-api-")
    ap.add_argument("--phase", choices=("idle", "busy", "both"), default="both")
    ap.add_argument("--setup", choices=("baseline", "paged", "both"), default="both")
    args = ap.parse_args()
    work, env = workspace()
    ctx = Context(load_config(environ=env))
    fill(ctx.config.catalog_url, args.vms, args.increments)
    now = datetime.now(UTC)
    with ctx.catalog.session() as s:  # a night of jobs: backups of every VM, some failed
        for n in range(args.vms):
            state = "FAILED" if n % 40 == 0 else "DONE"
            s.add(Job(kind="backup", target=f"vm-{n:05d}", state=state, host="h", pid=1,
                      origin="schedule", created_at=now - timedelta(hours=8),
                      finished_at=now - timedelta(hours=7)))  # fmt: skip
    token = tokens.create(ctx, "bench", "viewer")["token"]
    operator = tokens.create(ctx, "bench-op", "operator")["token"]
    lab = None
    setups = {
        "baseline: 1 HTTP process, whole list": (1, ["/v1/vms?limit=1000", OVERVIEW]),
        "paged: --http-workers 2, one page": (2, ["/v1/vms", OVERVIEW]),
    }
    try:
        if args.backup == "lab" and args.phase != "idle":
            lab, vm = lab_vm(env, work, args.lab_prefix)
        print(f"API on loopback: {args.vms} VMs and {args.vms * args.increments} points in the "
              f"catalog, {args.clients} clients, {args.seconds:.0f} s per round, {args.rounds} "
              f"rounds, {os.cpu_count()} cores shared by server and load generator; figures "
              "min / median / max over the rounds", flush=True)  # fmt: skip
        phases = {"idle": [False], "busy": [True], "both": [False, True]}[args.phase]
        phases = [p for p in phases if lab is not None or not p]
        for busy in phases:
            for title, (http_workers, paths) in setups.items():
                if args.setup != "both" and not title.startswith(args.setup):
                    continue
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", 0))
                    port = sk.getsockname()[1]
                with daemon(env, port, http_workers):
                    loop = BackupLoop(port, operator, vm) if busy else None
                    if loop is not None:
                        loop.__enter__()
                    try:
                        closed, opened = [], []
                        for _ in range(args.rounds):
                            closed.append(asyncio.run(closed_loop(port, token, paths, args.clients,
                                                                  args.seconds)))  # fmt: skip
                            opened.append(asyncio.run(open_loop(port, token, paths, args.clients,
                                                                args.seconds, args.period)))  # fmt: skip
                    finally:
                        if loop is not None:
                            loop.__exit__()
                print(f"\n{title}" + (" -- while a lab guest's full backup runs" if busy else ""))
                report(
                    f"(a) closed loop: {args.clients} clients, no think time", closed, args.seconds
                )
                report(f"(b) open loop: {args.clients} dashboards, each route every {args.period:g} s",
                       opened, max(1, int(args.seconds / args.period)) * args.period)  # fmt: skip
                if loop is not None:
                    took = [t for st, t in loop.done if st == "DONE"]
                    states = sorted({st for st, _ in loop.done})
                    print(f"    backups during it: {len(loop.done)} ({', '.join(states)}), "
                          f"{spread(took, '{:.1f}') if took else '-'} s each")  # fmt: skip
                sys.stdout.flush()
    except BaseException:
        for log in sorted(work.glob("daemon-*.log")):  # what the daemons said, on a failure
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        if lab is not None:
            lab.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
