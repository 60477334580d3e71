"""``dir`` driver: backups as plain qcow2 files in a folder, restorable with nothing but qemu-img.

Layout: ``<path>/<vm name>/<backup id>/{N.<disk>.qcow2, N.domain.xml, manifest.json}``. Files are
written under a ``.partial`` name, fsynced and renamed: a crash never leaves a file that looks
complete but is not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import field_validator

from vmkeep.datastores.base import DatastoreDriver, DriverOptions, register, wrap_oserror
from vmkeep.datastores.ssh import tree_size
from vmkeep.errors import DatastoreError
from vmkeep.faults import failpoint

PARTIAL = ".partial"
STAGING = ".vmkeep-staging"


class DirOptions(DriverOptions):
    path: Path
    # QEMU writes a backup into a folder of the datastore, so storing it is a rename. True: into
    # vmkeep's data dir, copied at the end (a datastore on slow or network storage: the guest's
    # writes during the backup then wait on local disk, not on it).
    stage_in_data_dir: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _absolute(cls, value: object) -> Path:
        """Stored absolute (a relative path would break from another working directory);
        never empty and never the root of the file system."""
        text = str(value).strip() if value is not None else ""
        if not text:
            raise ValueError("give the folder for the backups, e.g. --path /srv/backups")
        path = Path(os.path.abspath(os.path.expanduser(text)))
        if path == Path("/"):
            raise ValueError("'/' cannot be a datastore; give a folder such as /srv/backups")
        return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@register
class DirDriver(DatastoreDriver):
    driver = "dir"
    options_model = DirOptions
    capabilities = frozenset({"local"})
    options: DirOptions

    @property
    def root(self) -> Path:
        return self.options.path

    def staging_root(self) -> Path | None:
        if self.options.stage_in_data_dir:
            return None
        return self.root / STAGING  # a dot name: chains() never lists it

    def _chain_dir(self, chain: str) -> Path:
        self.checked_chain(chain)
        d = (self.root / chain).resolve()
        if self.root.resolve() not in d.parents:
            raise DatastoreError(self.name, f"chain key {chain!r} escapes the datastore")
        return d

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".vmkeep-write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise wrap_oserror(self.name, f"{self.root} is not writable", err) from err

    def monitor(self) -> tuple[int, int]:
        try:
            st = os.statvfs(self.root)
        except OSError as err:
            raise wrap_oserror(self.name, f"cannot stat {self.root}", err) from err
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def used(self) -> int:
        return tree_size(self.root)

    def backup(self, chain: str, staged: list[Path]) -> None:
        dest = self._chain_dir(chain)
        try:
            for d in (dest.parent, dest):  # the VM's and the chain's folders: vmkeep's alone
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            for src in staged:
                final = self.local_path(dest, chain, src.name)
                tmp = dest / (src.name + PARTIAL)
                try:
                    os.rename(src, tmp)  # same file system: no copy
                except OSError:
                    shutil.copyfile(src, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fchmod(fd, 0o600)  # a guest's disk: readable by vmkeep's user alone
                    os.fsync(fd)
                finally:
                    os.close(fd)
                failpoint("dir-rename")  # the fault suite kills a store between partial and final
                os.replace(tmp, final)
            _fsync_dir(dest)
        except OSError as err:
            raise wrap_oserror(self.name, f"storing into {dest}", err) from err

    def restore(self, chain: str, names: list[str], workdir: Path) -> dict[str, Path]:
        d = self._chain_dir(chain)
        out = {}
        for n in names:
            p = self.local_path(d, chain, n)  # read in place: never a file outside the chain
            if not p.is_file():
                raise DatastoreError(self.name, f"{p} is missing")
            out[n] = p
        return out

    def rm(self, chain: str, names: list[str] | None = None) -> None:
        d = self._chain_dir(chain)
        try:
            if names is None:
                shutil.rmtree(d, ignore_errors=False) if d.exists() else None
                if d.parent != self.root and d.parent.exists() and not any(d.parent.iterdir()):
                    d.parent.rmdir()
                return
            for n in names:
                self.checked_name(chain, n)
                (d / n).unlink(missing_ok=True)
                (d / (n + PARTIAL)).unlink(missing_ok=True)
        except OSError as err:
            raise wrap_oserror(self.name, f"removing from {d}", err) from err

    def chains(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            f"{vm.name}/{b.name}"
            for vm in self.root.iterdir()
            if vm.is_dir() and not vm.name.startswith(".")
            for b in vm.iterdir()
            if b.is_dir()
        )
