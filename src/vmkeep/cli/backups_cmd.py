"""``vmkeep backups list|show|verify``."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli.output import console, ctx_of, json_option, kv, render, table
from vmkeep.engine import backups as engine
from vmkeep.engine import jobs
from vmkeep.engine.restore import verify


@click.group()
def backups() -> None:
    """Backups in the catalog."""


def _row(b: dict[str, Any]) -> dict[str, Any]:
    valid = [i for i in b["increments"] if i["status"] == "VALID"]
    return dict(
        b, points=",".join(str(i["id"]) for i in valid) or "-", size=sum(i["size"] for i in valid)
    )


@backups.command("list")
@click.option("--vm", "vm_ref", default=None, help="Only this VM's backups.")
@json_option
@click.pass_context
def list_cmd(c: click.Context, vm_ref: str | None, as_json: bool) -> None:
    """List backups (one row per chain)."""
    rows = engine.list_backups(ctx_of(c), vm_ref)
    render(
        rows,
        as_json,
        lambda r: table(
            [_row(b) for b in r], ("id", "vm", "datastore", "mode", "status", "points", "size")
        ),
    )


@backups.command("show")
@click.argument("backup_id", type=int)
@json_option
@click.pass_context
def show_cmd(c: click.Context, backup_id: int, as_json: bool) -> None:
    """Show one backup chain and its increments."""
    data = engine.show_backup(ctx_of(c), backup_id)

    def human(d: dict[str, Any]) -> None:
        kv({k: v for k, v in d.items() if k != "increments"})
        table(
            [dict(i, files=len(i["files"])) for i in d["increments"]],
            ("id", "parent", "status", "consistency", "size", "finished", "files"),
            title="increments",
        )

    render(data, as_json, human)


@backups.command("verify")
@click.argument("backup_id", type=int)
@json_option
@click.pass_context
def verify_cmd(c: click.Context, backup_id: int, as_json: bool) -> None:
    """Check every stored file against its sha256 (exit 17 on a mismatch)."""
    ctx = ctx_of(c)
    with jobs.recorded(ctx, "verify", str(backup_id), {"backup": backup_id}) as job:
        res = job.result = verify(ctx, backup_id)
    render(
        res,
        as_json,
        lambda r: console.print(
            f"backup {r['backup']}: {len(r['files'])} files OK", highlight=False
        ),
    )
