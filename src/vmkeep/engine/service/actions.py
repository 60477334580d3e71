"""The long actions a job can run: kind -> engine call. The CLI, the API and (later) schedules
enqueue these kinds; a daemon worker runs them through ``jobs.execute``. Each runner takes the
job's JSON params and a progress callback and returns (result, warnings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmkeep.engine.core import trust
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.jobs import Runner
from vmkeep.engine.groups import backup as group_backup
from vmkeep.engine.lifecycle import dispatch
from vmkeep.engine.points import copy
from vmkeep.engine.protect import backup
from vmkeep.engine.restore import drill, inplace, point
from vmkeep.engine.vm import inventory

Progress = Callable[[int, int], None]


def _backup(
    ctx: Context, p: dict[str, Any], progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    out = backup.run_backup(
        ctx, str(p["vm"]), str(p["datastore"]), reset=bool(p.get("reset")), progress=progress
    )
    return out.result, out.warnings.items


def _group_backup(
    ctx: Context, p: dict[str, Any], progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    out = group_backup.run_group_backup(
        ctx,
        str(p["group"]),
        str(p["datastore"]),
        parallel_freeze=bool(p.get("parallel_freeze")),
        reset=bool(p.get("reset")),
        progress=progress,
    )
    return out.result, out.warnings.items


def _restore(
    ctx: Context, p: dict[str, Any], progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    fields = point.RestoreOptions.__dataclass_fields__
    opts = point.RestoreOptions(
        **{k: v for k, v in p.items() if k in fields and k != "by"}, by=trust.actor_of(p)
    )
    result, warnings = inplace.run_restore(ctx, int(p["backup"]), opts, progress)
    return result, warnings.items


def _verify(
    ctx: Context, p: dict[str, Any], _progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    return point.verify(ctx, int(p["backup"])), []


def _drill(
    ctx: Context, p: dict[str, Any], _progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    result, warnings = drill.run_drill(
        ctx,
        int(p["backup"]),
        p.get("increment"),
        p.get("probe"),
        float(p.get("timeout", drill.BOOT_TIMEOUT)),
    )
    drill.check_passed(result)  # a FAIL verdict is a FAILED job, as on the CLI
    return result, warnings.items


def _vm_action(
    ctx: Context, p: dict[str, Any], _progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    opts = dict(p.get("opts") or {})
    if p["action"] == "recover":
        result, warnings = dispatch.recover(ctx, str(p["vm"]), str(opts.get("how")), origin="api")
    else:
        result, warnings = dispatch.run_action(ctx, str(p["vm"]), str(p["action"]), opts,
                                                origin="api", actor=trust.actor_of(p))  # fmt: skip
    return result, warnings.items


def _copy(ctx: Context, p: dict[str, Any], _progress: Progress) -> tuple[dict[str, Any], list[str]]:
    return copy.copy_backup(ctx, int(p["backup"]), str(p["to"])), []


def _quiesce(
    ctx: Context, p: dict[str, Any], _progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    return inventory.quiesce(ctx, str(p["vm"])), []


def _unquiesce(
    ctx: Context, p: dict[str, Any], _progress: Progress
) -> tuple[dict[str, Any], list[str]]:
    return inventory.unquiesce(ctx, str(p["vm"])), []


RUNNERS: dict[str, Runner] = {
    "backup": _backup,
    "group-backup": _group_backup,
    "restore": _restore,
    "verify": _verify,
    "drill": _drill,
    "vm-action": _vm_action,
    "copy": _copy,
    "quiesce": _quiesce,
    "unquiesce": _unquiesce,
}
