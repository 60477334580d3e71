"""``vmkeep restore ID [--increment N] [--disk N] [--name NEW] [--path DIR] [--no-nic] [--no-ip]
[--start] [--in-place] [--instant] [--without-memory]``."""

from __future__ import annotations

import os
from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import act, json_option, kv, render, report_warnings


@click.command()
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.option(
    "--increment", type=int, default=None, help="Restore point (0 = full; default newest)."
)
@click.option("--disk", default=None, help="Only this disk (target name or index) to --path.")
@click.option("--name", default=None, help="Name of the new domain.")
@click.option(
    "--path",
    default=None,
    help="Folder for the disks; with --disk a file, or a folder ending in '/'.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file / use a non-empty folder.")
@click.option("--no-nic", is_flag=True, help="Drop network interfaces.")
@click.option("--no-ip", is_flag=True, help="Keep NICs but drop MAC and fixed addresses.")
@click.option("--start", is_flag=True, help="Start the restored VM.")
@click.option(
    "--instant",
    is_flag=True,
    help="Run the VM at once on overlays over the backup, then copy its disks to --path.",
)
@click.option(
    "--copy-bwlimit",
    type=click.IntRange(min=0),
    default=0,
    metavar="MIB",
    help="Instant restore: limit the copy to MiB/s (0 = unlimited).",
)
@click.option(
    "--without-memory",
    is_flag=True,
    help="A point with memory state: boot the VM cold instead of resuming it.",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Roll the VM itself back (it must be powered off; name, UUID, NICs stay).",
)
@json_option
@click.pass_context
def restore(c: click.Context, backup_id: int, as_json: bool, **opts: object) -> None:
    """Restore a backup as a new VM, one disk image, or the VM itself (--in-place). A running
    daemon on this catalog runs it as a job (Ctrl-C cancels it)."""
    given = {k: v for k, v in opts.items() if v is not None and v is not False}  # --increment 0
    params: dict[str, Any] = {"backup": backup_id, **given}
    if isinstance(opts.get("path"), str):  # the daemon's working directory is not this one
        path = str(opts["path"])
        params["path"] = os.path.abspath(path) + ("/" if path.endswith("/") and path != "/" else "")

    res, warnings = act(c, "restore", params, bar=not as_json and bool(opts.get("instant")))
    render(res, as_json, kv)
    report_warnings(warnings)
