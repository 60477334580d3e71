"""The catalog rows of a group backup: opened RUNNING with one member row per VM
(``record_start``), closed VALID, FAILED or CANCELLED with each member's backup, increment,
consistency and freeze times (``record_end``), and a RUNNING one left by a dead process closed
as abandoned (``close_abandoned``). ``Timing`` holds the freeze and thaw times recorded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import GroupBackup, GroupBackupMember, Vm
from vmkeep.engine.core.context import Context
from vmkeep.engine.groups.manage import group_backup_dict
from vmkeep.engine.protect.member import MemberJob
from vmkeep.model import BackupStatus


@dataclass
class Timing:
    """Milliseconds since the group's first freeze began."""

    t0: float = field(default_factory=time.monotonic)
    frozen: dict[str, float] = field(default_factory=dict)
    thawed: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        return (time.monotonic() - self.t0) * 1000

    @property
    def window_ms(self) -> float | None:
        """First freeze -> last thaw (the first freeze starts at 0)."""
        return max(self.thawed.values(), default=None)


def record_start(ctx: Context, group_id: int, ds_id: int, vms: list[Vm], parallel: bool) -> int:
    with ctx.catalog.session() as s:
        gb = GroupBackup(
            group_id=group_id,
            datastore_id=ds_id,
            status=BackupStatus.RUNNING,
            parallel_freeze=parallel,
        )
        for i, vm in enumerate(vms):
            gb.members.append(
                GroupBackupMember(
                    vm_id=vm.id, vm_name=vm.name, position=i, status=BackupStatus.RUNNING
                )
            )
        s.add(gb)
        s.flush()
        return gb.id


def close_abandoned(ctx: Context, group_id: int) -> None:
    """A RUNNING record while we hold the group's lock was left by a process that died."""
    with ctx.catalog.session() as s:
        stale = s.execute(
            select(GroupBackup).where(
                GroupBackup.group_id == group_id, GroupBackup.status == BackupStatus.RUNNING
            )
        ).scalars()
        for gb in stale:
            gb.status, gb.finished_at = BackupStatus.FAILED, datetime.now(UTC)
            gb.error = "abandoned: the vmkeep process running it died"
            for m in gb.members:
                m.status = BackupStatus.FAILED


def record_end(
    ctx: Context,
    gb_id: int,
    jobs: list[MemberJob],
    timing: Timing,
    status: BackupStatus,
    failed_vm: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    by_name = {j.name: j for j in jobs}
    with ctx.catalog.session() as s:
        gb = s.get(GroupBackup, gb_id)
        assert gb is not None
        gb.status, gb.failed_vm, gb.error = status, failed_vm, reason
        gb.freeze_window_ms = timing.window_ms
        gb.finished_at = datetime.now(UTC)
        for m in gb.members:
            j = by_name.get(m.vm_name)
            m.status = status
            m.frozen_at_ms = timing.frozen.get(m.vm_name)
            m.thawed_at_ms = timing.thawed.get(m.vm_name)
            if j is not None and j.plan is not None:
                m.backup_id, m.seq = j.plan.backup_id, j.plan.seq
                m.consistency = j.q.consistency
                m.freeze_ms = j.q.freeze_ms
            if status != BackupStatus.VALID:
                other = failed_vm is not None and m.vm_name != failed_vm
                m.error = f"not taken: {failed_vm} failed" if other else reason
        s.flush()
        return group_backup_dict(gb)
