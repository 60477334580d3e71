"""Which host a VM or a job goes to: the host a VM, a group or a point's VM lives on, and the
placement of a new VM (after OpenNebula's scheduler).

Placement (``place``): the candidates are the hosts in state MONITORED (DISABLED, OFFLINE, ERROR
and INIT hosts take nothing new) whose daemon is not silent, with at least the VM's vCPUs and
its memory free (the last monitoring's ``free_memory_kib``). The rank: the fewest running VMs
first (striping), then the most free memory, then the name. ``--host`` pins a host, which must
still be able to take it. A refusal names every host and why it was passed over. A VM is placed
when it is deployed (``deploy_host``: the check before its job is queued writes the host, so the
job runs on that host's daemon); docs/hosts.md, "Placement".
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import select, update

from vmkeep.catalog.tables import Backup, Group, GroupMember, Host, Vm
from vmkeep.engine.core.context import Context
from vmkeep.engine.hosts.records import MONITORED, daemon_state, find_host, vm_key
from vmkeep.engine.hosts.records import host_of_vm as _host_of
from vmkeep.errors import HostUnavailable, InvalidValue, Refused
from vmkeep.hypervisor.domain_xml import cpu_memory


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


def _why_not(
    h: Host, vcpus: int, memory_kib: int, silent_after: float, here: str | None = None
) -> str | None:
    """Why host ``h`` cannot take a VM of that size now (None: it can)."""
    if h.state != MONITORED:
        return f"it is {h.state}"
    daemon = daemon_state(h, silent_after)
    if daemon in ("silent", "stopped") and h.name != here:  # ``here``: this process runs it
        return f"its daemon is {daemon}"
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


def place(
    ctx: Context,
    vcpus: int,
    memory_kib: int,
    pin: str | None = None,
    exclude: Collection[str] = (),
) -> str:
    """The host a new VM of ``vcpus`` and ``memory_kib`` goes to (``pin``: that one; ``exclude``:
    hosts passed over whatever they have free, e.g. the failed host of a VM redeployed)."""
    silent = ctx.config.cluster.silent_after
    with ctx.catalog.session() as s:
        if pin is not None:
            h = find_host(s, pin)
            why = _why_not(h, vcpus, memory_kib, silent, ctx.host)
            if why is not None:
                raise HostUnavailable(pin, why, "Choose another host (vmkeep host list).")
            return h.name
        hosts = s.execute(select(Host).order_by(Host.name)).scalars().all()
        passed: list[str] = []
        fit: list[Host] = []
        for h in hosts:
            why = exclude_why(h.name, exclude) or _why_not(h, vcpus, memory_kib, silent, ctx.host)
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


def exclude_why(name: str, exclude: Collection[str]) -> str | None:
    return "it is the host the VM leaves" if name in exclude else None


def has_hosts(ctx: Context) -> bool:
    """Whether the catalog has hosts (else it drives one libvirt URI, as before hosts)."""
    with ctx.catalog.session() as s:
        return s.execute(select(Host.id).limit(1)).first() is not None


def size_of(template: str | None) -> tuple[int, int]:
    """(vCPUs, memory KiB) a VM's definition asks for (1 vCPU, 0 KiB without one)."""
    return cpu_memory(template) if template else (1, 0)


def deploy_host(ctx: Context, ref: str, pin: str | None = None) -> str | None:
    """The host VM ``ref`` is deployed on, written to its row (``vms.host``, ``host_uri``) so
    that its deploy job goes to that host's daemon (``actions.runs_on``). ``pin`` (``--host``),
    else the host the VM already has (created with ``--host``, or undeployed from it), else
    ``place``'s choice. A catalog without hosts: None, the VM stays as it is (``--host`` is
    refused: there is no host to pin)."""
    with ctx.catalog.session() as s:
        vm = s.execute(select(Vm).where(vm_key(ref))).scalar_one_or_none()
        if vm is None:
            return None  # the caller's own check names the missing VM
        if s.execute(select(Host.id).limit(1)).first() is None:
            if pin is not None:
                raise InvalidValue(
                    "--host", pin, "this catalog has no hosts; add them with 'vmkeep host add'"
                )
            return None
        vcpus, memory_kib, current = *size_of(vm.template), vm.host
    host = place(ctx, vcpus, memory_kib, pin or current)
    move_to(ctx, ref, host)
    return host


def move_to(ctx: Context, ref: str, host: str) -> None:
    """The VM's row now says it lives on ``host`` (its name and libvirt URI)."""
    with ctx.catalog.session() as s:
        uri = find_host(s, host).uri
        s.execute(update(Vm).where(vm_key(ref)).values(host=host, host_uri=uri))
