"""Retention: which restore points of a VM on a datastore stay, across every chain it has there
(chains left by ``--reset``, a checkpoint fallback or a change of mode included), and the plan
that removes the others without leaving any kept point unrestorable.

``calendar.select`` marks each VALID point keep or remove with the rule that decided. Then:

- a point a protected one is built on is kept (``chains.needed_by_protected``);
- the newest point of the chain the next increment extends is kept (its checkpoint is that
  increment's base);
- a chain none of whose points stays is deleted whole;
- inside a chain, a kept point whose parent goes is merged down (``merge.py``): onto the
  nearest kept point below it, or, when none is left below, into a new base of its own.

``plan`` only reads (``prune --dry-run`` prints it); ``merge.apply`` carries it out
(``merge.apply_retention``: both). It runs
after every backup (with the backup's policy: a backup job's keys over the VM's) and as
``vmkeep prune``, also from a backup job of task ``prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Backup
from vmkeep.engine.core import schedules
from vmkeep.engine.core.backup_config import BackupConfig
from vmkeep.engine.core.chains import latest_chain, needed_by_protected, valid_increments
from vmkeep.engine.core.context import Context
from vmkeep.engine.points.calendar import Mark, Point, select_points
from vmkeep.model import BackupMode, BackupStatus


@dataclass
class ChainPlan:
    """What retention does to one chain: ``delete`` it whole, or ``remove`` these points and
    give each kept point in ``relink`` its new parent (None: it becomes the chain's base)."""

    backup: int
    chain: str
    delete: bool = False
    remove: list[int] = field(default_factory=list)
    relink: dict[int, int | None] = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        return self.delete or bool(self.remove)


@dataclass
class Plan:
    vm: str
    datastore: str
    rules: dict[str, int]
    zone: str
    points: list[dict[str, Any]]  # newest first: backup, increment, taken, keep, rule, how
    chains: list[ChainPlan]

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "datastore": self.datastore,
            "rules": self.rules,
            "timezone": self.zone,
            "keep": sum(p["keep"] for p in self.points),
            "remove": sum(not p["keep"] for p in self.points),
            "points": self.points,
        }


def plan(ctx: Context, s: Session, vm_id: int, ds_id: int, cfg: BackupConfig) -> Plan:
    """The retention plan of the VM's points on the datastore under ``cfg``'s rules."""
    zone = schedules.zone_name(ctx.config.schedule.timezone)
    chains = list(
        s.execute(
            select(Backup)
            .where(
                Backup.vm_id == vm_id,
                Backup.datastore_id == ds_id,
                Backup.status == BackupStatus.VALID,
            )
            .order_by(Backup.id)
        ).scalars()
    )
    rules = cfg.keeps()
    points = [
        Point((b.id, i.seq), i.started_at, i.protected) for b in chains for i in valid_increments(b)
    ]
    marks = select_points(points, rules, schedules.zone(zone))
    for b in chains:
        for seq in needed_by_protected(b):
            key = (b.id, seq)
            if key in marks and not marks[key].keep:
                marks[key] = Mark(True, f"a protected point of backup {b.id} is built on it")
    extended = latest_chain(s, vm_id, ds_id)
    if extended is not None and extended.mode == BackupMode.INCREMENT:
        valid = valid_increments(extended)
        if valid and valid[-1].checkpoint and not marks[(extended.id, valid[-1].seq)].keep:
            marks[(extended.id, valid[-1].seq)] = Mark(True, "the next increment builds on it")
    chain_plans = [_chain_plan(b, marks) for b in chains]
    how = {(c.backup, q): h for c in chain_plans for q, h in _how(c)}
    rows = [
        {
            "backup": p.key[0],
            "increment": p.key[1],
            "taken": p.taken,
            "keep": marks[p.key].keep,
            "rule": marks[p.key].rule,
            "how": how.get(p.key),
        }
        for p in sorted(points, key=lambda p: (p.taken, p.key), reverse=True)
    ]
    first = chains[0] if chains else None
    return Plan(
        vm=first.vm.name if first else "",
        datastore=first.datastore.name if first else "",
        rules=rules,
        zone=zone,
        points=rows,
        chains=[c for c in chain_plans if c.changes],
    )


def _chain_plan(b: Backup, marks: dict[Any, Mark]) -> ChainPlan:
    valid = valid_increments(b)
    kept = {i.seq for i in valid if marks[(b.id, i.seq)].keep}
    out = ChainPlan(b.id, b.chain)
    if not valid or (not kept and any(i.protected for i in b.increments)):
        return out  # no point to judge (all DAMAGED, say), or a protected one it must keep
    if not kept:
        out.delete = True
        out.remove = [i.seq for i in valid]
        return out
    out.remove = [i.seq for i in valid if i.seq not in kept]
    parent = {i.seq: i.parent for i in b.increments}
    for i in valid:
        if i.seq not in kept or i.parent is None or i.parent in kept:
            continue
        below: int | None = i.parent  # down the parent links to the nearest kept point, if any
        while below is not None and below not in kept:
            below = parent.get(below)
        out.relink[i.seq] = below
    return out


def _how(c: ChainPlan) -> list[tuple[int, str]]:
    """Per point of the chain that changes, how (``prune`` prints it beside the rule)."""
    if c.delete:
        return [(q, f"backup {c.backup} deleted whole") for q in c.remove]
    out = []
    for q in c.remove:
        into = [n for n, below in c.relink.items() if below is None or below < q]
        later = [n for n in into if n > q]
        if later:
            out.append((q, f"merged into increment {min(later)}"))
        else:
            out.append((q, "dropped (no kept point is built on it)"))
    for n, below in c.relink.items():
        out.append((n, "becomes the chain's base" if below is None else f"now built on {below}"))
    return out
