"""``restic`` driver: deduplicated, encrypted backups in a restic repository, local or over SFTP
(OpenNebula's restic datastore: PASSWORD, COMPRESSION, CONNECTIONS, BWLIMIT, NICE/IONICE).

Every stored file is one restic snapshot read from standard input, named ``/<file>`` and tagged
``vmkeep``, ``chain=<vm>/<backup id>``, ``file=<name>``, ``vm=``, ``backup=`` and, for increment
files, ``increment=``: a file can be removed on its own (forget + prune) and the newest snapshot of
a name is its current content. A snapshot exists only once restic wrote all its data, so a killed
transfer leaves no file that looks complete (its packs are garbage for the next prune).

The password reaches restic only through a file or a command named in restic's environment
(``RESTIC_PASSWORD_FILE`` / ``RESTIC_PASSWORD_COMMAND``): never on a command line (``ps`` shows
every user the argv), in the catalog or in JSON; ``password_command`` itself is shown as
``(set)`` by API reads and JSON.

Snapshot tags are untrusted input (a hostile repository may be scanned and imported): a ``file=``
tag names a file only if it follows the stored-file rule (names.py), a ``chain=`` tag is checked by
the import, and every fetched file is written inside the caller's folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from vmkeep.datastores.base import DatastoreDriver, DriverOptions, register
from vmkeep.datastores.ssh import (
    SshLogin,
    SshTarget,
    classify,
    parse_df,
    remote,
    remote_tree_size,
    tree_size,
)
from vmkeep.errors import DatastoreError, InvalidValue
from vmkeep.names import check_file_name

HOST = "vmkeep"  # one snapshot host for every machine: a new host can import and restore
CHECK_SUBSET = "10%"
LOCK_WAIT = 600.0  # seconds forget/prune/check wait for another vmkeep's store to finish
log = logging.getLogger(__name__)


class ResticOptions(DriverOptions):
    repo: str
    password_file: Path | None = None
    password_command: str | None = None
    compression: Literal["off", "auto", "max"] | None = None
    connections: int | None = Field(default=None, ge=1, le=128)
    bwlimit: int | None = Field(default=None, gt=0)  # KiB/s, both directions
    nice: int | None = Field(default=None, ge=-20, le=19)
    ionice: int | None = None  # best-effort class level 0..7
    init: bool = False
    # SSH for sftp: repositories
    port: int | None = Field(default=None, ge=1, le=65535)
    identity: Path | None = None
    known_hosts: Path | None = None
    retries: int = Field(default=3, ge=0, le=20)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "a password is never given as an option (it would show in ps and in the catalog); "
                "use --opt password_file=FILE or --opt password_command=CMD"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> ResticOptions:
        if (self.password_file is None) == (self.password_command is None):
            raise ValueError("give exactly one of password_file=FILE or password_command=CMD")
        if self.password_file is not None:
            object.__setattr__(self, "password_file", self.password_file.expanduser().absolute())
        if self.password_command is not None and not self.password_command.strip():
            raise ValueError("password_command is empty")
        if not self.repo.startswith("sftp:"):
            if ":" in self.repo.split("/", 1)[0]:
                raise ValueError("repo is a local folder or sftp:USER@HOST:/PATH")
            object.__setattr__(self, "repo", os.path.abspath(os.path.expanduser(self.repo)))
        else:
            self.sftp()  # validates the form
        for key in ("identity", "known_hosts"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, value.expanduser().absolute())
        if self.ionice is not None and not 0 <= self.ionice <= 7:
            raise ValueError("ionice is a best-effort level 0..7")
        return self

    def sftp(self) -> tuple[SshTarget, str] | None:
        """(ssh target, remote path) of an ``sftp:[USER@]HOST:/PATH`` repository (HOST may be an
        ssh config alias: see ssh.py)."""
        if not self.repo.startswith("sftp:"):
            return None
        rest = self.repo.removeprefix("sftp:")
        login, sep, path = rest.partition(":")
        user, at, host = login.rpartition("@")
        if not sep or not host or not path.startswith("/"):
            raise ValueError("an SFTP repo is sftp:USER@HOST:/ABSOLUTE/PATH")
        target = SshTarget(
            host=host,
            user=user if at else None,
            port=self.port,
            identity=self.identity,
            known_hosts=self.known_hosts,
        )
        return target, path


def _tags(chain: str, name: str) -> list[str]:
    vm, _, backup = chain.partition("/")
    tags = ["vmkeep", f"chain={chain}", f"file={name}", f"vm={vm}", f"backup={backup}"]
    seq = name.split(".", 1)[0]
    if seq.isdigit():
        tags.append(f"increment={seq}")
    return tags


def _safe_name(name: str) -> bool:
    try:
        check_file_name("file tag", name)
    except InvalidValue:
        return False
    return True


def _tag(snapshot: dict[str, Any], key: str) -> str | None:
    return next(
        (t.split("=", 1)[1] for t in snapshot.get("tags") or [] if t.startswith(key + "=")), None
    )


@register
class ResticDriver(DatastoreDriver):
    driver = "restic"
    options_model = ResticOptions
    capabilities = frozenset({"remote", "dedup", "one-writer"})  # one-writer: limits.py
    secret_options = frozenset({"password_command"})
    options: ResticOptions

    # --- running restic ----------------------------------------------------------------------
    def _argv(self, args: list[str]) -> list[str]:
        o = self.options
        argv: list[str] = []
        if o.nice is not None:
            argv += ["nice", "-n", str(o.nice)]
        if o.ionice is not None:
            argv += ["ionice", "-c", "2", "-n", str(o.ionice)]
        argv += ["restic", "--repo", o.repo]  # the password: through _env(), never argv
        target = self._target
        if target is not None:
            argv += ["-o", f"sftp.command={target.ssh_command()} {target.login} -s sftp"]
        if o.connections:
            backend = "sftp" if target else "local"
            argv += ["-o", f"{backend}.connections={o.connections}"]
        if o.bwlimit:
            argv += ["--limit-upload", str(o.bwlimit), "--limit-download", str(o.bwlimit)]
        return argv + args

    def _env(self) -> dict[str, str]:
        """restic's environment: ours, without any RESTIC_* of the caller's, plus the password's
        file or command (the environment is readable by root and the process' owner only)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        o = self.options
        if o.password_file is not None:
            env["RESTIC_PASSWORD_FILE"] = str(o.password_file)
        else:
            env["RESTIC_PASSWORD_COMMAND"] = str(o.password_command)
        return env

    def _error(self, what: str, stderr: str) -> DatastoreError:
        low = stderr.lower()
        if "wrong password" in low:
            return DatastoreError(
                self.name, f"{what}: wrong password or no key found; check --opt password_file"
            )
        if "is there a repository at the following location" in low:
            return DatastoreError(
                self.name,
                f"no restic repository at {self.options.repo}; add --opt init=yes to create one",
            )
        if "already locked" in low or "unable to create lock" in low:
            return DatastoreError(
                self.name, f"{what}: the repository is locked by another restic that is running"
            )
        if self._target is not None and "unable to start the sftp session" in low:
            why = self._ssh_refusal()  # restic passes ssh's own words on only sometimes
            if why:
                return classify(self.name, what, why)
        return classify(self.name, what, stderr)

    def _ssh_refusal(self) -> str:
        """What ssh says when it logs in as restic's sftp command does ("" when it can)."""
        target = self._target
        assert target is not None
        try:
            proc = subprocess.run([*target.ssh_argv(), target.login, "--", "true"],
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "ssh: no answer in 30 s"
        return proc.stderr if proc.returncode != 0 else ""

    def _run(
        self,
        args: list[str],
        what: str,
        stdin: Any = None,
        stdout: Any = None,
        lock_wait: float = 0.0,
    ) -> str:
        """Run restic. A lock left by a dead process is cleared (``restic unlock`` removes stale
        locks only); a live one is waited for up to ``lock_wait`` seconds (restic 0.14 has no
        ``--retry-lock``): forget, prune and check need the repository to themselves."""
        deadline = time.monotonic() + lock_wait
        unlocked = False
        while True:
            for f in (stdin, stdout):
                if f is not None and hasattr(f, "seek"):
                    f.seek(0)
                    if f is stdout:
                        f.truncate()
            proc = subprocess.run(
                self._argv(args),
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(),
            )
            if proc.returncode == 0:
                return proc.stdout.decode() if stdout is None else ""
            err = self._error(what, proc.stderr.decode(errors="replace"))
            if "is locked" not in str(err):
                raise err
            if not unlocked:
                subprocess.run(self._argv(["unlock"]), capture_output=True, env=self._env())
                unlocked = True
                continue
            if time.monotonic() >= deadline:
                raise err
            time.sleep(2.0)

    def _snapshots(self, chain: str | None = None) -> list[dict[str, Any]]:
        tag = f"vmkeep,chain={chain}" if chain else "vmkeep"
        out = self._run(["snapshots", "--json", "--tag", tag], "list snapshots")
        rows: list[dict[str, Any]] = json.loads(out or "[]") or []
        # by the instant, not the text: the offset in "time" is the writer's local time zone
        return sorted(rows, key=lambda r: datetime.fromisoformat(r["time"]))

    def _current(
        self, chain: str, snaps: list[dict[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The newest snapshot of every file name of a chain."""
        newest: dict[str, dict[str, Any]] = {}
        for snap in self._snapshots(chain) if snaps is None else snaps:
            name = _tag(snap, "file")
            if name and _safe_name(name):
                newest[name] = snap  # sorted by time: the last one wins
            elif name:
                log.warning("datastore %s: snapshot %s of %s has a file tag that is no file "
                            "name (%r): ignored", self.name, snap.get("short_id"), chain, name)  # fmt: skip
        return newest

    def _forget(self, ids: list[str], prune: bool) -> None:
        if ids:
            self._run(["forget", *ids], "forget", lock_wait=LOCK_WAIT)
            if prune:
                self._run(["prune"], "prune", lock_wait=LOCK_WAIT)

    @cached_property
    def _target(self) -> SshLogin | None:
        """The SFTP login as ssh itself would make it (an ssh config alias resolved, see ssh.py)."""
        sftp = self.options.sftp()
        return sftp[0].resolve(self.name) if sftp else None

    def ssh_target(self) -> SshLogin | None:
        return self._target

    # --- contract -------------------------------------------------------------------------------
    def check(self) -> None:
        pf = self.options.password_file
        if pf is not None and not os.access(pf, os.R_OK):
            raise DatastoreError(self.name, f"password_file {pf} is not readable")
        try:
            self._run(["cat", "config"], "open repository")
        except DatastoreError as err:
            if "add --opt init=yes" not in str(err) or not self.options.init:
                raise
            self._run(["init", "--repository-version", "2"], "init repository")

    def monitor(self) -> tuple[int, int]:
        sftp = self.options.sftp()
        if sftp is not None and self._target is not None:
            out = remote(self.name, self._target, ["df", "-P", "-B1", sftp[1]], "monitor")
            return parse_df(self.name, out)
        path = Path(self.options.repo)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            st = os.statvfs(path)
        except OSError as err:
            raise DatastoreError(self.name, f"cannot stat {path}: {err.strerror}") from err
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def used(self) -> int:
        sftp = self.options.sftp()
        if sftp is not None and self._target is not None:
            return remote_tree_size(self.name, self._target, sftp[1])
        return tree_size(Path(self.options.repo))

    def backup(self, chain: str, staged: list[Path]) -> None:
        stored: dict[str, str] = {}  # file name -> the snapshot just written
        for src in staged:
            args = ["backup", "--json", "--host", HOST, "--stdin", "--stdin-filename", src.name]
            for t in _tags(chain, src.name):
                args += ["--tag", t]
            if self.options.compression:
                args += ["--compression", self.options.compression]
            with open(src, "rb") as f:
                out = self._run(args, f"store {src.name}", stdin=f)
            summary = [json.loads(ln) for ln in out.splitlines() if '"summary"' in ln]
            if summary and summary[-1].get("snapshot_id"):
                stored[src.name] = summary[-1]["snapshot_id"]
        # a name stored again replaces the older content (manifest.json after every increment);
        # best effort: forget needs the repository to itself, and the newest snapshot wins anyway
        old = [
            s["short_id"]
            for s in self._snapshots(chain)
            # restic 0.14's summary names the snapshot by its short id
            if (name := _tag(s, "file")) in stored and not s["id"].startswith(stored[name])
        ]
        try:
            self._forget(old, prune=False)
        except DatastoreError as err:
            log.warning("datastore %s: older copies of %s stay until the next rm: %s",
                        self.name, ", ".join(stored), err)  # fmt: skip

    def restore(self, chain: str, names: list[str], workdir: Path) -> dict[str, Path]:
        self.checked_chain(chain)
        workdir.mkdir(parents=True, exist_ok=True)
        dests = {n: self.local_path(workdir, chain, n) for n in names}  # every name, first
        current = self._current(chain)
        out: dict[str, Path] = {}
        for n in names:
            if n not in current:
                raise DatastoreError(self.name, f"{chain}/{n} is missing")
            dest = dests[n]
            with open(dest, "wb") as f:
                self._run(["dump", current[n]["id"], "/" + n], f"restore {n}", stdout=f)
            out[n] = dest
        return out

    def rm(self, chain: str, names: list[str] | None = None) -> None:
        snaps = self._snapshots(self.checked_chain(chain))
        ids = [s["short_id"] for s in snaps if names is None or _tag(s, "file") in names]
        self._forget(ids, prune=True)

    def chains(self) -> list[str]:
        return sorted({c for s in self._snapshots() if (c := _tag(s, "chain"))})

    def head(self, chain: str, name: str, size: int, workdir: Path) -> bytes:
        self.checked_chain(chain)
        self.checked_name(chain, name)
        current = self._current(chain)
        if name not in current:
            raise DatastoreError(self.name, f"{chain}/{name} is missing")
        proc = subprocess.Popen(
            self._argv(["--no-lock", "dump", current[name]["id"], "/" + name]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self._env(),
        )
        assert proc.stdout is not None
        try:
            return proc.stdout.read(size)
        finally:
            proc.send_signal(signal.SIGINT)  # restic removes its lock on SIGINT, not on SIGKILL
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def verify_store(self, chain: str) -> str | None:
        self._run(
            ["check", f"--read-data-subset={CHECK_SUBSET}"], "restic check", lock_wait=LOCK_WAIT
        )
        return f"restic check --read-data-subset={CHECK_SUBSET}: no errors"
