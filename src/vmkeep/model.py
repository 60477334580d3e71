"""Plain data types shared by every layer (no I/O here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

ROLES = ("viewer", "operator", "admin")  # API token roles, least to most


class VmState(enum.StrEnum):
    """Hypervisor-level state (OpenNebula's VM state, reduced to what libvirt can tell)."""

    ACTIVE = "ACTIVE"
    POWEROFF = "POWEROFF"
    SUSPENDED = "SUSPENDED"
    UNKNOWN = "UNKNOWN"


class LcmState(enum.StrEnum):
    """What vmkeep is doing with a VM (OpenNebula's LCM state)."""

    RUNNING = "RUNNING"
    POWEROFF = "POWEROFF"
    SUSPENDED = "SUSPENDED"
    BACKUP = "BACKUP"
    BACKUP_POWEROFF = "BACKUP_POWEROFF"
    QUIESCING = "QUIESCING"
    QUIESCED = "QUIESCED"
    UNQUIESCING = "UNQUIESCING"
    RESTORE = "RESTORE"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"


class FsFreeze(enum.StrEnum):
    NONE = "NONE"
    AGENT = "AGENT"
    SUSPEND = "SUSPEND"


class BackupMode(enum.StrEnum):
    FULL = "FULL"
    INCREMENT = "INCREMENT"


class BackupStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    VALID = "VALID"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    DAMAGED = "DAMAGED"  # a stored file failed its checksum: never restored, never extended


class Consistency(enum.StrEnum):
    AGENT_FROZEN = "AGENT_FROZEN"
    SUSPENDED = "SUSPENDED"
    CRASH = "CRASH"
    OFFLINE = "OFFLINE"  # powered-off VM: nothing in flight, file-system clean if shut down cleanly
    MEMORY = "MEMORY"  # RAM and disks at one paused instant: restore resumes the guest


@dataclass(frozen=True)
class DiskInfo:
    target: str  # vda
    path: str  # source file
    fmt: str  # qcow2 | raw
    device: str = "disk"  # disk | cdrom
    readonly: bool = False
    transient: bool = False  # BACKUP_VOLATILE decides whether such disks are included


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: VmState
    paused: bool
    persistent: bool
    disks: tuple[DiskInfo, ...] = ()
    has_agent_channel: bool = False
    checkpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestExecResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class Warnings:
    """Warnings are collected and reported, not raised (borg's BorgWarning)."""

    items: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.items.append(message)

    def extend(self, other: Warnings) -> None:
        self.items.extend(other.items)

    def __bool__(self) -> bool:
        return bool(self.items)
