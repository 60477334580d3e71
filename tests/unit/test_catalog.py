import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from vmkeep.catalog import Catalog, lock
from vmkeep.catalog.db import HEAD_REVISION, MIGRATIONS_DIR
from vmkeep.catalog.tables import Base, Lock
from vmkeep.errors import Locked


def test_revision_is_read_when_another_process_creates_it_meanwhile(tmp_path: Path) -> None:
    """Two daemons starting on a new catalog: this one's SELECT fails (no table yet), the
    other's migration commits the table before this one looks for it; it is read, not an error."""
    import sqlite3

    from sqlalchemy import event

    db = tmp_path / "c.db"
    cat = Catalog(f"sqlite:///{db}", migrate=False)

    def other_process_commits(_ctx: object) -> None:  # right after this one's SELECT failed
        with sqlite3.connect(db) as other:  # commits on leaving
            other.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
            other.execute("INSERT INTO alembic_version VALUES ('0042')")
        other.close()

    event.listen(cat.engine, "handle_error", other_process_commits, once=True)
    assert cat.current_revision() == "0042"
    assert Catalog(f"sqlite:///{tmp_path / 'empty.db'}", migrate=False).current_revision() is None


def test_migrations_reach_head_and_match_models(tmp_path: Path) -> None:
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    assert cat.current_revision() == HEAD_REVISION
    heads = sorted(p.name.split("_")[0] for p in (MIGRATIONS_DIR / "versions").glob("*.py"))
    assert heads[-1] == HEAD_REVISION
    insp = inspect(cat.engine)
    for name, table in Base.metadata.tables.items():
        cols = {c["name"] for c in insp.get_columns(name)}
        assert cols == {c.name for c in table.columns}, name


def test_lock_conflict_and_release(tmp_path: Path) -> None:
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    with lock(cat, "vm:1", "backup"):
        # A row held by a live process (ourselves, seen from a "different" pid) blocks.
        with cat.session() as s:
            s.add(Lock(name="vm:2", host=os.uname().nodename, pid=1, reason="other"))
        with pytest.raises(Locked, match="vm:2 is busy: other by pid 1"), lock(cat, "vm:2", "x"):
            pass
    with cat.session() as s:
        assert [r.name for r in s.execute(select(Lock)).scalars()] == ["vm:2"]


def test_lock_of_dead_process_is_reclaimed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    cat = Catalog(url)
    # A real process takes the lock and dies without releasing it.
    code = (
        "import os; from vmkeep.catalog import Catalog; from vmkeep.catalog.locks import acquire;"
        f"acquire(Catalog({url!r}), 'vm:7', 'backup'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with cat.session() as s:
        assert s.get(Lock, "vm:7") is not None
    with lock(cat, "vm:7", "restore"), cat.session() as s:
        row = s.get(Lock, "vm:7")
        assert row is not None and row.pid == os.getpid() and row.reason == "restore"


def test_a_lock_whose_pid_another_process_got_since_is_reclaimed(tmp_path: Path) -> None:
    """The holder is its pid and that process's start: a live process with the pid, started
    after the holder died (pid reuse), does not keep the lock; the holder itself does. The
    same rule ends a job of a process whose pid was reused."""
    from vmkeep.catalog.locks import pid_alive, proc_start
    from vmkeep.catalog.tables import Job
    from vmkeep.config import load_config
    from vmkeep.engine.core import jobs
    from vmkeep.engine.core.context import Context

    other = subprocess.Popen(["sleep", "60"])  # a live process "with the dead holder's pid"
    try:
        start = proc_start(other.pid)
        assert start is not None and start == proc_start(other.pid)
        assert pid_alive(other.pid, start) and not pid_alive(other.pid, start - 1)
        cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
        host = socket.gethostname()
        with cat.session() as s:
            s.add(Lock(name="vm:1", host=host, pid=other.pid, pid_start=start - 1, reason="backup"))
            s.add(Lock(name="vm:2", host=host, pid=other.pid, pid_start=start, reason="backup"))
        with lock(cat, "vm:1", "restore"), cat.session() as s:  # reclaimed
            row = s.get(Lock, "vm:1")
            assert row is not None and (row.pid, row.pid_start) == (
                os.getpid(),
                proc_start(os.getpid()),
            )
        with pytest.raises(Locked, match="vm:2 is busy: backup"), lock(cat, "vm:2", "x"):
            pass  # its holder lives
        ctx = Context(load_config(environ={"VMKEEP_CATALOG_URL": str(cat.engine.url),
                                            "VMKEEP_DATA_DIR": str(tmp_path)}))  # fmt: skip
        with ctx.catalog.session() as s:
            for target, pid_start in (("reused", start - 1), ("alive", start)):
                s.add(Job(kind="backup", target=target, params={}, origin="cli", who="t",
                          state="RUNNING", host=host, pid=other.pid, pid_start=pid_start))  # fmt: skip
        assert [j["target"] for j in jobs.list_jobs(ctx)] == ["alive", "reused"]
        jobs.recover(ctx)
        assert [j["target"] for j in jobs.list_jobs(ctx, "RUNNING")] == ["alive"]
    finally:
        other.kill()
        other.wait()


def test_a_postgresql_url_without_its_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL's driver is the ``postgres`` extra: without it the error says how to get it."""
    from vmkeep.errors import CatalogError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(CatalogError) as raised:
        Catalog("postgresql+psycopg://vmkeep@localhost/vmkeep", migrate=False)
    assert "pip install 'vmkeep[postgres]'" in str(raised.value), raised.value
    assert "psycopg" in str(raised.value)
