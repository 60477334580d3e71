"""Which host a VM or a job goes to: the host a VM, a group or a point's VM lives on, and the
placement of a new VM (after OpenNebula's scheduler).

Placement (``place``): the candidates are the hosts in state MONITORED (DISABLED, OFFLINE, ERROR
and INIT hosts take nothing new) whose daemon is not silent, with at least the VM's vCPUs and
its memory free (the last monitoring's ``free_memory_kib``). The rank: the fewest running VMs
first (striping), then the most free memory, then the name. ``--host`` pins a host, which must
still be able to take it. A refusal names every host and why it was passed over.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmkeep.catalog.tables import Backup, Group, GroupMember, Host, Vm
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts.records import MONITORED, daemon_state, find_host
from vmkeep.engine.hosts.records import host_of_vm as _host_of
from vmkeep.errors import HostUnavailable, Refused


def host_of_vm(ctx: Context, ref: str) -> str | None:
    with ctx.catalog.session() as s:
        return _host_of(s, ref)


def host_of_point(ctx: Context, backup_id: int) -> str | None:
    """The host of the VM a chain was taken of (None: no hosts, or the VM is gone)."""
    with ctx.catalog.session() as s:
        q = select(Vm.host).join(Backup, Backup.vm_id == Vm.id).where(Backup.id == backup_id)
        host: str | None = s.execute(q).scalar()
        return host


def host_of_group(ctx: Context, name: str) -> str | None:
    """The one host a group's members live on; Refused when they live on several (a group
    backup freezes its members from one host's daemon)."""
    with ctx.catalog.session() as s:
        q = (
            select(Vm.name, Vm.host)
            .join(GroupMember, GroupMember.vm_id == Vm.id)
            .join(Group, Group.id == GroupMember.group_id)
            .where(Group.name == name)
            .order_by(GroupMember.position)
        )
        rows = s.execute(q).all()
    hosts: dict[str | None, list[str]] = {}
    for vm, host in rows:
        hosts.setdefault(host, []).append(vm)
    if len(hosts) > 1:
        shown = "; ".join(f"{h or '(no host)'}: {', '.join(v)}" for h, v in hosts.items())
        raise Refused(
            f"group '{name}'",
            f"its members live on several hosts ({shown})",
            "A group's actions run on one host: migrate the members to one host "
            "(vmkeep vm migrate VM HOST).",
        )
    return next(iter(hosts), None)


def _why_not(h: Host, vcpus: int, memory_kib: int, silent_after: float) -> str | None:
    """Why host ``h`` cannot take a VM of that size now (None: it can)."""
    if h.state != MONITORED:
        return f"it is {h.state}"
    if daemon_state(h, silent_after) == "silent":
        return "its daemon is silent"
    m = h.monitor or {}
    free = int(m.get("free_memory_kib") or 0)
    if free < memory_kib:
        return f"{free // 1024} MiB free, the VM needs {memory_kib // 1024} MiB"
    cpus = int(m.get("cpus") or 0)
    if cpus < vcpus:
        return f"{cpus} CPUs, the VM needs {vcpus}"
    return None


def rank_key(h: Host) -> tuple[int, int, str]:
    m = h.monitor or {}
    return (int(m.get("running") or 0), -int(m.get("free_memory_kib") or 0), h.name)


def place(ctx: Context, vcpus: int, memory_kib: int, pin: str | None = None) -> str:
    """The host a new VM of ``vcpus`` and ``memory_kib`` goes to (``pin``: that one)."""
    silent = ctx.config.cluster.silent_after
    with ctx.catalog.session() as s:
        if pin is not None:
            h = find_host(s, pin)
            why = _why_not(h, vcpus, memory_kib, silent)
            if why is not None:
                raise HostUnavailable(pin, why, "Choose another host (vmkeep host list).")
            return h.name
        hosts = s.execute(select(Host).order_by(Host.name)).scalars().all()
        passed: list[str] = []
        fit: list[Host] = []
        for h in hosts:
            why = _why_not(h, vcpus, memory_kib, silent)
            if why is None:
                fit.append(h)
            else:
                passed.append(f"{h.name}: {why}")
        if not fit:
            raise HostUnavailable(
                "(any)",
                "no host can take the VM" + (f" ({'; '.join(passed)})" if passed else ""),
                "Add or enable a host (vmkeep host add / enable) or free memory.",
            )
        return min(fit, key=rank_key).name


def candidates(ctx: Context, vcpus: int, memory_kib: int) -> list[dict[str, Any]]:
    """Every host with its rank position or why it is passed over (``host list --for``)."""
    silent = ctx.config.cluster.silent_after
    with ctx.catalog.session() as s:
        hosts = s.execute(select(Host)).scalars().all()
        out = [
            {"host": h.name, "why_not": _why_not(h, vcpus, memory_kib, silent)}
            for h in sorted(hosts, key=rank_key)
        ]
    return out
