"""The README's many-hosts story, step by step, on real libvirtds, a real PostgreSQL catalog and
two real daemons: two lab hosts, a daemon per host (host 2's inside host 2's namespaces),
guests imported on host 1, one live-migrated to host 2, its backups queued on host 1's daemon
and run by host 2's, a migration back and forth after which the backups stay increments of one
chain, host 2 killed (its libvirtd, the guest's QEMU and its daemon), and the guest redeployed
on host 1 from its newest point with the data written before it.

The module runs on a lab of its own (10.83.0.0/16, ``VMKEEP_LAB_HOSTS_NET``): killing its host 2
never disturbs the lab other modules share."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkeep.hypervisor import connect
from vmkeep.lab import Lab, hosts
from vmkeep.lab.postgres import server

from .conftest import LAB_DIR, PREFIX, running_daemon

NET = "83"
CLUSTER = {  # quick heartbeats and monitoring: a daemon silent after 5 s, its VMs UNKNOWN 3 s on
    "VMKEEP_CLUSTER_HEARTBEAT_INTERVAL": "1",
    "VMKEEP_CLUSTER_SILENT_AFTER": "5",
    "VMKEEP_CLUSTER_UNKNOWN_AFTER": "3",
    "VMKEEP_MONITOR_INTERVAL": "2",
}


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[dict[int, str]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hosts.NET_ENV, NET)
        with hosts.lease(2) as up:
            yield {h.number: h.uri for h in up}


@pytest.fixture(scope="module")
def catalog() -> Iterator[str]:
    with server() as url:
        yield url


@pytest.fixture
def story_env(
    two_hosts: dict[int, str], catalog: str, monkeypatch: pytest.MonkeyPatch
) -> dict[int, str]:
    monkeypatch.setenv(hosts.NET_ENV, NET)
    monkeypatch.setenv("VMKEEP_CATALOG_URL", catalog)
    monkeypatch.setenv("VMKEEP_CLUSTER_HOST", "host1")  # the shell of the README acts for host1
    for k, v in CLUSTER.items():
        monkeypatch.setenv(k, v)
    return two_hosts


def wait_for(what: str, check: Callable[[], Any], seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.5)


def host2_daemon(data: Path) -> subprocess.Popen[str]:
    """``vmkeep daemon --host host2`` inside lab host 2's mount and network namespaces."""
    data.mkdir(mode=0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ) | {"VMKEEP_DATA_DIR": str(data), "VMKEEP_CLUSTER_HOST": "host2"}
    argv = [*hosts.nsenter_argv(2), sys.executable, "-m", "vmkeep.cli.main", "daemon",
            "--host", "host2", "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    return subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, text=True)


def test_two_hosts_a_live_migration_with_backups_and_a_host_lost(
    vmkeep: Any, lab: Lab, story_env: dict[int, str], tmp_path: Path
) -> None:
    uris = story_env
    vmkeep("host", "add", "host1", "--uri", uris[1])
    vmkeep("host", "add", "host2", "--uri", uris[2])
    data1 = Path(os.environ["VMKEEP_DATA_DIR"])
    data2 = data1.with_name(data1.name + "-h2")
    names = [f"{PREFIX}story-1", f"{PREFIX}story-2"]
    d2 = host2_daemon(data2)
    try:
        with running_daemon("--host", "host1", log=tmp_path / "host1.log"):

            def hosts_up() -> bool:
                rows = vmkeep("host", "list", "--json").json()
                return [(h["name"], h["state"], h["daemon"]) for h in rows] == [
                    ("host1", "MONITORED", "alive"), ("host2", "MONITORED", "alive")
                ]  # fmt: skip

            wait_for("both hosts MONITORED with a live daemon", hosts_up)
            for name in names:  # two lab guests on host 1, imported there
                lab.create(name, [64 << 20])
                vmkeep("vm", "import", name)
            guest = names[1]
            moved = vmkeep("vm", "migrate", guest, "host2", "--live", "--json").json()
            assert moved["host"] == "host2" and moved["lcm_state"] == "RUNNING", moved
            on = {v["name"]: v["host"] for v in vmkeep("vm", "list", "--json").json()}
            assert (on[names[0]], on[guest]) == ("host1", "host2")
            host2 = Lab(connect(uris[2]), LAB_DIR, prefix=PREFIX)
            vmkeep("datastore", "add", "local", "--driver", "dir", "--path", str(tmp_path / "b"))
            vmkeep("vm", "config", guest, "--mode", "increment")
            host2.write_random(guest, "/mnt/vda/one", 2)

            first = vmkeep("backup", guest, "--datastore", "local", "--json").json()
            job = next(j for j in vmkeep("jobs", "list", "--json").json() if j["kind"] == "backup")
            assert (job["runs_on"], job["state"], job["pid"]) == ("host2", "DONE", d2.pid)

            vmkeep("vm", "migrate", guest, "host1", "--live")  # back: its checkpoints follow
            second = vmkeep("backup", guest, "--datastore", "local", "--json").json()
            vmkeep("vm", "migrate", guest, "host2", "--live")
            wanted = host2.write_random(guest, "/mnt/vda/two", 2)
            third = vmkeep("backup", guest, "--datastore", "local", "--json").json()
            chain = [(b["id"], b["increment"]) for b in (first, second, third)]
            assert chain == [(first["id"], 0), (first["id"], 1), (first["id"], 2)], chain

            vmkeep("lab", "hosts", "down", "2")  # host 2 dies: libvirtd, the guest's QEMU, daemon
            d2.wait(timeout=60)  # its daemon died with it (TimeoutExpired otherwise)
            try:  # host1's daemon sweeps: host2's VMs UNKNOWN once it is gone long enough
                wait_for(
                    f"{guest} UNKNOWN",
                    lambda: vmkeep("vm", "show", guest, "--json").json()["lcm_state"] == "UNKNOWN",
                )
            except AssertionError as err:  # what the sweep saw, for the report
                rows = vmkeep("host", "list", "--json").json()
                vm = vmkeep("vm", "show", guest, "--json").json()
                said = (tmp_path / "host1.log").read_text()[-4000:]
                raise AssertionError(
                    f"{err}; hosts {rows}; vm {vm}; host1's daemon: {said}"
                ) from None
            res = vmkeep("vm", "recover", guest, "--redeploy", "--host", "host1",
                         "--from-backup", check=None)  # fmt: skip
            assert res.code in (0, 1), res
            shown = vmkeep("vm", "show", guest, "--json").json()
            assert (shown["host"], shown["lcm_state"]) == ("host1", "RUNNING"), shown
            lab.wait_ready(guest)
            assert lab.sha256(guest, "/mnt/vda/two") == wanted
    finally:
        if d2.poll() is None:
            d2.send_signal(signal.SIGTERM)
            d2.wait(timeout=60)
        for name in names:
            lab.remove(name)
        shutil.rmtree(data2, ignore_errors=True)
