"""SQLAlchemy 2 ORM models: the catalog is the source of truth for VMs, backups, jobs and locks.

Schema changes go through an Alembic migration in ``migrations/versions``; a unit test checks that
the migrations produce exactly these tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        if dialect.name == "sqlite":  # one parse per value: a list reads ~25,000 of them
            return _sqlite_utc
        return super().result_processor(dialect, coltype)


def _sqlite_utc(value: str | None) -> datetime | None:
    """SQLite's stored text (UTC, no zone: ``process_bind_param``) as an aware datetime, in one
    call: ``fromisoformat`` then ``replace(tzinfo=UTC)`` cost 6x more."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value + "+00:00")
    except ValueError:  # text that names its zone
        return datetime.fromisoformat(value).astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UtcDateTime}


class Vm(Base):
    __tablename__ = "vms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    host_uri: Mapped[str] = mapped_column(String(255))
    # the vmkeep host it lives on (``hosts.name``); None in a catalog without hosts rows
    host: Mapped[str | None] = mapped_column(String(255), default=None, index=True)
    state: Mapped[str] = mapped_column(String(32))
    lcm_state: Mapped[str] = mapped_column(String(32))
    pool: Mapped[str | None] = mapped_column(String(255), default=None)
    backup_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    quiesced_at: Mapped[datetime | None] = mapped_column(default=None)
    # lifecycle: the domain XML vmkeep deploys it from (created VMs, and off-host states), its
    # memory state file (SUSPENDED/STOPPED), and whether vmkeep created it (else imported)
    template: Mapped[str | None] = mapped_column(Text, default=None)
    state_file: Mapped[str | None] = mapped_column(Text, default=None)
    created: Mapped[bool] = mapped_column(default=False)
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the last poll's figures
    imported_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class VmHistory(Base):
    """One lifecycle action on a VM (``vm history``): who, from where, when, and how it ended."""

    __tablename__ = "vm_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    action: Mapped[str] = mapped_column(String(32))
    origin: Mapped[str] = mapped_column(String(16), default="cli")
    who: Mapped[str] = mapped_column(String(255), default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    result: Mapped[str] = mapped_column(String(16), default="RUNNING")  # DONE | FAILED
    error: Mapped[str | None] = mapped_column(Text, default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class VmSnapshot(Base):
    """A system snapshot (``kind`` system: disks + memory) or one disk's (``kind`` disk)."""

    __tablename__ = "vm_snapshots"
    __table_args__ = (
        UniqueConstraint("vm_id", "seq"),
        UniqueConstraint("vm_id", "label", name="uq_vm_snapshots_label"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    seq: Mapped[int] = mapped_column(Integer)  # the snapshot id users see (ONE_SNAPSHOT_ID)
    name: Mapped[str] = mapped_column(String(255))  # the hypervisor's name for it
    # the user's name for it (names.py's rule, unique per VM; None: unnamed); never handed to
    # the hypervisor or qemu-img, which know the snapshot by ``name``
    label: Mapped[str | None] = mapped_column(String(64), default=None)
    kind: Mapped[str] = mapped_column(String(8))
    disk: Mapped[str | None] = mapped_column(String(32), default=None)
    memory: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Datastore(Base):
    __tablename__ = "datastores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    driver: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Backup(Base):
    """One restore chain: a full (increment 0) plus its increments."""

    __tablename__ = "backups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"), index=True)
    datastore_id: Mapped[int] = mapped_column(ForeignKey("datastores.id"))
    chain: Mapped[str] = mapped_column(String(512))  # datastore key: <vm name>/<backup id>
    mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    active_flatten: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    vm: Mapped[Vm] = relationship()
    datastore: Mapped[Datastore] = relationship()
    increments: Mapped[list[Increment]] = relationship(
        back_populates="backup", order_by="Increment.seq", cascade="all, delete-orphan"
    )


class Increment(Base):
    __tablename__ = "increments"
    __table_args__ = (UniqueConstraint("backup_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    backup_id: Mapped[int] = mapped_column(ForeignKey("backups.id"))
    seq: Mapped[int] = mapped_column(Integer)  # 0 = full, as OpenNebula numbers them
    parent: Mapped[int | None] = mapped_column(Integer, default=None)
    checkpoint: Mapped[str | None] = mapped_column(String(255), default=None)
    status: Mapped[str] = mapped_column(String(16))
    consistency: Mapped[str | None] = mapped_column(String(16), default=None)
    size: Mapped[int] = mapped_column(default=0)
    files: Mapped[list[Any]] = mapped_column(default=list)
    freeze_ms: Mapped[float | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # a protected point is never pruned nor deleted without an admin's force (and neither are
    # the chain's points it needs: engine/core/chains.py: needed_by_protected)
    protected: Mapped[bool] = mapped_column(default=False)
    note: Mapped[str | None] = mapped_column(Text, default=None)
    protected_by: Mapped[str | None] = mapped_column(String(255), default=None)
    protected_at: Mapped[datetime | None] = mapped_column(default=None)
    # the last verify that read this increment's files: when, and OK or FAILED
    verified_at: Mapped[datetime | None] = mapped_column(default=None)
    verify_result: Mapped[str | None] = mapped_column(String(8), default=None)
    backup: Mapped[Backup] = relationship(back_populates="increments")
    drills: Mapped[list[Drill]] = relationship(
        back_populates="increment", order_by="Drill.id", cascade="all, delete-orphan"
    )


class Drill(Base):
    """One restore drill of a point (``vmkeep drill``): PASS/FAIL, the reason, each step's
    evidence."""

    __tablename__ = "drills"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    increment_id: Mapped[int] = mapped_column(ForeignKey("increments.id"), index=True)
    result: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    probe: Mapped[str | None] = mapped_column(Text, default=None)
    checks: Mapped[list[Any]] = mapped_column(default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    increment: Mapped[Increment] = relationship(back_populates="drills")


class Job(Base):
    """A long action (backup, restore, verify, quiesce, ...) whatever started it (cli/api/schedule):
    QUEUED -> RUNNING -> DONE | FAILED | CANCELLED, with progress, result and error."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(default=0.0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    pid_start: Mapped[int | None] = mapped_column(BigInteger, default=None)  # as Lock's
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    origin: Mapped[str] = mapped_column(String(16), default="cli")
    who: Mapped[str] = mapped_column(String(255), default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    done_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # the limits (engine/core/limits.py): higher first, then the oldest; why a QUEUED job waits
    priority: Mapped[int] = mapped_column(Integer, default=50)
    wait_reason: Mapped[str | None] = mapped_column(Text, default=None)
    datastore: Mapped[str | None] = mapped_column(String(255), default=None)  # it writes to
    run_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)  # a job run
    # the host whose daemon must run it (its VM's host); None: any daemon
    runs_on: Mapped[str | None] = mapped_column(String(255), default=None, index=True)


class Host(Base):
    """A libvirt host vmkeep drives (OpenNebula's host): how to reach it, its VMM driver, its
    state (INIT, MONITORED, ERROR; DISABLED and OFFLINE set by an admin), the last monitoring's
    figures, and its daemon's heartbeat (``engine/hosts``)."""

    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    uri: Mapped[str] = mapped_column(String(255))
    vmm: Mapped[str] = mapped_column(String(16), default="native")
    vmm_dir: Mapped[str | None] = mapped_column(Text, default=None)
    vmm_args: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str] = mapped_column(String(16), default="INIT")
    max_backups: Mapped[int | None] = mapped_column(Integer, default=None)
    monitor: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    monitored_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    daemon: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Token(Base):
    """An API bearer token: only the sha256 of the secret is stored (the secret is shown once)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class Lock(Base):
    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the holder's start (clock ticks since boot): its pid, reused by another process, is not it
    pid_start: Mapped[int | None] = mapped_column(BigInteger, default=None)


class Group(Base):
    """VMs that are backed up together (one consistent cut) and started/stopped in order."""

    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    members: Mapped[list[GroupMember]] = relationship(
        back_populates="group", order_by="GroupMember.position", cascade="all, delete-orphan"
    )


class GroupMember(Base):
    """``position`` is the freeze and start order; ``stop_position`` (None: reverse) the stop order."""

    __tablename__ = "group_members"
    __table_args__ = (UniqueConstraint("group_id", "vm_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    position: Mapped[int] = mapped_column(Integer)
    stop_position: Mapped[int | None] = mapped_column(Integer, default=None)
    group: Mapped[Group] = relationship(back_populates="members")
    vm: Mapped[Vm] = relationship()


class GroupBackup(Base):
    """One group restore point: a backup increment per member, taken inside one freeze window."""

    __tablename__ = "group_backups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    datastore_id: Mapped[int] = mapped_column(ForeignKey("datastores.id"))
    status: Mapped[str] = mapped_column(String(16))
    parallel_freeze: Mapped[bool] = mapped_column(default=False)
    freeze_window_ms: Mapped[float | None] = mapped_column(default=None)
    failed_vm: Mapped[str | None] = mapped_column(String(255), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    group: Mapped[Group] = relationship()
    datastore: Mapped[Datastore] = relationship()
    members: Mapped[list[GroupBackupMember]] = relationship(
        back_populates="group_backup",
        order_by="GroupBackupMember.position",
        cascade="all, delete-orphan",
    )


class GroupBackupMember(Base):
    """A member's part of a group backup; times are ms since the group's first freeze."""

    __tablename__ = "group_backup_members"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_backup_id: Mapped[int] = mapped_column(ForeignKey("group_backups.id"))
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    vm_name: Mapped[str] = mapped_column(String(255))
    position: Mapped[int] = mapped_column(Integer)
    backup_id: Mapped[int | None] = mapped_column(
        ForeignKey("backups.id"), default=None, index=True
    )
    seq: Mapped[int | None] = mapped_column(Integer, default=None)
    status: Mapped[str] = mapped_column(String(16))
    consistency: Mapped[str | None] = mapped_column(String(16), default=None)
    frozen_at_ms: Mapped[float | None] = mapped_column(default=None)
    thawed_at_ms: Mapped[float | None] = mapped_column(default=None)
    freeze_ms: Mapped[float | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    group_backup: Mapped[GroupBackup] = relationship(back_populates="members")


class GroupDrill(Base):
    """One drill of a group restore point: every member booted together, in start order, on an
    isolated network; PASS/FAIL, the reason, each step's evidence (member probes and the
    cross-member probe)."""

    __tablename__ = "group_drills"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_backup_id: Mapped[int] = mapped_column(ForeignKey("group_backups.id"), index=True)
    result: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    checks: Mapped[list[Any]] = mapped_column(default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEntry(Base):
    """Who did what through the API: every mutating request and every failed login
    (``engine/audit.py``). Never a request's body or headers."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(2048))
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str] = mapped_column(String(255))


class Pool(Base):
    """A pool of VMs sharing a backup policy: VM -> pool -> ``[backup]`` of the config file."""

    __tablename__ = "pools"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    backup_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BackupJob(Base):
    """What to back up (``selector``: vms, group, pool or all), where, when (``schedule``), and
    the policy keys it sets over the VMs' (``options``)."""

    __tablename__ = "backup_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    datastore: Mapped[str] = mapped_column(String(255))
    copy_to: Mapped[str | None] = mapped_column(String(255), default=None)
    schedule: Mapped[str] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=50)
    execution: Mapped[str] = mapped_column(String(16), default="sequential")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    repeat_missed: Mapped[bool] = mapped_column(default=True)
    enabled: Mapped[bool] = mapped_column(default=True)
    owner: Mapped[str] = mapped_column(String(255), default="")
    role: Mapped[str] = mapped_column(String(16), default="admin")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # slots before this never fire: set when it is made, enabled, or given a new schedule
    active_since: Mapped[datetime] = mapped_column(default=utcnow)
    # the zone its cron and calendar slots are read in (every daemon reads them alike)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    # what a run does to the VMs it names: backup, prune, verify or drill
    task: Mapped[str] = mapped_column(String(16), default="backup")


class BackupJobRun(Base):
    """One fired slot of a backup job (or a ``backupjob run``): unique per job and slot, so two
    daemons never fire the same slot twice. Its jobs carry its id (``Job.run_id``)."""

    __tablename__ = "backup_job_runs"
    __table_args__ = (
        UniqueConstraint("backup_job_id", "slot_at", name="uq_backup_job_runs_slot"),
        {"sqlite_autoincrement": True},  # jobs keep a deleted run's id: never given again
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    backup_job_id: Mapped[int] = mapped_column(ForeignKey("backup_jobs.id"))
    slot_at: Mapped[datetime] = mapped_column()
    origin: Mapped[str] = mapped_column(String(16))  # schedule | missed | manual
    state: Mapped[str] = mapped_column(String(16))  # FIRED | SKIPPED (a missed slot not run)
    host: Mapped[str] = mapped_column(String(255), default="")
    who: Mapped[str] = mapped_column(String(255), default="")
    skipped: Mapped[list[Any]] = mapped_column(default=list)  # [{vm, reason}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Notification(Base):
    """The outbox: one row per finished job and target, sent (and retried) by the daemon."""

    __tablename__ = "notifications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(String(64))  # "webhook" | "url:<digest>"
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="PENDING")  # PENDING | SENT | FAILED
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(default=utcnow)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)


class Counter(Base):
    """Named counters; ``claim`` is bumped by every claim, which serialises claimers (a row
    lock on PostgreSQL, the write lock on SQLite) so that the limits are counted exactly."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
