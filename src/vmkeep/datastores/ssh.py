"""SSH for the remote drivers (rsync, restic over SFTP): one way to build the ``ssh`` command, run a
remote command, learn a host key and classify failures.

Host keys are always checked (``StrictHostKeyChecking=yes``) against the datastore's own
known_hosts file: given with ``--opt known_hosts=FILE`` or learned once on ``datastore add``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from pydantic import BaseModel, field_validator

from vmkeep.errors import DatastoreError, DatastoreUnreachable, InvalidValue

TIMEOUT = 15  # seconds to connect
# ssh's own messages for a host it cannot reach (transient: retried with back-off)
UNREACHABLE = (
    "connection refused",
    "connection timed out",
    "no route to host",
    "network is unreachable",
    "could not resolve hostname",
    "connection closed by",
    "connection reset",
    "broken pipe",
    "operation timed out",
    "kex_exchange_identification",
    # restic when its ssh died before the sftp session started, without ssh's own line (seen
    # under load); a refused login or host key says so first and is classified above
    "unable to start the sftp session",
)


class SshTarget(BaseModel):
    """Where a remote datastore lives and how to log in (no password: keys only)."""

    host: str
    user: str = "root"
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None

    @field_validator("identity", "known_hosts", mode="before")
    @classmethod
    def _absolute(cls, value: object) -> Path | None:
        if value in (None, ""):
            return None
        return Path(str(value)).expanduser().absolute()

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        """A host name or address: it is an argument of ssh (``-oProxyCommand=..`` would be read
        as an option and run as root)."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:%\[\]-]{0,252}", value):
            raise ValueError("a host is a name or address: letters, digits and . - _ : [ ] %")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(
                "a user is 1-64 letters, digits, '.', '_' or '-', not starting with '-'"
            )
        return value

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("a TCP port is 1..65535")
        return value

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh_argv(self) -> list[str]:
        argv = [
            "ssh",
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={TIMEOUT}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "LogLevel=ERROR",
        ]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity is not None:
            argv += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return argv

    def ssh_command(self) -> str:
        """The ssh command as one shell string (rsync ``-e``, restic ``sftp.command``)."""
        return shlex.join(self.ssh_argv())


def classify(ds: str, what: str, stderr: str) -> DatastoreError:
    """A failed ssh/rsync/restic call as the error a user can act on."""
    msg = " ".join(stderr.strip().split())[-500:] or "no error output"
    low = msg.lower()
    if "host key verification failed" in low or "remote host identification has changed" in low:
        return DatastoreError(
            ds,
            f"{what}: the host key is not the one in the datastore's known_hosts ({msg}); "
            "if the host was reinstalled, update --opt known_hosts",
        )
    if "permission denied (" in low or "too many authentication failures" in low:
        return DatastoreError(
            ds, f"{what}: login refused ({msg}); check --opt user and --opt identity"
        )
    if any(m in low for m in UNREACHABLE):
        return DatastoreUnreachable(ds, f"{what}: {msg}", 0)
    return DatastoreError(ds, f"{what}: {msg}")


def remote(
    ds: str, target: SshTarget, command: list[str], what: str, timeout: float | None = 600
) -> str:
    """Run ``command`` on the datastore host; its stdout (``timeout`` None: as long as it takes,
    e.g. syncing large files; a dead connection still ends through ServerAliveInterval)."""
    argv = [*target.ssh_argv(), target.login, "--", shlex.join(command)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise DatastoreUnreachable(ds, f"{what}: no answer in {err.timeout:.0f} s", 0) from err
    if proc.returncode != 0:
        raise classify(ds, what, proc.stderr)
    return proc.stdout


def learn_host_key(ds: str, target: SshTarget, dest: Path) -> list[str]:
    """Fetch the host's keys into ``dest`` (a known_hosts file); their fingerprints for the user."""
    proc = subprocess.run(
        ["ssh-keyscan", "-T", str(TIMEOUT), "-p", str(target.port), target.host],
        capture_output=True,
        text=True,
    )
    keys = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
    if not keys:
        raise DatastoreUnreachable(
            ds, f"no SSH host key from {target.host}:{target.port} ({proc.stderr.strip()})", 0
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(keys) + "\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(dest)], capture_output=True, text=True)
    return out.stdout.splitlines()


def parse_df(ds: str, out: str) -> tuple[int, int]:
    """(total, free) bytes from ``df -P -B1 PATH``."""
    try:
        fields = out.strip().splitlines()[-1].split()
        return int(fields[1]), int(fields[3])
    except (IndexError, ValueError) as err:
        raise DatastoreError(ds, f"cannot read the remote df output {out!r}") from err


def check_remote_path(name: str, value: str) -> str:
    if not value.startswith("/") or value.rstrip("/") == "":
        raise InvalidValue(f"datastore {name} option path", value, "an absolute folder, not '/'")
    return value.rstrip("/")


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def remote_tree_size(ds: str, target: SshTarget, path: str) -> int:
    out = remote(
        ds, target, ["sh", "-c", f"du -sb {shlex.quote(path)} 2>/dev/null || echo 0"], "usage"
    )
    try:
        return int(out.split()[0])
    except (IndexError, ValueError) as err:
        raise DatastoreError(ds, f"cannot read the remote du output {out!r}") from err
