"""The two-host lab's pure parts: addresses, URIs, the libvirtd.conf it writes, the argv it runs,
and the throwaway PostgreSQL's URL and options (the real lab: tests/e2e/test_lab_hosts.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmkeep.errors import LabError
from vmkeep.lab import hosts
from vmkeep.lab.hosts import LabHost
from vmkeep.lab.postgres import Postgres, server_options


def test_addresses_and_uris_of_host_1_and_host_k() -> None:
    one, two, three = LabHost(1), LabHost(2), LabHost(3)
    assert (one.address, one.uri, one.local_uri) == (
        "10.77.0.1",
        "qemu+tcp://10.77.0.1/system",
        "qemu:///system",
    )
    assert one.netns is None and one.libvirtd_pidfile == Path("/run/libvirtd.pid")
    assert (two.name, two.netns, two.address, two.peer) == (
        "host2",
        "vmkeep-h2",
        "10.77.1.2",
        "10.77.1.1",
    )
    assert two.uri == "qemu+tcp://10.77.1.2/system"
    assert two.local_uri == "qemu+unix:///system?socket=/var/lib/vmkeep/labhosts/2/run/libvirt-sock"
    assert three.address == "10.77.2.2" and three.veth == ("vmkeep-h3", "vmkeep-h3p")
    assert all(len(name) <= 15 for name in LabHost(200).veth)  # IFNAMSIZ


@pytest.mark.parametrize("n", [0, -1, 201])
def test_host_numbers_out_of_range_are_refused(n: int) -> None:
    with pytest.raises(LabError, match="out of range"):
        LabHost(n)


def test_libvirtd_conf_keeps_the_machines_settings_and_listens_on_plain_tcp() -> None:
    text = hosts.libvirtd_conf("# comment\nmax_clients = 7\n")
    assert text.startswith("# comment\nmax_clients = 7\n")
    lines = text.splitlines()
    for setting in ("listen_tls = 0", "listen_tcp = 1", 'auth_tcp = "none"'):
        assert setting in lines
    assert hosts.libvirtd_conf("").count("listen_tcp = 1") == 1


def test_setup_script_binds_every_own_folder_then_starts_the_daemons() -> None:
    host = LabHost(2)
    script = hosts.setup_script(host).splitlines()
    assert script[0] == "set -e"
    mounts = [line.split()[2:] for line in script if line.startswith("mount --bind")]
    assert mounts == [
        ["/var/lib/vmkeep/labhosts/2/run", "/run/libvirt"],
        ["/var/lib/vmkeep/labhosts/2/lib", "/var/lib/libvirt"],
        ["/var/lib/vmkeep/labhosts/2/etc", "/etc/libvirt"],
        ["/var/lib/vmkeep/labhosts/2/log", "/var/log/libvirt"],
        ["/var/lib/vmkeep/labhosts/2/cache", "/var/cache/libvirt"],
        ["/var/lib/vmkeep/labhosts/2/hostlocal", "/var/lib/vmkeep/hostlocal"],
    ]
    # the daemons start after the mounts, with pid files in the shared state folder
    assert script[-2:] == [
        "virtlogd -d -p /var/lib/vmkeep/labhosts/2/virtlogd.pid",
        "libvirtd -d --listen -p /var/lib/vmkeep/labhosts/2/libvirtd.pid",
    ]
    argv = hosts.start_argv(host)
    assert argv[:8] == ["ip", "netns", "exec", "vmkeep-h2", "unshare", "-m", "--propagation",
                        "private"]  # fmt: skip
    assert argv[-1] == hosts.setup_script(host)


def test_network_of_host_k() -> None:
    argvs = hosts.network_argvs(LabHost(3))
    assert argvs[0] == ["ip", "netns", "add", "vmkeep-h3"]
    assert ["ip", "addr", "add", "10.77.2.1/24", "dev", "vmkeep-h3"] in argvs
    assert ["ip", "-n", "vmkeep-h3", "addr", "add", "10.77.2.2/24", "dev", "vmkeep-h3p"] in argvs
    assert ["ip", "-n", "vmkeep-h3", "link", "set", "lo", "up"] in argvs
    # host 1's 10.77.0.1 is reached through the root namespace's end of the pair
    assert argvs[-1] == [
        "ip",
        "-n",
        "vmkeep-h3",
        "route",
        "add",
        "10.77.0.1/32",
        "via",
        "10.77.2.1",
    ]


def test_nsenter_prefix() -> None:
    assert hosts.nsenter_prefix(LabHost(1), 123) == []
    assert hosts.nsenter_prefix(LabHost(2), 4242) == [
        "nsenter",
        "--mount=/proc/4242/ns/mnt",
        "--net=/run/netns/vmkeep-h2",
        "--",
    ]


def test_exec_without_a_command_is_refused() -> None:
    with pytest.raises(LabError, match="no command given"):
        hosts.exec(2, [])


def test_a_pid_is_ours_only_with_its_program_and_a_zombie_is_not_running() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert hosts.is_running(proc.pid)
        assert hosts._alive(proc.pid, "python")
        assert not hosts._alive(proc.pid, "libvirtd")  # a reused pid is never taken for one
        assert not hosts._alive(None, "python")
        proc.kill()
        deadline = time.monotonic() + 10
        while hosts.is_running(proc.pid):  # a zombie until waited for: not running
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not hosts.is_running(proc.pid)


def test_relay_argv_runs_this_python() -> None:
    argv = hosts.relay_argv("10.77.0.1", Path("/run/libvirt/libvirt-sock"))
    assert argv == [sys.executable, "-m", "vmkeep.lab.relay", "10.77.0.1", "16509",
                    "/run/libvirt/libvirt-sock"]  # fmt: skip


def test_up_and_down_need_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts.os, "geteuid", lambda: 1000)
    for call in (lambda: hosts.up(2), hosts.down):
        with pytest.raises(LabError, match="needs root"):
            call()


def test_up_refuses_a_count_below_two() -> None:
    with pytest.raises(LabError, match="out of range|needs root"):
        hosts.up(1)


def test_postgres_url_and_options() -> None:
    pg = Postgres(Path("/tmp/vmkeep-pg-x"), 5432)
    assert pg.url == "postgresql+psycopg://postgres@/vmkeep?host=/tmp/vmkeep-pg-x&port=5432"
    assert pg.tcp_url is None
    assert "listen_addresses=''" in server_options(pg) and "-k /tmp/vmkeep-pg-x" in server_options(
        pg
    )
    tcp = Postgres(Path("/tmp/p"), 6000, "10.77.1.1")
    assert tcp.tcp_url == "postgresql+psycopg://postgres@10.77.1.1:6000/vmkeep"
    assert "listen_addresses='10.77.1.1'" in server_options(tcp)
