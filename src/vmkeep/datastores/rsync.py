"""``rsync`` driver: the ``dir`` layout on another host, over SSH (OpenNebula's rsync datastore).

``<path>/<vm name>/<backup id>/{N.<disk>.qcow2, N.domain.xml, manifest.json}`` on the remote host.
A store uploads into a hidden ``.partial-*`` folder beside the chain's files and renames each file
into place only after the transfer finished and was synced: a broken transfer never leaves a
file that looks complete. Host keys are checked (see ssh.py).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import uuid
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator

from vmkeep.datastores.base import DatastoreDriver, DriverOptions, register
from vmkeep.datastores.ssh import (
    SshLogin,
    SshTarget,
    classify,
    parse_df,
    remote,
    remote_tree_size,
)
from vmkeep.errors import DatastoreError, DatastoreUnreachable

PARTIAL = ".partial-"

# rsync ``args``: what the transfer copies and how, never where it reads or writes (--log-file,
# --temp-dir, --backup-dir, --write-batch), which program it runs (-e, --rsync-path) or which
# files it takes (--files-from, --include-from): those would run as root on either host.
SHORT_ARGS = "aSzcHAXvqW"  # -a -S -z -c -H -A -X -v -q -W, alone or together (-aSz)
LONG_ARGS = frozenset(
    {
        "--archive", "--sparse", "--compress", "--checksum", "--hard-links", "--acls",
        "--xattrs", "--verbose", "--quiet", "--whole-file", "--no-whole-file", "--numeric-ids",
        "--no-perms", "--no-owner", "--no-group", "--no-times", "--perms", "--owner", "--group",
        "--times", "--preallocate", "--stats", "--human-readable",
    }
)  # fmt: skip
VALUE_ARGS = {"--compress-level": range(0, 10), "--timeout": range(0, 86401)}
# refused with their own reason: the driver renames complete files into place itself
ATOMIC_BREAKERS = frozenset(
    {"--inplace", "--append", "--partial", "--remove-source-files", "--delete"}
)
ALLOWED_ARGS = (
    " ".join(f"-{c}" for c in SHORT_ARGS)
    + " "
    + " ".join(sorted(LONG_ARGS))
    + " "
    + " ".join(f"{k}=N" for k in VALUE_ARGS)
)
# a remote folder: no space, quote or shell character (rsync hands it to the remote shell)
_REMOTE_PATH = re.compile(r"/[A-Za-z0-9_./+@=:,%-]*")


def check_args(value: str) -> str:
    """``value`` if every rsync argument in it is allowed (ValueError naming the first that is
    not, and the allowed ones)."""
    try:
        given = shlex.split(value)
    except ValueError as err:
        raise ValueError(f"args cannot be split into arguments ({err})") from None
    breakers = sorted(set(given) & ATOMIC_BREAKERS)
    if breakers:
        raise ValueError(f"{', '.join(breakers)} would break atomic stores")
    for arg in given:
        key, eq, num = arg.partition("=")
        if re.fullmatch(f"-[{SHORT_ARGS}]+", arg) or arg in LONG_ARGS:
            continue
        if eq and key in VALUE_ARGS and num.isdigit() and int(num) in VALUE_ARGS[key]:
            continue
        raise ValueError(f"rsync argument {arg!r} is not allowed in args; allowed: {ALLOWED_ARGS}")
    return value


class RsyncOptions(DriverOptions, SshTarget):
    path: str
    args: str = "-aS"
    bwlimit: int | None = Field(default=None, gt=0)  # KiB/s
    retries: int = Field(default=3, ge=0, le=20)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") == "":
            raise ValueError("give the absolute folder on the remote host, e.g. /srv/backups")
        if not _REMOTE_PATH.fullmatch(value) or ".." in value.split("/"):
            raise ValueError(
                "the remote folder may hold letters, digits and _ . / + @ = : , % - only "
                "(no '..', space, quote or shell character)"
            )
        return value.rstrip("/")

    @field_validator("args")
    @classmethod
    def _args(cls, value: str) -> str:
        return check_args(value)


@register
class RsyncDriver(DatastoreDriver):
    driver = "rsync"
    options_model = RsyncOptions
    capabilities = frozenset({"remote", "ssh"})
    options: RsyncOptions

    def _dir(self, chain: str) -> str:
        self.checked_chain(chain)  # two safe path components: never outside the datastore
        return f"{self.options.path}/{chain}"

    @cached_property
    def _target(self) -> SshLogin:
        """The login as ssh itself would make it (an ssh config alias resolved, see ssh.py)."""
        return self.options.resolve(self.name)

    def _ssh(self, command: list[str], what: str, timeout: float | None = 600) -> str:
        return remote(self.name, self._target, command, what, timeout)

    def _rsync(self, sources: list[str], dest: str, what: str) -> None:
        argv = ["rsync", *shlex.split(self.options.args), "-e", self._target.ssh_command()]
        if self.options.bwlimit:
            argv.append(f"--bwlimit={self.options.bwlimit}")
        proc = subprocess.run([*argv, "--", *sources, dest], capture_output=True, text=True)
        if proc.returncode in (23, 24) and "no such file" in proc.stderr.lower():
            raise DatastoreError(self.name, f"{what}: a file is missing ({proc.stderr.strip()})")
        if proc.returncode in (30, 35) and "no space" not in proc.stderr.lower():
            # rsync's own I/O timeouts: transient
            raise DatastoreUnreachable(self.name, f"{what}: {proc.stderr.strip()}", 0)
        if proc.returncode != 0:
            raise classify(self.name, what, proc.stderr)

    def _remote_name(self, path: str) -> str:
        return f"{self._target.login}:{path}"  # names and chain keys are strict (names.py)

    def ssh_target(self) -> SshLogin:
        return self._target

    # --- contract -------------------------------------------------------------------------------
    def check(self) -> None:
        p = self.options.path
        self._ssh(["sh", "-c", f"mkdir -p {shlex.quote(p)} && test -w {shlex.quote(p)}"], "check")

    def monitor(self) -> tuple[int, int]:
        return parse_df(self.name, self._ssh(["df", "-P", "-B1", self.options.path], "monitor"))

    def used(self) -> int:
        return remote_tree_size(self.name, self._target, self.options.path)

    def backup(self, chain: str, staged: list[Path]) -> None:
        d = self._dir(chain)
        tmp = f"{d}/{PARTIAL}{uuid.uuid4().hex[:12]}"
        # a store broken with the host (its clean-up could not reach it) left its folder: one
        # store writes to a chain at a time (the VM's lock), so any other .partial-* is stale
        stale = f"rm -rf -- {shlex.quote(d)}/{PARTIAL}*"
        self._ssh(["sh", "-c", f"{stale} && mkdir -p -- {shlex.quote(tmp)}"], "store")
        try:
            self._rsync([str(p) for p in staged], f"{self._remote_name(tmp)}/", "store")
            names = [self.checked_name(chain, p.name) for p in staged]
            # fsync the data, then rename each file into place, then fsync the folder
            script = (
                f"cd {shlex.quote(tmp)} && sync -- {shlex.join(names)} && "
                + " && ".join(f"mv -f -- {shlex.quote(n)} ../{shlex.quote(n)}" for n in names)
                + " && cd .. && rmdir -- "
                + shlex.quote(tmp.rsplit("/", 1)[1])
                + " && sync -- ."
            )
            self._ssh(["sh", "-c", script], "store", timeout=None)  # syncs the data: no limit
        except BaseException:
            with contextlib.suppress(DatastoreError):  # else the next rm of the chain removes it
                self._ssh(["rm", "-rf", "--", tmp], "store cleanup")
            raise

    def restore(self, chain: str, names: list[str], workdir: Path) -> dict[str, Path]:
        d = self._dir(chain)
        workdir.mkdir(parents=True, exist_ok=True)
        out = {n: self.local_path(workdir, chain, n) for n in names}  # checks every name first
        sources = [self._remote_name(f"{d}/{n}") for n in names]
        self._rsync(sources, f"{workdir}/", "restore")
        # -a copies a symlink as a link: one from a hostile store would read a local file
        links = [n for n, p in out.items() if p.is_symlink()]
        if links:
            raise DatastoreError(self.name, f"refused: {d}/{links[0]} is a symbolic link")
        missing = [n for n, p in out.items() if not p.is_file()]
        if missing:
            raise DatastoreError(self.name, f"{d}/{missing[0]} is missing")
        return out

    def rm(self, chain: str, names: list[str] | None = None) -> None:
        d = self._dir(chain)
        if names is None:
            parent = d.rsplit("/", 1)[0]
            script = (
                f"rm -rf -- {shlex.quote(d)} && "
                f"(rmdir -- {shlex.quote(parent)} 2>/dev/null || true)"
                if parent != self.options.path
                else f"rm -rf -- {shlex.quote(d)}"
            )
            self._ssh(["sh", "-c", script], "rm")
            return
        if names:
            paths = [f"{d}/{self.checked_name(chain, n)}" for n in names]
            self._ssh(["rm", "-f", "--", *paths], "rm")

    def chains(self) -> list[str]:
        p = shlex.quote(self.options.path)
        out = self._ssh(
            ["sh", "-c", f"cd {p} 2>/dev/null && find . -mindepth 2 -maxdepth 2 -type d || true"],
            "list chains",
        )
        keys = [ln.removeprefix("./") for ln in out.splitlines() if ln.strip()]
        return sorted(k for k in keys if not any(part.startswith(".") for part in k.split("/")))

    def head(self, chain: str, name: str, size: int, workdir: Path) -> bytes:
        argv = [*self._target.ssh_argv(), self._target.login, "--"]
        path = f"{self._dir(chain)}/{self.checked_name(chain, name)}"
        cmd = shlex.join(["head", "-c", str(size), "--", path])
        proc = subprocess.run([*argv, cmd], capture_output=True)
        if proc.returncode != 0:
            raise classify(self.name, "stat", proc.stderr.decode(errors="replace"))
        return proc.stdout
