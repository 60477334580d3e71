"""A throwaway PostgreSQL 15 server (Debian's package) for tests and the lab: a fresh cluster in a
temp folder, run as the ``postgres`` user, trusted connections on a unix socket in that folder.

A unix socket crosses network namespaces (it is a file), so a daemon inside a lab host's
namespace (``vmkeep.lab.hosts``) reaches the same URL; ``listen`` adds TCP on one address.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmkeep.errors import LabError

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
DATABASE = "vmkeep"
START_TIMEOUT = 60


@dataclass(frozen=True)
class Postgres:
    root: Path  # the temp folder: data/, the socket, the log
    port: int
    listen: str | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def url(self) -> str:
        """The catalog URL over the unix socket."""
        return self.database_url(DATABASE)

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` of this server, over the unix socket."""
        return f"postgresql+psycopg://{PG_USER}@/{name}?host={self.root}&port={self.port}"

    @property
    def tcp_url(self) -> str | None:
        if self.listen is None:
            return None
        return f"postgresql+psycopg://{PG_USER}@{self.listen}:{self.port}/{DATABASE}"


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _as_pg(*argv: str) -> None:
    try:
        subprocess.run(
            ["runuser", "-u", PG_USER, "--", *argv],
            check=True,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 30,
        )
    except subprocess.CalledProcessError as err:
        out = (err.stderr or err.stdout or "").strip()[-1000:]
        raise LabError(f"{Path(argv[0]).name} failed: {out}") from None


def server_options(pg: Postgres) -> str:
    """pg_ctl's -o: the socket in the temp folder, TCP only on ``listen``."""
    listen = pg.listen or ""
    return f"-k {pg.root} -p {pg.port} -c listen_addresses='{listen}' -c max_connections=100"


def start(listen: str | None = None, parent: Path | None = None) -> Postgres:
    """A fresh cluster with a ``vmkeep`` database, started; stop it with ``stop``."""
    if not (PG_BIN / "initdb").exists():
        raise LabError(f"PostgreSQL 15 is not installed ({PG_BIN}): apt-get install postgresql-15")
    root = Path(tempfile.mkdtemp(prefix="vmkeep-pg-", dir=parent))
    try:
        shutil.chown(root, PG_USER, PG_USER)
        root.chmod(0o755)  # the socket is reached by root and by the lab hosts' daemons
        port = _free_port(listen) if listen else 5432  # the socket's name only, without TCP
        pg = Postgres(root, port, listen)
        _as_pg(str(PG_BIN / "initdb"), "-D", str(pg.data), "-A", "trust", "-U", PG_USER)
        if listen:
            with open(pg.data / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet trust\n")
        _as_pg(str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-o", server_options(pg), "-w",
               "-t", str(START_TIMEOUT), "-l", str(pg.log), "start")  # fmt: skip
    except BaseException:
        log = root / "log"
        tail = log.read_text(errors="replace")[-1000:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        if tail:
            raise LabError(f"PostgreSQL did not start; its log ends:\n{tail}") from None
        raise
    try:
        create_database(pg, DATABASE)
    except BaseException:
        stop(pg)
        raise
    return pg


def create_database(pg: Postgres, name: str) -> str:
    """A new empty database on a running server (a catalog of its own for each test of a module
    that shares one server); its URL."""
    _as_pg(str(PG_BIN / "createdb"), "-h", str(pg.root), "-p", str(pg.port), name)
    return pg.database_url(name)


def stop(pg: Postgres) -> None:
    """Stop the server (immediately: it is throwaway) and remove its folder."""
    with contextlib.suppress(LabError):
        if (pg.data / "postmaster.pid").exists():
            _as_pg(str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "-w", "stop")
    shutil.rmtree(pg.root, ignore_errors=True)


@contextlib.contextmanager
def server(listen: str | None = None, parent: Path | None = None) -> Iterator[str]:
    """A throwaway server for the block; yields its catalog URL (unix socket)."""
    pg = start(listen, parent)
    try:
        yield pg.url
    finally:
        stop(pg)


# ``vmkeep lab postgres up|down``: one throwaway server for a user's lab (the README's many-host
# walk-through), remembered in a file so that ``down`` finds it
LAB_STATE = Path("/var/lib/vmkeep/labpg.json")


def lab_up() -> str:
    """The lab's server (started unless it runs): its catalog URL."""
    running = _lab_server()
    if running is not None:
        return running.url
    LAB_STATE.parent.mkdir(parents=True, exist_ok=True)
    pg = start(parent=LAB_STATE.parent)
    LAB_STATE.write_text(json.dumps({"root": str(pg.root), "port": pg.port}))
    return pg.url


def lab_down() -> bool:
    """Stop the lab's server and remove its folder; False when none ran."""
    pg = _lab_server(alive_only=False)
    LAB_STATE.unlink(missing_ok=True)
    if pg is None:
        return False
    stop(pg)
    return True


def _lab_server(alive_only: bool = True) -> Postgres | None:
    try:
        state = json.loads(LAB_STATE.read_text())
        pg = Postgres(Path(state["root"]), int(state["port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if alive_only and not _running(pg):
        return None
    return pg


def _running(pg: Postgres) -> bool:
    """Whether the server's postmaster (the first line of its pid file) is alive."""
    try:
        pid = int((pg.data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True
