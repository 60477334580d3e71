"""Shell completion. ``vmkeep completion bash|zsh|fish`` prints click's script for that shell;
on Tab the script runs ``vmkeep`` again with ``_VMKEEP_COMPLETE`` set (``main.COMPLETE_VAR``),
and ``answer`` prints what fits. VM names, backup ids, datastore, group and pool names and job ids
come from the callbacks below (``shell_complete=`` of the arguments and options that take
them): from the daemon that serves this catalog (``remote.get``, the list routes), else from the
catalog read in this process (``engine/core/refs.py``). A completion never prints an error:
whatever fails offers nothing.

Every command module imports this one: only click and ``remote`` at import time, nothing that
``output`` does not import already (``tests/unit/test_cli_lazy.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from vmkeep.cli import remote

PROG = "vmkeep"
SHELLS = ("bash", "zsh", "fish")

Completer = Callable[[click.Context, click.Parameter | None, str], list[str]]


def _completer(
    path: str, kind: str, key: str, ids: bool = False, newest_first: bool = False
) -> Completer:
    """The values of ``key`` in the rows of ``GET path`` (or of ``refs(kind)`` in this process)
    that start with what was typed so far: names A-Z, ``ids`` newest first, whichever answered.
    ``newest_first``: the route lists newest first, so its first page (``remote.MAX_PAGE``
    rows, as many as ``refs`` offers) is all a Tab press reads, not every page of a long
    history."""

    def offered(c: click.Context, _param: click.Parameter | None, incomplete: str) -> list[str]:
        try:
            most = str(remote.MAX_PAGE) if newest_first else None
            rows = remote.get(c, path, limit=most)
            if rows is not None:
                values = [str(row[key]) for row in rows]
            else:
                from vmkeep.cli.output import ctx_of
                from vmkeep.engine.core.refs import refs

                values = refs(ctx_of(c), kind)
            fit = [v for v in values if v.startswith(incomplete)]
            return sorted(fit, key=int, reverse=True) if ids else sorted(fit)
        except Exception:  # no config, a broken catalog, a daemon's refusal: offer nothing
            return []

    offered.__doc__ = f"{kind} completion: {path} or the catalog"
    return offered


vms = _completer("/v1/vms", "vm", "name")
backups = _completer("/v1/backups", "backup", "id", ids=True)
datastores = _completer("/v1/datastores", "datastore", "name")
groups = _completer("/v1/groups", "group", "name")
jobs = _completer("/v1/jobs", "job", "id", ids=True, newest_first=True)
pools = _completer("/v1/pools", "pool", "name")
hosts = _completer("/v1/hosts", "host", "name")


def answer(cli: click.Command, var: str, instruction: str) -> int:
    """What the shell's script asked for (``instruction``: ``bash_complete`` and so on), on
    stdout; the exit code. Nothing reaches stderr, which the shell would print over the
    command line: log records, warnings and any failure are dropped (no items, exit 0)."""
    import io
    import logging
    import warnings
    from contextlib import redirect_stderr

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    with redirect_stderr(io.StringIO()):
        try:
            from click.shell_completion import shell_complete

            return shell_complete(cli, {}, PROG, var, instruction)
        except (Exception, KeyboardInterrupt):
            return 0


@click.command()
@click.argument("shell", metavar="SHELL", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish). Install it with, e.g.,
    vmkeep completion bash > /etc/bash_completion.d/vmkeep (README: Shell completion)."""
    from click.shell_completion import get_completion_class

    from vmkeep.cli.main import COMPLETE_VAR

    script = get_completion_class(shell)
    assert script is not None  # every name of SHELLS is one of click's
    root = click.get_current_context().find_root().command
    click.echo(script(root, {}, PROG, COMPLETE_VAR).source())


# the target datastore of backup and group backup
datastore_option = click.option(
    "--datastore",
    "-d",
    required=True,
    help="Target datastore (name or id).",
    shell_complete=datastores,
)
