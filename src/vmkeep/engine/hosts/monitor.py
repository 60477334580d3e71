"""Host monitoring and the sweep of silent hosts (OpenNebula's monitor: a host in ERROR, its VMs
UNKNOWN). Every daemon runs both in its monitor loop (``api/daemon.py``); the rules live here.

``monitor``: a daemon looks at its own host (``ctx.host``) through libvirt: the node's CPUs and
memory, its VMs (how many the catalog puts there, how many of them run), the free bytes of the
``dir`` datastores as this host sees their paths (other drivers are skipped). INIT, ERROR and
MONITORED become MONITORED when libvirt answers, ERROR (with the error) when it does not;
DISABLED stays DISABLED (its figures are updated), OFFLINE is not looked at.

``sweep``: any daemon looks at every host:

- A host whose libvirt has not answered its daemon for ``[cluster] unknown_after`` s (since its
  last good monitoring), or whose daemon's heartbeat is older than ``silent_after +
  unknown_after`` s: its idle VMs on the host (lcm RUNNING or POWEROFF) become UNKNOWN (state and
  lcm state), the reason in the VM's error. A VM vmkeep is busy with is left alone; VMs off the
  host (PENDING, STOPPED, UNDEPLOYED, ...) too. The host's daemon, back, polls its VMs and sets
  their real state again.
- A QUEUED job whose ``runs_on`` host's daemon is silent (or has never sent a heartbeat) says so
  in its ``wait_reason``; one that has waited for it ``[cluster] queued_timeout`` s (counted from
  the daemon's last heartbeat when the job is older) fails with HostUnavailable, naming the host
  and the fix.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import Datastore, Host, Job, Vm
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.states import BUSY_STATES, ON_HOST
from vmkeep.engine.hosts.records import DISABLED, ERROR, MONITORED, OFFLINE, find_host
from vmkeep.engine.hosts.records import heartbeat as write_heartbeat
from vmkeep.errors import HostUnavailable, VmkeepError
from vmkeep.model import JobState, LcmState, VmState


def heartbeat(ctx: Context, listen: str) -> None:
    """This daemon is alive: its host's heartbeat, with who and where it is."""
    if ctx.host is None:
        return
    info = {"pid": os.getpid(), "machine": socket.gethostname(), "listen": listen}
    write_heartbeat(ctx, ctx.host, info)


def figures(ctx: Context) -> dict[str, Any]:
    """What libvirt and the file systems say about this host now; raises VmkeepError when
    libvirt cannot be reached."""
    node = ctx.hv.node_info()
    domains = ctx.hv.states()
    with ctx.catalog.session() as s:
        names = list(s.execute(select(Vm.name).where(Vm.host == ctx.host)).scalars())
        stores = s.execute(
            select(Datastore.name, Datastore.options).where(Datastore.driver == "dir")
        )
        paths = {name: str((options or {}).get("path") or "") for name, options in stores}
    running = sum(1 for n in names if n in domains and domains[n].state == VmState.ACTIVE)
    free: dict[str, int] = {}
    for name, path in sorted(paths.items()):
        try:
            st = os.statvfs(path)
        except OSError:
            continue  # not mounted on this host (or gone): nothing to say about it here
        free[name] = st.f_bavail * st.f_frsize
    return node | {"vms": len(names), "running": running, "domains": len(domains),
                   "datastores": free}  # fmt: skip


def monitor(ctx: Context, now: datetime | None = None) -> dict[str, Any]:
    """Monitor this process's host once; returns its new state, figures and error."""
    if ctx.host is None:
        return {}
    now = now or datetime.now(UTC)
    with ctx.catalog.session() as s:
        h = find_host(s, ctx.host)
        if h.state == OFFLINE:
            return {"host": h.name, "state": OFFLINE}
    try:
        seen: dict[str, Any] | None = figures(ctx)
        error = None
    except VmkeepError as err:
        seen, error = None, str(err)
    kept = Host.state == DISABLED  # an admin's DISABLED stays; OFFLINE is left alone
    with ctx.catalog.session() as s:
        q = update(Host).where(Host.name == ctx.host, Host.state != OFFLINE)
        if seen is not None:
            s.execute(q.values(state=case((kept, DISABLED), else_=MONITORED), monitor=seen,
                               error=None, monitored_at=now))  # fmt: skip
        else:
            s.execute(q.values(state=case((kept, DISABLED), else_=ERROR), error=error))
        h = find_host(s, ctx.host)
        return {"host": h.name, "state": h.state, "monitor": h.monitor, "error": h.error}


def _clock(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%H:%M:%S")


def _age(now: datetime, t: datetime) -> float:
    return (now - t).total_seconds()


# how each reason the sweep writes on a VM ends: the VM's poll, once its state is known again,
# clears it (``unknown_cleared``)
UNKNOWN_UNTIL = ("the VM's state is unknown until it polls again",
                 "the VM's state is unknown until it is reached again")  # fmt: skip


def unknown_cleared(error: str | None) -> str | None:
    """A VM's error once its poll has seen its state: None for the sweep's reason (its host's
    daemon and libvirt answer again), any other error as it is."""
    return None if error is not None and error.endswith(UNKNOWN_UNTIL) else error


def _unknown_reason(
    h: Host, now: datetime, silent_after: float, unknown_after: float
) -> str | None:
    """Why the VMs of host ``h`` are UNKNOWN now (None: they are not)."""
    if h.state == OFFLINE:
        return None
    if h.heartbeat_at is not None and _age(now, h.heartbeat_at) > silent_after + unknown_after:
        return (f"host {h.name}'s daemon is silent since {_clock(h.heartbeat_at)} UTC: "
                f"{UNKNOWN_UNTIL[0]}")  # fmt: skip
    since = h.monitored_at or h.created_at
    if h.state == ERROR and since is not None and _age(now, since) > unknown_after:
        return (f"host {h.name} cannot be reached since {_clock(since)} UTC ({h.error}): "
                f"{UNKNOWN_UNTIL[1]}")  # fmt: skip
    return None


def _silence(h: Host) -> str:
    if h.heartbeat_at is None:
        return f"host {h.name}'s daemon has never sent a heartbeat"
    if (h.daemon or {}).get("stopped"):
        return f"host {h.name}'s daemon stopped at {_clock(h.heartbeat_at)} UTC"
    return f"host {h.name}'s daemon is silent since {_clock(h.heartbeat_at)} UTC"


def waiting_reason(h: Host, queued_timeout: float) -> str:
    """What a job queued for silent host ``h`` says while it waits."""
    return (f"{_silence(h)}; the job waits for it (fails after [cluster] queued_timeout, "
            f"{queued_timeout:g} s)")  # fmt: skip


def mark_unknown(s: Session, host: str, reason: str) -> list[str]:
    """The idle VMs on ``host`` whose domain is there -> UNKNOWN, ``reason`` in their error;
    returns their names."""
    q = select(Vm).where(
        Vm.host == host,
        Vm.lcm_state.in_([str(x) for x in ON_HOST]),
        Vm.lcm_state.not_in([str(x) for x in BUSY_STATES]),
    )
    marked = []
    for vm in s.execute(q.with_for_update()).scalars():
        vm.state, vm.lcm_state, vm.error = VmState.UNKNOWN, LcmState.UNKNOWN, reason
        marked.append(vm.name)
    return marked


def sweep(ctx: Context, now: datetime | None = None) -> dict[str, Any]:
    """The rules for silent and unreachable hosts over the whole catalog (any daemon runs it):
    returns the VMs marked UNKNOWN, the jobs told to wait and the jobs failed.

    Each host is judged on its row read with a share lock, in the transaction that marks its
    VMs and jobs: a heartbeat written meanwhile waits for the sweep or is seen by it, so a sweep
    never marks the VMs of a daemon that is back (and has polled them) from an older read."""
    now = now or datetime.now(UTC)
    cluster = ctx.config.cluster
    out: dict[str, Any] = {"unknown": [], "waiting": [], "failed": []}
    with ctx.catalog.session() as s:
        names = list(s.execute(select(Host.name).order_by(Host.name)).scalars())
    for name in names:
        with ctx.catalog.session() as s:
            q = select(Host).where(Host.name == name).with_for_update(read=True)
            h = s.execute(q).scalar_one_or_none()
            if h is None:
                continue  # removed meanwhile
            reason = _unknown_reason(h, now, cluster.silent_after, cluster.unknown_after)
            if reason is not None:
                out["unknown"] += mark_unknown(s, h.name, reason)
            stopped = bool((h.daemon or {}).get("stopped"))
            if (
                h.heartbeat_at is None
                or stopped
                or _age(now, h.heartbeat_at) > cluster.silent_after
            ):
                waiting, failed = _jobs_of_silent(s, h, now, cluster.queued_timeout)
                out["waiting"] += waiting
                out["failed"] += failed
    return out


def _jobs_of_silent(
    s: Session, h: Host, now: datetime, timeout: float
) -> tuple[list[int], list[int]]:
    """The QUEUED jobs for silent host ``h``: the reason on each; those that waited
    ``timeout`` s for its daemon (since they were queued, or since its last heartbeat when that
    came later) FAILED."""
    why = waiting_reason(h, timeout)
    err = HostUnavailable(
        h.name,
        f"{_silence(h)} and the job waited for it over [cluster] queued_timeout ({timeout:g} s)",
        f"Start its daemon there (vmkeep daemon --host {h.name}), then queue the job again.",
    )
    told: list[int] = []
    failed: list[int] = []
    rows = s.execute(
        select(Job.id, Job.created_at, Job.wait_reason).where(
            Job.state == JobState.QUEUED, Job.runs_on == h.name
        )
    ).all()
    for job_id, created, reason in rows:
        start = max(created, h.heartbeat_at) if h.heartbeat_at is not None else created
        if _age(now, start) <= timeout:
            if reason != why:
                told.append(job_id)
            continue
        won = s.execute(  # type: ignore[attr-defined]
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)  # not claimed meanwhile
            .values(
                state=JobState.FAILED,
                finished_at=now,
                error_code="HostUnavailable",
                error=str(err),
                wait_reason=None,
            )  # fmt: skip
        ).rowcount
        if won == 1:
            failed.append(job_id)
    if told:
        s.execute(update(Job).where(Job.id.in_(told), Job.state == JobState.QUEUED)
                  .values(wait_reason=why))  # fmt: skip
    return told, failed
