"""The names and ids shell completion offers (``cli/complete.py``), read from the catalog alone:
no libvirt call (``inventory.list_vms`` refreshes states), no datastore driver (``stores.list_all``
asks each store for its free space) and nothing written, so a Tab press stays quick and quiet."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup, Datastore, Group, Host, Job, Pool, Vm
from vmkeep.engine.core.context import Context

# kind: (column, ids: past LIMIT rows keep the newest, the ones a user means most)
KINDS: dict[str, tuple[Any, bool]] = {
    "vm": (Vm.name, False),
    "backup": (Backup.id, True),
    "datastore": (Datastore.name, False),
    "group": (Group.name, False),
    "job": (Job.id, True),
    "pool": (Pool.name, False),
    "host": (Host.name, False),
}
LIMIT = 1000  # a shell shows no more than that usefully


def refs(ctx: Context, kind: str) -> list[str]:
    """The values of one ``KINDS`` column, as strings."""
    column, newest_first = KINDS[kind]
    q = select(column).order_by(column.desc() if newest_first else column).limit(LIMIT)
    with ctx.catalog.session() as s:
        return [str(v) for v in s.execute(q).scalars()]
