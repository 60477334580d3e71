"""The hosts table (OpenNebula's hosts): add, list, show, enable, disable, remove, and which
host a VM and a job belong to.

States: INIT (added, not monitored yet), MONITORED (its last monitoring reached it), ERROR (it
did not), DISABLED (an admin's: monitored, its VMs run, nothing new is placed on it), OFFLINE
(an admin's: not monitored, nothing placed). A host's daemon writes ``heartbeat_at``; one older
than ``[cluster] silent_after`` is *silent*: the jobs queued for it wait (``docs/hosts.md``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from vmkeep.catalog.tables import Host, Job, Vm
from vmkeep.engine.core.context import Context
from vmkeep.errors import AlreadyExists, HostNotFound, HostUnavailable, InvalidValue, Refused
from vmkeep.model import JobState
from vmkeep.names import check_name, is_id

INIT, MONITORED, ERROR, DISABLED, OFFLINE = "INIT", "MONITORED", "ERROR", "DISABLED", "OFFLINE"
STATES = (INIT, MONITORED, ERROR, DISABLED, OFFLINE)
ADMIN_STATES = frozenset({DISABLED, OFFLINE})  # set by an admin; monitoring keeps them
VMMS = ("native", "exec")


def find_host(s: Session, name: str) -> Host:
    host = s.execute(select(Host).where(Host.name == name)).scalar_one_or_none()
    if host is None:
        raise HostNotFound(name)
    return host


def daemon_state(h: Host, silent_after: float, now: datetime | None = None) -> str:
    """``alive`` (a heartbeat within ``silent_after`` s), ``silent`` (an older one),
    ``stopped`` (it signed off when it stopped) or ``none`` (never a heartbeat)."""
    if h.heartbeat_at is None:
        return "none"
    if (h.daemon or {}).get("stopped"):
        return "stopped"
    age = ((now or datetime.now(UTC)) - h.heartbeat_at).total_seconds()
    return "alive" if age <= silent_after else "silent"


def host_dict(h: Host, silent_after: float, vms: int = 0) -> dict[str, Any]:
    return {
        "id": h.id,
        "name": h.name,
        "uri": h.uri,
        "vmm": h.vmm,
        "vmm_dir": h.vmm_dir,
        "vmm_args": h.vmm_args,
        "state": h.state,
        "max_backups": h.max_backups,
        "vms": vms,
        "monitor": h.monitor,
        "error": h.error,
        "monitored_at": h.monitored_at,
        "heartbeat_at": h.heartbeat_at,
        "daemon": daemon_state(h, silent_after),
        "daemon_info": h.daemon,
        "created_at": h.created_at,
    }


# a libvirt URI: driver[+transport]://[user@][host[:port]]/path[?query] (the API's schema says
# the same)
URI_PATTERN = r"[a-z][a-z0-9+]*://[^/\s]*/[^\s]+"


def _check_uri(uri: str) -> str:
    if not re.fullmatch(URI_PATTERN, uri):
        raise InvalidValue("--uri", uri, "use a libvirt URI like qemu+tcp://HOST/system")
    return uri


def add(
    ctx: Context,
    name: str,
    uri: str,
    vmm: str = "native",
    vmm_dir: str | None = None,
    vmm_args: str = "",
    max_backups: int | None = None,
) -> dict[str, Any]:
    """A new host (INIT until monitored). VMs of the catalog without a host whose libvirt URI
    is this one become its VMs (a single-host catalog growing its first hosts)."""
    check_name("host name", name)
    _check_uri(uri)
    if vmm not in VMMS:
        raise InvalidValue("--vmm", vmm, "use native or exec")
    if vmm == "exec":
        if not vmm_dir:
            raise InvalidValue("--vmm-dir", vmm_dir, "the exec driver needs its folder of scripts")
        if not Path(vmm_dir).is_dir():
            raise InvalidValue("--vmm-dir", vmm_dir, "no such folder of driver scripts")
    if max_backups is not None and not 1 <= max_backups <= 1000:
        raise InvalidValue("--max-backups", max_backups, "use a number from 1 to 1000")
    with ctx.catalog.session() as s:
        if s.execute(select(Host.id).where(Host.name == name)).first() is not None:
            raise AlreadyExists(f"host '{name}'")
        h = Host(
            name=name, uri=uri, vmm=vmm, vmm_dir=vmm_dir, vmm_args=vmm_args, state=INIT,
            max_backups=max_backups, monitor={}, daemon={},
        )  # fmt: skip
        s.add(h)
        s.flush()
        s.execute(update(Vm).where(Vm.host.is_(None), Vm.host_uri == uri).values(host=name))
        return host_dict(h, ctx.config.cluster.silent_after, _vm_count(s, name))


def _vm_count(s: Session, name: str) -> int:
    return int(s.execute(select(func.count()).where(Vm.host == name)).scalar() or 0)


def list_hosts(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        q = select(Vm.host, func.count()).where(Vm.host.is_not(None)).group_by(Vm.host)
        counts = {host: n for host, n in s.execute(q)}
        rows = s.execute(select(Host).order_by(Host.name)).scalars().all()
        silent = ctx.config.cluster.silent_after
        return [host_dict(h, silent, int(counts.get(h.name, 0))) for h in rows]


def show(ctx: Context, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        h = find_host(s, name)
        out = host_dict(h, ctx.config.cluster.silent_after, _vm_count(s, name))
        vms = s.execute(select(Vm.name, Vm.lcm_state).where(Vm.host == name).order_by(Vm.name))
        out["vm_list"] = [{"name": n, "lcm_state": lcm} for n, lcm in vms]
        queued = select(func.count()).where(Job.runs_on == name, Job.state == JobState.QUEUED)
        out["queued_jobs"] = int(s.execute(queued).scalar() or 0)
        return out


def enable(ctx: Context, name: str) -> dict[str, Any]:
    """Back to INIT (MONITORED at its next monitoring): VMs may be placed on it again."""
    return _set_state(ctx, name, INIT)


def disable(ctx: Context, name: str, offline: bool = False) -> dict[str, Any]:
    """DISABLED: its VMs keep running, nothing new is placed on it; OFFLINE: not monitored
    either (a host taken out for maintenance)."""
    return _set_state(ctx, name, OFFLINE if offline else DISABLED)


def _set_state(ctx: Context, name: str, state: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        h = find_host(s, name)
        h.state = state
        h.error = None
        s.flush()
        return host_dict(h, ctx.config.cluster.silent_after, _vm_count(s, name))


def remove(ctx: Context, name: str) -> dict[str, Any]:
    """Forget a host; refused while VMs live on it or jobs wait for it (naming them)."""
    with ctx.catalog.session() as s:
        h = find_host(s, name)
        vms = s.execute(select(Vm.name).where(Vm.host == name).order_by(Vm.name)).scalars().all()
        if vms:
            shown = ", ".join(vms[:10]) + (" ..." if len(vms) > 10 else "")
            raise Refused(
                f"removing host '{name}'",
                f"{len(vms)} VM(s) live on it ({shown})",
                "Migrate them to another host (vmkeep vm migrate VM HOST) or terminate them.",
            )
        waiting = s.execute(
            select(func.count()).where(
                Job.runs_on == name, Job.state.in_([JobState.QUEUED, JobState.RUNNING])
            )
        ).scalar()
        if waiting:
            raise Refused(
                f"removing host '{name}'",
                f"{waiting} job(s) are queued for it or running there",
                "Wait for them or cancel them (vmkeep jobs list, vmkeep jobs cancel ID).",
            )
        out = host_dict(h, ctx.config.cluster.silent_after)
        s.delete(h)
        return out


def vm_key(ref: str) -> ColumnElement[bool]:
    """The VM a reference names: its id (all digits) or its name."""
    return Vm.id == int(ref) if is_id(ref) else Vm.name == ref


def host_of_vm(s: Session, vm_ref: str) -> str | None:
    """The host a VM (name or id) lives on; None for a VM without one (or no such VM)."""
    host: str | None = s.execute(select(Vm.host).where(vm_key(vm_ref))).scalar()
    return host


def check_daemon(ctx: Context, name: str, vm: str) -> None:
    """HostUnavailable unless host ``name``'s daemon is alive: a job queued for a daemon that
    does not run would only wait (the CLI queues another host's VM's action for its daemon)."""
    with ctx.catalog.session() as s:
        state = daemon_state(find_host(s, name), ctx.config.cluster.silent_after)
    if state != "alive":
        why = {"none": "has never sent a heartbeat", "stopped": "stopped"}.get(state, "is silent")
        raise HostUnavailable(
            name,
            f"VM {vm} lives there and that host's daemon {why}",
            f"Start 'vmkeep daemon --host {name}' on it, or run the command there with "
            f"[cluster] host = {name}.",
        )


def sign_off(ctx: Context, name: str, pid: int) -> None:
    """A daemon that stops says so (its heartbeat is kept: since when it is gone): nothing is
    queued for it by a CLI nor placed on its host meanwhile (``daemon_state``: stopped)."""
    with ctx.catalog.session() as s:
        h = s.execute(select(Host).where(Host.name == name).with_for_update()).scalar_one_or_none()
        if h is not None and (h.daemon or {}).get("pid") == pid:  # not a successor's beat
            h.daemon = dict(h.daemon) | {"stopped": True}


def heartbeat(ctx: Context, name: str, info: dict[str, Any]) -> None:
    """The host's daemon is alive: its heartbeat and what it says about itself."""
    with ctx.catalog.session() as s:
        s.execute(
            update(Host)
            .where(Host.name == name)
            .values(heartbeat_at=datetime.now(UTC), daemon=info)
        )
