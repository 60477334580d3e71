"""Planning one VM's backup: which disks (``select_disks``), and whether it is a new full chain
or the next increment of the last chain (``plan_backup``), as catalog rows in RUNNING; the rows
of a plan that never started are removed again (``abandon_plan``).

A chain follows the VM's disks (docs/architecture.md, "Chains that follow the disks"): in an
increment, a disk its parent point holds is copied since the parent's checkpoint, and a disk it
does not hold (attached since, or included again) is copied whole, a full of that disk alone
(``joined_disks``). A disk the VM no longer has, or that is excluded, is left out of the point:
its part of the chain ends there, and the earlier points keep it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Backup, Datastore, Increment, Vm
from vmkeep.engine.core.backup_config import BackupConfig
from vmkeep.engine.core.chains import checkpoint_name, latest_chain, new_chain_key, valid_increments
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of
from vmkeep.engine.lifecycle.migration import chain_break_since
from vmkeep.errors import BackupFailed
from vmkeep.model import BackupMode, BackupStatus, DiskInfo, DomainInfo, Warnings
from vmkeep.names import check_disk_name

log = logging.getLogger(__name__)


@dataclass
class Plan:
    backup_id: int
    seq: int
    parent: int | None
    chain: str
    incremental_from: str | None  # checkpoint the increment is taken against
    checkpoint: str | None  # checkpoint this backup creates
    new_chain: bool
    # disks an increment copies whole: they joined the chain at this point (every disk of a
    # new chain is a full too, without being named here)
    full_disks: tuple[str, ...] = ()

    def is_full(self, disk: str) -> bool:
        return self.parent is None or disk in self.full_disks


def select_disks(info: DomainInfo, cfg: BackupConfig) -> tuple[list[DiskInfo], list[str]]:
    """The disks to back up, and those left out by ``cfg.exclude_disks`` that the VM has."""
    disks, excluded = [], []
    for d in info.disks:
        if d.device != "disk" or not d.path:
            continue
        if d.transient and not cfg.backup_volatile:
            log.info("skipping volatile disk %s (BACKUP_VOLATILE=NO)", d.target)
            continue
        if d.target in cfg.exclude_disks:
            log.info("skipping disk %s (EXCLUDE_DISKS)", d.target)
            excluded.append(d.target)
            continue
        check_disk_name(f"disk target of VM {info.name}", d.target)  # it names stored files
        disks.append(d)
    if not disks:
        why = f" (every disk is excluded: {', '.join(excluded)})" if excluded else ""
        hint = "; include one again with 'vmkeep vm config VM --exclude-disk ...'" if why else ""
        raise BackupFailed(info.name, f"it has no disk to back up{why}{hint}")
    return disks, excluded


def joined_disks(parent_files: list[dict[str, Any]], disks: list[str]) -> tuple[str, ...]:
    """The disks of an increment that its parent point does not hold (attached since, or
    included again after an exclusion): each is copied whole. The others are copied since the
    parent's checkpoint, which has a bitmap of exactly the disks its point holds."""
    held = {f["disk"] for f in parent_files if f.get("disk")}
    return tuple(d for d in disks if d not in held)


def bitmapless_disk(reason: str, disks: list[str], plan: Plan) -> str | None:
    """The disk of the plan's incremental ones that libvirt's refusal names as lacking its
    bitmap of the parent's checkpoint ("missing or broken bitmap 'vmkeep-1-3' for disk
    'vdb'"), or None: the refusal is about the checkpoint itself."""
    m = re.search(r"bitmap .* for disk '([^']+)'", reason)
    disk = m.group(1) if m else None
    return disk if disk in disks and not plan.is_full(disk) else None


def _new_chain(s: Session, vm: Vm, ds_id: int, mode: BackupMode) -> Plan:
    b = Backup(vm_id=vm.id, datastore_id=ds_id, mode=mode, status=BackupStatus.RUNNING, chain="")
    s.add(b)
    s.flush()
    ds = s.get(Datastore, ds_id)
    assert ds is not None
    stored = driver_of(ds).chains()  # keys of chains the catalog does not know too
    b.chain = new_chain_key(s, vm.name, b.id, ds_id, stored)
    s.add(Increment(backup_id=b.id, seq=0, parent=None, status=BackupStatus.RUNNING))
    s.flush()
    cp = checkpoint_name(b.id, 0) if mode == BackupMode.INCREMENT else None
    return Plan(b.id, 0, None, b.chain, None, cp, True)


def plan_backup(
    ctx: Context,
    vm_id: int,
    ds_id: int,
    cfg: BackupConfig,
    disks: list[DiskInfo],
    reset: bool,
    warnings: Warnings,
) -> Plan:
    mode = cfg.mode
    raw = [d.target for d in disks if d.fmt != "qcow2"]
    if mode == BackupMode.INCREMENT and raw:
        warnings.add(
            f"disk(s) {', '.join(raw)} are not qcow2; incremental backups need qcow2 v3 "
            "(dirty bitmaps), so this is a full backup"
        )
        mode = BackupMode.FULL
    with ctx.catalog.session() as s:
        vm = s.get(Vm, vm_id)
        assert vm is not None
        if mode == BackupMode.INCREMENT and not reset:
            chain = latest_chain(s, vm_id, ds_id)
            if chain and any(i.status == BackupStatus.DAMAGED for i in chain.increments):
                warnings.add(
                    f"backup {chain.id} of VM {vm.name} has damaged files (a checksum failed); "
                    "starting a new full backup chain instead of extending it"
                )
                chain = None
            last = valid_increments(chain)[-1] if chain and valid_increments(chain) else None
            if chain and last and last.checkpoint:
                if last.checkpoint in ctx.hv.checkpoints(vm.name):
                    joined = joined_disks(last.files, [d.target for d in disks])
                    if joined:
                        log.info("%s: disk(s) %s join backup %s with a full",
                                 vm.name, ", ".join(joined), chain.id)  # fmt: skip
                    seq = max(i.seq for i in chain.increments) + 1
                    s.add(
                        Increment(
                            backup_id=chain.id,
                            seq=seq,
                            parent=last.seq,
                            status=BackupStatus.RUNNING,
                        )
                    )
                    s.flush()
                    return Plan(
                        chain.id,
                        seq,
                        last.seq,
                        chain.chain,
                        last.checkpoint,
                        checkpoint_name(chain.id, seq),
                        False,
                        joined,
                    )
                why = chain_break_since(s, vm_id, last.started_at) or (
                    "deleted outside vmkeep, or the VM was recreated"
                )
                warnings.add(
                    f"checkpoint {last.checkpoint} of VM {vm.name} is missing ({why}); "
                    "starting a new full backup chain"
                )
        return _new_chain(s, vm, ds_id, mode)


def abandon_plan(ctx: Context, plan: Plan) -> None:
    """Remove the rows of a plan that never started (replaced by a new full chain)."""
    with ctx.catalog.session() as s:
        b = s.get(Backup, plan.backup_id)
        assert b is not None
        if plan.new_chain:
            s.delete(b)
        else:
            for inc in list(b.increments):
                if inc.seq == plan.seq:
                    b.increments.remove(inc)
