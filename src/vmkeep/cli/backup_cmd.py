"""``vmkeep backup VM --datastore D [--reset]`` and ``vmkeep backup cancel VM``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vmkeep.cli import complete
from vmkeep.cli.output import act, ctx_of, emit_json, json_option, render, report_warnings

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem


class DefaultGroup(click.Group):
    """``backup VM ...`` runs the default command; ``backup cancel VM`` the subcommand."""

    default = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args.insert(0, self.default)
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        """``backup <Tab>``: the VMs (for the default command) as well as the subcommands."""
        from click.shell_completion import CompletionItem

        vms = complete.vms(ctx, None, incomplete) if not incomplete.startswith("-") else []
        return super().shell_complete(ctx, incomplete) + [CompletionItem(v) for v in vms]


@click.group(cls=DefaultGroup)
def backup() -> None:
    """Back up a VM (vmkeep backup VM --datastore D), or cancel a running backup."""


@backup.command("run")
@click.argument("vm", shell_complete=complete.vms)
@complete.datastore_option
@click.option("--reset", is_flag=True, help="Start a new full chain (INCREMENT mode).")
@json_option
@click.pass_context
def run_cmd(c: click.Context, vm: str, datastore: str, reset: bool, as_json: bool) -> None:
    """Back up VM to a datastore (full, or an increment per the VM's BACKUP_CONFIG). A running
    daemon on this catalog runs it as a job (Ctrl-C cancels it)."""
    params = {"vm": vm, "datastore": datastore, "reset": reset}
    r, warnings = act(c, "backup", params, bar=not as_json)
    if as_json:
        emit_json(r)
    else:
        inc = next(i for i in r["increments"] if i["id"] == r["increment"])
        kind = "full" if inc["parent"] is None else f"increment of {inc['parent']}"
        click.echo(
            f"backup {r['id']} increment {r['increment']} ({kind}) of {r['vm']}: {r['status']}, "
            f"{inc['size']} bytes, {inc['consistency']}, {r['seconds']} s"
        )
    report_warnings(warnings)


@backup.command("cancel")
@click.argument("vm", shell_complete=complete.vms)
@json_option
@click.pass_context
def cancel_cmd(c: click.Context, vm: str, as_json: bool) -> None:
    """Cancel the running backup of VM (aborts the job, removes partial files)."""
    from vmkeep.engine.protect.backup import cancel_backup

    res = cancel_backup(ctx_of(c), vm)
    render(
        res,
        as_json,
        lambda r: click.echo(
            f"{r['vm']}: backup cancelled" if r["cancelled"] else f"{r['vm']}: {r['reason']}"
        ),
    )
