"""The two-host lab itself, on real libvirtds (this proves the lab, not vmkeep): ``lab hosts up 2``
gives a second libvirtd in its own namespaces reached over TCP, a running lab guest moves to it
and back with plain ``virsh migrate --live`` (its RAM with it, its agent answering there), a
killed lab libvirtd comes back without its guests dying, and ``lab hosts down`` leaves nothing
behind while this machine's own libvirtd keeps running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.hypervisor import connect
from vmkeep.lab import Lab, hosts
from vmkeep.lab.postgres import server

from .conftest import LAB_DIR, PREFIX

# a lab of this module's own (10.79.0.0/16): `lab hosts down` here never takes down the lab
# that other sessions' tests share (10.77)
NET = "79"
HOST1 = "qemu+tcp://10.79.0.1/system"
HOST2 = "qemu+tcp://10.79.1.2/system"


@pytest.fixture(scope="module", autouse=True)
def own_lab_module() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hosts.NET_ENV, NET)
        yield


@pytest.fixture(autouse=True)
def own_lab(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hosts.NET_ENV, NET)  # clean_env removed it; the CLI inherits it


def virsh(*argv: str, uri: str = HOST2, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["virsh", "-c", uri, *argv], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"virsh -c {uri} {' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def running_on(uri: str) -> set[str]:
    return set(virsh("list", "--name", uri=uri).split())


def ping(name: str, uri: str) -> dict[str, object]:
    out = virsh("qemu-agent-command", name, '{"execute":"guest-ping"}', uri=uri, timeout=30)
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def down_after(own_lab: None) -> Iterator[None]:
    """No lab host up before the test (another test's lease may have left the module's hosts
    up: ``up`` must start them itself) and none after it."""
    hosts.down()
    yield
    hosts.down()  # whatever the test left, even when it failed midway


def test_two_hosts_live_migration_there_and_back_and_down(
    vmkeep, lab: Lab, down_after: None
) -> None:
    root_libvirtd = hosts.libvirtd_pid(1)
    assert root_libvirtd is not None
    started = time.monotonic()
    out = vmkeep("lab", "hosts", "up", "2").out
    took_up = time.monotonic() - started
    assert out.splitlines() == [f"host1: {HOST1}", f"host2: {HOST2}"], out
    rows = vmkeep("lab", "hosts", "list", "--json").json()
    assert [(r["number"], r["uri"], r["alive"]) for r in rows] == [
        (1, HOST1, True),
        (2, HOST2, True),
    ]
    lab_libvirtd = rows[1]["libvirtd_pid"]
    assert rows[0]["libvirtd_pid"] == root_libvirtd != lab_libvirtd
    # up again: the running hosts are kept
    vmkeep("lab", "hosts", "up", "2")
    assert vmkeep("lab", "hosts", "list", "--json").json()[1]["libvirtd_pid"] == lab_libvirtd

    # host 2's libvirtd over TCP from here; host 1's over TCP from inside host 2 (the relay);
    # inside host 2, qemu:///system is host 2's own libvirtd
    virsh("list", uri=HOST2)
    res = vmkeep("lab", "hosts", "exec", "2", "--", "virsh", "-c", HOST1, "uri")
    assert res.out.strip() == HOST1
    name = lab.create(f"{PREFIX}hosts", [64 << 20])
    assert name in running_on(HOST1)
    res = vmkeep(
        "lab", "hosts", "exec", "2", "--", "virsh", "-c", "qemu:///system", "list", "--name"
    )
    assert name not in res.out.split()  # host 2 is another libvirtd
    res = vmkeep("lab", "hosts", "exec", "2", "--", "ip", "-br", "addr")
    assert "10.79.1.2/24" in res.out and "192.0.2." not in res.out, res.out  # its own network

    # a mark in the guest's RAM (its root is an initramfs): it must travel with the guest
    mark = f"mark-{time.time_ns()}"
    lab.sh(name, f"echo {mark} > /run/lab-hosts-mark")
    t0 = time.monotonic()
    virsh(
        "migrate",
        "--live",
        "--unsafe",
        name,
        HOST2,
        "tcp://10.79.1.2",
        uri="qemu:///system",
        timeout=300,
    )
    there = time.monotonic() - t0
    assert name in running_on(HOST2) and name not in running_on(HOST1)
    assert ping(name, HOST2) == {"return": {}}
    hv2 = connect(HOST2)
    assert Lab(hv2, LAB_DIR, prefix=PREFIX).sh(name, "cat /run/lab-hosts-mark").strip() == mark

    # back, peer to peer: host 2's libvirtd itself reaches host 1's over TCP
    t0 = time.monotonic()
    virsh("migrate", "--live", "--p2p", "--unsafe", name, HOST1, "tcp://10.79.0.1", timeout=300)
    back = time.monotonic() - t0
    assert name in running_on(HOST1) and name not in running_on(HOST2)
    assert lab.sh(name, "cat /run/lab-hosts-mark").strip() == mark
    print(f"up {took_up:.2f} s, migrate there {there:.2f} s, back {back:.2f} s")

    # host 2's libvirtd killed (by its pid): `up` starts it again in the same namespaces
    subprocess.run(["kill", "-9", str(lab_libvirtd)], check=True)
    deadline = time.monotonic() + 10
    while hosts.is_running(lab_libvirtd):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert vmkeep("lab", "hosts", "list", "--json").json()[1]["alive"] is False
    vmkeep("lab", "hosts", "up", "2")
    again = vmkeep("lab", "hosts", "list", "--json").json()[1]
    assert again["alive"] and again["libvirtd_pid"] != lab_libvirtd
    virsh("list", uri=HOST2)

    started = time.monotonic()
    assert vmkeep("lab", "hosts", "down").out.splitlines() == ["host2: removed"]
    took_down = time.monotonic() - started
    print(f"down {took_down:.2f} s")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "vmkeep79-h2" not in netns.split()
    assert not hosts.is_running(again["libvirtd_pid"])
    assert vmkeep("lab", "hosts", "list", "--json").json() == []
    assert not Path("/var/lib/vmkeep/labhosts-79/2").exists()
    assert not Path("/sys/class/net/vmkeep79-h2").exists()
    # this machine's own libvirtd was never touched, nor its guest
    assert hosts.libvirtd_pid(1) == root_libvirtd
    assert name in running_on("qemu:///system")
    vmkeep("lab", "hosts", "down")  # twice: nothing to do, no error


def test_exec_on_a_host_that_is_not_up_says_so(vmkeep) -> None:
    res = vmkeep("lab", "hosts", "exec", "7", "--", "true", check=19)
    assert "host7 is not up: 'vmkeep lab hosts up 7'" in res.err


def test_postgres_socket_reached_from_inside_host_2(lab_hosts) -> None:
    """The throwaway PostgreSQL's unix socket crosses namespaces: a client inside host 2 (as a
    daemon there would be) uses the same catalog URL."""
    probe = (
        "import sys, sqlalchemy; "
        "e = sqlalchemy.create_engine(sys.argv[1]); "
        "c = e.connect(); print(c.execute(sqlalchemy.text('select 41 + 1')).scalar())"
    )
    with server() as url:
        res = lab_hosts.run(2, sys.executable, "-c", probe, url)
        assert res.returncode == 0 and res.stdout.strip() == "42", res.stderr
        assert lab_hosts.run(2, "ip", "-br", "addr").stdout.count("10.79.1.2/24") == 1
    assert lab_hosts.uris == {1: HOST1, 2: HOST2}
    assert lab_hosts.nsenter(2)[0] == "nsenter"
