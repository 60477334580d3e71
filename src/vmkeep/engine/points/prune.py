"""``vmkeep prune VM``: retention run on its own, on every datastore the VM has points on (or
one), with the VM's policy or rules given for this run; ``dry_run`` only says what it would do.
The plan and its explanation per point are ``retention.py``'s; carrying it out, ``merge.py``'s."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmkeep.catalog.locks import lock
from vmkeep.catalog.tables import Backup
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import find_datastore
from vmkeep.engine.points import merge, retention
from vmkeep.engine.vm import policy
from vmkeep.engine.vm.record import find_vm
from vmkeep.engine.vm.recovery import prune_checkpoints
from vmkeep.model import BackupStatus


def prune(
    ctx: Context,
    vm_ref: str,
    datastore: str | None = None,
    *,
    dry_run: bool = False,
    rules: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per datastore: the plan (each point kept or removed, with the rule that decided and how
    it goes) and, unless ``dry_run``, what was done. ``rules``: keep_* keys over the VM's."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, vm_ref)
        vm_id, name = vm.id, vm.name
        cfg, sources = policy.effective(ctx, vm, policy.check_overrides(rules))
        q = select(Backup.datastore_id).where(
            Backup.vm_id == vm_id, Backup.status == BackupStatus.VALID
        )
        if datastore is not None:
            q = q.where(Backup.datastore_id == find_datastore(s, datastore).id)
        ds_ids = sorted(set(s.execute(q).scalars()))
    rule_sources = {k: sources[k] for k in cfg.keeps()}
    out: dict[str, Any] = {"vm": name, "dry_run": dry_run, "rules": cfg.keeps(),
                           "rule_sources": rule_sources, "datastores": []}  # fmt: skip
    with lock(ctx.catalog, f"vm:{vm_id}", "prune", label=f"VM {name}"):
        for ds_id in ds_ids:
            with ctx.catalog.session() as s:
                p = retention.plan(ctx, s, vm_id, ds_id, cfg)
            shown = p.as_dict()
            if not dry_run and p.rules:
                shown["done"] = merge.apply(ctx, p)
            out["datastores"].append(shown)
        if not dry_run:
            prune_checkpoints(ctx, vm_id, name, missing_ok=True)
    return out
