"""Freeze, thaw and suspend of guests, and the guard that makes sure a guest ends thawed.

A guest agent that does not answer a freeze in time may still run it later: qemu-ga reads its
commands in order and libvirt only stopped *waiting* (seen on a real guest: agent stopped with
SIGSTOP, freeze timed out, agent resumed -> ``guest-fsfreeze-status`` said ``frozen``). So a
timed-out freeze counts as "may happen later": a detached guard process (``engine/vm/watchdog.py``)
waits until the agent answers again and thaws the guest, unless a vmkeep action holds it frozen
on purpose at that moment; success is only reported once ``guest-fsfreeze-status`` says
``thawed``.

Every intentional freeze holds the catalog lock ``freeze:<vm id>`` from before the freeze until
after the thaw, so a guard never thaws a freeze that a backup is relying on.
"""

from __future__ import annotations

import enum
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime

from vmkeep.catalog import lock
from vmkeep.engine.core.context import Context
from vmkeep.errors import (
    AgentTimeout,
    AgentUnavailable,
    HypervisorError,
    NotFound,
    VmkeepError,
)
from vmkeep.model import Consistency, FsFreeze, Warnings

log = logging.getLogger(__name__)

THAW_ATTEMPTS = 3
CONFIG_ENV = "VMKEEP_WATCHDOG_CONFIG"
WATCHDOG_MODULE = "vmkeep.engine.vm.watchdog"


def freeze_lock(vm_id: int) -> str:
    return f"freeze:{vm_id}"


class Thawed(enum.StrEnum):
    """What ``ensure_thawed`` could establish about a guest."""

    CONFIRMED = "confirmed"  # the agent says 'thawed'
    NO_AGENT = "no-agent"  # no agent connected: nothing can have been frozen through it
    SILENT = "silent"  # the agent does not answer: a queued freeze may still happen


@dataclass
class Quiesce:
    consistency: Consistency = Consistency.CRASH
    freeze_ms: float | None = None


@contextmanager
def freeze_intent(ctx: Context, vm_ids: list[int]) -> Iterator[None]:
    """Mark the guests as frozen on purpose for the body (guards leave them alone)."""
    with ExitStack() as stack:
        for vm_id in vm_ids:
            stack.enter_context(lock(ctx.catalog, freeze_lock(vm_id), "freeze"))
        yield


def freeze_guest(
    ctx: Context, vm_id: int, name: str, mode: FsFreeze
) -> tuple[Consistency, Callable[[], object]]:
    """Freeze (agent) or suspend the guest; returns the consistency and how to undo it.

    Raises AgentUnavailable (no agent: nothing happened in the guest) or AgentTimeout (the agent
    is hung: the freeze may still happen, so a guard process is left to undo it). ``mode`` NONE
    does nothing (CRASH consistency). The caller holds ``freeze_intent``."""
    timeout = ctx.agent_timeout
    if mode == FsFreeze.SUSPEND:
        ctx.hv.suspend(name)
        return Consistency.SUSPENDED, lambda: ctx.hv.resume(name)
    if mode == FsFreeze.AGENT:
        try:
            ctx.hv.fs_freeze(name, timeout)
        except AgentTimeout:
            spawn(ctx, [vm_id], pending=True)
            raise
        return Consistency.AGENT_FROZEN, lambda: ctx.hv.fs_thaw(name, timeout)
    return Consistency.CRASH, lambda: None


@contextmanager
def quiesced(
    ctx: Context, vm_id: int, name: str, mode: FsFreeze, warnings: Warnings
) -> Iterator[Quiesce]:
    """Freeze (agent) or suspend the guest for the body only; always undone, with retries.
    A missing or hung agent gives a crash-consistent backup and a warning that says which."""
    q = Quiesce()
    undo: Callable[[], object] | None = None
    with freeze_intent(ctx, [vm_id]) if mode != FsFreeze.NONE else ExitStack():
        t0 = time.monotonic()
        try:
            q.consistency, undo = freeze_guest(ctx, vm_id, name, mode)
        except AgentUnavailable as err:
            warnings.add(f"{err} The backup is crash-consistent.")
        except AgentTimeout as err:
            warnings.add(
                f"{err} The agent is hung, so the backup is crash-consistent; a guard process "
                "thaws the guest as soon as its agent answers again (see watchdog.log)."
            )
        try:
            yield q
        finally:
            if undo is not None and mode != FsFreeze.NONE:
                try:
                    undo_with_retries(ctx, vm_id, name, undo)
                except HypervisorError as err:
                    # The point in time was taken while frozen: the backup itself is fine.
                    warnings.add(str(err))
                q.freeze_ms = (time.monotonic() - t0) * 1000


def undo_with_retries(ctx: Context, vm_id: int, name: str, undo: Callable[[], object]) -> None:
    """Thaw/resume, retried; when it still fails a guard process takes over, and the error says so."""
    last: Exception | None = None
    for attempt in range(THAW_ATTEMPTS):
        try:
            undo()
            return
        except HypervisorError as err:
            last = err
            log.error("unquiesce of %s failed (attempt %d): %s", name, attempt + 1, err)
            if isinstance(err, AgentTimeout):
                break  # each attempt would wait the whole agent timeout: leave it to the guard
            time.sleep(0.5 * (attempt + 1))
    with suppress(VmkeepError):
        spawn(ctx, [vm_id], pending=True)
    raise HypervisorError(
        f"could not thaw/resume {name}: {last}; a guard process keeps trying until the guest "
        "agent answers (see watchdog.log)"
    )


def ensure_thawed(ctx: Context, name: str) -> Thawed:
    """Thaw the guest and confirm it through ``guest-fsfreeze-status``."""
    timeout = ctx.agent_timeout
    try:
        if ctx.hv.fs_freeze_status(name, timeout) == "thawed":
            return Thawed.CONFIRMED
        ctx.hv.fs_thaw(name, timeout)
        status = ctx.hv.fs_freeze_status(name, timeout)
    except AgentUnavailable:
        return Thawed.NO_AGENT
    except (AgentTimeout, NotFound):
        return Thawed.SILENT
    except HypervisorError as err:
        log.warning("thaw of %s: %s", name, err)
        return Thawed.SILENT
    return Thawed.CONFIRMED if status == "thawed" else Thawed.SILENT


# --- the guard process ---------------------------------------------------------------------------
def spawn(
    ctx: Context,
    vm_ids: list[int],
    *,
    owner: int | None = None,
    quiesced_at: datetime | None = None,
    pending: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a detached guard (``engine/vm/watchdog.py``) for ``vm_ids``:

    * ``owner``: recover the VMs at once if that process dies (thaw, resume, clean up);
    * ``quiesced_at``: unquiesce at ``quiesce.max_seconds`` unless it was unquiesced before;
    * ``pending``: a freeze or thaw timed out; thaw as soon as the agent answers again.

    It runs in its own session (Ctrl-C on the caller does not reach it) and gets the resolved
    config through the environment, never on its command line."""
    deadline = time.time() + ctx.config.quiesce.max_seconds
    argv = [sys.executable, "-m", WATCHDOG_MODULE, "--deadline", f"{deadline:.3f}"]
    if owner is not None:
        argv += ["--owner", str(owner)]
    if quiesced_at is not None:
        argv += ["--quiesced-at", quiesced_at.isoformat()]
    if pending:
        argv += ["--pending"]
    for vm_id in vm_ids:
        argv += ["--vm", str(vm_id)]
    ctx.config.data_dir.mkdir(parents=True, exist_ok=True)
    logfile = open(ctx.config.data_dir / "watchdog.log", "ab")  # noqa: SIM115 (child owns it)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            env=os.environ | {CONFIG_ENV: ctx.config.model_dump_json()},
        )
    finally:
        logfile.close()


@contextmanager
def guarding(ctx: Context, vm_ids: list[int]) -> Iterator[None]:
    """Owner-mode guard for the body: if this process dies inside it (SIGKILL, OOM), the guard
    thaws and resumes ``vm_ids`` and cleans up their unfinished backups at once."""
    proc = spawn(ctx, vm_ids, owner=os.getpid())
    try:
        yield
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
