"""Rendering helpers shared by the command modules: JSON or a rich table, warnings, exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from vmkeep.engine.context import Context
from vmkeep.model import Warnings

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_default))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c.upper())
    for r in rows:
        t.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in columns])
    console.print(t)


def render(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        emit_json(data)
    else:
        human(data)


@contextmanager
def transfer_progress(description: str, as_json: bool) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on stderr (only on a terminal, never with --json); yields the
    ``progress(done, total)`` callback the engine calls."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=as_json or not err_console.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield progress


def ctx_of(click_ctx: click.Context) -> Context:
    obj = click_ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj


def report_warnings(warnings: Warnings) -> None:
    """Print warnings on stderr and make the process exit 1 (finished with warnings)."""
    for w in warnings.items:
        err_console.print(f"[yellow]warning:[/yellow] {w}")
    if warnings:
        click.get_current_context().find_root().meta["vmkeep.exit_code"] = 1


def kv(data: dict[str, Any]) -> None:
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        if isinstance(v, (list, dict)):
            v = json.dumps(v, default=_default)
        console.print(f"{k.upper():<{width}}  {v if v is not None else ''}", highlight=False)


def die_usage(message: str) -> None:
    err_console.print(f"vmkeep: error: {message}")
    sys.exit(2)
