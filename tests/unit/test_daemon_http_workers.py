"""``vmkeep daemon --http-workers 2``: a real daemon process whose API is served by two HTTP
processes on the sockets it bound (TCP and the local socket), the job workers in the daemon
itself; a job queued through an HTTP process is claimed at once; a dead HTTP process is started
again; SIGTERM stops them all and the daemon exits 0; with the daemon killed they stop too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from vmkeep.api.daemon import GRACE
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import tokens

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from catalog import fill  # noqa: E402  (bench/catalog.py's generator)

VK = [sys.executable, "-m", "vmkeep.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout  # fmt: skip
    return {int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line}


def wait_for(cond: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def daemon(
    clean_env: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    count = getattr(request, "param", 2)  # HTTP processes
    fill(f"sqlite:///{clean_env / 'catalog.db'}", 20, 2)
    token = tokens.create(Context(load_config()), "op", "operator")["token"]
    port = _free_port()
    proc = subprocess.Popen(
        [
            *VK,
            "daemon",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--http-workers",
            str(count),
        ],  # fmt: skip
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            ok = httpx.get(f"{base}/healthz").status_code == 200
            return ok and len(children(proc.pid)) == (count if count > 1 else 0)
        except httpx.TransportError:
            return False

    try:
        wait_for(up)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"the daemon did not come up: {proc.communicate()[1]}") from None
    yield proc, base, token
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_two_http_processes_serve_and_the_daemon_runs_their_jobs(
    daemon: tuple[subprocess.Popen[str], str, str], clean_env: Path
) -> None:
    proc, base, token = daemon
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=h) as c:
        assert len(c.get("/v1/vms?limit=1000").json()) == 20
        waits = []
        for backup in (1, 2, 3):  # verify jobs: queued by an HTTP process, run by the daemon
            r = c.post(f"/v1/backups/{backup}/verify", json={})
            assert r.status_code == 202, r.text
            job = r.json()["job"]
            done = c.get(f"/v1/jobs/{job['id']}?wait=20").json()
            assert done["state"] in ("DONE", "FAILED") and done["pid"] == proc.pid, done
            started, created = (datetime.fromisoformat(done[k]) for k in ("started", "created"))
            waits.append((started - created).total_seconds())
        assert max(waits) < 0.5, waits  # woken across processes, not at a later poll
    # the CLI reads through the local socket the daemon bound, served by an HTTP process
    listed = subprocess.run([*VK, "vm", "list"], capture_output=True, text=True, check=True)
    assert "vm-00019" in listed.stdout
    # an HTTP process that dies is started again
    first = children(proc.pid)
    os.kill(min(first), signal.SIGKILL)
    wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid) != first)
    assert httpx.get(f"{base}/healthz").status_code == 200
    # SIGTERM: every process stops, the daemon exits 0 and removes its socket
    now = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "2 HTTP processes" in err and "vmkeep daemon stopped" in err
    assert not any(Path(f"/proc/{pid}").exists() for pid in now)
    assert not (clean_env / "vmkeep.sock").exists()


def test_http_processes_stop_when_the_daemon_is_killed(
    daemon: tuple[subprocess.Popen[str], str, str],
) -> None:
    proc, _base, _token = daemon
    http = children(proc.pid)
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in http), 15)


@pytest.mark.parametrize("daemon", [1, 2], indirect=True, ids=["one-process", "two-processes"])
def test_sigterm_ends_open_event_streams_and_the_daemon_stops(
    daemon: tuple[subprocess.Popen[str], str, str],
) -> None:
    """A dashboard tab holds /v1/events open: SIGTERM ends the stream with an ``end`` event and
    the daemon exits 0 at once (uvicorn waits for open requests before it stops)."""
    proc, base, token = daemon
    seen: list[str] = []
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=h, timeout=20) as c:
        assert c.post("/v1/backups/1/verify", json={}).status_code == 202  # a job to be shown
        with c.stream("GET", "/v1/events") as r:
            lines = r.iter_lines()
            while "event: job" not in seen:  # the stream is open and answering
                seen.append(next(lines))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            seen.extend(lines)  # to the stream's end
            ended = time.monotonic() - t0
    # exit 0; within uvicorn's grace plus a margin (a loaded machine once took over 30 s)
    _, err = proc.communicate(timeout=GRACE + 30)
    assert proc.returncode == 0, err
    assert "event: end" in seen and any("the daemon is stopping" in s for s in seen), seen[-3:]
    assert ended < GRACE / 2, ended  # not held open until uvicorn's grace for open requests
