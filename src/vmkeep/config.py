"""Configuration: one TOML file, typed models, ``VMKEEP_`` environment overrides.

Lookup order for the file: ``--config``, ``$VMKEEP_CONFIG``, ``~/.config/vmkeep/config.toml``
(``/etc/vmkeep/config.toml`` for root). With no file at all vmkeep runs on embedded defaults.

Environment overrides are ``VMKEEP_<SECTION>_<KEY>``, e.g. ``VMKEEP_CATALOG_URL`` or
``VMKEEP_LIBVIRT_URI``; they win over the file.

    version = 1
    [catalog]
    url = "sqlite:////var/lib/vmkeep/catalog.db"   # or postgresql+psycopg://user@host/db
    [libvirt]
    uri = "qemu:///system"
    [agent]
    timeout = 10          # seconds for every guest-agent call
    [lab]
    dir = "/var/lib/vmkeep/lab"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vmkeep.errors import ConfigError
from vmkeep.model import ROLES
from vmkeep.paths import (
    DEFAULT_LIBVIRT_URI,
    SOCKET,
    absolute,
    catalog_url,
    default_data_dir,
    read_file,
)

CONFIG_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogConfig(_Section):
    url: str = ""  # empty = SQLite file in the data dir

    def resolved_url(self, data_dir: Path) -> str:
        return catalog_url(self.url, data_dir)


class LibvirtConfig(_Section):
    uri: str = DEFAULT_LIBVIRT_URI


class AgentConfig(_Section):
    timeout: float = Field(default=10.0, gt=0, le=600)


class QuiesceConfig(_Section):
    max_seconds: float = Field(default=60.0, gt=0, le=3600)


class ApiConfig(_Section):
    listen: str = "127.0.0.1:8700"  # HOST:PORT of ``vmkeep daemon``
    tls_cert: Path | None = None  # PEM certificate (chain): serve HTTPS
    tls_key: Path | None = None  # PEM private key of tls_cert
    policy: dict[str, str] = {}  # action -> least role, e.g. quiesce = "admin"
    # bounds on every client (docs/security.md): a larger body is a 413 before it is read
    max_body_bytes: int = Field(default=2 << 20, ge=1024, le=1 << 30)
    max_streams_per_token: int = Field(default=4, ge=1, le=1000)  # ?wait= and /v1/events at once
    max_queued_per_token: int = Field(default=50, ge=1, le=100000)  # QUEUED jobs a token may have
    http_workers: int = Field(default=1, ge=1, le=32)  # processes serving the API (daemon)

    @field_validator("policy")
    @classmethod
    def _roles(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {k: v for k, v in value.items() if v not in ROLES}
        if bad:
            raise ValueError(f"roles must be one of {', '.join(ROLES)}; got {bad}")
        return value


class JobsConfig(_Section):
    workers: int = Field(default=2, ge=1, le=64)  # jobs a daemon runs at once


class HostConfig(_Section):
    """A host and its VMM driver (``[[hosts]]``); vmkeep drives the one whose ``uri`` is
    ``[libvirt] uri``, with the native driver when none is listed."""

    name: str = Field(min_length=1, max_length=255)
    uri: str = "qemu:///system"
    vmm: Literal["native", "exec"] = "native"
    vmm_dir: Path | None = None  # exec: the folder of action scripts
    vmm_args: str = ""  # exec: -r N -t N -l ACTION[=SCRIPT],...


# OpenNebula's imported_vms_actions, in vmkeep's action names: what VMs vmkeep did not create
# may go through (never terminate: it deletes disks vmkeep did not make); migrate (OpenNebula's
# resched) moves a VM and leaves its disks where they are
IMPORTED_VMS_ACTIONS = [
    "poweroff", "reboot", "suspend", "resume", "stop", "hold", "release", "disk-attach",
    "disk-detach", "nic-attach", "nic-detach", "snapshot-create", "snapshot-delete", "recover",
    "migrate",
]  # fmt: skip


class VmmConfig(_Section):
    imported_vms_actions: list[str] = Field(default_factory=lambda: list(IMPORTED_VMS_ACTIONS))
    # the places an admin names for operators (docs/security.md): disk-attach sources (the data
    # dir's images/ and restores/ always are), and the host bridges an operator's NIC may join
    # (a NIC without a bridge uses QEMU's user-mode network, which reaches no host bridge)
    image_paths: list[Path] = []
    bridges: list[str] = []
    # a domain XML with <qemu:commandline>, host devices or host folders is refused unless true
    allow_raw_xml: bool = False


class RestoreConfig(_Section):
    # folders an operator may restore into besides the data dir's restores/ (an admin: anywhere)
    allowed_paths: list[Path] = []


class MountConfig(_Section):
    # the kernel file-system drivers ``vmkeep mount`` lets a guest's image reach
    fs_types: list[str] = ["ext4", "ext3", "ext2", "xfs", "btrfs", "vfat"]


class ClusterConfig(_Section):
    """Many hosts on one catalog (docs/hosts.md): this process's host, and the daemons'
    heartbeats."""

    host: str | None = Field(default=None, min_length=1, max_length=255)  # a ``hosts`` row's name
    heartbeat_interval: float = Field(default=5.0, ge=0.5, le=3600)  # a daemon writes its own
    silent_after: float = Field(default=30.0, ge=1, le=86400)  # older: the daemon is "silent"
    queued_timeout: float = Field(default=3600.0, ge=1, le=30 * 86400)  # then a job waiting
    # for a silent host's daemon fails
    unknown_after: float = Field(default=60.0, ge=1, le=86400)  # a host unreachable that long:
    # its VMs UNKNOWN

    @model_validator(mode="after")
    def _beats_within_silence(self) -> ClusterConfig:
        """A daemon beating less often than ``silent_after`` would look silent between its
        heartbeats: its queued jobs would fail and its VMs turn UNKNOWN while it runs."""
        if self.heartbeat_interval >= self.silent_after:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval:g} s) must be below silent_after "
                f"({self.silent_after:g} s), else a running daemon looks silent; lower "
                "heartbeat_interval or raise silent_after"
            )
        return self


class MonitorConfig(_Section):
    interval: float = Field(default=60.0, ge=1, le=86400)  # the daemon's poll loop, seconds


class BackupDefaults(_Section):
    """``[backup]``: the global layer of the backup policy (VM -> pool -> here -> built-in
    defaults; a backup job's options go over all of them). A key left out is not set here."""

    keep_last: int | str | None = None
    keep_hourly: int | str | None = None
    keep_daily: int | str | None = None
    keep_weekly: int | str | None = None
    keep_monthly: int | str | None = None
    keep_yearly: int | str | None = None
    mode: str | None = None
    fs_freeze: str | None = None
    backup_volatile: bool | None = None
    memory: bool | None = None
    exclude: bool | None = None  # left out of ``--all`` and ``--pool`` backup jobs
    exclude_disks: list[str] | str | None = None  # disk targets left out of backups

    def layer(self) -> dict[str, Any]:
        """The keys this section sets."""
        return self.model_dump(exclude_none=True)


class LimitsConfig(_Section):
    """How many backups run at once (0: no limit). Waiting jobs stay QUEUED with the reason."""

    max_backups: int = Field(default=0, ge=0, le=10000)  # in the whole catalog
    max_backups_host: int = Field(default=0, ge=0, le=10000)  # on one host (one daemon)
    # on one datastore (a restic repository takes one writer whatever this says)
    max_backups_datastore: int = Field(default=0, ge=0, le=10000)


class ScheduleConfig(_Section):
    tick: float = Field(default=1.0, gt=0, le=60)  # seconds between the scheduler's looks
    timezone: str = ""  # new backup jobs read their slots in this zone (empty: the host's)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            if value:
                ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("use a zone name like Europe/Berlin (or leave it empty)") from None
        return value


class NotifyConfig(_Section):
    """Where finished jobs are reported (``engine/service/notify.py``; docs/notifications.md).
    ``on = "failure"`` reports FAILED jobs only (not done with warnings, not cancelled)."""

    webhook_url: SecretStr | None = None  # JSON POST per finished job (may hold a token)
    webhook_secret: SecretStr | None = None  # adds an HMAC-SHA256 signature header
    urls: list[SecretStr] = []  # notification-library URLs (mailto://, ...): may hold passwords
    on: Literal["always", "failure"] = "always"
    timeout: float = Field(default=10.0, gt=0, le=300)  # seconds per delivery attempt
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_after: float = Field(default=5.0, gt=0, le=3600)  # first retry; doubles each time


class LabConfig(_Section):
    # Not under /root: QEMU runs as libvirt-qemu and must traverse the path to the images.
    dir: Path = Path("/var/lib/vmkeep/lab")


class Config(_Section):
    version: int = CONFIG_VERSION
    data_dir: Path = Field(default_factory=default_data_dir)
    catalog: CatalogConfig = CatalogConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    agent: AgentConfig = AgentConfig()
    quiesce: QuiesceConfig = QuiesceConfig()
    api: ApiConfig = ApiConfig()
    jobs: JobsConfig = JobsConfig()
    lab: LabConfig = LabConfig()
    hosts: list[HostConfig] = []
    vmm: VmmConfig = VmmConfig()
    restore: RestoreConfig = RestoreConfig()
    mount: MountConfig = MountConfig()
    monitor: MonitorConfig = MonitorConfig()
    cluster: ClusterConfig = ClusterConfig()
    backup: BackupDefaults = BackupDefaults()
    limits: LimitsConfig = LimitsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    notify: NotifyConfig = NotifyConfig()

    @field_validator("data_dir")
    @classmethod
    def _usable_dir(cls, value: Path) -> Path:
        path = absolute(value)
        for p in [path, *path.parents]:
            if p.exists():
                if not p.is_dir():
                    raise ValueError(f"{p} is a file; data_dir must be a folder vmkeep can create")
                break
        if path.parts[1:2] in (("proc",), ("sys",), ("dev",)):
            raise ValueError(f"{path} is on a kernel file system; choose a normal folder")
        return path

    @property
    def catalog_url(self) -> str:
        return self.catalog.resolved_url(self.data_dir)

    @property
    def socket(self) -> Path:
        """The daemon's local socket (``vmkeep daemon`` listens on it; the CLI reads through it)."""
        return self.data_dir / SOCKET


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Map VMKEEP_<SECTION>_<KEY> variables onto the nested config dict."""
    out: dict[str, Any] = {}
    if "VMKEEP_DATA_DIR" in environ:
        out["data_dir"] = environ["VMKEEP_DATA_DIR"]
    for section, model in Config.model_fields.items():
        sub = model.annotation
        if not (isinstance(sub, type) and issubclass(sub, _Section)):
            continue
        for key in sub.model_fields:
            name = f"VMKEEP_{section}_{key}".upper()
            if name in environ:
                out.setdefault(section, {})[key] = environ[name]
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _loc(err: dict[str, Any]) -> str:
    parts: list[str] = []
    for p in err["loc"]:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts) or "<root>"


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load the config file (if any), apply env overrides, validate. Errors name the bad key."""
    env = dict(os.environ if environ is None else environ)
    file, data = read_file(path, env)
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{file}: version", f"{version!r} is not supported; use {CONFIG_VERSION}")
    data = _merge(data, _env_overrides(env))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        var = (
            "VMKEEP_DATA_DIR" if loc[:1] == ["data_dir"] else f"VMKEEP_{'_'.join(loc[:2])}".upper()
        )
        if var in env and len(loc) <= 2:
            raise ConfigError(
                f"environment variable {var}", f"{first['msg']} (it is {env[var]!r})"
            ) from err
        raise ConfigError(f"{file}: {_loc(dict(first))}", first["msg"]) from err
