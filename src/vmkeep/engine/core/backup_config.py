"""BACKUP_CONFIG (OpenNebula): KEEP_LAST (and Proxmox Backup Server's KEEP_HOURLY, _DAILY,
_WEEKLY, _MONTHLY, _YEARLY), BACKUP_VOLATILE, FS_FREEZE, MODE, MEMORY (stoney's state file: each
backup of a running VM also saves its RAM), EXCLUDE (the VM is left out of ``--all`` and
``--pool`` backup jobs) and EXCLUDE_DISKS (disk targets left out of its backups;
docs/architecture.md, "Chains that follow the disks").

Stored per VM, per pool and in ``[backup]`` of the config file as a dict of the keys set there;
``resolve_named`` layers them, most specific first (backup job, VM, pool, config), over the
defaults and says which layer set each key. Which layers a VM has is ``engine/vm/policy.py``'s
rule (``effective``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from vmkeep.errors import InvalidValue
from vmkeep.model import BackupMode, FsFreeze
from vmkeep.names import check_disk_name

# retention on the calendar (engine/points/calendar.py: Proxmox Backup Server's prune rules)
KEEP_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
KEYS = (*KEEP_KEYS, "backup_volatile", "fs_freeze", "mode", "memory", "exclude", "exclude_disks")
# the value that removes a key from a layer (VM or pool): the key is inherited again
UNSET = "unset"
DEFAULT = "default"  # the source of a key no layer sets
MAX_KEEP = 1_000_000  # keep_last's bound (a number past 64 bits is no JSON every reader takes)
MAX_DISKS = 64  # exclude_disks' bound


@dataclass(frozen=True)
class BackupConfig:
    keep_last: int | None = None  # None: this rule keeps nothing; no rule set = keep all
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    backup_volatile: bool = False
    fs_freeze: FsFreeze = FsFreeze.NONE
    mode: BackupMode = BackupMode.FULL
    memory: bool = False  # save RAM with the disks (a running VM; restore resumes it)
    exclude: bool = False  # left out of ``--all`` and ``--pool`` backup jobs
    exclude_disks: tuple[str, ...] = ()  # disk targets left out of its backups, sorted

    def keeps(self) -> dict[str, int]:
        """The retention rules set (none: every point is kept)."""
        return {k: n for k in KEEP_KEYS if (n := getattr(self, k)) is not None}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fs_freeze"] = str(self.fs_freeze)
        d["mode"] = str(self.mode)
        d["exclude_disks"] = list(self.exclude_disks)
        return d


def validate(key: str, value: Any) -> Any:
    """Normalise one user-given value; errors name the key, the value and what is allowed."""
    if key in KEEP_KEYS:
        if value in (None, "", "none", "all"):
            return None
        hint = f"use a whole number from 1 to {MAX_KEEP}, or 'all'"
        try:
            n = int(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidValue(key, value, hint) from None
        if not 1 <= n <= MAX_KEEP:
            raise InvalidValue(key, value, hint)
        return n
    if key in ("backup_volatile", "memory", "exclude"):
        return _yes_no(key, value)
    if key == "fs_freeze":
        try:
            return FsFreeze(str(value).upper())
        except ValueError:
            raise InvalidValue("fs_freeze", value, "use none, agent or suspend") from None
    if key == "exclude_disks":
        return _disk_list(value)
    if key == "mode":
        text = str(value).upper()
        text = "INCREMENT" if text in ("INCREMENTAL", "INCREMENT", "INC") else text
        try:
            return BackupMode(text)
        except ValueError:
            raise InvalidValue("mode", value, "use full or increment") from None
    raise InvalidValue("backup_config", key, f"known keys are {', '.join(KEYS)}")


def _disk_list(value: Any) -> tuple[str, ...]:
    """Disk targets: a list, or one text of them split by commas; ``none`` or nothing: none."""
    hint = "give disk targets such as vdb (a list, or vdb,vdc), or none"
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (list, tuple)) and [str(d).strip().lower() for d in value] in (
        [""],
        ["none"],
    ):
        return ()
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DISKS:
        raise InvalidValue("exclude_disks", value, f"{hint}; at most {MAX_DISKS}")
    return tuple(
        sorted(
            {
                check_disk_name("exclude_disks", d.strip() if isinstance(d, str) else d)
                for d in value
            }
        )  # fmt: skip
    )


# what a yes/no key (backup_volatile, memory, exclude) takes besides a boolean, in any case (the
# API's schema shows them: ``pool_routes.YesNo``)
YES_WORDS = ("yes", "true", "1", "on")
NO_WORDS = ("no", "false", "0", "off")


def _yes_no(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in YES_WORDS:
        return True
    if text in NO_WORDS:
        return False
    raise InvalidValue(key, value, "use yes or no")


def stored(value: Any) -> Any:
    """A validated value as a layer keeps it in JSON (an enum as its text)."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if hasattr(value, "value") else value


def changed(layer: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
    """``layer`` with ``changes`` applied: each value validated, or ``UNSET`` (any case) to
    remove the key so that it is inherited again. The one rule for a VM's and a pool's keys."""
    out = dict(layer or {})
    for key, value in changes.items():
        if isinstance(value, str) and value.strip().lower() == UNSET:
            if key not in KEYS:
                validate(key, value)  # names the known keys
            out.pop(key, None)
        else:
            out[key] = stored(validate(key, value))
    return out


def resolve_named(
    layers: Iterable[tuple[str, dict[str, Any] | None]],
) -> tuple[BackupConfig, dict[str, str]]:
    """Merge named layers, most specific first (e.g. ``("backupjob", ...)``, ``("vm", ...)``,
    ``("pool web", ...)``, ``("config", ...)``), over the defaults. Returns the config and, for
    every key, the name of the layer that set it (``"default"`` when none did). A bad value is
    an ``InvalidValue`` that names the key and its layer."""
    values: dict[str, Any] = {}
    sources = dict.fromkeys(KEYS, DEFAULT)
    for name, layer in layers:
        for key, value in (layer or {}).items():
            if key in values:
                continue  # a more specific layer set it
            try:
                values[key] = validate(key, value)
            except InvalidValue as err:
                if key not in KEYS:
                    raise InvalidValue(f"{name} backup config", key, err.args[2]) from None
                raise InvalidValue(f"{key} (set by {name})", value, err.args[2]) from None
            sources[key] = name
    return BackupConfig(**values), sources


def resolve(*layers: dict[str, Any] | None) -> BackupConfig:
    """Merge unnamed layers, most specific first (VM, pool, global), over the defaults."""
    return resolve_named((f"layer {i}", x) for i, x in enumerate(layers, 1))[0]
