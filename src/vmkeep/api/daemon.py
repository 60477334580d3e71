"""``vmkeep daemon``: one process holding the API (uvicorn) and the job workers.

At start it marks this host's RUNNING jobs left by a dead process FAILED (their VMs were recovered
by their guard process). SIGTERM / Ctrl-C: uvicorn stops taking requests, workers stop claiming,
running jobs are cancelled through the engine's cancel path (guests thawed, partial data and
checkpoints removed), then the process exits 0.
"""

from __future__ import annotations

import logging
import threading

import uvicorn

from vmkeep.api.app import create_app
from vmkeep.config import Config
from vmkeep.engine import jobs, lifecycle
from vmkeep.engine.actions import RUNNERS
from vmkeep.engine.context import Context
from vmkeep.errors import InvalidValue, VmkeepError

log = logging.getLogger(__name__)
IDLE = 0.2  # seconds a worker waits when the queue is empty


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidValue("--listen", text, "use HOST:PORT, e.g. 127.0.0.1:8700")
    return host.strip("[]"), int(port)


def _worker(config: Config, stop: threading.Event) -> None:
    ctx = Context(config)
    while not stop.is_set():
        try:
            job_id = jobs.claim(ctx)
        except VmkeepError as err:
            log.error("claiming a job failed: %s", err)
            job_id = None
        if job_id is None:
            stop.wait(IDLE)
            continue
        log.info("running job %s", job_id)
        jobs.execute(ctx, job_id, RUNNERS)


def _monitor(config: Config, stop: threading.Event) -> None:
    """The monitor loop: poll every VM through the VMM driver each ``[monitor] interval`` s."""
    ctx = Context(config)
    while not stop.wait(config.monitor.interval):
        try:
            for row in lifecycle.poll(ctx):
                if "error" in row:
                    log.warning("poll of %s: %s", row["vm"], row["error"])
        except VmkeepError as err:
            log.error("monitor: %s", err)


def serve(config: Config, listen: str | None = None, workers: int | None = None) -> None:
    host, port = parse_listen(listen or config.api.listen)
    ctx = Context(config)
    for job_id in jobs.recover(ctx):
        log.warning("job %s was running when the daemon stopped: marked FAILED", job_id)
    stop = threading.Event()
    pool = [
        threading.Thread(target=_worker, args=(config, stop), name=f"worker-{i}", daemon=True)
        for i in range(workers or config.jobs.workers)
    ]
    tls = config.api.tls_cert, config.api.tls_key
    if (tls[0] is None) != (tls[1] is None):
        raise InvalidValue("[api] tls_cert/tls_key", str(tls), "give both files, or neither")
    for f in tls:
        if f is not None and not f.is_file():
            raise InvalidValue("[api] tls_cert/tls_key", str(f), "the file does not exist")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_level="warning",
            ssl_certfile=str(tls[0]) if tls[0] else None,
            ssl_keyfile=str(tls[1]) if tls[1] else None,
        )
    )
    pool.append(threading.Thread(target=_monitor, args=(config, stop), name="monitor", daemon=True))
    for t in pool:
        t.start()
    scheme = "https" if tls[0] else "http"
    log.warning(
        "vmkeep daemon listening on %s://%s:%s, %d workers", scheme, host, port, len(pool) - 1
    )
    try:
        server.run()  # returns after SIGTERM / SIGINT
    finally:
        stop.set()
        for job in jobs.list_jobs(ctx, jobs.RUNNING):
            if job["pid"] == jobs.os.getpid():
                jobs.cancel(ctx, job["id"])
        for t in pool:
            t.join(timeout=300)
    log.warning("vmkeep daemon stopped")
