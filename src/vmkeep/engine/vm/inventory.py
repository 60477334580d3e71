"""VM inventory and the per-VM quiesce contract (OpenNebula DispatchManager / Nova quiesce spec).

Every action checks the VM's state first and refuses a wrong state with ``WrongState``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog import lock
from vmkeep.catalog.tables import Vm
from vmkeep.engine.core import states
from vmkeep.engine.core.backup_config import changed
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.states import BUSY_STATES, OFF_HOST
from vmkeep.engine.vm import quiesce as quiesce_guard
from vmkeep.engine.vm.policy import Policies, pool_for_vm
from vmkeep.engine.vm.quiesce import Thawed, ensure_thawed
from vmkeep.engine.vm.record import find_vm, set_lcm, states_of
from vmkeep.engine.vm.recovery import recover_vm
from vmkeep.errors import (
    AgentTimeout,
    AgentUnavailable,
    DomainNotFound,
    HostUnavailable,
    HypervisorError,
    InvalidValue,
    WrongState,
)
from vmkeep.model import DomainInfo, LcmState, VmState, Warnings
from vmkeep.names import check_name

log = logging.getLogger(__name__)


def _observed(
    ctx: Context,
    name: str,
    state: str,
    lcm_state: str,
    state_file: str | None,
    live: dict[str, DomainInfo] | None = None,
) -> tuple[str, str]:
    """The (state, lcm_state) the catalog should hold for a VM whose row has ``state``,
    ``lcm_state`` and ``state_file``, as libvirt sees it now (``live``: every domain's, from one
    call; else the domain is asked)."""
    try:
        info = ctx.hv.domain(name) if live is None else live[name]
    except (DomainNotFound, KeyError):
        if state in OFF_HOST:
            return state, lcm_state  # PENDING, HOLD, STOPPED, UNDEPLOYED, DONE: no domain
        new, lcm = VmState.UNKNOWN, LcmState.UNKNOWN
    else:
        new, lcm = states_of(info)
        if (state in OFF_HOST or state_file) and new != VmState.ACTIVE:
            return state, lcm_state  # saved or off the host: only a running domain says else
    return new, lcm_state if lcm_state in BUSY_STATES else lcm


def _refresh(ctx: Context, vm: Vm, live: dict[str, DomainInfo] | None = None) -> None:
    if not ctx.here(vm.host):
        return  # another host's: its daemon's monitor keeps the state
    state, lcm = _observed(ctx, vm.name, vm.state, vm.lcm_state, vm.state_file, live)
    # assign only what changed: an unchanged row then costs the session's flush nothing
    if vm.state != state:
        vm.state = state
    if vm.lcm_state != lcm:
        vm.lcm_state = lcm


def import_vm(ctx: Context, domain: str) -> dict[str, Any]:
    """Add a libvirt domain to the catalog (idempotent: re-import refreshes it); ``new`` says
    whether its row was made now (False: it was already imported)."""
    info = ctx.hv.domain(domain)
    try:
        check_name(f"domain name of {domain!r}", info.name)
    except InvalidValue as err:
        raise InvalidValue(
            "domain", domain, f"{err.args[2]}; rename it first with 'virsh domrename'"
        ) from None
    state, lcm = states_of(info)
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(Vm.uuid == info.uuid)).scalar_one_or_none()
        if vm is None:
            vm = s.execute(select(Vm).where(Vm.name == info.name)).scalar_one_or_none()
        new = vm is None
        if vm is None:
            vm = Vm(name=info.name, uuid=info.uuid, host_uri=ctx.hv.uri, backup_config={})
            s.add(vm)
        vm.name, vm.uuid, vm.host_uri, vm.state = info.name, info.uuid, ctx.hv.uri, state
        vm.host = ctx.host
        if vm.lcm_state is None or vm.lcm_state not in BUSY_STATES:
            vm.lcm_state = lcm
        s.flush()
        return vm_dict(vm, Policies(ctx, s), info) | {"new": new}


def import_all(ctx: Context) -> tuple[list[dict[str, Any]], Warnings]:
    """Import every domain of the host. One that is gone by the time its turn comes (removed
    meanwhile) is skipped; one whose name vmkeep cannot take is skipped with a warning that
    says how to fix it, and the others are imported."""
    rows, warnings = [], Warnings()
    for d in ctx.hv.list_domains():
        try:
            rows.append(import_vm(ctx, d.name))
        except DomainNotFound:
            continue
        except InvalidValue as err:
            warnings.add(f"domain {d.name!r} was not imported: {err}")
    return rows, warnings


def list_vms(
    ctx: Context, limit: int | None = None, after: int | None = None, reuse: bool = False
) -> list[dict[str, Any]]:
    """Every VM in id order (``limit`` of them, those after id ``after``: a page), its state
    refreshed from libvirt's (one call for all domains; ``reuse``: the API's, ``live_states``), with its effective backup config (one read of
    the pools table: ``policy.Policies``). The rows are read as plain tuples and only those
    whose state changed are loaded as objects and written (1,000 VMs: 25 ms as ORM objects,
    9 ms so, in-process)."""
    with ctx.catalog.session() as s:
        q = select(Vm.state_file, *_SHOWN).order_by(Vm.id).limit(limit)
        if after is not None:
            q = q.where(Vm.id > after)
        rows = s.execute(q).all()
        policies = Policies(ctx, s)
        live: dict[str, DomainInfo] = {}
        if any(ctx.here(row[-1]) for row in rows):  # only other hosts' VMs: libvirt not asked
            live = live_states(ctx, s) if reuse else ctx.hv.states()
        out, moved = [], []
        for state_file, *shown in rows:
            d = _summary(policies, *shown)
            if not ctx.here(shown[-1]):  # another host's daemon keeps its state
                out.append(d)
                continue
            state, lcm = _observed(ctx, d["name"], d["state"], d["lcm_state"], state_file, live)
            if (state, lcm) != (d["state"], d["lcm_state"]):
                moved.append(d["id"])
                d["state"], d["lcm_state"] = state, lcm
            out.append(d)
        if moved:
            for vm in s.execute(select(Vm).where(Vm.id.in_(moved))).scalars():
                _refresh(ctx, vm, live)
        return out


# libvirt's domain states as the API's list last saw them, per hypervisor URI and catalog:
# (monotonic time, the catalog's newest VM change then, the states)
_live: dict[str, tuple[float, Any, dict[str, DomainInfo]]] = {}
_live_lock = threading.Lock()
LIVE_TTL = 2.0  # seconds libvirt's states are reused by lists while no VM row changes


def live_states(ctx: Context, s: Session) -> dict[str, DomainInfo]:
    """Every domain's state (``hv.states``: one call, but one libvirt round trip per domain
    inside it), reused for ``LIVE_TTL`` s by the API's lists (each page of each of 50 polling
    clients would ask for all domains again) as long as no VM row of the catalog changed meanwhile: an action of vmkeep (which
    writes the VM's row, in any process) is seen by the next list at once, a change made
    outside vmkeep (``virsh``) within ``LIVE_TTL`` s."""
    changed = s.execute(select(func.max(Vm.updated_at))).scalar()
    now = time.monotonic()
    key = f"{ctx.hv.uri} {ctx.config.catalog_url}"
    with _live_lock:
        hit = _live.get(key)
    if hit is not None and now - hit[0] < LIVE_TTL and hit[1] == changed:
        return hit[2]
    states = ctx.hv.states()
    with _live_lock:
        _live[key] = (now, changed, states)
    return states


def show_vm(ctx: Context, ref: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        _refresh(ctx, vm)
        info: DomainInfo | None = None
        if ctx.here(vm.host):  # another host's domain is not this process's libvirt's
            with suppress(DomainNotFound):
                info = ctx.hv.domain(vm.name)
        return vm_dict(vm, Policies(ctx, s), info)


# the columns of a VM that ``vm list`` and ``vm show`` show, in ``_summary``'s order
_SHOWN = (Vm.id, Vm.name, Vm.uuid, Vm.host_uri, Vm.state, Vm.lcm_state, Vm.pool,
          Vm.backup_config, Vm.error, Vm.created, Vm.usage, Vm.host)  # fmt: skip


def _summary(
    policies: Policies,
    id: int,
    name: str,
    uuid: str,
    host_uri: str,
    state: str,
    lcm_state: str,
    pool: str | None,
    backup_config: dict[str, Any] | None,
    error: str | None,
    created: bool,
    usage: dict[str, Any] | None,
    host: str | None,
) -> dict[str, Any]:
    return {
        "id": id,
        "name": name,
        "uuid": uuid,
        # the vmkeep host it lives on; its libvirt URI in a catalog without hosts
        "host": host or host_uri,
        "host_uri": host_uri,
        "state": state,
        "lcm_state": lcm_state,
        "pool": pool,
        "backup_config": policies.config(backup_config, pool),
        "error": error,
        "created": created,
        "usage": usage or {},
    }


def vm_dict(vm: Vm, policies: Policies, info: DomainInfo | None = None) -> dict[str, Any]:
    """One VM as ``vm show`` shows it: ``vm list``'s columns, ``backup_config_sources`` (the
    layer that set each key of its effective config) and what libvirt says of its domain."""
    out = _summary(policies, *(getattr(vm, c.key) for c in _SHOWN))
    out["backup_config_sources"] = policies.of(vm.backup_config, vm.pool)[1]
    if info is not None:
        out["disks"] = [
            {"target": d.target, "path": d.path, "format": d.fmt, "device": d.device}
            for d in info.disks
        ]
        out["agent_channel"] = info.has_agent_channel
        out["checkpoints"] = list(info.checkpoints)
    return out


def check_action(ctx: Context, ref: str, action: str) -> str:
    """Raise WrongState unless the VM's current state allows ``action``; returns its name."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        check_state(ctx, vm, action)
        return vm.name


def check_state(ctx: Context, vm: Vm, action: str) -> None:
    """Refresh the VM's row (in its session) from libvirt; WrongState unless it allows ``action``."""
    _refresh(ctx, vm)
    needs = states.needs(action)
    if vm.lcm_state not in needs:
        raise WrongState(vm.name, vm.lcm_state, action, " or ".join(sorted(needs)))


@contextmanager
def vm_action(
    ctx: Context, ref: str, action: str, needs: frozenset[LcmState] | None = None
) -> Iterator[Vm]:
    """Lock the VM and check its lcm state for ``action``; yields a detached Vm row.

    What a dead vmkeep process left on the VM (a BACKUP state, a RUNNING attempt, its checkpoint
    and partial files, a frozen or paused guest) is cleaned up first, so no failure needs a
    manual step before the next action."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        check_here(ctx, vm)
        _refresh(ctx, vm)
        vm_id, name = vm.id, vm.name
    needs = states.needs(action) if needs is None else needs
    with lock(ctx.catalog, f"vm:{vm_id}", action, label=f"VM {name}"):
        recover_vm(ctx, vm_id, "the vmkeep process running it died; cleaned up by the next action")
        with ctx.catalog.session() as s:
            vm = find_vm(s, str(vm_id))
            if vm.lcm_state not in needs:
                raise WrongState(vm.name, vm.lcm_state, action, " or ".join(sorted(needs)))
        yield vm


def check_here(ctx: Context, vm: Vm) -> None:
    """HostUnavailable unless this process drives the VM's host: an action on a VM runs on
    its host (a daemon queues it for that host's daemon)."""
    if not ctx.here(vm.host):
        raise not_here(ctx, str(vm.host), f"VM {vm.name} lives there")


def not_here(ctx: Context, host: str, why: str) -> HostUnavailable:
    """The refusal of work that must run on ``host`` (``why``) in a process acting for
    another, with the fix."""
    return HostUnavailable(
        host,
        f"{why} and this process acts for "
        + (f"host '{ctx.host}'" if ctx.host else "no host ([cluster] host is not set)"),
        "Run it through a daemon (any daemon's API queues it for that host's daemon), "
        "or on that host with [cluster] host set to its name.",
    )


def quiesce(ctx: Context, ref: str) -> dict[str, Any]:
    """RUNNING -> QUIESCING -> QUIESCED: freeze the guest file systems through the agent."""
    with vm_action(ctx, ref, "quiesce") as vm:
        set_lcm(ctx, vm.id, LcmState.QUIESCING)
        try:
            frozen = ctx.hv.fs_freeze(vm.name, ctx.agent_timeout)
        except AgentUnavailable:
            # Nothing happened in the guest: the VM stays RUNNING and the caller is told why.
            set_lcm(ctx, vm.id, LcmState.RUNNING)
            raise
        except AgentTimeout:
            # The agent is hung: the freeze may still run when it wakes. The VM stays RUNNING
            # (not frozen on purpose) and a guard thaws it once the agent answers again.
            set_lcm(ctx, vm.id, LcmState.RUNNING)
            quiesce_guard.spawn(ctx, [vm.id], pending=True)
            raise
        except HypervisorError as err:
            thawed = ensure_thawed(ctx, vm.name)
            if thawed == Thawed.SILENT:
                quiesce_guard.spawn(ctx, [vm.id], pending=True)
            set_lcm(ctx, vm.id, LcmState.ERROR, error=f"quiesce failed: {err}")
            raise
        now = datetime.now(UTC)
        set_lcm(ctx, vm.id, LcmState.QUIESCED, quiesced_at=now)
        # A crashed or forgetful caller never leaves the guest frozen: thawed at the deadline.
        max_s = ctx.config.quiesce.max_seconds
        quiesce_guard.spawn(ctx, [vm.id], quiesced_at=now)
        return {
            "vm": vm.name,
            "lcm_state": LcmState.QUIESCED,
            "filesystems": frozen,
            "auto_unquiesce_at": now + timedelta(seconds=max_s),
        }


def unquiesce(ctx: Context, ref: str) -> dict[str, Any]:
    """QUIESCED -> UNQUIESCING -> RUNNING: thaw the guest file systems."""
    with vm_action(ctx, ref, "unquiesce") as vm:
        set_lcm(ctx, vm.id, LcmState.UNQUIESCING)
        try:
            thawed = ctx.hv.fs_thaw(vm.name, ctx.agent_timeout)
        except HypervisorError as err:
            quiesce_guard.spawn(ctx, [vm.id], pending=True)
            set_lcm(ctx, vm.id, LcmState.ERROR, error=f"unquiesce failed: {err}")
            raise
        set_lcm(ctx, vm.id, LcmState.RUNNING, quiesced_at=None)
        return {"vm": vm.name, "lcm_state": LcmState.RUNNING, "filesystems": thawed}


def reset_state(ctx: Context, ref: str) -> dict[str, Any]:
    """Admin recovery: make sure the guest is thawed and resumed, then take the state from libvirt."""
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        name, vm_id = vm.name, vm.id
    with lock(ctx.catalog, f"vm:{vm_id}", "reset-state", label=f"VM {name}"):
        recovered = recover_vm(ctx, vm_id, "reset-state: the vmkeep process running it died")
        info = ctx.hv.domain(name)
        if info.paused:
            ctx.hv.resume(name)
        thawed = ensure_thawed(ctx, name) if info.state == VmState.ACTIVE else None
        if thawed == Thawed.SILENT:
            quiesce_guard.spawn(ctx, [vm_id], pending=True)
        state, lcm = states_of(ctx.hv.domain(name))
        set_lcm(ctx, vm_id, lcm, state=state, quiesced_at=None)
    return {
        "vm": name,
        "state": state,
        "lcm_state": lcm,
        "thawed": None if thawed is None else thawed == Thawed.CONFIRMED,
        "agent": thawed,
        "recovered": recovered,
    }


def configure(ctx: Context, ref: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Set BACKUP_CONFIG keys of a VM (validated; errors name the bad value). A value ``unset``
    removes the key (inherited again from the pool or ``[backup]``). The key ``pool`` puts the
    VM in a pool, which must exist; ``None`` takes it out of its pool."""
    keys = dict(changes)
    moving, pool = "pool" in keys, keys.pop("pool", None)
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        new_pool = pool_for_vm(s, pool) if pool is not None else None
        vm.backup_config = changed(vm.backup_config, keys)
        if moving:
            vm.pool = new_pool
        s.flush()
        return vm_dict(vm, Policies(ctx, s))
