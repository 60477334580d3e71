"""The datastore driver contract (OpenNebula DATASTORE operations: backup, restore, monitor, rm, stat,
download URL).

A driver stores the files of backup chains under a *chain key* (``<vm name>/<backup id>``). Files of
one chain reference each other by relative name (qcow2 backing files), so a driver keeps a chain's
files together. Optional operations have a slow-but-correct default a driver may override.
"""

from __future__ import annotations

import json
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vmkeep.errors import AlreadyExists, DatastoreError, InvalidValue
from vmkeep.names import check_chain_key, check_file_name

QCOW2_MAGIC = b"QFI\xfb"
SECRET_SHOWN = "(set)"  # what API reads and JSON show for a secret option that is set


def qemu_img_info(path: Path | str, check: bool = True) -> dict[str, Any]:
    """``qemu-img info`` of an image as a dict; with ``check=False`` a failing qemu-img gives
    ``{}`` instead of raising CalledProcessError."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=check,
    )
    if proc.returncode:
        return {}
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


class DriverOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class DatastoreDriver(ABC):
    driver: ClassVar[str]
    options_model: ClassVar[type[DriverOptions]]
    # "local": files are readable in place (restore needs no copy)
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # options never shown by an API read or in JSON (stored in the catalog, shown as "(set)")
    secret_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        try:
            self.options = self.options_model.model_validate(options)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "options"
            # a model-level error's input is every option (maybe a secret): never echo it
            shown = first.get("input") if first["loc"] else "(the options given)"
            if any(s in key for s in ("password", "secret", "key")):
                shown = "(hidden)"
            msg = first["msg"]
            if first["type"] == "extra_forbidden":
                shown = "(given)"
                msg = (
                    f"{self.driver} datastores take no option {key!r}; the allowed ones are "
                    + ", ".join(self.options_model.model_fields)
                )
            raise InvalidValue(f"datastore {name} option {key}", shown, msg) from None

    def shown_options(self) -> dict[str, Any]:
        """The options as API reads and JSON show them: a secret is ``(set)``, never its value."""
        shown: dict[str, Any] = self.options.model_dump(mode="json")
        for key in self.secret_options:
            if shown.get(key) is not None:
                shown[key] = SECRET_SHOWN
        return shown

    # --- names read from the datastore are untrusted -----------------------------------------
    def checked_chain(self, chain: str) -> str:
        """``chain`` if it is a chain key by the rule of names.py, else DatastoreError."""
        try:
            return check_chain_key("chain key", chain)
        except InvalidValue as err:
            raise DatastoreError(self.name, f"refused: {err}") from None

    def checked_name(self, chain: str, name: str) -> str:
        """``name`` if it is a stored file name by the rule of names.py, else DatastoreError."""
        try:
            return check_file_name(f"stored file name in {chain}", name)
        except InvalidValue as err:
            raise DatastoreError(self.name, f"refused: {err}") from None

    def local_path(self, folder: Path, chain: str, name: str) -> Path:
        """Where a fetched file is written: ``folder/name``, refused unless it stays directly in
        ``folder`` once resolved (no ``..``, no link leading out)."""
        self.checked_name(chain, name)
        root = folder.resolve()
        path = (root / name).resolve()
        if path.parent != root:
            raise DatastoreError(self.name, f"refused: {chain}/{name} leaves the folder {root}")
        return path

    def staging_root(self) -> Path | None:
        """A folder on the datastore's own file system where a backup can be staged, so that
        storing it is a rename, never a copy (None: stage in vmkeep's data dir)."""
        return None

    # --- required -------------------------------------------------------------------------------
    @abstractmethod
    def monitor(self) -> tuple[int, int]:
        """(total bytes, free bytes) of the datastore."""

    @abstractmethod
    def backup(self, chain: str, staged: list[Path]) -> None:
        """Store staged files into ``chain`` atomically per file: a file is either absent or complete.
        A file with the same name is replaced. The staged files may be moved away."""

    @abstractmethod
    def restore(self, chain: str, names: list[str], workdir: Path) -> dict[str, Path]:
        """Make the named files of ``chain`` readable locally (in ``workdir`` or in place)."""

    @abstractmethod
    def rm(self, chain: str, names: list[str] | None = None) -> None:
        """Remove files of ``chain`` (``None``: the whole chain). Absent files are no error."""

    @abstractmethod
    def chains(self) -> list[str]:
        """Chain keys present in the datastore."""

    # --- optional, with slow-but-correct defaults -----------------------------------------------
    def head(self, chain: str, name: str, size: int, workdir: Path) -> bytes:
        """The first ``size`` bytes of a stored file. Default: fetch it and read."""
        path = self.restore(chain, [name], workdir)[name]
        with open(path, "rb") as f:
            return f.read(size)

    def stat(self, chain: str, name: str, workdir: Path) -> int:
        """Restored (virtual) size of a disk file, from its qcow2 header."""
        header = self.head(chain, name, 32, workdir)
        if len(header) < 32 or header[:4] != QCOW2_MAGIC:
            raise DatastoreError(self.name, f"{chain}/{name} is not a qcow2 image")
        return int.from_bytes(header[24:32], "big")

    def used(self) -> int | None:
        """Bytes the datastore's backups take (restic: the repository's size), if known."""
        return None

    def ssh_target(self) -> Any:
        """The SshTarget of a driver that logs in over SSH (host key learned on add), else None."""
        return None

    def verify_store(self, chain: str) -> str | None:
        """A driver's own integrity check of the stored data beyond per-file sha256 (restic
        ``check --read-data-subset``); a one-line summary, or None when the driver has none."""
        return None

    def url(self, chain: str, name: str) -> str:
        """Download pseudo-URL ``<driver>://<datastore>/<chain>/<file>``."""
        return f"{self.driver}://{self.name}/{chain}/{name}"

    def check(self) -> None:
        """Validate that the datastore is usable (called on ``datastore add``)."""
        self.monitor()


REGISTRY: dict[str, type[DatastoreDriver]] = {}


def register(cls: type[DatastoreDriver]) -> type[DatastoreDriver]:
    if cls.driver in REGISTRY:
        raise AlreadyExists(f"datastore driver {cls.driver!r}")
    REGISTRY[cls.driver] = cls
    return cls


def make_driver(driver: str, name: str, options: dict[str, Any]) -> DatastoreDriver:
    """The driver for a datastore; remote ones wrapped so transient network errors are retried."""
    factory: Callable[[str, dict[str, Any]], DatastoreDriver] | None = REGISTRY.get(driver)
    if factory is None:
        raise InvalidValue("--driver", driver, f"known drivers are {', '.join(sorted(REGISTRY))}")
    drv = factory(name, options)
    if "remote" in drv.capabilities:
        from vmkeep.datastores.retry import Retrying

        return Retrying(drv, attempts=int(getattr(drv.options, "retries", 3)) + 1)
    return drv


def wrap_oserror(ds: str, what: str, err: OSError) -> DatastoreError:
    return DatastoreError(ds, f"{what}: {err.strerror or err}")
