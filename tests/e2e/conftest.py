"""E2E fixtures: real libvirtd, real QEMU (TCG), real qemu-guest-agent in lab guests.

These tests never skip: a host without libvirtd fails them with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
