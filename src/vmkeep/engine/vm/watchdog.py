"""The guard process: makes sure guests vmkeep froze end thawed, whatever happens to vmkeep.

Started detached by ``engine/quiesce.spawn`` (``python -m vmkeep.engine.vm.watchdog``), in one of
three modes:

* owner: watches the vmkeep process running a backup or group backup. If the owner dies
  (SIGKILL, OOM), it takes the VMs' locks and recovers them at once (``recovery.recover_vm``:
  thaw, resume, abort the job, remove partial data and the new checkpoint, mark the attempt
  FAILED). If the owner holds a freeze longer than ``quiesce.max_seconds``, it thaws.
* quiesce (``vm quiesce``): unquiesces the VM at ``quiesce.max_seconds`` through the normal
  QUIESCED -> UNQUIESCING -> RUNNING path, unless it was unquiesced (or re-quiesced) before.
* pending: a freeze or thaw timed out because the agent is hung; the queued freeze may still
  run. Waits until the agent answers again, thaws unless a vmkeep action holds the guest frozen
  on purpose right then, and logs success only once the agent reports ``thawed``. One pending
  guard per VM; it gives up only when the domain stops or after ``GUARD_SECONDS`` (a day).

It gets the owner's resolved config through the environment, never on its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import UTC, datetime

from vmkeep.catalog.locks import acquire, holder, lock, pid_alive, release
from vmkeep.catalog.tables import Vm
from vmkeep.config import Config
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.states import QUIESCE_STATES
from vmkeep.engine.vm.inventory import unquiesce
from vmkeep.engine.vm.quiesce import CONFIG_ENV, Thawed, ensure_thawed, freeze_lock
from vmkeep.engine.vm.recovery import recover_vm
from vmkeep.errors import AgentTimeout, AgentUnavailable, Locked, NotFound, VmkeepError, WrongState
from vmkeep.model import LcmState, VmState

log = logging.getLogger("vmkeep.watchdog")
POLL = 0.25
GUARD_SECONDS = 24 * 3600  # a pending guard waits this long for a hung agent at most


def _vm(ctx: Context, vm_id: int) -> tuple[str, str, datetime | None] | None:
    with ctx.catalog.session() as s:
        vm = s.get(Vm, vm_id)
        return (vm.name, vm.lcm_state, vm.quiesced_at) if vm is not None else None


# --- quiesce mode --------------------------------------------------------------------------------
def _still_quiesced(ctx: Context, vm_id: int, quiesced_at: str) -> bool:
    row = _vm(ctx, vm_id)
    return (
        row is not None
        and row[1] == LcmState.QUIESCED
        and row[2] is not None
        and abs((row[2] - datetime.fromisoformat(quiesced_at)).total_seconds()) < 0.01
    )


def _auto_unquiesce(ctx: Context, vm_id: int, quiesced_at: str) -> None:
    for _ in range(40):
        if not _still_quiesced(ctx, vm_id, quiesced_at):
            return
        try:
            res = unquiesce(ctx, str(vm_id))
        except Locked:
            time.sleep(POLL)  # someone is unquiescing it right now; look again
            continue
        except WrongState:
            return
        except VmkeepError as err:
            log.error("auto-unquiesce of VM %s failed: %s; waiting for its agent", vm_id, err)
            pending(ctx, vm_id, time.time() + GUARD_SECONDS)
            return
        log.warning(
            "auto-unquiesced VM %s after quiesce.max_seconds=%s",
            res["vm"],
            ctx.config.quiesce.max_seconds,
        )
        return


# --- owner mode ----------------------------------------------------------------------------------
def _recover(ctx: Context, vm_ids: list[int], owner: int) -> None:
    for vm_id in vm_ids:
        row = _vm(ctx, vm_id)
        if row is None:
            continue
        name = row[0]
        why = f"the vmkeep process {owner} running it died; cleaned up by its guard"
        try:
            with lock(ctx.catalog, f"vm:{vm_id}", "recovery", label=f"VM {name}"):
                done = recover_vm(ctx, vm_id, why)
        except Locked as err:
            log.info("VM %s: %s (a new action owns it and recovers it itself)", name, err)
            continue
        except VmkeepError as err:
            log.error("recovery of VM %s failed: %s", name, err)
            done = []
        for msg in done:
            log.warning("%s", msg)


def _frozen_too_long(ctx: Context, vm_ids: list[int], owner: int) -> list[int]:
    limit = ctx.config.quiesce.max_seconds
    out = []
    for vm_id in vm_ids:
        h = holder(ctx.catalog, freeze_lock(vm_id))
        if h is not None and h.pid == owner:
            held = (datetime.now(UTC) - h.acquired_at).total_seconds()
            if held > limit:
                out.append(vm_id)
    return out


# --- pending mode --------------------------------------------------------------------------------
def pending(ctx: Context, vm_id: int, until: float, *, quick: bool = False) -> Thawed | None:
    """Wait until the agent answers, then make sure the guest is thawed (see module docstring).

    ``quick``: give up at once when no agent is connected."""
    guard = f"guard:{vm_id}"
    try:
        acquire(ctx.catalog, guard, "thaw guard")
    except Locked:
        log.info("VM %s already has a thaw guard", vm_id)
        return None
    try:
        while time.time() < until:
            row = _vm(ctx, vm_id)
            if row is None:
                return None
            name, lcm, _ = row
            try:
                info = ctx.hv.domain(name)
            except NotFound:
                return None
            if info.state != VmState.ACTIVE:
                log.info("VM %s is not running any more: nothing can stay frozen", name)
                return None
            if lcm in QUIESCE_STATES:
                time.sleep(1)  # frozen on purpose (vm quiesce); its own watchdog bounds it
                continue
            try:
                status = ctx.hv.fs_freeze_status(name, ctx.agent_timeout)
            except AgentUnavailable:
                if quick:
                    return Thawed.NO_AGENT
                time.sleep(1)  # no agent connected (restarting?): nothing can thaw it yet
                continue
            except AgentTimeout:
                log.info("agent of %s still silent", name)
                time.sleep(POLL)
                continue
            except VmkeepError as err:
                log.info("agent of %s: %s", name, err)
                time.sleep(1)
                continue
            if status == "thawed":
                log.info("VM %s: agent answers, guest-fsfreeze-status is thawed", name)
                return Thawed.CONFIRMED
            try:
                acquire(ctx.catalog, freeze_lock(vm_id), "thaw guard")
            except Locked:
                time.sleep(POLL)  # a backup holds it frozen on purpose, for a moment
                continue
            try:
                result = ensure_thawed(ctx, name)
            finally:
                release(ctx.catalog, freeze_lock(vm_id))
            if result == Thawed.CONFIRMED:
                log.warning("VM %s was frozen by a delayed freeze: thawed (confirmed)", name)
                return result
            log.error("thaw of %s not confirmed (%s); trying again", name, result)
            time.sleep(1)
        log.error("VM %s: gave up after %s s", vm_id, GUARD_SECONDS)
        return Thawed.SILENT
    finally:
        release(ctx.catalog, guard)


# --- main loop -----------------------------------------------------------------------------------
def run(
    ctx: Context,
    deadline: float,
    vm_ids: list[int],
    owner: int | None,
    quiesced_at: str | None,
    pending_mode: bool = False,
) -> None:
    if pending_mode:
        until = time.time() + GUARD_SECONDS
        for vm_id in vm_ids:
            pending(ctx, vm_id, until)
        return
    if owner is not None:
        while pid_alive(owner):
            for vm_id in _frozen_too_long(ctx, vm_ids, owner):
                row = _vm(ctx, vm_id)
                if row is not None:
                    log.warning("%s frozen longer than quiesce.max_seconds: thawing", row[0])
                    ensure_thawed(ctx, row[0])
            time.sleep(POLL)
        log.warning("owner process %s died: recovering VMs %s", owner, vm_ids)
        _recover(ctx, vm_ids, owner)
        return
    assert quiesced_at is not None
    while time.time() < deadline:
        if not any(_still_quiesced(ctx, v, quiesced_at) for v in vm_ids):
            return
        time.sleep(min(POLL, max(deadline - time.time(), 0)))
    for vm_id in vm_ids:
        _auto_unquiesce(ctx, vm_id, quiesced_at)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vmkeep-watchdog")
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--owner", type=int)
    p.add_argument("--quiesced-at")
    p.add_argument("--pending", action="store_true")
    p.add_argument("--vm", type=int, action="append", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s watchdog[%(process)d] %(levelname)s %(message)s"
    )
    raw = os.environ.get(CONFIG_ENV)
    if raw is None:
        sys.exit(f"{CONFIG_ENV} is not set: the watchdog is started by vmkeep itself")
    ctx = Context(Config.model_validate_json(raw))
    run(ctx, args.deadline, args.vm, args.owner, args.quiesced_at, args.pending)


if __name__ == "__main__":
    main()
