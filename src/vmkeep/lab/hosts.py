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
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vmkeep.errors import LabError

LAB_ROOT = Path("/var/lib/vmkeep/labhosts")
HOSTLOCAL = Path("/var/lib/vmkeep/hostlocal")
ETC_LIBVIRT = Path("/etc/libvirt")
ROOT_SOCKET = Path("/run/libvirt/libvirt-sock")
ROOT_PIDFILE = Path("/run/libvirtd.pid")
NETNS_PREFIX = "vmkeep-h"
LIBVIRT_PORT = 16509
MAX_HOSTS = 200
UP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
HOST1_LINK = "vmkeep-h1"  # a veth pair kept in the root namespace: it holds 10.77.0.1
HOST1_ADDRESS = "10.77.0.1"

# each host's own folders: (the path every host sees, the folder under the host's state dir)
BIND_MOUNTS = (
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/etc/libvirt", "etc"),
    ("/var/log/libvirt", "log"),
    ("/var/cache/libvirt", "cache"),
    (str(HOSTLOCAL), "hostlocal"),
)
LISTEN_CONF = (
    "\n# vmkeep lab host: libvirt over plain TCP inside the lab's own network namespace\n"
    'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nlisten_addr = "0.0.0.0"\n'
    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
)


@dataclass(frozen=True)
class LabHost:
    number: int

    def __post_init__(self) -> None:
        if not 1 <= self.number <= MAX_HOSTS:
            raise LabError(f"host number {self.number} is out of range: use 1..{MAX_HOSTS}")

    @property
    def name(self) -> str:
        return f"host{self.number}"

    @property
    def netns(self) -> str | None:
        return None if self.number == 1 else f"{NETNS_PREFIX}{self.number}"

    @property
    def address(self) -> str:
        """Where the host's libvirt is reached over TCP from every host."""
        return HOST1_ADDRESS if self.number == 1 else f"10.77.{self.number - 1}.2"

    @property
    def peer(self) -> str:
        """The root namespace's end of the host's veth pair (host 1 as this host sees it)."""
        return HOST1_ADDRESS if self.number == 1 else f"10.77.{self.number - 1}.1"

    @property
    def uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def dir(self) -> Path:
        return LAB_ROOT / str(self.number)

    @property
    def socket(self) -> Path:
        """libvirtd's unix socket, as the root namespace sees it (sockets cross net namespaces)."""
        return ROOT_SOCKET if self.number == 1 else self.dir / "run" / "libvirt-sock"

    @property
    def local_uri(self) -> str:
        """The host's libvirt from the root namespace without TCP: its unix socket."""
        if self.number == 1:
            return "qemu:///system"
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def libvirtd_pidfile(self) -> Path:
        return ROOT_PIDFILE if self.number == 1 else self.dir / "libvirtd.pid"

    @property
    def virtlogd_pidfile(self) -> Path:
        return self.dir / "virtlogd.pid"

    @property
    def relay_pidfile(self) -> Path:
        return self.dir / "relay.pid"

    @property
    def veth(self) -> tuple[str, str]:
        """The veth pair: the root side and the side moved into the namespace."""
        return f"{NETNS_PREFIX}{self.number}", f"{NETNS_PREFIX}{self.number}p"


# --- text and argv (pure) -------------------------------------------------------------------
def libvirtd_conf(base: str) -> str:
    """The host's libvirtd.conf: the machine's own, with plain TCP listening appended."""
    return base.rstrip("\n") + "\n" + LISTEN_CONF


def setup_script(host: LabHost) -> str:
    """Run inside the host's namespaces: its own folders over the shared paths, then virtlogd
    and libvirtd (both leave as daemons and hold the mount namespace)."""
    lines = ["set -e"]
    for target, sub in BIND_MOUNTS:
        lines.append(f"mount --bind {shlex.quote(str(host.dir / sub))} {shlex.quote(target)}")
    lines.append(f"virtlogd -d -p {shlex.quote(str(host.virtlogd_pidfile))}")
    lines.append(f"libvirtd -d --listen -p {shlex.quote(str(host.libvirtd_pidfile))}")
    return "\n".join(lines) + "\n"


def start_argv(host: LabHost) -> builtins.list[str]:
    assert host.netns is not None
    return ["ip", "netns", "exec", host.netns, "unshare", "-m", "--propagation", "private",
            "sh", "-c", setup_script(host)]  # fmt: skip


def network_argvs(host: LabHost) -> builtins.list[builtins.list[str]]:
    """The veth pair, its addresses, and the route to host 1's 10.77.0.1 through the root side."""
    assert host.netns is not None
    ns, (outside, inside) = host.netns, host.veth
    return [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", ns],
        ["ip", "addr", "add", f"{host.peer}/24", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", inside],
        ["ip", "-n", ns, "link", "set", inside, "up"],
        ["ip", "-n", ns, "route", "add", f"{HOST1_ADDRESS}/32", "via", host.peer],
    ]


def nsenter_prefix(host: LabHost, mount_pid: int) -> builtins.list[str]:
    """argv prefix running a command in the host's mount and network namespaces."""
    if host.netns is None:
        return []
    return ["nsenter", f"--mount=/proc/{mount_pid}/ns/mnt", f"--net=/run/netns/{host.netns}", "--"]


def relay_argv(address: str, socket_path: Path) -> builtins.list[str]:
    return [sys.executable, "-m", "vmkeep.lab.relay", address, str(LIBVIRT_PORT), str(socket_path)]


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
    if not _link_exists(HOST1_LINK):
        _run(["ip", "link", "add", HOST1_LINK, "type", "veth", "peer", "name", HOST1_LINK + "p"])
        _run(["ip", "addr", "add", f"{HOST1_ADDRESS}/24", "dev", HOST1_LINK])
        _run(["ip", "link", "set", HOST1_LINK + "p", "up"])
        _run(["ip", "link", "set", HOST1_LINK, "up"])
    _start_relay(LabHost(1), HOST1_ADDRESS)


def _host1_down() -> None:
    _stop_relay(LabHost(1))
    if _link_exists(HOST1_LINK):
        _run(["ip", "link", "del", HOST1_LINK], check=False)
    shutil.rmtree(LabHost(1).dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        HOSTLOCAL.rmdir()  # host 1's local storage, when nothing was left in it


# --- host K >= 2 ------------------------------------------------------------------------------
def _prepare_dirs(host: LabHost) -> None:
    if host.dir.exists():
        shutil.rmtree(host.dir)
    for _, sub in BIND_MOUNTS:
        (host.dir / sub).mkdir(parents=True)
    etc = host.dir / "etc"
    for conf in ETC_LIBVIRT.glob("*.conf"):
        shutil.copy2(conf, etc / conf.name)
    conf = etc / "libvirtd.conf"
    conf.write_text(libvirtd_conf(conf.read_text() if conf.exists() else ""))
    if (ETC_LIBVIRT / "nwfilter").is_dir():
        shutil.copytree(ETC_LIBVIRT / "nwfilter", etc / "nwfilter")
    for sub in ("qemu/networks", "secrets", "storage"):
        (etc / sub).mkdir(parents=True, exist_ok=True)
    (etc / "secrets").chmod(0o700)
    (host.dir / "run").chmod(0o755)


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
    found = {int(d.name) for d in LAB_ROOT.glob("*") if d.name.isdigit()}
    netns = Path("/run/netns")
    if netns.is_dir():
        for f in netns.iterdir():
            tail = f.name.removeprefix(NETNS_PREFIX)
            if f.name.startswith(NETNS_PREFIX) and tail.isdigit():
                found.add(int(tail))
    return sorted(n for n in found if 2 <= n <= MAX_HOSTS)


# --- the API ----------------------------------------------------------------------------------
def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the two-host lab needs root (network namespaces, mounts, libvirtd)")


def up(count: int) -> builtins.list[LabHost]:
    """Hosts 1..count up (running ones are kept); more hosts than count are left alone."""
    _need_root()
    if not 2 <= count <= MAX_HOSTS:
        raise LabError(f"host count {count} is out of range: use 2..{MAX_HOSTS}")
    _host1_up()
    hosts = [LabHost(n) for n in range(1, count + 1)]
    for host in hosts[1:]:
        if _host_alive(host):
            continue
        if libvirtd_pid(host.number) is None and _holder(host) is not None:
            start_libvirtd(host.number)  # its namespaces and guests live on: like a restart
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
    host = LabHost(n)
    holder = _holder(host)
    if host.netns is None or holder is None:
        raise LabError(f"{host.name} has no namespaces to restart libvirtd in: 'lab hosts up {n}'")
    if libvirtd_pid(n) is None:
        argv = ["libvirtd", "-d", "--listen", "-p", str(host.libvirtd_pidfile)]
        _run([*nsenter_prefix(host, holder), *argv])
    _wait_port(host.address, f"{host.name}'s libvirtd", f"{host.dir / 'log' / 'libvirtd.log'}")
    _start_relay(host, host.peer)
    pid = libvirtd_pid(n)
    if pid is None:
        raise LabError(f"{host.name}'s libvirtd left no pid file at {host.libvirtd_pidfile}")
    return pid


def down() -> builtins.list[int]:
    """Every lab host stopped and removed (host 1's libvirtd itself is left running)."""
    _need_root()
    numbers = _lab_numbers()
    for n in numbers:
        _host_down(LabHost(n))
    _host1_down()
    with contextlib.suppress(OSError):
        LAB_ROOT.rmdir()
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
