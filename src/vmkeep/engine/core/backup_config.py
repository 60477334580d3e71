"""BACKUP_CONFIG (OpenNebula): KEEP_LAST, BACKUP_VOLATILE, FS_FREEZE, MODE, and MEMORY (stoney's
state file: each backup of a running VM also saves its RAM).

Stored per VM as a dict of the keys the user set; ``resolve`` layers VM over pool over the defaults
(stoney's VM -> pool -> global inheritance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmkeep.errors import InvalidValue
from vmkeep.model import BackupMode, FsFreeze

KEYS = ("keep_last", "backup_volatile", "fs_freeze", "mode", "memory", "exclude")


@dataclass(frozen=True)
class BackupConfig:
    keep_last: int | None = None  # None = keep all
    backup_volatile: bool = False
    fs_freeze: FsFreeze = FsFreeze.NONE
    mode: BackupMode = BackupMode.FULL
    memory: bool = False  # save RAM with the disks (a running VM; restore resumes it)
    exclude: bool = False  # left out of --pool and --all backup jobs

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fs_freeze"] = str(self.fs_freeze)
        d["mode"] = str(self.mode)
        return d


def validate(key: str, value: Any) -> Any:
    """Normalise one user-given value; errors name the key, the value and what is allowed."""
    if key == "keep_last":
        if value in (None, "", "none", "all"):
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise InvalidValue("keep_last", value, "use a whole number >= 1, or 'all'") from None
        if n < 1:
            raise InvalidValue("keep_last", value, "use a whole number >= 1, or 'all'")
        return n
    if key in ("backup_volatile", "memory", "exclude"):
        return _yes_no(key, value)
    if key == "fs_freeze":
        try:
            return FsFreeze(str(value).upper())
        except ValueError:
            raise InvalidValue("fs_freeze", value, "use none, agent or suspend") from None
    if key == "mode":
        text = str(value).upper()
        text = "INCREMENT" if text in ("INCREMENTAL", "INCREMENT", "INC") else text
        try:
            return BackupMode(text)
        except ValueError:
            raise InvalidValue("mode", value, "use full or increment") from None
    raise InvalidValue("backup_config", key, f"known keys are {', '.join(KEYS)}")


def _yes_no(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("yes", "true", "1", "on"):
        return True
    if text in ("no", "false", "0", "off"):
        return False
    raise InvalidValue(key, value, "use yes or no")


def resolve(*layers: dict[str, Any] | None) -> BackupConfig:
    """Merge layers, most specific first (VM, pool, global), over the defaults."""
    merged: dict[str, Any] = {}
    for layer in reversed([x for x in layers if x]):
        merged.update({k: validate(k, v) for k, v in layer.items()})
    return BackupConfig(**merged)
