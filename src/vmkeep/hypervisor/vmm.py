"""The VMM driver contract (after OpenNebula's virtualization driver): the actions
the lifecycle engine hands to a host's driver. Two implementations: ``native`` (libvirt in-process,
``vmm_native.py``; the engine gets it from ``Hypervisor.native_vmm()``, which for the in-memory
``fake.py`` is its ``FakeVmm``) and ``exec`` (one executable per action, ``vmm_exec.py``).

Each call succeeds or raises ``VmmError`` with the driver's message. ``poll`` returns the seed's
record: ``STATE`` (a = active, p = paused, e = error/crashed, d = disappeared or off) and the usage
figures (CPU in % of one CPU, MEMORY in KiB, NETRX/NETTX and DISKRD/WR bytes and IOPS).
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from vmkeep.errors import VmmError

__all__ = ["VmmError"]

POLL_KEYS = (
    "STATE",
    "CPU",
    "MEMORY",
    "NETRX",
    "NETTX",
    "DISKRDBYTES",
    "DISKWRBYTES",
    "DISKRDIOPS",
    "DISKWRIOPS",
)
ACTIONS = (
    "attach_disk",
    "attach_nic",
    "cancel",
    "deploy",
    "detach_disk",
    "detach_nic",
    "migrate",
    "poll",
    "reboot",
    "reset",
    "restore",
    "save",
    "shutdown",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_revert",
    # vmkeep's additions to the seed's list (documented in docs/lifecycle.md)
    "resize_disk",
    "undefine",
)


@dataclass(frozen=True)
class DiskSpec:
    source: str
    target: str
    index: int
    fmt: str = "qcow2"
    readonly: bool = False
    cache: str = "none"


@dataclass(frozen=True)
class NicSpec:
    mac: str
    bridge: str = ""  # empty: user-mode networking (no bridge on the host)
    model: str = "virtio"
    target: str = ""


Progress = Callable[[int, int], None]  # (bytes done, bytes total); raising in it cancels


@dataclass(frozen=True)
class Migration:
    """What a migration did. ``checkpoints``: the names defined again on the destination, in
    order; ``chain_break``: why the checkpoints (and so the backup chain's next increment) did
    not follow the VM, "" when they did or the VM had none. Timings are libvirt's (None when
    the driver cannot tell)."""

    checkpoints: tuple[str, ...] = ()
    chain_break: str = ""
    live: bool = False
    total_ms: int | None = None
    downtime_ms: int | None = None
    data_bytes: int | None = None


def migration_uri(dest_uri: str) -> str | None:
    """Where QEMU sends the migration stream: ``tcp://`` to the destination's libvirt host name
    (None when its URI names no host: libvirt picks, which only works on one machine)."""
    host = urlsplit(dest_uri).hostname
    if not host:
        return None
    return f"tcp://[{host}]" if ":" in host else f"tcp://{host}"


def parse_poll(text: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs separated by blanks (vector values ``KEY=[ ... ]`` are kept as text)."""
    out: dict[str, str] = {}
    tokens = shlex.split(text.replace("[", " [ ").replace("]", " ] "), posix=True)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if "=" in tok and not tok.startswith("="):
            key, _, value = tok.partition("=")
            if value == "" and i + 1 < len(tokens) and tokens[i + 1] == "[":
                end = tokens.index("]", i + 1) if "]" in tokens[i + 1 :] else len(tokens)
                value = " ".join(tokens[i + 1 : end + 1])
                i = end
            out.setdefault(key.strip().upper(), value)
        i += 1
    return out


def format_poll(record: dict[str, object]) -> str:
    return " ".join(f"{k}={record[k]}" for k in POLL_KEYS if k in record)


class Vmm(ABC):
    """One host's VMM driver."""

    kind: str

    @abstractmethod
    def deploy(self, domain: str, xml: str) -> str:
        """Define the domain from ``xml`` and boot it; returns the deploy id (its name)."""

    @abstractmethod
    def shutdown(self, domain: str) -> None:
        """Orderly power-off; returns once the guest is off (fails on timeout)."""

    @abstractmethod
    def cancel(self, domain: str) -> None:
        """Pull the plug."""

    @abstractmethod
    def reboot(self, domain: str) -> None: ...

    @abstractmethod
    def reset(self, domain: str) -> None: ...

    @abstractmethod
    def save(self, domain: str, file: str) -> None:
        """Memory and device state to ``file``; the guest stops (its definition stays)."""

    @abstractmethod
    def restore(self, file: str) -> None:
        """The guest back from ``file``, running, defined persistently."""

    @abstractmethod
    def undefine(self, domain: str) -> None:
        """Remove the definition (stopped domain); its disks stay."""

    @abstractmethod
    def poll(self, domain: str) -> dict[str, str]: ...

    @abstractmethod
    def snapshot_create(self, domain: str, snapshot_id: int) -> str:
        """A system snapshot; returns the hypervisor's name for it."""

    @abstractmethod
    def snapshot_revert(self, domain: str, name: str) -> None: ...

    @abstractmethod
    def snapshot_delete(self, domain: str, name: str) -> None: ...

    @abstractmethod
    def attach_disk(self, domain: str, disk: DiskSpec) -> None: ...

    @abstractmethod
    def detach_disk(self, domain: str, disk: DiskSpec) -> None: ...

    @abstractmethod
    def attach_nic(self, domain: str, nic: NicSpec) -> None: ...

    @abstractmethod
    def detach_nic(self, domain: str, mac: str) -> None: ...

    @abstractmethod
    def resize_disk(self, domain: str, target: str, size: int) -> None:
        """Grow a disk of a running domain to ``size`` bytes."""

    @abstractmethod
    def migrate(
        self,
        domain: str,
        dest_uri: str,
        *,
        live: bool,
        copy_storage: bool = False,
        bandwidth_mib: int = 0,
        progress: Progress | None = None,
    ) -> Migration:
        """Move the domain to the host at libvirt URI ``dest_uri``: running (``live``: it keeps
        running during the copy; else paused for it) or powered off (its definition moves).
        ``copy_storage``: its disks are copied to the same paths there (host-local storage); else
        they are on storage both hosts see. Its checkpoints follow it when they can (see
        ``Migration``). ``progress`` is called about twice a second; when it raises, the
        migration is aborted, the domain stays on this host as it was, and the error propagates.
        On any failure the domain is left on this host with its checkpoints."""
