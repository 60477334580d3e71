"""The VM lifecycle (OpenNebula's DispatchManager): every action checks the VM's state against
``engine/states.py``'s table (WrongState names the state and what the action needs; an unknown VM
is NotFound), refuses what imported VMs may not do, takes the VM's lock, moves it through the
rule's transient state, hands the work to the host's VMM driver (``operations.py``) and lands in
the rule's success or failure state. Every action is recorded in the VM's history.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Vm, VmHistory
from vmkeep.engine.core import states
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.states import BUSY_STATES, OFF_HOST
from vmkeep.engine.core.trust import (
    ACTOR,
    LOCAL_ADMIN,
    Actor,
    check_domain_xml,
    check_image_source,
    check_nic,
)
from vmkeep.engine.hosts import placement
from vmkeep.engine.hosts.monitor import unknown_cleared
from vmkeep.engine.hosts.records import find_host
from vmkeep.engine.lifecycle import migration, operations
from vmkeep.engine.lifecycle.snapshots import snapshot_list
from vmkeep.engine.vm.inventory import check_state, vm_action
from vmkeep.engine.vm.record import find_vm, set_lcm, states_of
from vmkeep.errors import (
    AlreadyExists,
    DomainNotFound,
    InvalidValue,
    Refused,
    VmkeepError,
    WrongState,
)
from vmkeep.hypervisor.vmm import Progress, Vmm
from vmkeep.hypervisor.vmm_exec import ExecVmm, parse_args
from vmkeep.model import JobState, LcmState, VmState, Warnings
from vmkeep.names import check_disk_name, check_name

log = logging.getLogger(__name__)


def vmm_of(ctx: Context) -> Vmm:
    """The VMM driver of this host: its ``hosts`` row's when the process acts for a host, else
    the ``[[hosts]]`` entry of the config whose uri is the libvirt uri (native when none)."""
    if ctx.host is not None:
        with ctx.catalog.session() as s:
            row = find_host(s, ctx.host)
            vmm, vmm_dir, vmm_args, uri = row.vmm, row.vmm_dir, row.vmm_args, row.uri
        if vmm == "native":
            return ctx.hv.native_vmm()
        if vmm_dir is None:
            raise InvalidValue(f"host {ctx.host} vmm_dir", None, "the exec driver needs vmm_dir")
        return ExecVmm(Path(vmm_dir), parse_args(vmm_args), uri, ctx.config.data_dir / "vmm")
    host = next((h for h in ctx.config.hosts if h.uri == ctx.hv.uri), None)
    if host is None or host.vmm == "native":
        return ctx.hv.native_vmm()
    if host.vmm_dir is None:
        raise InvalidValue(f"hosts.{host.name}.vmm_dir", None, "the exec driver needs vmm_dir")
    return ExecVmm(host.vmm_dir, parse_args(host.vmm_args), host.uri, ctx.config.data_dir / "vmm")


# --- history --------------------------------------------------------------------------------------
def _begin_history(
    ctx: Context, vm_id: int, action: str, origin: str, who: str, detail: dict[str, Any]
) -> int:
    with ctx.catalog.session() as s:
        row = VmHistory(
            vm_id=vm_id,
            action=action,
            origin=origin,
            who=who,
            detail=detail,
            result=JobState.RUNNING,
        )
        s.add(row)
        s.flush()
        return row.id


def _end_history(ctx: Context, hid: int, error: BaseException | None) -> None:
    with ctx.catalog.session() as s:
        row = s.get(VmHistory, hid)
        assert row is not None
        row.finished_at = datetime.now(UTC)
        row.result = JobState.FAILED if error else JobState.DONE
        row.error = None if error is None else f"{type(error).__name__}: {error}"


def snapshots(ctx: Context, ref: str) -> dict[str, Any]:
    """System and disk snapshots of a VM (a read: no lock, no history)."""
    return snapshot_list(ctx, ref)


def history(ctx: Context, ref: str) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        rows = s.execute(
            select(VmHistory).where(VmHistory.vm_id == vm.id).order_by(VmHistory.id)
        ).scalars()
        return [
            {
                "id": r.id,
                "action": r.action,
                "origin": r.origin,
                "who": r.who,
                "start": r.started_at,
                "end": r.finished_at,
                "result": r.result,
                "error": r.error,
                "options": r.detail.get("opts", {}),
                **({"migration": r.detail["migration"]} if "migration" in r.detail else {}),
            }
            for r in rows
        ]


# --- the rules ------------------------------------------------------------------------------------
def check_allowed(ctx: Context, ref: str, action: str, *, state: bool = False) -> Vm:
    """NotFound or Refused (unsupported, or not for imported VMs), before any lock. With
    ``state``, also WrongState unless the VM's state, refreshed from libvirt, allows the action
    (``vms.check_action``, in the same catalog read: what the API checks before queueing)."""
    rule = states.RULES.get(action)
    if rule is None or action in ("create",):
        raise InvalidValue("action", action, f"use one of {', '.join(LIFECYCLE_ACTIONS)}")
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        if not rule.supported:
            raise Refused(
                f"{action} of VM {vm.name}", f"it is not supported yet ({rule.summary})", ""
            )
        allowed = ctx.config.vmm.imported_vms_actions
        if not vm.created and action not in allowed:
            raise Refused(
                f"{action} of VM {vm.name}",
                "vmkeep did not create this VM (it was imported), and "
                f"[vmm] imported_vms_actions allows only {', '.join(allowed)}",
                "Add the action to imported_vms_actions in the config to allow it.",
            )
        if state:
            check_state(ctx, vm, action)
            s.flush()  # the refreshed state is kept (the row leaves the session next)
        s.expunge(vm)
    return vm


LIFECYCLE_ACTIONS = [a for a in states.RULES if a not in states.DATA_ACTIONS]


def run_action(
    ctx: Context,
    ref: str,
    action: str,
    opts: dict[str, Any] | None = None,
    *,
    origin: str = "cli",
    who: str = "",
    actor: Actor = LOCAL_ADMIN,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], Warnings]:
    """One lifecycle action on a VM (CLI, API job): checks, lock, driver, states, history.
    ``actor``'s places (engine/trust.py) bound what the action may reach on the host;
    ``progress``: the job's, for an action that reports bytes (migrate)."""
    opts = dict(opts or {})
    check_places(ctx, action, opts, actor, ref)
    check_allowed(ctx, ref, action)
    rule = states.RULES[action]
    warnings = Warnings()
    vmm = vmm_of(ctx)
    needs = rule.needs
    with vm_action(ctx, ref, action, needs) as vm:
        before = LcmState(vm.lcm_state)
        hid = _begin_history(
            ctx, vm.id, action, origin, who, {"opts": opts, "from": before, "driver": vmm.kind}
        )
        if rule.through is not None:
            set_lcm(ctx, vm.id, rule.through)
        try:
            extra = {ACTOR: actor, migration.PROGRESS: progress}
            result = operations.HANDLERS[action](ctx, vmm, vm, {**opts, **extra}, warnings)
        except BaseException as err:
            failed_lcm = rule.failure or before
            set_lcm(ctx, vm.id, failed_lcm, error=f"{action} failed: {err}")
            _end_history(ctx, hid, err)
            raise
        land(ctx, vm.id, vm.name, result.pop(migration.LANDS, None) or rule.success)
        _end_history(ctx, hid, None)
    with ctx.catalog.session() as s:
        row = find_vm(s, str(vm.id))
        out = {"vm": row.name, "action": action, "state": row.state, "lcm_state": row.lcm_state}
    return out | result, warnings


def land(ctx: Context, vm_id: int, name: str, success: tuple[VmState, LcmState] | None) -> None:
    """Where a success leaves the VM: the rule's state, or what the hypervisor says."""
    if success is not None:
        set_lcm(ctx, vm_id, success[1], state=success[0])
        return
    try:
        info = ctx.hv.domain(name)
    except DomainNotFound:
        set_lcm(ctx, vm_id, LcmState.UNKNOWN, state=VmState.UNKNOWN)
        return
    state, lcm = states_of(info)
    set_lcm(ctx, vm_id, lcm, state=state)


def check_places(
    ctx: Context, action: str, opts: dict[str, Any], actor: Actor, ref: str | None = None
) -> None:
    """The host resources an action names (an image, a bridge) are within ``actor``'s places;
    a migration's destination host takes VMs (and is not VM ``ref``'s own)."""
    if action == "disk-attach":
        if opts.get("target") is not None:
            check_disk_name("--target", opts["target"])
        if opts.get("source"):
            check_image_source(ctx.config, actor, str(opts["source"]), opts.get("format"))
    elif action == "nic-attach":
        check_nic(ctx.config, actor, opts.get("bridge"))
    elif action == "migrate":
        migration.check_destination(ctx, str(opts.get("host", "")), ref)


# --- create ---------------------------------------------------------------------------------------
def create(
    ctx: Context,
    xml: str,
    *,
    hold: bool = False,
    host: str | None = None,
    origin: str = "cli",
    who: str = "",
) -> dict[str, Any]:
    """A new VM from a libvirt domain XML, PENDING (or HOLD) until ``deploy``; ``host``: pinned
    to that host (refused now when it cannot take the VM; else placed when deployed)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InvalidValue("--xml", "(file)", f"not a domain XML: {err}") from None
    if root.tag != "domain":
        raise InvalidValue("--xml", root.tag, "the file must hold a libvirt <domain> XML")
    name = root.findtext("name", "")
    check_name("domain name", name)
    check_domain_xml(ctx.config, xml, "vm create")
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.SubElement(root, "uuid")
        uuid_el.text = str(uuidlib.uuid4())
    try:
        uuid_el.text = str(uuidlib.UUID(uuid_el.text or ""))
    except ValueError:
        raise InvalidValue("<uuid>", uuid_el.text, "give a UUID, or leave it out") from None
    try:
        ctx.hv.domain(name)
    except DomainNotFound:
        pass
    else:
        raise AlreadyExists(f"libvirt domain {name!r} (import it with 'vmkeep vm import')")
    if host is not None:
        placement.place(ctx, *placement.size_of(xml), pin=host)
    state = VmState.HOLD if hold else VmState.PENDING
    with ctx.catalog.session() as s:
        if s.execute(select(Vm).where(Vm.name == name)).scalar_one_or_none() is not None:
            raise AlreadyExists(f"VM {name!r} in the catalog")
        vm = Vm(
            name=name,
            uuid=str(uuid_el.text),
            host_uri=ctx.hv.uri,
            state=state,
            lcm_state=LcmState(state),
            backup_config={},
            template=ET.tostring(root, encoding="unicode"),
            created=True,
        )
        s.add(vm)
        s.flush()
        vm_id = vm.id
    if host is not None:
        placement.move_to(ctx, str(vm_id), host)
    opts = {"hold": hold} | ({"host": host} if host else {})
    hid = _begin_history(ctx, vm_id, "create", origin, who, {"opts": opts})
    _end_history(ctx, hid, None)
    return {"vm": name, "id": vm_id, "action": "create", "state": state, "lcm_state": state,
            "host": host}  # fmt: skip


# --- recover --------------------------------------------------------------------------------------
def recover(
    ctx: Context, ref: str, how: str, *, origin: str = "cli", who: str = ""
) -> tuple[dict[str, Any], Warnings]:
    """Admin: end a ``*_FAILURE`` or stuck transient state. ``success``: as if the last action
    had worked; ``failure``: back where it started; ``retry``: run it again; ``delete``:
    terminate --hard."""
    if how not in ("success", "failure", "retry", "delete"):
        raise InvalidValue("recover", how, "use --success, --failure, --retry or --delete")
    check_allowed(ctx, ref, "recover")
    with ctx.catalog.session() as s:
        vm = find_vm(s, ref)
        last = (
            s.execute(
                select(VmHistory)
                .where(VmHistory.vm_id == vm.id, VmHistory.action != "recover")
                .order_by(VmHistory.id.desc())
            )
            .scalars()
            .first()
        )
        if vm.lcm_state not in states.RULES["recover"].needs:
            raise WrongState(vm.name, vm.lcm_state, "recover", "a *_FAILURE or transient state")
        if last is None:
            raise Refused(f"recover of VM {vm.name}", "it has no action to recover", "")
        action, opts, before = last.action, dict(last.detail.get("opts", {})), last.detail["from"]
        vm_id, name, host = vm.id, vm.name, vm.host
    warnings = Warnings()
    hid = _begin_history(ctx, vm_id, "recover", origin, who, {"opts": {how: True}, "of": action})
    try:
        if action == "migrate" and how != "delete":  # never left paused by the copy
            where = str(opts.get("host")) if how == "success" else host
            migration.stop_paused_copy(ctx, name, where, LcmState(before), warnings)
        if how == "success" and action == "migrate":  # it is on the destination now
            migration.moved(ctx, vm_id, str(opts.get("host")), LcmState(before))
        elif how == "success":
            land(ctx, vm_id, name, states.RULES[action].success)
        elif how == "failure":
            set_lcm(ctx, vm_id, LcmState(before), error=None, state=_state_of(LcmState(before)))
        else:
            set_lcm(ctx, vm_id, LcmState(before), state=_state_of(LcmState(before)))
            if how == "retry":
                _end_history(ctx, hid, None)
                return run_action(ctx, ref, action, opts, origin=origin, who=who)
            set_lcm(ctx, vm_id, LcmState.POWEROFF)  # terminate needs an idle state
            _end_history(ctx, hid, None)
            return run_action(ctx, ref, "terminate", {"hard": True}, origin=origin, who=who)
    except VmkeepError as err:
        _end_history(ctx, hid, err)
        raise
    _end_history(ctx, hid, None)
    with ctx.catalog.session() as s:
        row = find_vm(s, ref)
        return {
            "vm": name,
            "action": "recover",
            "how": how,
            "of": action,
            "state": row.state,
            "lcm_state": row.lcm_state,
        }, warnings


def _state_of(lcm: LcmState) -> VmState:
    return VmState.ACTIVE if lcm == LcmState.RUNNING else VmState(lcm.value)


# --- poll (the seed's monitoring) -------------------------------------------------------------------
POLL_STATES = {
    "a": (VmState.ACTIVE, LcmState.RUNNING),
    "p": (VmState.SUSPENDED, LcmState.SUSPENDED),
    "e": (VmState.UNKNOWN, LcmState.UNKNOWN),  # crashed, or its deployment failed
    "d": (VmState.POWEROFF, LcmState.POWEROFF),  # gone from the hypervisor, or off
}


def poll(ctx: Context, ref: str | None = None) -> list[dict[str, Any]]:
    """Ask the VMM driver for each VM on the host (or ``ref``); states follow the seed's STATE
    letter unless vmkeep is busy with the VM or keeps it off the host on purpose, and the usage
    figures are kept for ``vm show`` and ``/metrics``. A VM whose state changed while it was
    polled (an action ended meanwhile) keeps it: the poll saw the domain before the change."""
    vmm = vmm_of(ctx)
    with ctx.catalog.session() as s:
        rows = [find_vm(s, ref)] if ref else list(s.execute(select(Vm).order_by(Vm.id)).scalars())
        targets = [
            (v.id, v.name, (v.state, v.lcm_state))
            for v in rows
            if v.state not in OFF_HOST and ctx.here(v.host)
        ]
    out: list[dict[str, Any]] = []
    for vm_id, name, seen in targets:
        try:
            record = vmm.poll(name)
        except VmkeepError as err:
            out.append({"vm": name, "error": str(err)})
            continue
        state, lcm = POLL_STATES[record["STATE"]]
        with ctx.catalog.session() as s:
            vm = s.get(Vm, vm_id)
            if vm is None or not ctx.here(vm.host):
                continue  # removed, or migrated to another host, while it was polled
            saved = vm.state_file is not None and record["STATE"] == "d"
            moved = seen != (vm.state, vm.lcm_state)
            if not saved and not moved and vm.lcm_state not in BUSY_STATES:
                if vm.state != state:
                    vm.state = state
                if vm.lcm_state != lcm:
                    vm.lcm_state = lcm
                if lcm != LcmState.UNKNOWN and vm.error != unknown_cleared(vm.error):
                    vm.error = None  # the sweep's "unknown until it polls again": it polled
            usage = {k: _number(v) for k, v in record.items() if k != "STATE"}
            vm.usage = usage | {"polled_at": datetime.now(UTC).isoformat()}
            out.append({"vm": name, "poll": record, "state": vm.state, "lcm_state": vm.lcm_state})
    return out


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value
