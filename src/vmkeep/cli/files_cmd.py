"""``vmkeep files ls|get`` and ``vmkeep mount|umount``: files of a restore point, read-only,
without booting it (engine/files.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import console, ctx_of, json_option, kv, render, table
from vmkeep.engine.restore import files as engine


def _point_options(f: Any) -> Any:
    f = click.option("--partition", type=int, default=None, help="Partition number (1 = first).")(f)
    f = click.option("--disk", default=None, help="Disk target (vda) or index; default the first.")(
        f
    )
    f = click.option("--increment", type=int, default=None, help="Restore point (default newest).")(
        f
    )
    return f


@click.group()
def files() -> None:
    """Files of a restore point (read-only; the backup is never written)."""


@files.command("ls")
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.argument("path", default="/")
@_point_options
@json_option
@click.pass_context
def ls_cmd(
    c: click.Context,
    backup_id: int,
    path: str,
    increment: int | None,
    disk: str | None,
    partition: int | None,
    as_json: bool,
) -> None:
    """List a folder of a restore point (a disk with several file systems: its partitions)."""
    res = engine.ls(ctx_of(c), backup_id, path, increment, disk, partition)

    def human(r: dict[str, Any]) -> None:
        if "partitions" in r:
            console().print("several file systems: choose one with --partition N", highlight=False)
            table(r["partitions"], ("number", "size", "type", "fstype"), title="partitions")
            return
        table(r["entries"], ("path", "type", "size", "mode", "mtime"))

    render(res, as_json, human)


@files.command("get")
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.argument("paths", nargs=-1, required=True)
@click.option("--to", "to", required=True, type=click.Path(path_type=Path), help="Folder.")
@click.option("--force", is_flag=True, help="Overwrite files that exist in --to.")
@_point_options
@json_option
@click.pass_context
def get_cmd(
    c: click.Context,
    backup_id: int,
    paths: tuple[str, ...],
    to: Path,
    force: bool,
    increment: int | None,
    disk: str | None,
    partition: int | None,
    as_json: bool,
) -> None:
    """Copy files or folders of a restore point into a folder."""
    res = engine.get(ctx_of(c), backup_id, list(paths), to, increment, disk, partition, force)

    def human(r: dict[str, Any]) -> None:
        for x in r["copied"]:
            console().print(f"{x['from']} -> {x['to']}", highlight=False)

    render(res, as_json, human)


@click.command("mount")
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.argument("mountpoint", type=click.Path(path_type=Path))
@_point_options
@json_option
@click.pass_context
def mount(
    c: click.Context,
    backup_id: int,
    mountpoint: Path,
    increment: int | None,
    disk: str | None,
    partition: int | None,
    as_json: bool,
) -> None:
    """Mount a restore point's file system read-only (vmkeep umount MOUNTPOINT to undo)."""
    render(engine.mount(ctx_of(c), backup_id, mountpoint, increment, disk, partition), as_json, kv)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@json_option
@click.pass_context
def umount(c: click.Context, mountpoint: Path, as_json: bool) -> None:
    """Unmount what 'vmkeep mount' mounted."""
    render(engine.umount(ctx_of(c), mountpoint), as_json, kv)
