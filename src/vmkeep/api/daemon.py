"""``vmkeep daemon``: one process holding the API (uvicorn), the job workers, the monitor, the
scheduler of backup jobs (``engine/service/scheduler.py``) and the sender of notifications
(``engine/service/notify.py``: a worker writes a finished job's outbox rows, never waits).

With ``--http-workers N`` (``[api] http_workers``) above 1 the API is served by N processes
instead (one Python process serves ~100 requests/s on one core: the GIL): the daemon binds the
TCP and local sockets once and starts N HTTP processes (multiprocessing's spawn: none inherits
the daemon's threads or catalog connections) that serve on them, the kernel spreading the
connections; the daemon itself keeps the job workers, monitor, scheduler and notifier. The
processes share the catalog (the job queue is its ``jobs`` table) and one cross-process event
on which a queued job wakes the daemon's idle workers at once. A process that dies is started
again; each exits when the daemon is gone.

With ``--host NAME`` (``[cluster] host``; docs/hosts.md) the daemon acts for that row of the
``hosts`` table: its workers claim only the jobs for that host or for any host, it drives that
host's libvirt URI, writes the host's heartbeat every ``[cluster] heartbeat_interval`` s and
monitors the host in its monitor loop; every daemon's monitor loop also sweeps the hosts whose
daemon is silent (``engine/hosts/monitor.py``). Its HTTP processes get the same host.

At start it marks this machine's RUNNING jobs left by a dead process FAILED (their VMs were
recovered by their guard process): the pid is what decides, so the daemons of two hosts on one
machine never fail each other's live jobs, and a daemon back after a crash fails its own.

SIGTERM / Ctrl-C: uvicorn stops taking requests, workers stop claiming, running jobs are
cancelled through the engine's cancel path (guests thawed, partial data and checkpoints
removed), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from vmkeep import gctune
from vmkeep.api.app import create_app
from vmkeep.config import Config
from vmkeep.engine.core import jobs
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import monitor as host_monitor
from vmkeep.engine.hosts import records
from vmkeep.engine.hosts.records import find_host
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.service import notify, scheduler
from vmkeep.engine.service.actions import ONE_PER_VM, RUNNERS
from vmkeep.engine.service.workers import WorkSlots
from vmkeep.errors import InvalidValue, VmkeepError
from vmkeep.model import JobState
from vmkeep.paths import SOCKET_PATH_MAX, private_umask

log = logging.getLogger(__name__)
IDLE = 0.2  # seconds a worker waits when the queue is empty
GRACE = 30  # seconds the API waits for open requests at a stop (a long download), then cuts them
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidValue("--listen", text, "use HOST:PORT, e.g. 127.0.0.1:8700")
    return host.strip("[]"), int(port)


def _worker(config: Config, stop: threading.Event, slots: WorkSlots) -> None:
    """Claims and runs jobs, each holding one of the daemon's work slots (shared with the API's
    files requests, ``engine/workers.py``) from its claim to its end."""
    ctx = Context(config)
    while not stop.is_set():
        if not slots.acquire(IDLE):
            continue  # every slot is taken (jobs, files requests): look again
        try:
            try:
                job_id = jobs.claim(ctx, one_per_target=ONE_PER_VM)
            except VmkeepError as err:
                log.error("claiming a job failed: %s", err)
                job_id = None
            except Exception:  # a lost database connection: logged, the worker goes on
                log.exception("claiming a job failed")
                job_id = None
            if job_id is not None:
                log.info("running job %s", job_id)
                job = jobs.execute(ctx, job_id, RUNNERS)
                notify.job_ended(ctx, job)  # outbox rows only: never waits for a delivery
                continue
        finally:
            slots.release()
        jobs.WAKE.wait(IDLE)  # a job the API queues wakes it at once
        jobs.WAKE.clear()


def _monitor(config: Config, stop: threading.Event) -> None:
    """The monitor loop, at start and then every ``[monitor] interval`` s: this daemon's host
    (``engine/hosts/monitor.py``), every VM of it through the VMM driver, and the sweep of
    silent and unreachable hosts (their VMs UNKNOWN, the jobs waiting for them)."""
    ctx = Context(config)
    while True:  # at once: a daemon back after a crash sets its VMs' real state first thing
        for name, step in (("host", _hosts), ("poll", _poll), ("sweep", _sweep)):
            try:
                step(ctx)
            except Exception:  # a bug or a lost database connection: logged, the loop goes on
                log.exception("monitor loop: %s failed", name)
        if stop.wait(config.monitor.interval):
            return


def _poll(ctx: Context) -> None:
    try:
        for row in dispatch.poll(ctx):
            if "error" in row:
                log.warning("poll of %s: %s", row["vm"], row["error"])
    except VmkeepError as err:
        log.error("monitor: %s", err)


def _hosts(ctx: Context) -> None:
    try:
        seen = host_monitor.monitor(ctx)
    except VmkeepError as err:
        log.error("monitoring host %s: %s", ctx.host, err)
        return
    if seen.get("error"):
        log.warning("host %s: %s", ctx.host, seen["error"])


def _sweep(ctx: Context) -> None:
    try:
        swept = host_monitor.sweep(ctx)
    except VmkeepError as err:
        log.error("sweep of silent hosts: %s", err)
        return
    if swept["unknown"]:
        log.warning("VMs now UNKNOWN (host unreachable or silent): %s", ", ".join(swept["unknown"]))
    for job_id in swept["failed"]:
        log.warning("job %s failed: its host's daemon stayed silent", job_id)


def _heartbeat(ctx: Context, listen: str, stop: threading.Event) -> None:
    """This daemon's heartbeat every ``[cluster] heartbeat_interval`` s (none without a host)."""
    while True:
        try:
            host_monitor.heartbeat(ctx, listen)
        except VmkeepError as err:
            log.error("heartbeat of host %s: %s", ctx.host, err)
        except Exception:  # a lost database connection: logged, the next beat tries again
            log.exception("heartbeat of host %s failed", ctx.host)
        if stop.wait(ctx.config.cluster.heartbeat_interval):
            return


def local_socket(path: Path) -> tuple[socket.socket, tuple[int, int]] | None:
    """The daemon's listening socket in the data dir, for the CLI on this host
    (``cli/remote.py``): mode 0600, so only the daemon's user (who could open the catalog
    itself) reaches it. A socket left by a daemon that died is replaced. None, with a warning,
    when there can be none (another live daemon on this data dir answers on it, a path too long
    for a socket, a file system without sockets): this daemon then serves TCP only, and the CLI
    reads through the other daemon, or the catalog itself."""
    if len(os.fsencode(path)) >= SOCKET_PATH_MAX:
        log.warning("no local socket: %s is longer than a socket path can be", path)
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(2)
                try:
                    probe.connect(str(path))
                except (ConnectionRefusedError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # its daemon is gone
                else:
                    log.warning("no local socket: another daemon answers on %s", path)
                    return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)  # before listen(): no one else can ever connect
            sock.listen(128)
            return sock, _file_id(path)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        log.warning("no local socket at %s: %s", path, err)
        return None


class _Server(uvicorn.Server):
    """uvicorn's server that tells the app it is stopping (``create_app``'s ``stopping``):
    uvicorn waits for open requests before it stops, and a stream ends only when told."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)


class _SignalsToTcp(uvicorn.Server):
    """The local socket's server: stopped by the TCP server's end, not by signals of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_both(
    tcp: uvicorn.Server,
    local: uvicorn.Server,
    sock: socket.socket | None,
    tcp_sock: socket.socket | None = None,
) -> None:
    """The TCP server (on ``tcp_sock`` when the daemon bound it) until SIGTERM/SIGINT stops it
    (uvicorn handles them), and the local socket's server as long as it runs."""
    tcp_sockets = None if tcp_sock is None else [tcp_sock]
    if sock is None:
        await tcp.serve(sockets=tcp_sockets)
        return
    local_task = asyncio.create_task(local.serve(sockets=[sock]))
    try:
        await tcp.serve(sockets=tcp_sockets)
    finally:
        local.should_exit = True
        await local_task


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _remove_socket(path: Path, bound: tuple[int, int]) -> None:
    """Our socket file only: one another daemon put there since stays."""
    with contextlib.suppress(OSError):
        if _file_id(path) == bound:
            path.unlink()


def _tcp_socket(host: str, port: int) -> socket.socket:
    """The API's listening TCP socket, bound once by the daemon for its HTTP processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise InvalidValue("--listen", f"{host}:{port}", f"cannot listen there: {err}") from err
    return sock


def _uvicorn_config(config: Config, app: Any, **where: Any) -> uvicorn.Config:
    tls = config.api.tls_cert, config.api.tls_key
    return uvicorn.Config(
        app,
        log_level="warning",
        ssl_certfile=str(tls[0]) if tls[0] else None,
        ssl_keyfile=str(tls[1]) if tls[1] else None,
        timeout_graceful_shutdown=GRACE,
        **where,
    )


def _http_process(
    config: Config, tcp: socket.socket, sock: socket.socket | None, wake: Any, parent: int
) -> None:
    """One HTTP process of the daemon (``--http-workers``): the API on the daemon's sockets
    until SIGTERM/SIGINT, or until the daemon is gone."""
    private_umask()
    jobs.WAKE = wake  # a job queued here wakes the daemon's workers
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises them once it has stopped
        signal.signal(sig, lambda _s, _f: None)
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM when the daemon dies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    stopping = threading.Event()
    app = create_app(
        config, local_socket=config.socket if sock is not None else None, stopping=stopping
    )
    server = _Server(_uvicorn_config(config, app), stopping)
    local = _SignalsToTcp(uvicorn.Config(app, log_level="warning", lifespan="off"))

    def orphaned() -> None:
        while not server.should_exit:
            if os.getppid() != parent:
                log.warning("the daemon (pid %d) is gone: this HTTP process stops", parent)
                server.should_exit = True
            server_stop.wait(1.0)

    server_stop = threading.Event()
    threading.Thread(target=orphaned, name="orphaned", daemon=True).start()
    gctune.for_daemon()
    try:
        asyncio.run(_serve_both(server, local, sock, tcp))
    finally:
        server_stop.set()


def _watch_http(
    config: Config,
    tcp: socket.socket,
    sock: socket.socket | None,
    wake: Any,
    count: int,
    stopping: threading.Event,
) -> None:
    """Start ``count`` HTTP processes, start again one that dies, until ``stopping``; then stop
    them all (SIGTERM: each finishes its requests), waiting for each."""
    spawn = multiprocessing.get_context("spawn")
    args = (config, tcp, sock, wake, os.getpid())
    procs: list[Any] = []
    try:
        while not stopping.is_set():
            for k, p in enumerate(procs):
                if not p.is_alive():
                    log.error("HTTP process %d died (exit %s): started again", p.pid, p.exitcode)
                    procs[k] = None
            procs = [p for p in procs if p is not None]
            while len(procs) < count and not stopping.is_set():
                p = spawn.Process(target=_http_process, args=args, name="vmkeep-http", daemon=True)
                p.start()
                procs.append(p)
            stopping.wait(0.5)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                log.error("HTTP process %d did not stop in 30 s: killed", p.pid)
                p.kill()
                p.join()


def serve(
    config: Config,
    listen: str | None = None,
    workers: int | None = None,
    clock: scheduler.Clock | None = None,
    http_workers: int | None = None,
    host_name: str | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT; ``host_name`` (``--host``): the host this daemon runs the
    jobs of (``[cluster] host``), which must exist in the catalog."""
    private_umask()  # also when serve() is called without the CLI's main()
    if host_name is not None:
        cluster = config.cluster.model_copy(update={"host": host_name})
        config = config.model_copy(update={"cluster": cluster})
    host, port = parse_listen(listen or config.api.listen)
    http_count = http_workers or config.api.http_workers
    ctx = Context(config)
    if ctx.host is not None:
        with ctx.catalog.session() as s:
            find_host(s, ctx.host)  # HostNotFound names the fix: vmkeep host add
        host_monitor.heartbeat(ctx, f"{host}:{port}")  # alive before its first poll
    for job_id in jobs.recover(ctx):
        log.warning("job %s was running when the daemon stopped: marked FAILED", job_id)
    stop = threading.Event()
    slots = WorkSlots(workers or config.jobs.workers)  # shared with the API's files requests
    pool = [
        threading.Thread(
            target=_worker, args=(config, stop, slots), name=f"worker-{i}", daemon=True
        )
        for i in range(slots.size)
    ]
    tls = config.api.tls_cert, config.api.tls_key
    if (tls[0] is None) != (tls[1] is None):
        raise InvalidValue("[api] tls_cert/tls_key", str(tls), "give both files, or neither")
    for f in tls:
        if f is not None and not f.is_file():
            raise InvalidValue("[api] tls_cert/tls_key", str(f), "the file does not exist")
    tcp = _tcp_socket(host, port) if http_count > 1 else None
    bound = local_socket(config.socket)
    sock = bound[0] if bound is not None else None
    woken = jobs.WAKE
    if tcp is not None:  # N HTTP processes: the API's jobs wake the workers across processes
        jobs.WAKE = multiprocessing.get_context("spawn").Event()  # type: ignore[assignment]
    else:
        stopping = threading.Event()
        app = create_app(config, local_socket=config.socket, slots=slots, stopping=stopping)
        server = _Server(_uvicorn_config(config, app, host=host, port=port), stopping)
        local = _SignalsToTcp(uvicorn.Config(app, log_level="warning", lifespan="off"))
    gctune.for_daemon()
    pool.append(threading.Thread(target=_monitor, args=(config, stop), name="monitor", daemon=True))
    if ctx.host is not None:
        beat = (Context(config), f"{host}:{port}", stop)
        pool.append(threading.Thread(target=_heartbeat, args=beat, name="heartbeat", daemon=True))
    pool.append(
        threading.Thread(
            target=scheduler.loop, args=(config, stop, clock), name="scheduler", daemon=True
        )
    )
    pool.append(
        threading.Thread(
            target=notify.loop, args=(config, stop, notify.WAKE), name="notify", daemon=True
        )
    )
    for t in pool:
        t.start()
    scheme = "https" if tls[0] else "http"
    also = f" and {config.socket}" if sock is not None else ""
    log.warning(
        "vmkeep daemon listening on %s://%s:%s%s, %d workers, %d HTTP process%s%s",
        scheme,
        host,
        port,
        also,
        slots.size,
        http_count,
        "es" if http_count > 1 else "",
        f", running the jobs of host {ctx.host}" if ctx.host else "",
    )
    try:
        if tcp is not None:
            _serve_processes(config, tcp, sock, http_count)  # returns after SIGTERM / SIGINT
        else:
            asyncio.run(_serve_both(server, local, sock))  # returns after SIGTERM / SIGINT
    finally:
        if tcp is not None:
            tcp.close()
        if bound is not None:
            bound[0].close()
            _remove_socket(config.socket, bound[1])
        stop.set()
        jobs.WAKE.set()  # idle workers see ``stop`` at once
        notify.WAKE.set()
        for job in jobs.list_jobs(ctx, JobState.RUNNING):
            if job["pid"] == jobs.os.getpid():
                jobs.cancel(ctx, job["id"])
        for t in pool:
            t.join(timeout=300)
        jobs.WAKE = woken
        if ctx.host is not None:
            try:  # nothing is queued for it by a CLI nor placed on its host meanwhile
                records.sign_off(ctx, ctx.host, os.getpid())
            except VmkeepError as err:
                log.error("signing off host %s: %s", ctx.host, err)
    log.warning("vmkeep daemon stopped")


def _serve_processes(
    config: Config, tcp: socket.socket, sock: socket.socket | None, count: int
) -> None:
    """The HTTP processes until SIGTERM / SIGINT reaches the daemon; stopped before it
    returns."""
    stopping = threading.Event()
    before = {
        sig: signal.signal(sig, lambda _s, _f: stopping.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        _watch_http(config, tcp, sock, jobs.WAKE, count, stopping)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
