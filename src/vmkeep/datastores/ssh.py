"""SSH for the remote drivers (rsync, restic over SFTP): one way to build the ``ssh`` command, run a
remote command, learn a host key and classify failures.

A datastore's host may be a ``Host`` alias of the ssh config: ``SshTarget.resolve`` asks ``ssh -G``
what ssh itself would use (HostName, Port, User, IdentityFile) and every ssh, ssh-keyscan, rsync
and restic call uses that; options given with ``--opt`` win over the config.

Host keys are always checked (``StrictHostKeyChecking=yes``) against the datastore's own
known_hosts file: given with ``--opt known_hosts=FILE`` or learned once on ``datastore add``.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import subprocess
from dataclasses import dataclass
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
    # restic when its ssh died in the middle of the session (the server gone mid-transfer):
    # ssh's own exit status 255 (a refused login says so first and is classified above)
    "ssh command exited: exit status 255",
)


def _check_host(value: str) -> str:
    """A host name or address: it is an argument of ssh (``-oProxyCommand=..`` would be read as
    an option and run as root)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:%\[\]-]{0,252}", value):
        raise ValueError("a host is a name or address: letters, digits and . - _ : [ ] %")
    return value


def _check_user(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError("a user is 1-64 letters, digits, '.', '_' or '-', not starting with '-'")
    return value


def _check_port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError("a TCP port is 1..65535")
    return value


@dataclass(frozen=True)
class SshLogin:
    """A resolved SSH login (``SshTarget.resolve``): the address, port, user and keys every ssh,
    ssh-keyscan, rsync and restic call of a datastore uses."""

    host: str
    user: str
    port: int
    identities: tuple[Path, ...] = ()
    known_hosts: Path | None = None

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
        for identity in self.identities:
            argv += ["-i", str(identity)]
        if self.identities:
            argv += ["-o", "IdentitiesOnly=yes"]
        return argv

    def ssh_command(self) -> str:
        """The ssh command as one shell string (rsync ``-e``, restic ``sftp.command``)."""
        return shlex.join(self.ssh_argv())


class SshTarget(BaseModel):
    """Where a remote datastore lives and how to log in, as the user gave it (no password: keys
    only). ``host`` may be a ``Host`` alias of the ssh config: ``resolve`` fills in what is not
    given from it."""

    host: str
    user: str | None = None
    port: int | None = None
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
        return _check_host(value)

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return None if value is None else _check_user(value)

    @field_validator("port")
    @classmethod
    def _port(cls, value: int | None) -> int | None:
        return None if value is None else _check_port(value)

    def resolve(self, ds: str) -> SshLogin:
        """What ssh itself would use for ``host`` (``ssh -G``: an alias's HostName, Port, User and
        IdentityFile; a host that is no alias is itself), under the options given, which win."""
        conf = ssh_config(ds, self.host)

        def one(key: str) -> str:
            values = conf.get(key)
            if not values:
                raise DatastoreError(ds, f"'ssh -G {self.host}' printed no {key}")
            return values[0]

        try:
            host = _check_host(one("hostname"))
            user = self.user or _check_user(one("user"))
            port = self.port or _check_port(int(one("port")))
        except ValueError as err:
            raise DatastoreError(ds, f"the ssh config of host {self.host!r}: {err}") from None
        if self.identity is not None:
            identities: tuple[Path, ...] = (self.identity,)
        elif conf.get("identityfile", []) == default_identities(ds):
            identities = ()  # no IdentityFile configured: ssh tries its own keys, as before
        else:
            tokens = {"h": host, "r": user, "p": str(port), "n": self.host}
            identities = tuple(
                _expand_identity(ds, self.host, f, tokens) for f in conf["identityfile"]
            )
        return SshLogin(host, user, port, identities, self.known_hosts)


def parse_ssh_g(out: str) -> dict[str, list[str]]:
    """``ssh -G`` output (one ``keyword value`` a line) as keyword -> values, in order."""
    conf: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            conf.setdefault(key.lower(), []).append(value.strip())
    return conf


def _config_args() -> list[str]:
    """ssh reads ``~/.ssh/config`` from the home of the passwd entry; vmkeep's ``~`` is $HOME
    (as in ``--opt identity=~/...`` and vmkeep's own folders). When the two differ and $HOME has
    an ssh config, ``ssh -G`` is given that one (``-F``: then without /etc/ssh/ssh_config)."""
    mine = Path.home() / ".ssh" / "config"
    if not mine.is_file():
        return []
    try:
        ssh_own = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh" / "config"
    except KeyError:  # no passwd entry: ssh has no ~ of its own
        return ["-F", str(mine)]
    return [] if ssh_own.exists() and mine.samefile(ssh_own) else ["-F", str(mine)]


def _run_ssh_g(ds: str, args: list[str], host: str) -> str:
    argv = ["ssh", *args, "-G", "--", host]  # no shell; ssh -G reads its config, never connects
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise DatastoreError(ds, f"'ssh -G {host}' gave no answer in {TIMEOUT} s") from None
    except OSError as err:
        raise DatastoreError(ds, f"cannot run ssh: {err.strerror or err}") from None
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.strip().split())[-500:] or f"exit code {proc.returncode}"
        raise DatastoreError(
            ds,
            f"cannot read the ssh config of host {host!r} ('ssh -G {host}' failed: {msg}); "
            "fix ~/.ssh/config or give the host's address",
        )
    return proc.stdout


def ssh_config(ds: str, host: str) -> dict[str, list[str]]:
    """What ssh's config says for ``host`` (``ssh -G``, with vmkeep's environment)."""
    return parse_ssh_g(_run_ssh_g(ds, _config_args(), _check_host(host)))


_DEFAULTS: list[list[str]] = []  # the answer of default_identities, once asked


def default_identities(ds: str) -> list[str]:
    """The IdentityFile list ssh uses when no config names one (``ssh -F none -G``)."""
    if not _DEFAULTS:
        _DEFAULTS.append(
            parse_ssh_g(_run_ssh_g(ds, ["-F", "none"], "localhost")).get("identityfile", [])
        )
    return _DEFAULTS[0]


# the IdentityFile tokens vmkeep expands: ``%%``, ``%d`` (home), ``%u`` (local user), ``%i`` (uid)
# and the resolved ``%h``, ``%r``, ``%p``, ``%n`` (the alias); any other, or ``${VAR}``, is refused
# with the fix
_TOKEN = re.compile(r"%(.)|\$\{")


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _expand_identity(ds: str, alias: str, value: str, tokens: dict[str, str]) -> Path:
    local = {
        "%": "%",
        "d": str(Path.home()),
        "u": _local_user(),
        "i": str(os.getuid()),
    }
    known = local | tokens

    def one(m: re.Match[str]) -> str:
        if m.group(1) is None or m.group(1) not in known:
            raise DatastoreError(
                ds,
                f"the ssh config of host {alias!r} names IdentityFile {value} with "
                f"{m.group(0)!r}, which vmkeep does not expand; give --opt identity=FILE",
            )
        return known[m.group(1)]

    return Path(os.path.expanduser(_TOKEN.sub(one, value))).absolute()


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
    ds: str, target: SshLogin, command: list[str], what: str, timeout: float | None = 600
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


def learn_host_key(ds: str, target: SshLogin, dest: Path) -> list[str]:
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


def remote_tree_size(ds: str, target: SshLogin, path: str) -> int:
    out = remote(
        ds, target, ["sh", "-c", f"du -sb {shlex.quote(path)} 2>/dev/null || echo 0"], "usage"
    )
    try:
        return int(out.split()[0])
    except (IndexError, ValueError) as err:
        raise DatastoreError(ds, f"cannot read the remote du output {out!r}") from err
