"""``vmkeep drill ID [--increment N] [--probe CMD] [--timeout S]``: prove a restore point boots
(engine/drill.py). Exit 0 on PASS, 26 on FAIL (the reason and each step's evidence are printed and
recorded on the point)."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import act, console, json_option, render, report_warnings, shown_on_failure

BOOT_TIMEOUT = 300.0  # the params model's default (engine/service/params.py DrillParams)


@click.command()
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.option("--increment", type=int, default=None, help="Restore point (default newest).")
@click.option("--probe", default=None, metavar="CMD", help="Run CMD in the guest; must exit 0.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=BOOT_TIMEOUT,
    show_default=True,
    help="Seconds the guest agent has to answer after start.",
)
@json_option
@click.pass_context
def drill(
    c: click.Context,
    backup_id: int,
    increment: int | None,
    probe: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Boot a restore point as an isolated throw-away VM and check it (checksums, fsck, agent,
    probe); the result is recorded on the point (backups show)."""
    params = {"backup": backup_id, "increment": increment, "probe": probe, "timeout": timeout}

    def human(r: dict[str, Any]) -> None:
        for chk in r["checks"]:
            mark = "ok  " if chk["ok"] else "FAIL"
            console().print(f"{mark} {chk['step']}: {chk['detail']}", markup=False, highlight=False)
        console().print(f"drill {r['drill']} of backup {r['backup']} point {r['increment']}: "
                      f"{r['result']}", markup=False, highlight=False)  # fmt: skip

    with shown_on_failure(as_json, human):  # FAIL: the evidence, then exit 26 (a FAILED job)
        res, warnings = act(c, "drill", params, bar=False)
    render(res, as_json, human)
    report_warnings(warnings)
