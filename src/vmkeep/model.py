"""Plain data types shared by every layer (no I/O here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

ROLES = ("viewer", "operator", "admin")  # API token roles, least to most


class VmState(enum.StrEnum):
    """OpenNebula's VM state. PENDING, HOLD, STOPPED, UNDEPLOYED and DONE are off the host: only
    vmkeep's catalog knows them (``engine/lifecycle/dispatch.py``); the others follow libvirt."""

    PENDING = "PENDING"  # created, waiting for deploy
    HOLD = "HOLD"  # created, held: deploy refused until release
    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"  # memory saved to a state file, domain taken off the host
    SUSPENDED = "SUSPENDED"  # memory kept on the host (saved there, or the vCPUs paused)
    POWEROFF = "POWEROFF"
    UNDEPLOYED = "UNDEPLOYED"  # off the host, disks kept; deploy brings it back
    DONE = "DONE"  # terminated
    UNKNOWN = "UNKNOWN"


class LcmState(enum.StrEnum):
    """What vmkeep is doing with a VM (OpenNebula's LCM state). An idle VM's lcm state names its
    VM state (RUNNING for ACTIVE); the others are transient, or a ``*_FAILURE`` that ``vm recover``
    leaves."""

    RUNNING = "RUNNING"
    POWEROFF = "POWEROFF"
    SUSPENDED = "SUSPENDED"
    PENDING = "PENDING"
    HOLD = "HOLD"
    STOPPED = "STOPPED"
    UNDEPLOYED = "UNDEPLOYED"
    DONE = "DONE"
    BOOT = "BOOT"
    SHUTDOWN = "SHUTDOWN"
    SHUTDOWN_POWEROFF = "SHUTDOWN_POWEROFF"
    SHUTDOWN_UNDEPLOY = "SHUTDOWN_UNDEPLOY"
    SAVE_SUSPEND = "SAVE_SUSPEND"
    SAVE_STOP = "SAVE_STOP"
    HOTPLUG = "HOTPLUG"
    HOTPLUG_NIC = "HOTPLUG_NIC"
    HOTPLUG_SNAPSHOT = "HOTPLUG_SNAPSHOT"
    HOTPLUG_RESIZE = "HOTPLUG_RESIZE"
    DISK_SNAPSHOT = "DISK_SNAPSHOT"
    DISK_RESIZE = "DISK_RESIZE"
    CLEANUP_DELETE = "CLEANUP_DELETE"
    MIGRATE = "MIGRATE"  # moving to another host (running or powered off)
    BOOT_FAILURE = "BOOT_FAILURE"  # deploy/resume failed: the domain may be half there
    EPILOG_FAILURE = "EPILOG_FAILURE"  # terminate/undeploy/stop failed after the VM went down
    BACKUP = "BACKUP"
    BACKUP_POWEROFF = "BACKUP_POWEROFF"
    QUIESCING = "QUIESCING"
    QUIESCED = "QUIESCED"
    UNQUIESCING = "UNQUIESCING"
    RESTORE = "RESTORE"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"


class JobState(enum.StrEnum):
    """A job's state (``engine/core/jobs.py``): QUEUED -> RUNNING -> DONE | FAILED | CANCELLED. The
    catalog stores, and JSON shows, these strings."""

    QUEUED = "QUEUED"  # waiting for a worker
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


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
