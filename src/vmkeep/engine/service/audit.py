"""The audit log: who did what through the API, kept in the catalog (table ``audit``).

Recorded: every mutating request (POST, PUT, PATCH, DELETE), whatever its answer, and every
failed login (a 401 on any method): the time, the actor (token name, ``@local`` for the daemon's
local socket, ``-`` when no token was accepted), its role, the method, the path (no query
string), the status code and the client's address. Never a request's body or headers: they carry
secrets (tokens, passwords of datastores). Admins read it (``GET /v1/audit``, ``vmkeep audit
list``); the newest ``KEEP`` entries are kept.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select

from vmkeep.catalog.tables import AuditEntry
from vmkeep.engine.core.context import Context

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KEEP = 100_000  # entries kept; older ones are dropped (checked every PRUNE_EVERY entries)
PRUNE_EVERY = 1000
NOBODY = "-"  # the actor of a request no token was accepted for


def wanted(method: str, status: int) -> bool:
    """Whether a request is recorded: it changes something, or its login failed."""
    return method.upper() in MUTATING or status == 401


def record(
    ctx: Context,
    *,
    actor: str,
    role: str,
    method: str,
    path: str,
    status: int,
    client: str,
) -> None:
    with ctx.catalog.session() as s:
        entry = AuditEntry(
            actor=(actor or NOBODY)[:64],
            role=(role or NOBODY)[:16],
            method=method.upper()[:16],
            path=path[:2048],
            status=status,
            client=client[:255],
        )
        s.add(entry)
        s.flush()
        if entry.id % PRUNE_EVERY == 0:
            s.execute(delete(AuditEntry).where(AuditEntry.id <= entry.id - KEEP))


def entry_dict(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": e.at,
        "actor": e.actor,
        "role": e.role,
        "method": e.method,
        "path": e.path,
        "status": e.status,
        "client": e.client,
    }


def list_entries(ctx: Context, limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries, newest first; ``after``: those older than the entry with
    this id (the next page)."""
    with ctx.catalog.session() as s:
        q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, limit))
        if after is not None:
            q = q.where(AuditEntry.id < after)
        return [entry_dict(e) for e in s.execute(q).scalars()]
