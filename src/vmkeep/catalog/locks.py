"""Locks are catalog rows (host, pid, reason), so the CLI and the daemon see the same locks.

A lock whose holder is a dead process on this host is reclaimed (Benji ``with_lock``); the holder
is its pid and that process's start, so a pid another process got since does not keep it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from vmkeep.catalog.db import Catalog
from vmkeep.catalog.tables import Lock
from vmkeep.errors import Locked

log = logging.getLogger(__name__)


def proc_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``'s 22nd
    field); None when it is gone (or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the fields after the command's name, which is in parentheses and may hold any
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs; with ``start`` (``proc_start`` when it was
    recorded), whether it is still that process: a pid a dead holder left and another process
    got since is not it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is None:
        return True
    now = proc_start(pid)
    return now is None or now == start


def holder(catalog: Catalog, name: str) -> Lock | None:
    """The current holder of a lock (a detached row), or None."""
    with catalog.session() as s:
        row = s.get(Lock, name)
        if row is not None:
            s.expunge(row)
        return row


def acquire(catalog: Catalog, name: str, reason: str, label: str | None = None) -> None:
    """Take the lock ``name`` for ``reason``; ``label`` names the locked thing for people
    ("VM web"). A lock held by a dead process on this host is reclaimed."""
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(2):
        try:
            with catalog.engine.begin() as conn:
                conn.execute(
                    insert(Lock).values(
                        name=name, host=host, pid=pid, pid_start=proc_start(pid), reason=reason
                    )
                )
            return
        except IntegrityError:
            with catalog.session() as s:
                holder = s.execute(select(Lock).where(Lock.name == name)).scalar_one_or_none()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.host == host and not pid_alive(holder.pid, holder.pid_start):
                    log.warning(
                        "reclaiming lock %s left by dead process %s (%s)",
                        name,
                        holder.pid,
                        holder.reason,
                    )
                    # Delete only that exact stale row: a racing reclaimer cannot steal a fresh lock.
                    s.execute(
                        delete(Lock).where(
                            Lock.name == name, Lock.host == holder.host, Lock.pid == holder.pid
                        )
                    )
                    continue
                raise Locked(
                    label or name,
                    holder.reason,
                    holder.pid,
                    holder.host,
                    holder.acquired_at.isoformat(timespec="seconds"),
                ) from None
    raise Locked(label or name, "another action", "?", "?", "just now")


def drop_if_dead(catalog: Catalog, name: str) -> bool:
    """Remove the lock ``name`` when its holder is a dead process on this host."""
    h = holder(catalog, name)
    if h is None or h.host != socket.gethostname() or pid_alive(h.pid, h.pid_start):
        return False
    with catalog.session() as s:
        s.execute(delete(Lock).where(Lock.name == name, Lock.pid == h.pid, Lock.host == h.host))
    return True


def release(catalog: Catalog, name: str) -> None:
    with catalog.session() as s:
        s.execute(
            delete(Lock).where(
                Lock.name == name, Lock.host == socket.gethostname(), Lock.pid == os.getpid()
            )
        )


@contextmanager
def lock(catalog: Catalog, name: str, reason: str, label: str | None = None) -> Iterator[None]:
    acquire(catalog, name, reason, label)
    try:
        yield
    finally:
        release(catalog, name)
