"""The CLI reads through a running daemon's local socket (``cli/remote.py``): a real ``vmkeep
daemon`` process on a catalog with 20 VMs, the CLI as real processes (no VMs needed)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from catalog import fill  # noqa: E402  (bench/catalog.py's generator)

VK = [sys.executable, "-m", "vmkeep.cli.main"]
READS = [
    ["backups", "list"],
    ["backups", "list", "--json"],
    ["backups", "list", "--vm", "vm-00003", "--json"],
    ["backups", "show", "2"],
    ["vm", "list"],
    ["vm", "list", "--json"],
    ["vm", "show", "vm-00007", "--json"],
    ["jobs", "list"],
]


def vk(
    *args: str, env: dict[str, str] | None = None, check: int = 0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*VK, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == check, proc.stderr
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*VK, "daemon", "--listen", f"127.0.0.1:{port}", "--workers", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the daemon did not start"
        time.sleep(0.2)


@pytest.fixture
def daemon(clean_env: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    fill(f"sqlite:///{clean_env / 'catalog.db'}", 20, 3)
    port = _free_port()
    proc = _start(port)
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_reads_answered_by_the_daemon_equal_the_direct_reads(
    daemon: tuple[subprocess.Popen[str], int], clean_env: Path
) -> None:
    sock = clean_env / "vmkeep.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    direct = dict(os.environ, VMKEEP_NO_DAEMON="1")
    for argv in READS:
        assert vk(*argv).stdout == vk(*argv, env=direct).stdout, argv
    # answered by the daemon: this process never imported SQLAlchemy
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", *VK[1:], "backups", "list"],
        capture_output=True,
        text=True,
    )
    assert traced.returncode == 0 and "vm-00019" in traced.stdout
    assert "sqlalchemy" not in traced.stderr
    # the direct path did (the check above can tell the two apart)
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", *VK[1:], "backups", "list"],
        capture_output=True,
        text=True,
        env=direct,
    )
    assert "sqlalchemy" in traced.stderr
    # an error comes back as the same message and exit code
    assert (
        vk("backups", "show", "999", check=6).stderr
        == vk("backups", "show", "999", env=direct, check=6).stderr
    )


def test_a_cli_on_another_catalog_reads_its_own(
    daemon: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    other = dict(os.environ, VMKEEP_CATALOG_URL=f"sqlite:///{tmp_path / 'other.db'}")
    assert vk("vm", "list", "--json", env=other).stdout.strip() == "[]"  # not the daemon's 20


def test_the_socket_grants_nothing_over_tcp(daemon: tuple[subprocess.Popen[str], int]) -> None:
    _proc, port = daemon
    r = httpx.get(f"http://127.0.0.1:{port}/v1/vms", headers={"X-Vmkeep-Catalog": "x"})
    assert r.status_code == 401


def _answered_by_a_daemon() -> bool:
    """``vm list`` printed the catalog's VMs without this process importing SQLAlchemy."""
    argv = [sys.executable, "-X", "importtime", *VK[1:], "vm", "list"]
    traced = subprocess.run(argv, capture_output=True, text=True)
    return "vm-00019" in traced.stdout and "sqlalchemy" not in traced.stderr


def test_a_second_daemon_on_the_data_dir_and_a_dead_ones_socket(
    daemon: tuple[subprocess.Popen[str], int], clean_env: Path
) -> None:
    proc, _port = daemon
    sock = clean_env / "vmkeep.sock"
    ours = sock.stat().st_ino
    # a second daemon on the same data dir serves TCP only and leaves the first one's socket
    second = _start(_free_port())
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0 and "another daemon answers on" in err, err
    assert sock.stat().st_ino == ours
    assert _answered_by_a_daemon()  # the first one
    proc.kill()  # SIGKILL: its socket stays behind
    proc.wait()
    assert sock.exists()
    direct = vk("vm", "list")
    assert "vm-00019" in direct.stdout and direct.stderr == ""  # read directly, not a word
    again = _start(_free_port())  # replaces the dead one's socket
    try:
        assert _answered_by_a_daemon()
    finally:
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert not sock.exists()


def test_completion_asks_the_daemon(daemon: tuple[subprocess.Popen[str], int]) -> None:
    """Tab's answer (``cli/complete.py``) comes from the daemon's list routes, the same as the
    catalog read in the process would give, and without that process loading SQLAlchemy."""
    ask = {"_VMKEEP_COMPLETE": "bash_complete"}
    direct = dict(os.environ, VMKEEP_NO_DAEMON="1")
    for line in ("vmkeep vm show vm-0001", "vmkeep backups show 1", "vmkeep jobs show "):
        words = {"COMP_WORDS": line, "COMP_CWORD": "3", **ask}
        traced = subprocess.run(
            [sys.executable, "-X", "importtime", *VK[1:]],
            capture_output=True,
            text=True,
            env=dict(os.environ, **words),
        )
        assert traced.returncode == 0 and "sqlalchemy" not in traced.stderr, line
        itself = subprocess.run(VK, capture_output=True, text=True, env=dict(direct, **words))
        assert (itself.returncode, itself.stderr) == (0, "")
        assert traced.stdout == itself.stdout, line
        if "vm show" in line:
            assert traced.stdout.split() == [f"plain,vm-000{n}" for n in range(10, 20)]
