"""The two-host lab's plan: which host is where (names, addresses, URIs, folders) and the text
and argv that make a host, all pure (``vmkeep.lab.hosts`` runs them; see docs/hosts.md)."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.errors import LabError

STATE = Path("/var/lib/vmkeep")
HOSTLOCAL = Path("/var/lib/vmkeep/hostlocal")
ETC_LIBVIRT = Path("/etc/libvirt")
ROOT_SOCKET = Path("/run/libvirt/libvirt-sock")
ROOT_PIDFILE = Path("/run/libvirtd.pid")
NET_ENV = "VMKEEP_LAB_HOSTS_NET"  # the second octet of the lab's 10.X.0.0/16, 77 unless set
DEFAULT_NET = 77
LIBVIRT_PORT = 16509
MAX_HOSTS = 200

# each host's own folders: (the path every host sees, the folder under the host's state dir)
BIND_MOUNTS = (
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/etc/libvirt", "etc"),
    ("/var/log/libvirt", "log"),
    ("/var/cache/libvirt", "cache"),
    (str(HOSTLOCAL), "hostlocal"),
)
# the daemons' umask, as when started from a login shell: QEMU (another user) opens what they make
DAEMON_UMASK = "umask 022"
LISTEN_CONF = (
    "\n# vmkeep lab host: libvirt over plain TCP inside the lab's own network namespace\n"
    'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nlisten_addr = "0.0.0.0"\n'
    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
)


def lab_net() -> int:
    """The lab's network, 10.X.0.0/16: X from $VMKEEP_LAB_HOSTS_NET (77 unless set). Another X
    is another lab, with its own namespaces, folders and addresses (a test that must take its
    lab down without touching the one other tests share)."""
    raw = os.environ.get(NET_ENV, "").strip() or str(DEFAULT_NET)
    if not raw.isdigit() or not 1 <= int(raw) <= 254:
        raise LabError(f"{NET_ENV}={raw!r} is not a number 1..254 (the X of 10.X.0.0/16)")
    return int(raw)


@dataclass(frozen=True)
class LabHost:
    number: int
    net: int = field(default_factory=lab_net)

    def __post_init__(self) -> None:
        if not 1 <= self.number <= MAX_HOSTS:
            raise LabError(f"host number {self.number} is out of range: use 1..{MAX_HOSTS}")

    @property
    def prefix(self) -> str:
        """Names of the lab's namespaces and links: vmkeep-hK (vmkeepX-hK in lab 10.X)."""
        return "vmkeep-h" if self.net == DEFAULT_NET else f"vmkeep{self.net}-h"

    @property
    def root(self) -> Path:
        """The lab's state folder, holding one folder per host."""
        return STATE / ("labhosts" if self.net == DEFAULT_NET else f"labhosts-{self.net}")

    @property
    def name(self) -> str:
        return f"host{self.number}"

    @property
    def netns(self) -> str | None:
        return None if self.number == 1 else f"{self.prefix}{self.number}"

    @property
    def address(self) -> str:
        """Where the host's libvirt is reached over TCP from every host."""
        return f"10.{self.net}.0.1" if self.number == 1 else f"10.{self.net}.{self.number - 1}.2"

    @property
    def peer(self) -> str:
        """The root namespace's end of the host's veth pair (host 1 as this host sees it)."""
        return f"10.{self.net}.0.1" if self.number == 1 else f"10.{self.net}.{self.number - 1}.1"

    @property
    def uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def dir(self) -> Path:
        return self.root / str(self.number)

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
        """The veth pair: the root side and the side moved into the namespace (host 1's pair
        stays in the root namespace: its first end holds 10.X.0.1)."""
        return f"{self.prefix}{self.number}", f"{self.prefix}{self.number}p"


# --- text and argv (pure) -------------------------------------------------------------------
def libvirtd_conf(base: str) -> str:
    """The host's libvirtd.conf: the machine's own, with plain TCP listening appended."""
    return base.rstrip("\n") + "\n" + LISTEN_CONF


def setup_script(host: LabHost) -> str:
    """Run inside the host's namespaces: its own folders over the shared paths, then virtlogd
    and libvirtd (both leave as daemons and hold the mount namespace)."""
    lines = ["set -e", DAEMON_UMASK]
    for target, sub in BIND_MOUNTS:
        lines.append(f"mount --bind {shlex.quote(str(host.dir / sub))} {shlex.quote(target)}")
    lines.append(f"virtlogd -d -p {shlex.quote(str(host.virtlogd_pidfile))}")
    lines.append(f"libvirtd -d --listen -p {shlex.quote(str(host.libvirtd_pidfile))}")
    return "\n".join(lines) + "\n"


def start_argv(host: LabHost) -> list[str]:
    assert host.netns is not None
    return ["ip", "netns", "exec", host.netns, "unshare", "-m", "--propagation", "private",
            "sh", "-c", setup_script(host)]  # fmt: skip


def network_argvs(host: LabHost) -> list[list[str]]:
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
        ["ip", "-n", ns, "route", "add", f"{LabHost(1, host.net).address}/32", "via", host.peer],
    ]


def nsenter_prefix(host: LabHost, mount_pid: int) -> list[str]:
    """argv prefix running a command in the host's mount and network namespaces."""
    if host.netns is None:
        return []
    return ["nsenter", f"--mount=/proc/{mount_pid}/ns/mnt", f"--net=/run/netns/{host.netns}", "--"]


def relay_argv(address: str, socket_path: Path) -> list[str]:
    return [sys.executable, "-m", "vmkeep.lab.relay", address, str(LIBVIRT_PORT), str(socket_path)]
