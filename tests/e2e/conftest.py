"""E2E fixtures: real libvirtd, real QEMU (TCG), real qemu-guest-agent in lab guests.

These tests never skip: a host without libvirtd fails them with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmkeep.errors import HypervisorUnreachable
from vmkeep.hypervisor import Hypervisor, connect
from vmkeep.lab import Lab

LAB_DIR = Path(os.environ.get("VMKEEP_E2E_LAB_DIR", "/var/lib/vmkeep/lab"))
# One lab per pytest process: under pytest-xdist each worker has its own prefix (its session's
# lab.down() must never touch another worker's VMs); VMKEEP_E2E_PREFIX overrides it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
PREFIX = os.environ.get("VMKEEP_E2E_PREFIX") or (
    f"vmkeep-x{_WORKER}-" if _WORKER else "vmkeep-e2e-"
)


@pytest.fixture(scope="session")
def hv() -> Hypervisor:
    hv = connect("qemu:///system")
    try:
        hv.list_domains()
    except HypervisorUnreachable as err:
        pytest.fail(f"e2e tests need a running libvirtd (start it with 'libvirtd -d'): {err}")
    return hv


@pytest.fixture(scope="session")
def lab(hv: Hypervisor) -> Iterator[Lab]:
    lab = Lab(hv, LAB_DIR, prefix=PREFIX)
    lab.down()
    yield lab
    lab.down()


@pytest.fixture(scope="session")
def agent_vm(lab: Lab) -> str:
    """A running lab VM with qemu-guest-agent and one 256 MiB ext4 data disk at /mnt/vda."""
    return lab.create(f"{PREFIX}agent", [256 << 20])


@pytest.fixture(scope="session")
def noagent_vm(lab: Lab) -> str:
    """A running lab VM whose agent channel exists but no agent runs in the guest."""
    return lab.create(f"{PREFIX}noagent", [64 << 20], agent=False)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def qemu_reachable_data_dir(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """QEMU (an unprivileged user) must reach vmkeep's staging folder: keep it out of /tmp/pytest-*."""
    import shutil
    import uuid

    data = LAB_DIR.parent / "e2e-data" / uuid.uuid4().hex[:8]
    data.mkdir(parents=True)
    data.chmod(0o755)  # whatever umask an in-process CLI call left: QEMU passes through it
    monkeypatch.setenv("VMKEEP_DATA_DIR", str(data))
    yield data
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def vmkeep(clean_env: Path) -> object:
    """Run the real CLI in a subprocess with the test's isolated environment."""

    def run(*args: str, check: int | None = 0, timeout: float = 600) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "vmkeep.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ),
        )
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        if check is not None:
            assert res.code == check, f"vmkeep {' '.join(args)} -> {res.code}\n{res.out}\n{res.err}"
        assert "Traceback" not in res.err, res.err
        return res

    return run


def guests_up(lab: Lab, hv: Hypervisor, names: list[str]) -> None:
    """Each of a module's shared lab guests running with its agent answering (an earlier test may
    have stopped one or killed its agent) and without checkpoints an earlier test's catalog left
    (their names would clash with a new catalog's first backups)."""
    for name in names:
        if hv.domain(name).state != "ACTIVE" or not hv.guest_ping(name, 2):
            hv.destroy(name)
            lab.start(name)
        for cp in hv.checkpoints(name):
            hv.delete_checkpoint(name, cp)


def make_group(
    vmkeep: Any, lab: Lab, hv: Hypervisor, names: list[str], store: Path, *config: str
) -> str:
    """Group 'app' of the lab guests ``names`` (their start order) in the test's fresh catalog,
    each up (``guests_up``) and imported (then ``vm config NAME *config``), and datastore 'ds'
    at ``store``."""
    guests_up(lab, hv, names)
    for name in names:
        vmkeep("vm", "import", name)
        if config:
            vmkeep("vm", "config", name, *config)
    vmkeep("datastore", "add", "ds", "--driver", "dir", "--path", str(store))
    vmkeep("group", "create", "app", *names)
    return "app"


@contextmanager
def running_daemon(
    *extra: str, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], httpx.Client]]:
    """A real ``vmkeep daemon`` on loopback and on its socket in the test's data dir, with an
    httpx client of its API; stopped with SIGTERM (exit 0). ``extra``: more daemon options;
    ``log``: where its stderr goes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = open(log, "a") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkeep.cli.main", "daemon", "--listen", f"127.0.0.1:{port}",
         *extra],
        env=dict(os.environ),
        stderr=err,
        text=True,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "no daemon"
                time.sleep(0.2)
            yield proc, c
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        if log is not None:
            err.close()  # type: ignore[union-attr]
        assert code == 0


@dataclass
class LabHosts:
    """The two-host lab as tests use it: ``uris[n]`` is host n's libvirt URI over TCP (as every
    host and daemon reaches it), ``nsenter(n)`` the argv prefix running a command on host n."""

    uris: dict[int, str]

    def nsenter(self, n: int) -> list[str]:
        from vmkeep.lab import hosts

        return hosts.nsenter_argv(n)

    def run(self, n: int, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        from vmkeep.lab import hosts

        return hosts.exec(n, list(argv), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab_hosts() -> Iterator[LabHosts]:
    """Hosts 1 and 2 of the two-host lab (``vmkeep.lab.hosts``), on a lease: brought down after
    the module unless another process (another session's tests) still uses them."""
    from vmkeep.lab import hosts

    with hosts.lease(2) as up:
        yield LabHosts({h.number: h.uri for h in up})


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL 15 server (``vmkeep.lab.postgres``): its catalog URL, over a unix
    socket that daemons inside lab hosts reach too."""
    from vmkeep.lab.postgres import server

    with server() as url:
        yield url


@dataclass(frozen=True)
class Delivery:
    """One POST a ``Webhook`` got: when, what it answered, the body and its signature header."""

    at: float
    status: int
    body: bytes
    signature: str

    def json(self) -> Any:
        return json.loads(self.body)


class Webhook:
    """A webhook receiver on loopback that records every POST; it answers 500 to the first
    ``refuse_first`` requests, 200 after. Its URL carries a token (``?token=...``) vmkeep must
    never print."""

    def __init__(self, refuse_first: int = 0) -> None:
        self.got: list[Delivery] = []
        self.refuse_first = refuse_first
        self.token = f"hook{secrets.token_hex(6)}"
        lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    status = 500 if len(hook.got) < hook.refuse_first else 200
                    sig = self.headers.get("X-Vmkeep-Signature", "")
                    hook.got.append(Delivery(time.time(), status, body, sig))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token={self.token}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def delivered(self) -> list[Any]:
        """The JSON bodies it answered 200."""
        return [d.json() for d in self.got if d.status == 200]

    def close(self) -> None:
        """Stop listening (a later delivery is refused by the OS); idempotent."""
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()
