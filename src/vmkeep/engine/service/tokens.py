"""API tokens and roles: viewer reads; operator backs up, restores, verifies, quiesces and cancels
jobs; admin also resets state, adds datastores, groups and pools, and sets a VM's backup policy.
The role an action needs comes from ``POLICY``, overridable per action in the config
(``[api.policy]``, e.g. ``quiesce = "admin"`` as Nova's spec has it by default).

A token is ``vmk_`` + 32 random bytes (URL-safe base64); only its sha256 is stored, so a catalog
leak does not leak tokens, and the secret is printed once at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Token
from vmkeep.engine.core.context import Context
from vmkeep.errors import AlreadyExists, Forbidden, InvalidValue, NotFound, Unauthorized
from vmkeep.model import ROLES
from vmkeep.names import check_name

PREFIX = "vmk_"
# ``tokens list`` shows when a token was last used to this precision: writing the time on every
# request made each GET a write transaction, and concurrent clients queued on SQLite's lock
LAST_USED_STEP = timedelta(seconds=60)

# action -> least role; "read" covers every GET.
POLICY: dict[str, str] = {
    "read": "viewer",
    "backup": "operator",
    "group-backup": "operator",
    "restore": "operator",
    "verify": "operator",
    "drill": "operator",
    "quiesce": "operator",
    "unquiesce": "operator",
    "cancel-job": "operator",
    "reset-state": "admin",
    "datastore-add": "admin",
    "datastore-remove": "admin",
    "datastore-scan": "admin",
    "backup-delete": "admin",  # and its --force, which deletes protected points, always
    # protected points (engine/points/protect.py): protecting only keeps more, as Proxmox
    # Backup Server lets Datastore.Modify protect; unprotecting lets retention and delete remove
    # the point again, so it is admin's as backup-delete is; a note is a label
    "backup-protect": "operator",
    "backup-unprotect": "admin",
    "backup-note": "operator",
    # retention with the VM's own policy (as after every backup) or a dry run; rules given for
    # one run delete what the policy keeps, so they need backup-delete (runners.check_prune)
    "prune": "operator",
    "copy": "operator",
    "files": "operator",  # reads the guests' files: more than a viewer may see
    "group-create": "admin",
    "group-start": "admin",  # every member, imported ones too (no imported_vms_actions check)
    "group-stop": "admin",  # --force destroys
    "group-recover": "admin",  # redeploys members of failed hosts, as vm recover is admin's
    "group-restore": "operator",  # new VMs, as a restore makes
    "group-drill": "operator",  # throw-away VMs on a throw-away isolated network, as drill
    "vm-action": "operator",  # lifecycle actions; recover and terminate need admin (below)
    "vm-recover": "admin",
    "vm-terminate": "admin",
    "vm-create": "admin",
    "audit": "admin",  # who did what (engine/audit.py)
    # backup policy (engine/vm/policy.py): a lower keep_last deletes restore points at the next
    # backup, as backup-delete does, so both are admin's; [api.policy] can lower them
    "pool-edit": "admin",  # create, change and delete pools
    "vm-config": "admin",  # a VM's own keys and its pool
    "host-edit": "admin",  # add, enable, disable and remove hosts (engine/hosts)
    "backupjob-edit": "admin",  # a job's keep_last prunes as vm-config's does; its runs act
    # with the role of who made it
}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidValue("--role", role, f"use one of {', '.join(ROLES)}")
    return role


def create(ctx: Context, name: str, role: str) -> dict[str, Any]:
    """A new token; the returned ``token`` is the only time the secret is shown."""
    check_name("token name", name)
    _check_role(role)
    secret = PREFIX + secrets.token_urlsafe(32)
    with ctx.catalog.session() as s:
        if s.execute(select(Token.id).where(Token.name == name)).first():
            raise AlreadyExists(f"token {name!r}")
        s.add(Token(name=name, role=role, digest=_digest(secret)))
    return {"name": name, "role": role, "token": secret}


def list_tokens(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        return [
            {"name": t.name, "role": t.role, "created": t.created_at, "last_used": t.last_used_at}
            for t in s.execute(select(Token).order_by(Token.id)).scalars()
        ]


def revoke(ctx: Context, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        t = s.execute(select(Token).where(Token.name == name)).scalar_one_or_none()
        if t is None:
            raise NotFound(f"token {name!r}")
        s.delete(t)
    return {"name": name, "revoked": True}


def authenticate(ctx: Context, header: str | None) -> tuple[str, str]:
    """(token name, role) for an ``Authorization`` header value; Unauthorized otherwise."""
    if not header:
        raise Unauthorized("no Authorization header")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("the Authorization header is not 'Bearer TOKEN'")
    digest = _digest(secret.strip())
    with ctx.catalog.session() as s:
        t = s.execute(select(Token).where(Token.digest == digest)).scalar_one_or_none()
        if t is None or not hmac.compare_digest(t.digest, digest):
            raise Unauthorized("unknown or revoked token")
        now = datetime.now(UTC)
        if t.last_used_at is None or now - t.last_used_at >= LAST_USED_STEP:
            t.last_used_at = now  # else a read stays a read: no write per request
        return t.name, t.role


def authorize(name: str, role: str, action: str, overrides: dict[str, str]) -> None:
    """Forbidden unless ``role`` is at least the role ``action`` needs."""
    needed = overrides.get(action) or POLICY.get(action, "admin")
    if ROLES.index(role) < ROLES.index(needed):
        raise Forbidden(name, role, action, needed)
