"""What every benchmark sets up: a work folder QEMU can reach, an isolated vmkeep config and, for
the lab benchmarks, the lab and a vmkeep runner."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vmkeep.hypervisor import connect
from vmkeep.lab import Lab

LAB_DIR = Path("/var/lib/vmkeep/lab")
PREFIX = "vmkeep-bench-"
VK = [sys.executable, "-m", "vmkeep.cli.main"]  # a vmkeep command, in this interpreter


def workspace() -> tuple[Path, dict[str, str]]:
    """A fresh folder under /var/lib/vmkeep (QEMU, an unprivileged user, must reach staging
    files there) and the environment for vmkeep commands that keeps their catalog in it."""
    Path("/var/lib/vmkeep").mkdir(parents=True, exist_ok=True)  # absent on a fresh machine
    work = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/var/lib/vmkeep"))
    work.chmod(0o755)
    (work / "c.toml").write_text("version = 1\n")
    env = dict(os.environ, VMKEEP_DATA_DIR=str(work / "data"), VMKEEP_CONFIG=str(work / "c.toml"))
    return work, env


def lab_workspace() -> tuple[Path, dict[str, str], Lab]:
    """``workspace()`` and the lab on qemu:///system, cleared of VMs an earlier run left."""
    work, env = workspace()
    lab = Lab(connect("qemu:///system"), LAB_DIR, prefix=PREFIX)
    lab.down()
    return work, env, lab


def runner(env: dict[str, str]) -> Callable[..., str]:
    """``vmkeep(*args)``: run a vmkeep command in ``env``, return its stdout, raise if it fails."""

    def vmkeep(*args: str) -> str:
        argv = [*VK, *args]
        return subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout

    return vmkeep


def drop_caches() -> None:
    """Cold runs: write back and drop the page cache (root)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_no_job(dom: Any) -> None:
    """Until the libvirt domain ``dom`` runs no job (a backup job ended or was aborted)."""
    import libvirt

    while dom.jobStats(0).get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
        time.sleep(0.005)


def push_job(dom: Any, target: Path, flags: int = 0) -> None:
    """libvirt's push backup job of disk vda to ``target`` (qcow2), waited for; exits the
    benchmark unless it completed. ``flags``: REUSE_EXTERNAL for a pre-created target."""
    import libvirt

    xml = (
        "<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'>"
        f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>"
    )
    dom.backupBegin(xml, None, flags)
    wait_no_job(dom)
    info = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if info.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        sys.exit(f"push job did not complete: {info}")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """min / median / max, as every benchmark prints its ratios (``fmt``: each number's)."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


@contextmanager
def daemon(env: dict[str, str]) -> Iterator[None]:
    """``vmkeep daemon`` on ``env``'s data dir and catalog for the block, ready when it answers
    on its socket: vmkeep commands in ``env`` read through it (``VMKEEP_NO_DAEMON=1`` in a
    command's env: they do not)."""
    from vmkeep.cli.remote import UnixConnection

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*VK, "daemon", "--listen", f"127.0.0.1:{port}", "--workers", "1"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    sock = str(Path(env["VMKEEP_DATA_DIR"]) / "vmkeep.sock")
    try:
        deadline = time.monotonic() + 60
        while True:
            conn = UnixConnection(sock, timeout=5)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("vmkeep daemon did not answer on its socket") from None
                time.sleep(0.2)
            finally:
                conn.close()
        yield
    finally:
        stop(proc, 120)


def stop(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM to a daemon, then SIGKILL when it has not stopped within ``timeout`` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
