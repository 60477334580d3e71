"""The two-host lab on one machine: more libvirt hosts, each a libvirtd + virtlogd in its own
network and mount namespaces (see docs/hosts.md).

Host 1 is the machine's own libvirtd (``qemu:///system``). It listens on its unix socket only and
other tests use it, so it is never restarted: a relay (``vmkeep.lab.relay``) makes it reachable
over TCP at 10.77.0.1 (a lab veth of the root namespace) and at 10.77.(K-1).1 (the root side of
host K's veth pair). Host K >= 2 lives in the namespace ``vmkeep-hK`` at 10.77.(K-1).2, with
its own /run/libvirt, /var/lib/libvirt, /etc/libvirt, /var/log/libvirt, /var/cache/libvirt
and its own "local storage" at /var/lib/vmkeep/hostlocal, all bind-mounted from
/var/lib/vmkeep/labhosts/K/; every other path is shared. Every process the lab starts is
stopped by its pid (a pid file, or ``ip netns pids`` of the lab's own namespace), never by name.
Names, addresses and the argv run here come from ``vmkeep.lab.hostplan``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from vmkeep.errors import LabError
from vmkeep.lab.hostplan import (
    BIND_MOUNTS,
    DAEMON_UMASK,
    ETC_LIBVIRT,
    HOSTLOCAL,
    LIBVIRT_PORT,
    MAX_HOSTS,
    NET_ENV,
    ROOT_SOCKET,
    LabHost,
    libvirtd_conf,
    network_argvs,
    nsenter_prefix,
    relay_argv,
    start_argv,
)

__all__ = ["NET_ENV", "LabHost", "down", "exec", "is_running", "lease", "libvirtd_pid", "list",
           "nsenter_argv", "start_libvirtd", "up"]  # fmt: skip

UP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


# --- processes --------------------------------------------------------------------------------
def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> builtins.list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int | None, marker: str) -> bool:
    """The pid runs and is what the pid file says (a reused pid is not ours)."""
    return pid is not None and any(marker in part for part in _cmdline(pid)[:4])


def _net_ino(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _in_netns(pid: int, netns: str) -> bool:
    try:
        return _net_ino(pid) == os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return False


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (whose parent, maybe init, has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop_pids(pids: builtins.list[int], timeout: float = STOP_TIMEOUT) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run(argv: builtins.list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as err:
        raise LabError(f"{argv[0]} is not installed (iproute2 / util-linux / libvirt)") from err
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


def _wait_port(address: str, what: str, check: str, timeout: float = UP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, LIBVIRT_PORT), 1):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise LabError(
                    f"{what} did not listen on {address}:{LIBVIRT_PORT} within {timeout:.0f} s "
                    f"({err}); check {check}"
                ) from None
            time.sleep(0.1)


def libvirtd_pid(n: int) -> int | None:
    """The pid of host n's libvirtd, None when it does not run."""
    host = LabHost(n)
    pid = _read_pid(host.libvirtd_pidfile)
    if not _alive(pid, "libvirtd"):
        return None
    assert pid is not None
    if host.netns is not None and not _in_netns(pid, host.netns):
        return None
    return pid


def _start_relay(host: LabHost, address: str) -> None:
    """Host 1's libvirtd over TCP at ``address`` (kept when it runs already)."""
    if _alive(_read_pid(host.relay_pidfile), "vmkeep.lab.relay"):
        return
    host.dir.mkdir(parents=True, exist_ok=True)
    with open(host.dir / "relay.log", "ab") as log:
        proc = subprocess.Popen(
            relay_argv(address, ROOT_SOCKET),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    host.relay_pidfile.write_text(f"{proc.pid}\n")
    _wait_port(address, "the relay to host 1's libvirtd", f"{host.dir / 'relay.log'}", 10)


def _stop_relay(host: LabHost) -> None:
    pid = _read_pid(host.relay_pidfile)
    if pid is not None and _alive(pid, "vmkeep.lab.relay"):
        _stop_pids([pid], 5)
    host.relay_pidfile.unlink(missing_ok=True)


# --- host 1 -----------------------------------------------------------------------------------
def _host1_up() -> None:
    if not ROOT_SOCKET.exists():
        raise LabError(f"host 1's libvirtd is not running ({ROOT_SOCKET} missing): 'libvirtd -d'")
    HOSTLOCAL.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(HOSTLOCAL.stat().st_mode)
    if mode & 0o011 != 0o011:
        HOSTLOCAL.chmod(mode | 0o011)  # QEMU opens the disks in it by their paths
    one = LabHost(1)
    link, peer = one.veth
    if not _link_exists(link):
        _run(["ip", "link", "add", link, "type", "veth", "peer", "name", peer])
        _run(["ip", "addr", "add", f"{one.address}/24", "dev", link])
        _run(["ip", "link", "set", peer, "up"])
        _run(["ip", "link", "set", link, "up"])
    _start_relay(one, one.address)


def _host1_down() -> None:
    _stop_relay(LabHost(1))
    if _link_exists(LabHost(1).veth[0]):
        _run(["ip", "link", "del", LabHost(1).veth[0]], check=False)
    shutil.rmtree(LabHost(1).dir, ignore_errors=True)
    # HOSTLOCAL stays: it is the mount point of every lab's hosts (removing a mount point
    # unmounts it in the namespaces that use it)


# --- host K >= 2 ------------------------------------------------------------------------------
def _like(path: Path, original: Path, default: int = 0o755) -> None:
    """``path`` gets the mode and owner of the machine's ``original`` (QEMU, an unprivileged
    user, walks these folders; the lab may run under a private umask)."""
    try:
        st = original.stat()
    except OSError:
        path.chmod(default)
        return
    path.chmod(stat.S_IMODE(st.st_mode))
    os.chown(path, st.st_uid, st.st_gid)


def _prepare_dirs(host: LabHost) -> None:
    if host.dir.exists():
        shutil.rmtree(host.dir)
    host.dir.mkdir(parents=True)
    for target, sub in BIND_MOUNTS:
        (host.dir / sub).mkdir()
        _like(host.dir / sub, Path(target))
    etc = host.dir / "etc"
    for conf in ETC_LIBVIRT.glob("*.conf"):
        shutil.copy2(conf, etc / conf.name)
    conf = etc / "libvirtd.conf"
    conf.write_text(libvirtd_conf(conf.read_text() if conf.exists() else ""))
    if (ETC_LIBVIRT / "nwfilter").is_dir():
        shutil.copytree(ETC_LIBVIRT / "nwfilter", etc / "nwfilter")
    for sub, default in (("qemu", 0o755), ("qemu/networks", 0o755), ("secrets", 0o700),
                         ("storage", 0o755)):  # fmt: skip
        (etc / sub).mkdir(exist_ok=True)
        _like(etc / sub, ETC_LIBVIRT / sub, default)


def _host_alive(host: LabHost) -> bool:
    return (
        host.netns is not None
        and _netns_exists(host.netns)
        and libvirtd_pid(host.number) is not None
        and _alive(_read_pid(host.relay_pidfile), "vmkeep.lab.relay")
    )


def _host_up(host: LabHost) -> None:
    assert host.netns is not None
    _host_down(host)  # whatever a killed earlier run left
    _prepare_dirs(host)
    for argv in network_argvs(host):
        _run(argv)
    _run(start_argv(host))
    _wait_port(host.address, f"{host.name}'s libvirtd", f"{host.dir / 'log' / 'libvirtd.log'}")
    _start_relay(host, host.peer)


def _host_down(host: LabHost) -> None:
    """Stop every process of the host (its namespace's pids, its pid files), remove the
    namespace, the veth pair and the folders. Safe to call in any state."""
    assert host.netns is not None
    _stop_relay(host)
    pids: builtins.list[int] = []
    if _netns_exists(host.netns):
        out = _run(["ip", "netns", "pids", host.netns], check=False).stdout
        pids = [int(p) for p in out.split() if p.isdigit()]
    own = _net_ino(os.getpid())
    for pidfile, marker in (
        (host.libvirtd_pidfile, "libvirtd"),
        (host.virtlogd_pidfile, "virtlogd"),
    ):
        # a daemon whose namespace was removed under it, but never one of the root namespace
        pid = _read_pid(pidfile)
        if pid is not None and pid not in pids and _alive(pid, marker) and _net_ino(pid) != own:
            pids.append(pid)
    if pids:
        _stop_pids(pids)
    if _netns_exists(host.netns):
        _run(["ip", "netns", "del", host.netns], check=False)
    if _link_exists(host.veth[0]):
        _run(["ip", "link", "del", host.veth[0]], check=False)
    shutil.rmtree(host.dir, ignore_errors=True)


def _lab_numbers() -> builtins.list[int]:
    """Hosts K >= 2 the lab may have left: state folders and namespaces."""
    prefix, root = LabHost(1).prefix, LabHost(1).root
    found = {int(d.name) for d in root.glob("*") if d.name.isdigit()}
    netns = Path("/run/netns")
    if netns.is_dir():
        for f in netns.iterdir():
            tail = f.name.removeprefix(prefix)
            if f.name.startswith(prefix) and tail.isdigit():
                found.add(int(tail))
    return sorted(n for n in found if 2 <= n <= MAX_HOSTS)


# --- the API ----------------------------------------------------------------------------------
def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the two-host lab needs root (network namespaces, mounts, libvirtd)")


@contextlib.contextmanager
def _locked(timeout: float = 120.0) -> Iterator[None]:
    """One process at a time brings the lab up or down (tests of several sessions share it)."""
    one = LabHost(1)
    one.root.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(one.root.parent / f".{one.root.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"another process holds the lab's lock over {timeout:.0f} s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _leases() -> Path:
    one = LabHost(1)
    return one.root.parent / f".{one.root.name}.leases"


def up(count: int) -> builtins.list[LabHost]:
    """Hosts 1..count up (running ones are kept); more hosts than count are left alone."""
    _need_root()
    with _locked():
        return _up(count)


@contextlib.contextmanager
def lease(count: int) -> Iterator[builtins.list[LabHost]]:
    """Hosts 1..count up for the block; brought down after it unless another living process
    still holds a lease (test modules of several sessions share one lab)."""
    _need_root()
    leases = _leases()
    with _locked():
        hosts = _up(count)
        leases.mkdir(exist_ok=True)
        mine = leases / f"{os.getpid()}-{time.monotonic_ns()}"
        mine.write_text(f"{count}\n")
    try:
        yield hosts
    finally:
        with _locked():
            mine.unlink(missing_ok=True)
            others = []
            for f in leases.iterdir():
                pid = f.name.split("-")[0]
                if pid.isdigit() and is_running(int(pid)):
                    others.append(f)
                else:
                    f.unlink(missing_ok=True)  # its process died without giving it back
            if not others:
                _down()


def _up(count: int) -> builtins.list[LabHost]:
    if not 2 <= count <= MAX_HOSTS:
        raise LabError(f"host count {count} is out of range: use 2..{MAX_HOSTS}")
    _host1_up()
    hosts = [LabHost(n) for n in range(1, count + 1)]
    for host in hosts[1:]:
        if _host_alive(host):
            continue
        if libvirtd_pid(host.number) is None and _holder(host) is not None:
            _start_libvirtd(host.number)  # its namespaces and guests live on: like a restart
        else:
            _host_up(host)
    return hosts


def _holder(host: LabHost) -> int | None:
    """A lab process holding the host's mount namespace (libvirtd, else its virtlogd)."""
    if host.netns is None or not _netns_exists(host.netns):
        return None
    for pid, marker in ((libvirtd_pid(host.number), "libvirtd"),
                        (_read_pid(host.virtlogd_pidfile), "virtlogd")):  # fmt: skip
        if pid is not None and _alive(pid, marker) and _in_netns(pid, host.netns):
            return pid
    return None


def start_libvirtd(n: int) -> int:
    """Start host n's libvirtd again in its living namespaces (after it was killed): its
    guests keep running, as on a real host. Returns the new pid."""
    _need_root()
    with _locked():
        return _start_libvirtd(n)


def _start_libvirtd(n: int) -> int:
    host = LabHost(n)
    holder = _holder(host)
    if host.netns is None or holder is None:
        raise LabError(f"{host.name} has no namespaces to restart libvirtd in: 'lab hosts up {n}'")
    if libvirtd_pid(n) is None:
        start = f"{DAEMON_UMASK}; exec libvirtd -d --listen -p {shlex.quote(str(host.libvirtd_pidfile))}"
        _run([*nsenter_prefix(host, holder), "sh", "-c", start])
    _wait_port(host.address, f"{host.name}'s libvirtd", f"{host.dir / 'log' / 'libvirtd.log'}")
    _start_relay(host, host.peer)
    pid = libvirtd_pid(n)
    if pid is None:
        raise LabError(f"{host.name}'s libvirtd left no pid file at {host.libvirtd_pidfile}")
    return pid


def down(number: int | None = None) -> builtins.list[int]:
    """Every lab host stopped and removed (host 1's libvirtd itself is left running), whoever
    brought it up; ``number``: only host K >= 2 (its libvirtd, its QEMUs, every process in its
    namespace: a host failure), the others stay up."""
    _need_root()
    with _locked():
        if number is None:
            return _down()
        host = LabHost(number)
        if host.netns is None:
            raise LabError("host 1 is this machine's own libvirtd: take down hosts 2 and up")
        _host_down(host)
        return [number]


def _down() -> builtins.list[int]:
    numbers = _lab_numbers()
    for n in numbers:
        _host_down(LabHost(n))
    _host1_down()
    with contextlib.suppress(OSError):
        LabHost(1).root.rmdir()
    return numbers


def list() -> builtins.list[dict[str, object]]:  # noqa: A001 (the lab's verb)
    """The lab's hosts: number, name, uri, local_uri, address, libvirtd pid, alive."""
    rows: builtins.list[dict[str, object]] = []
    one = LabHost(1)
    if _alive(_read_pid(one.relay_pidfile), "vmkeep.lab.relay"):
        numbers = [1, *_lab_numbers()]
    else:
        numbers = _lab_numbers()
    for n in numbers:
        host = LabHost(n)
        pid = libvirtd_pid(n)
        relay = _alive(_read_pid(host.relay_pidfile), "vmkeep.lab.relay")
        rows.append({
            "number": n, "name": host.name, "uri": host.uri, "local_uri": host.local_uri,
            "address": host.address, "netns": host.netns, "libvirtd_pid": pid,
            "alive": pid is not None and relay,
        })  # fmt: skip
    return rows


def nsenter_argv(n: int) -> builtins.list[str]:
    """argv prefix that runs a command on host n (empty for host 1, the root namespaces)."""
    host = LabHost(n)
    if host.netns is None:
        return []
    pid = _holder(host)
    if pid is None:
        raise LabError(f"{host.name} is not up: 'vmkeep lab hosts up {n}'")
    return nsenter_prefix(host, pid)


def exec(n: int, argv: builtins.list[str], **kw: object) -> subprocess.CompletedProcess[str]:  # noqa: A001
    """Run argv in host n's mount and network namespaces; the finished process."""
    if not argv:
        raise LabError("no command given: vmkeep lab hosts exec N -- CMD ARGS")
    return subprocess.run([*nsenter_argv(n), *argv], **kw)  # type: ignore[call-overload]
