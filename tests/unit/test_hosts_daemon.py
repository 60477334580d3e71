"""``vmkeep daemon --host NAME``: a real daemon process on a SQLite catalog and libvirt's test
driver (``test:///default``, in-process: no libvirtd): refused at start for a host the catalog
does not have; with ``--http-workers 2`` its HTTP processes act for the same host; it beats,
monitors its host, and its sweep tells the job queued for a host without a daemon why it waits."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from vmkeep.catalog.tables import Vm
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts import records
from vmkeep.engine.service import tokens

VK = [sys.executable, "-m", "vmkeep.cli.main"]
FAST = {"VMKEEP_MONITOR_INTERVAL": "1", "VMKEEP_CLUSTER_HEARTBEAT_INTERVAL": "0.5"}


def wait_for(cond: Callable[[], Any], seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while not (got := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return got


def test_a_host_the_catalog_does_not_have_is_refused_at_start(clean_env: Path) -> None:
    proc = subprocess.run([*VK, "daemon", "--host", "nope", "--listen", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 6, proc.stderr
    assert "Host 'nope' does not exist" in proc.stderr and "vmkeep host add" in proc.stderr


def test_the_daemon_and_its_http_processes_act_for_its_host(
    clean_env: Path, monkeypatch: Any
) -> None:
    ctx = Context(load_config())
    for name in ("h1", "h2"):
        records.add(ctx, name, "test:///default")
    with ctx.catalog.session() as s:  # catalog-only VMs: no such domain on the test driver
        for n, host in enumerate(("h1", "h2")):
            s.add(Vm(name=f"ghost-{host}", uuid=f"00000000-0000-4000-8000-{n:012d}",
                     host_uri="test:///default", host=host, state="ACTIVE", lcm_state="RUNNING",
                     backup_config={}))  # fmt: skip
    token = tokens.create(ctx, "op", "admin")["token"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    proc = subprocess.Popen(
        [*VK, "daemon", "--host", "h1", "--listen", f"127.0.0.1:{port}", "--workers", "1",
         "--http-workers", "2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        ) as c:

            def up() -> bool:
                try:
                    return c.get("/healthz").status_code == 200
                except httpx.TransportError:
                    assert proc.poll() is None, proc.communicate()[1]
                    return False

            wait_for(up)
            # an HTTP process of h1's daemon refreshes h1's VM from h1's libvirt (no domain:
            # UNKNOWN, refused); h2's VM it leaves to h2's daemon and queues the job for it
            r = c.post("/v1/vms/ghost-h1/quiesce")
            assert r.status_code == 409 and "UNKNOWN" in r.text, r.text
            r = c.post("/v1/vms/ghost-h2/quiesce")
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
            job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["waiting"] and j)
            assert job["state"] == "QUEUED" and job["runs_on"] == "h2", job
            assert job["waiting"].startswith("host h2's daemon has never sent a heartbeat")
        h1 = wait_for(lambda: (h := records.show(ctx, "h1"))["state"] == "MONITORED" and h)
        assert h1["daemon"] == "alive" and h1["daemon_info"]["pid"] == proc.pid, h1
        assert h1["daemon_info"]["listen"] == f"127.0.0.1:{port}"
        assert h1["monitor"]["cpus"] > 0 and h1["monitor"]["vms"] == 1, h1
        assert records.show(ctx, "h2")["state"] == "INIT"  # no daemon of its own: not monitored
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "running the jobs of host h1" in err and "Traceback" not in err, err
