"""Protected restore points and notes (``backups protect|unprotect|note``): quick catalog writes.

A protected point is never pruned by retention and never deleted without an admin's ``--force``;
the points it is built on are kept with it (``chains.needed_by_protected``, the one rule).
Protecting takes the VM's lock (as delete and retention do), so no merge or delete of the chain
runs meanwhile; a note or an unprotect changes nothing retention or delete rely on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from vmkeep.catalog.tables import Backup, Increment
from vmkeep.engine.core.chains import chain_locked, find_backup, valid_increments
from vmkeep.engine.core.context import Context
from vmkeep.errors import IncrementNotFound, InvalidValue, Refused
from vmkeep.model import BackupStatus

NOTE_MAX = 1024  # characters


def protect(
    ctx: Context, backup_id: int, increment: int | None = None, *, actor_name: str
) -> dict[str, Any]:
    """Protect one point (``None``: the chain's newest VALID one). Protecting it again keeps who
    protected it first and when."""
    with chain_locked(ctx, backup_id, "protect"), ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        inc = _point(b, increment, valid_only=True)
        if not inc.protected:
            inc.protected, inc.protected_by = True, actor_name
            inc.protected_at = datetime.now(UTC)
        return _result(b, inc)


def unprotect(ctx: Context, backup_id: int, increment: int | None = None) -> dict[str, Any]:
    """Lift the protection of one point (``None``: the chain's newest VALID one)."""
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        inc = _point(b, increment, valid_only=False)
        inc.protected, inc.protected_by, inc.protected_at = False, None, None
        return _result(b, inc)


def set_note(ctx: Context, backup_id: int, increment: int | None, text: str) -> dict[str, Any]:
    """Set a point's note (``None``: the newest VALID point); an empty text removes it."""
    if len(text) > NOTE_MAX:
        raise InvalidValue(
            "note", text[:40] + "...", f"it has {len(text)} characters; use at most {NOTE_MAX}"
        )
    if any((ord(ch) < 32 and ch not in "\n\t") or 0xD800 <= ord(ch) < 0xE000 for ch in text):
        raise InvalidValue(
            "note",
            text[:40],
            "remove its control characters and lone surrogates (tab and newline are allowed)",
        )
    with ctx.catalog.session() as s:
        b = find_backup(s, backup_id)
        inc = _point(b, increment, valid_only=False)
        inc.note = text.strip() or None
        return _result(b, inc)


def _point(b: Backup, increment: int | None, *, valid_only: bool) -> Increment:
    """The chosen point: a VALID one to protect (a damaged or unfinished point restores
    nothing), any to unprotect or annotate; ``None``: the newest VALID one."""
    valid = valid_increments(b)
    seqs = ", ".join(str(i.seq) for i in valid) or "none"
    if increment is None:
        if not valid:
            raise Refused(
                f"choosing the newest point of backup {b.id}",
                "it has no VALID increment",
                "Name one with --increment N (see 'vmkeep backups show ID').",
            )
        return valid[-1]
    inc = next((i for i in b.increments if i.seq == increment), None)
    if inc is None:
        raise IncrementNotFound(b.id, increment, ", ".join(str(i.seq) for i in b.increments))
    if valid_only and inc.status != BackupStatus.VALID:
        raise Refused(
            f"protect of increment {increment} of backup {b.id}",
            f"it is {inc.status} and restores nothing",
            f"Protect a VALID increment (VALID: {seqs}).",
        )
    return inc


def _result(b: Backup, inc: Increment) -> dict[str, Any]:
    return {
        "backup": b.id,
        "increment": inc.seq,
        "protected": inc.protected,
        "protected_by": inc.protected_by,
        "protected_at": inc.protected_at,
        "note": inc.note,
    }
