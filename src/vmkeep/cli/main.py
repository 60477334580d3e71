"""``vmkeep`` entry point. Only ``main()`` calls ``sys.exit``; exit codes come from errors.py."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import click

from vmkeep import __version__, gctune
from vmkeep.cli.lazy import LazyGroup
from vmkeep.errors import EXIT_INTERRUPTED, VmkeepError
from vmkeep.paths import private_umask

# command families, imported only when used: a no-op command stays fast
FAMILIES = {
    "vm": "vmkeep.cli.vm_cmd:vm",
    "lab": "vmkeep.cli.lab_cmd:lab",
    "datastore": "vmkeep.cli.datastore_cmd:datastore",
    "backup": "vmkeep.cli.backup_cmd:backup",
    "backups": "vmkeep.cli.backups_cmd:backups",
    "restore": "vmkeep.cli.restore_cmd:restore",
    "group": "vmkeep.cli.group_cmd:group",
    "daemon": "vmkeep.cli.daemon_cmd:daemon",
    "jobs": "vmkeep.cli.jobs_cmd:jobs",
    "token": "vmkeep.cli.token_cmd:token",
    "files": "vmkeep.cli.files_cmd:files",
    "mount": "vmkeep.cli.files_cmd:mount",
    "umount": "vmkeep.cli.files_cmd:umount",
    "drill": "vmkeep.cli.drill_cmd:drill",
    "prune": "vmkeep.cli.prune_cmd:prune",
    "audit": "vmkeep.cli.audit_cmd:audit",
    "completion": "vmkeep.cli.complete:completion",
    "backupjob": "vmkeep.cli.backupjob_cmd:backupjob",
    "pool": "vmkeep.cli.pool_cmd:pool",
    "host": "vmkeep.cli.host_cmd:host",
    "notify": "vmkeep.cli.notify_cmd:notify",
}
# set by the shell completion script (``vmkeep completion SHELL``): answer the shell, run nothing
COMPLETE_VAR = "_VMKEEP_COMPLETE"


@click.group(
    cls=LazyGroup,
    lazy_subcommands=FAMILIES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="vmkeep")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $VMKEEP_CONFIG, then ~/.config/vmkeep/config.toml).",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(click_ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """vmkeep: consistent backups, group snapshots and restore for KVM/libvirt VMs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # The engine context (config, catalog, libvirt) is made by the first command that needs it
    # (output.ctx_of): ``--version``, ``--help`` and reads a daemon answers never load it.
    click_ctx.obj = None


def _on_sigterm(_signum: int, _frame: Any) -> None:
    # Turn SIGTERM into the same clean-up path as Ctrl-C.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    gctune.for_command()
    private_umask()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if os.environ.get(COMPLETE_VAR):
        from vmkeep.cli.complete import answer

        sys.exit(answer(cli, COMPLETE_VAR, os.environ[COMPLETE_VAR]))
    code = 0
    try:
        with cli.make_context("vmkeep", list(sys.argv[1:] if argv is None else argv)) as ctx:
            cli.invoke(ctx)
            code = int(ctx.meta.get("vmkeep.exit_code", 0))
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = 2
    except click.exceptions.Abort:
        code = EXIT_INTERRUPTED
    except VmkeepError as e:
        click.echo(f"vmkeep: error: {e}", err=True)
        code = e.exit_code
    except OSError as e:  # a path the user gave that cannot be used: say which, no traceback
        where = f" {e.filename}" if e.filename else ""
        click.echo(f"vmkeep: error: cannot use{where}: {e.strerror or e}", err=True)
        code = 2
    except KeyboardInterrupt:
        click.echo("vmkeep: interrupted", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
