"""A VM's row and its states: lookup by name or id, the lcm state vmkeep sets, and the state
libvirt reports. The lowest engine module about VMs: recovery, quiesce and vms build on it."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Vm
from vmkeep.engine.core.context import Context
from vmkeep.errors import VmkeepError, VmNotFound
from vmkeep.model import DomainInfo, LcmState, VmState
from vmkeep.names import is_id

log = logging.getLogger(__name__)


def states_of(info: DomainInfo) -> tuple[VmState, LcmState]:
    if info.state == VmState.ACTIVE and info.paused:
        return VmState.SUSPENDED, LcmState.SUSPENDED
    if info.state == VmState.ACTIVE:
        return VmState.ACTIVE, LcmState.RUNNING
    if info.state == VmState.POWEROFF:
        return VmState.POWEROFF, LcmState.POWEROFF
    if info.state == VmState.SUSPENDED:
        return VmState.SUSPENDED, LcmState.SUSPENDED
    return VmState.UNKNOWN, LcmState.UNKNOWN


def find_vm(s: Session, ref: str) -> Vm:
    """A VM by name or numeric id."""
    query = select(Vm).where(Vm.id == int(ref)) if is_id(ref) else select(Vm).where(Vm.name == ref)
    vm = s.execute(query).scalar_one_or_none()
    if vm is None:
        raise VmNotFound(ref)
    return vm


def set_fields(ctx: Context, vm_id: int, **fields: Any) -> None:
    """Write the given columns of the VM's row."""
    with ctx.catalog.session() as s:
        vm = s.get(Vm, vm_id)
        assert vm is not None
        for k, v in fields.items():
            setattr(vm, k, v)


def set_lcm(
    ctx: Context, vm_id: int, lcm: LcmState, error: str | None = None, **fields: Any
) -> None:
    set_fields(ctx, vm_id, lcm_state=lcm, error=error, **fields)


def sync_state(ctx: Context, vm_id: int, name: str) -> None:
    """Take the VM's state from libvirt once vmkeep's action on it is over (clears busy states)."""
    try:
        state, lcm = states_of(ctx.hv.domain(name))
    except VmkeepError as err:
        log.warning("could not read the state of %s: %s", name, err)
        return
    set_lcm(ctx, vm_id, lcm, state=state)
