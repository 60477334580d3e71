"""Opening the catalog: engine, sessions, and automatic migrations on start."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.errors import CatalogError

# Bump together with a new file in migrations/versions; a unit test checks they agree.
HEAD_REVISION = "0014"

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def reason(err: BaseException) -> str:
    """What a database error says, for a message a client may see: the driver's short reason
    (its first line, e.g. ``IntegrityError: UNIQUE constraint failed: tokens.name``), never
    SQLAlchemy's text around it, which carries the statement and its bound parameters."""
    orig = getattr(err, "orig", None)
    source = orig if isinstance(orig, BaseException) else err
    text = str(source).split("\n[SQL:", 1)[0].split("\n(Background on this error", 1)[0]
    if source is err and isinstance(err, StatementError):
        text = text.split("[SQL:", 1)[0]  # a statement error without a driver's exception
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return f"{type(source).__name__}: {first}" if first else type(source).__name__


def _redact(url: str) -> str:
    """Never show a password from a catalog URL."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown by scheme only
        return url.split(":", 1)[0] + "://…"


def _private(file: Path) -> None:
    """The SQLite catalog (and its -wal/-shm files, which SQLite makes with the database's mode)
    readable by vmkeep's user alone: created 0600, an older catalog's group and world bits
    dropped."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # SQLite: 0644
    for f in (file, file.with_name(file.name + "-wal"), file.with_name(file.name + "-shm")):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            f.chmod(stat.S_IMODE(st.st_mode) & 0o700)


class Catalog:
    """The catalog database. ``with catalog.session() as s:`` commits on success, rolls back on error."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.display_url = _redact(url)
        if url.startswith("sqlite:///"):
            file = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
            folder = file.parent
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                if file.name and file.name != ":memory:":
                    _private(file)
            except OSError as err:
                blocked = next(
                    (p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None
                )
                why = f"{blocked} is a file, not a folder" if blocked else err.strerror or err
                raise CatalogError(
                    f"cannot create the folder {folder} for {self.display_url}: {why}; "
                    "set [catalog] url (or VMKEEP_CATALOG_URL) to a writable place"
                ) from err
        try:
            # JSON columns (increments' file lists) read with orjson: 10,000 rows in a list
            # command cost 0.24 s through the standard library's decoder
            self.engine: Engine = create_engine(url, future=True, json_deserializer=_json_loads)
        except ImportError as err:
            missing = getattr(err, "name", None) or ""
            hint = ""
            if missing.split(".")[0] == "psycopg":  # the PostgreSQL driver is an extra
                hint = "; PostgreSQL needs its driver: pip install 'vmkeep[postgres]'"
            raise CatalogError(f"cannot open {self.display_url}: {reason(err)}{hint}") from err
        except SQLAlchemyError as err:
            raise CatalogError(f"cannot open {self.display_url}: {reason(err)}") from err
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    def current_revision(self) -> str | None:
        """The schema revision in one query (start-up's fast path); None for an empty catalog."""
        try:
            with self.engine.connect() as conn:
                try:
                    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                except (OperationalError, ProgrammingError):
                    # no such table (SQLite: OperationalError, PostgreSQL: ProgrammingError)?
                    conn.rollback()
                    if not inspect(conn).has_table("alembic_version"):
                        return None
                    # it is there now: another process's migration committed it meanwhile
                    # (two daemons starting on a new catalog); a second failure is an error
                    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError as err:
            raise CatalogError(f"cannot read {self.display_url}: {reason(err)}") from err

    def migrate(self) -> None:
        """Bring the schema to HEAD. The fast path (already at head) costs one query."""
        if self.current_revision() == HEAD_REVISION:
            return
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection_url"] = self.url
        try:
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    # Several daemons may start at once on a new catalog: one migrates, the
                    # others wait here and then find the schema at head.
                    conn.execute(text("SELECT pg_advisory_xact_lock(7274653)"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as err:
            if self.current_revision() == HEAD_REVISION:
                return  # another process migrated it meanwhile (SQLite has no advisory lock)
            raise CatalogError(f"migrating {self.display_url} failed: {reason(err)}") from err

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except SQLAlchemyError as err:
            s.rollback()
            raise CatalogError(reason(err)) from err
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def _json_loads(text: str | bytes) -> Any:
    """orjson, or the standard library for what orjson refuses and it wrote (NaN, surrogates)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the daemon and the CLI read while a backup writes; busy_timeout serialises writers.
    # synchronous=NORMAL (SQLite's advice for WAL): a commit no longer waits for an fsync (39 ms
    # each here, 21 commits per backup: 0.8 s of an incremental); the WAL is synced at its
    # checkpoints. A crashed process loses nothing; a power cut can lose the last commits, never
    # the file's consistency. Known gap: after a power cut, a datastore change made right after
    # such a commit (retention's merge) may be ahead of the catalog.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
