"""``vmkeep restore ID [--increment N] [--disk N] [--name NEW] [--path DIR] [--no-nic] [--no-ip]
[--start] [--in-place] [--instant] [--without-memory]``."""

from __future__ import annotations

import click

from vmkeep.cli.output import ctx_of, json_option, kv, render, report_warnings, transfer_progress
from vmkeep.engine import jobs
from vmkeep.engine.inplace import run_restore
from vmkeep.engine.restore import RestoreOptions


@click.command()
@click.argument("backup_id", type=int)
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
    """Restore a backup as a new VM, one disk image, or the VM itself (--in-place)."""
    ctx = ctx_of(c)
    params = {"backup": backup_id, **{k: v for k, v in opts.items() if v not in (None, False)}}
    with (
        jobs.recorded(ctx, "restore", str(backup_id), params) as job,
        transfer_progress(f"restore {backup_id}", as_json or not opts.get("instant")) as bar,
    ):

        def both(done: int, total: int) -> None:
            bar(done, total)
            job(done, total)

        res, warnings = run_restore(ctx, backup_id, RestoreOptions(**opts), both)  # type: ignore[arg-type]
        job.result = res
    render(res, as_json, kv)
    report_warnings(warnings)
