"""The API's limits against a real ``vmkeep daemon`` (real uvicorn on 127.0.0.1, empty catalog,
no lab VM): a 200 MB body without a token is answered at once (413 or 401) and the daemon's RSS
does not grow; 45 waits of one token get 429 beyond ``[api] max_streams_per_token`` and
``/healthz`` stays quick; a revoked token's event stream ends. Issue 23 ("Limits")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx

from vmkeep.catalog.tables import Job
from vmkeep.config import load_config
from vmkeep.engine.core.context import Context
from vmkeep.engine.service import audit, tokens

BIG = 200 << 20  # the body of the finding: 200 MB


@contextmanager
def running_daemon(data: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = (data.parent / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", "daemon", "--listen", f"127.0.0.1:{port}"]
        + ["--workers", "1"],
        env=dict(os.environ),
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (data.parent / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (data.parent / "daemon.log").read_text()
        log.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send_big_body(port: int, head: str, chunked: bool) -> tuple[bytes, float]:
    """Send ``head`` then up to 200 MB of body (as fast as the daemon takes it) while reading
    the answer; the answer's first bytes and the seconds it took."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(30)
    sock.sendall(head.encode())
    chunk = b"x" * (1 << 20)
    stop = threading.Event()

    def pump() -> None:
        sent = 0
        try:
            while sent < BIG and not stop.is_set():
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
            if chunked and not stop.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the daemon closed the connection: it will not take the rest

    sender = threading.Thread(target=pump, daemon=True)
    start = time.monotonic()
    sender.start()
    try:
        answer = sock.recv(4096)
        took = time.monotonic() - start
    finally:
        stop.set()
        sock.close()
        sender.join(30)
    return answer, took


def test_a_200_mb_body_is_refused_at_once_and_never_taken_in(clean_env: Path) -> None:
    ctx = Context(load_config())
    operator = tokens.create(ctx, "ops", "operator")["token"]
    with running_daemon(clean_env) as (proc, port):
        before = rss_mib(proc.pid)
        post = f"POST /v1/vms/web/backup HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        json_type = "Content-Type: application/json\r\n"
        cases = [
            # declared size over the limit, no token: 413 before anything else
            (f"{post}{json_type}Content-Length: {BIG}\r\n\r\n", False, 413),
            # chunked (no size said), no token: 401 before a byte of the body is read
            (f"{post}{json_type}Transfer-Encoding: chunked\r\n\r\n", True, 401),
            # chunked with a valid token: counted while it streams, 413 past 2 MiB
            (
                f"{post}{json_type}Authorization: Bearer {operator}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n",
                True,
                413,
            ),
        ]
        for head, chunked, status in cases:
            answer, took = send_big_body(port, head, chunked)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (head, answer[:300])
            assert took < 5, (head, took)
        grown = rss_mib(proc.pid) - before
        assert grown < 20, f"the daemon's RSS grew by {grown:.0f} MiB"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    # each refusal audited with its actor and status (a request the server answered while its
    # body still came in is recorded when its connection ends: the order may vary)
    entries = [(e["actor"], e["method"], e["status"]) for e in audit.list_entries(ctx)]
    assert sorted(entries) == [("-", "POST", 401), ("-", "POST", 413), ("ops", "POST", 413)]


def _running_job(ctx: Context) -> int:
    """A RUNNING job of this (live) process: the daemon's workers leave it alone."""
    with ctx.catalog.session() as s:
        job = Job(kind="verify", target="1", state="RUNNING", host=socket.gethostname(),
                  pid=os.getpid(), origin="api", who="x", params={},
                  started_at=datetime.now(UTC))  # fmt: skip
        s.add(job)
        s.flush()
        return int(job.id)


def test_45_waits_of_one_token_get_429_and_healthz_stays_quick(clean_env: Path) -> None:
    ctx = Context(load_config())
    viewer = tokens.create(ctx, "viewer", "viewer")["token"]
    limit = ctx.config.api.max_streams_per_token
    job = _running_job(ctx)
    with running_daemon(clean_env) as (_proc, port):
        base = f"http://127.0.0.1:{port}"

        def wait() -> int:
            r = httpx.get(
                f"{base}/v1/jobs/{job}?wait=8",
                headers={"Authorization": f"Bearer {viewer}"},
                timeout=30,
            )
            return r.status_code

        with ThreadPoolExecutor(45) as pool:
            waits = [pool.submit(wait) for _ in range(45)]
            time.sleep(1.5)  # every wait has arrived: `limit` of them are waiting
            for _ in range(5):
                start = time.monotonic()
                assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
                assert time.monotonic() - start < 1.0
                time.sleep(0.2)
            statuses = sorted(f.result() for f in waits)
    assert statuses.count(200) == limit, statuses
    assert statuses.count(429) == 45 - limit, statuses


def test_a_revoked_tokens_event_stream_ends(clean_env: Path) -> None:
    ctx = Context(load_config())
    viewer = tokens.create(ctx, "watcher", "viewer")["token"]
    with running_daemon(clean_env) as (_proc, port):
        lines: list[str] = []
        ended = threading.Event()

        def follow() -> None:
            with httpx.stream(
                "GET",
                f"http://127.0.0.1:{port}/v1/events",
                headers={"Authorization": f"Bearer {viewer}"},
                timeout=60,
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    lines.append(line)
            ended.set()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        time.sleep(1.5)
        assert not ended.is_set(), "the stream ended before the token was revoked"
        revoked = time.monotonic()
        tokens.revoke(ctx, "watcher")
        assert ended.wait(15), "the stream of a revoked token goes on"
        assert time.monotonic() - revoked < 10
        assert 'data: {"reason": "token revoked"}' in lines
        reader.join(5)
