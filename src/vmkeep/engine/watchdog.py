"""Auto-unquiesce: a detached process that thaws guests vmkeep froze once ``quiesce.max_seconds`` pass.

vmkeep must never leave a guest frozen, even when the process that froze it dies. Two uses:

* ``vm quiesce`` leaves the guest QUIESCED on purpose. Its watchdog unquiesces the VM at the
  deadline (through the normal QUIESCED -> UNQUIESCING -> RUNNING path) unless it was unquiesced,
  or unquiesced and quiesced again (a different ``quiesced_at``), before that.
* A backup or group backup holds freezes for a moment only. Its watchdog watches the owning
  process: if the owner dies (SIGKILL, OOM) while guests are frozen, or the deadline passes, it
  thaws and resumes them at once. The owner stops the watchdog as soon as it has thawed.

The watchdog runs in its own session (Ctrl-C on the owner does not reach it) and gets the owner's
resolved config through the environment, never on its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime

from vmkeep.catalog.locks import pid_alive
from vmkeep.catalog.tables import Vm
from vmkeep.config import Config
from vmkeep.engine.context import Context
from vmkeep.errors import HypervisorError, Locked, VmkeepError, WrongState
from vmkeep.model import LcmState

log = logging.getLogger("vmkeep.watchdog")
CONFIG_ENV = "VMKEEP_WATCHDOG_CONFIG"
POLL = 0.25


def spawn(
    ctx: Context,
    vm_ids: list[int],
    *,
    owner: int | None = None,
    quiesced_at: datetime | None = None,
) -> subprocess.Popen[bytes]:
    """Start a watchdog for ``vm_ids``: owner mode (``owner`` pid) or quiesce mode (``quiesced_at``)."""
    deadline = time.time() + ctx.config.quiesce.max_seconds
    argv = [sys.executable, "-m", "vmkeep.engine.watchdog", "--deadline", f"{deadline:.3f}"]
    if owner is not None:
        argv += ["--owner", str(owner)]
    if quiesced_at is not None:
        argv += ["--quiesced-at", quiesced_at.isoformat()]
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
    """Owner-mode watchdog for the body: thaws ``vm_ids`` if this process dies inside it."""
    proc = spawn(ctx, vm_ids, owner=os.getpid())
    try:
        yield
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


# --- the watchdog process ------------------------------------------------------------------------
def _still_quiesced(ctx: Context, vm_id: int, quiesced_at: str) -> bool:
    with ctx.catalog.session() as s:
        vm = s.get(Vm, vm_id)
        return (
            vm is not None
            and vm.lcm_state == LcmState.QUIESCED
            and vm.quiesced_at is not None
            and abs((vm.quiesced_at - datetime.fromisoformat(quiesced_at)).total_seconds()) < 0.01
        )


def _auto_unquiesce(ctx: Context, vm_id: int, quiesced_at: str) -> None:
    from vmkeep.engine.vms import unquiesce

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
        log.warning(
            "auto-unquiesced VM %s after quiesce.max_seconds=%s",
            res["vm"],
            ctx.config.quiesce.max_seconds,
        )
        return


def _thaw_now(ctx: Context, vm_ids: list[int]) -> None:
    for vm_id in vm_ids:
        with ctx.catalog.session() as s:
            vm = s.get(Vm, vm_id)
            name = vm.name if vm else None
        if name is None:
            continue
        try:
            ctx.hv.fs_thaw(name, ctx.agent_timeout)
        except HypervisorError as err:
            log.info("thaw of %s: %s", name, err)
        try:
            ctx.hv.resume(name)
        except VmkeepError as err:
            log.error("resume of %s failed: %s", name, err)
        log.warning("watchdog thawed/resumed VM %s", name)


def run(
    ctx: Context, deadline: float, vm_ids: list[int], owner: int | None, quiesced_at: str | None
) -> None:
    while time.time() < deadline:
        if owner is not None and not pid_alive(owner):
            log.warning("owner process %s died while guests were frozen", owner)
            break
        if quiesced_at is not None and not any(
            _still_quiesced(ctx, v, quiesced_at) for v in vm_ids
        ):
            return
        time.sleep(min(POLL, max(deadline - time.time(), 0)))
    if quiesced_at is not None:
        for vm_id in vm_ids:
            _auto_unquiesce(ctx, vm_id, quiesced_at)
    else:
        _thaw_now(ctx, vm_ids)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vmkeep-watchdog")
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--owner", type=int)
    p.add_argument("--quiesced-at")
    p.add_argument("--vm", type=int, action="append", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s watchdog[%(process)d] %(levelname)s %(message)s"
    )
    raw = os.environ.get(CONFIG_ENV)
    if raw is None:
        sys.exit(f"{CONFIG_ENV} is not set: the watchdog is started by vmkeep itself")
    ctx = Context(Config.model_validate_json(raw))
    run(ctx, args.deadline, args.vm, args.owner, args.quiesced_at)


if __name__ == "__main__":
    main()
