"""Locks are catalog rows (host, pid, reason), so the CLI and the daemon see the same locks.

A lock whose holder is a dead process on this host is reclaimed (Benji ``with_lock``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from vmkeep.catalog.db import Catalog
from vmkeep.catalog.tables import Lock
from vmkeep.errors import Locked

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                conn.execute(insert(Lock).values(name=name, host=host, pid=pid, reason=reason))
            return
        except IntegrityError:
            with catalog.session() as s:
                holder = s.execute(select(Lock).where(Lock.name == name)).scalar_one_or_none()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.host == host and not pid_alive(holder.pid):
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
    if h is None or h.host != socket.gethostname() or pid_alive(h.pid):
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
