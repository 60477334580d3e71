"""Rendering helpers shared by the command modules: JSON or a rich table, warnings, exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

import click

from vmkeep import errors, jsontext
from vmkeep.cli import remote
from vmkeep.cli.lazy import resolve
from vmkeep.model import Warnings
from vmkeep.names import MAX_ID

if TYPE_CHECKING:
    from rich.console import Console

    from vmkeep.engine.core.context import Context


@cache
def _consoles() -> tuple[Console, Console]:
    from rich.console import Console  # ~45 ms: loaded by the first command that prints with it

    return Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)


def console() -> Console:
    """The rich console on stdout, created (and rich imported) on first use."""
    return _consoles()[0]


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
# a catalog id, as the API takes it: the same answer whether the daemon or the command reads it
CATALOG_ID = click.IntRange(1, MAX_ID)


def emit_json(data: Any) -> None:
    """Indented JSON (``jsontext``: orjson writes ``backups list`` with 10,000 increments in
    ~30 ms, the standard library's indented encoder took 1.4 s)."""
    click.echo(jsontext.dumps(data, indent=True).decode())


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """Aligned columns under an upper-case header, as ``virsh list`` or ``kubectl get`` print them:
    easy to read, to ``grep`` and ``awk``, and flat in cost (rich's table layout took 2.3 s for
    1,000 rows)."""
    cells = [[c.upper() for c in columns]]
    cells += [["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(columns))]
    lines = [title] if title else []
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    click.echo("\n".join(lines))


def render(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        emit_json(data)
    else:
        human(data)


@contextmanager
def transfer_progress(description: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on stderr (only on a terminal, never when ``quiet``, e.g. --json);
    yields the ``progress(done, total)`` callback the engine calls. Without a bar rich is not
    loaded."""
    if quiet or not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
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
        console=_consoles()[1],
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield progress


def ctx_of(click_ctx: click.Context) -> Context:
    """The engine context, made on first use (config loaded and checked then): a command that
    the daemon answers (``read``) never loads the config models, the catalog or libvirt."""
    root = click_ctx.find_root()
    if root.obj is None:
        from vmkeep.config import load_config
        from vmkeep.engine.core.context import Context

        root.obj = Context(load_config(root.params.get("config_path")))
    ctx: Context = root.obj
    return ctx


def read(
    click_ctx: click.Context, path: str, engine_call: str, *args: Any, **query: str | None
) -> Any:
    """What a list/show command prints: the daemon's answer to ``GET path?query`` when a daemon
    serves this catalog (``remote.get``; no ``path``: never ask), else ``engine_call``
    (``"module:function"`` of ``vmkeep.engine``, imported only then) called with the engine
    context and ``args`` in this process. Both come as the same JSON values (``jsontext``), so
    the output does not depend on which answered."""
    data = remote.get(click_ctx, path, **query) if path else None
    if data is not None:
        return data
    call = resolve(f"vmkeep.engine.{engine_call}")
    return jsontext.plain(call(ctx_of(click_ctx), *args))


def act(
    click_ctx: click.Context, kind: str, params: dict[str, Any], *, bar: bool
) -> tuple[Any, Warnings]:
    """A long action of the action table (``engine/service/actions.py``) and its warnings.
    When a daemon serves this catalog, it runs the action as its job, followed to its end here
    (Ctrl-C cancels it; the daemon cleans up); else it runs in this process, recorded as the same
    job. ``bar``: a byte progress bar on a terminal. The result comes as the same JSON values
    either way (``jsontext``), so the output does not depend on which ran it. An error that
    carries a result (a drill's evidence) has it in ``.result``."""
    from vmkeep.engine.service import actions

    a = actions.action(kind)
    values = {k: v for k, v in params.items() if v is not None}
    with transfer_progress(f"{kind} {a.target_of(values)}", not bar) as progress:
        # no name holds a "/": the command itself says what is wrong with such a reference
        ask = all("/" not in str(values.get(f, "")) for f in a.path_fields)
        queued = remote.submit(click_ctx, a.path(values, remote.segment), a.body(values),
                               a.method) if ask else None  # fmt: skip
        if queued is not None:  # from here on a Ctrl-C cancels the job
            result, warnings = queued.follow(progress)
            return result, Warnings(warnings)
        p = actions.parse(a, params, options=True)
        ctx = ctx_of(click_ctx)
        from vmkeep.engine.core.trust import LOCAL_ADMIN

        p, host = actions.route(ctx, a, p, LOCAL_ADMIN)
        if host is not None and host != ctx.host:  # another host's VM: its daemon runs it
            from vmkeep.engine.hosts.records import check_daemon

            check_daemon(ctx, host, a.target_of(p))

            job = actions.enqueue(ctx, a, p, LOCAL_ADMIN, origin="cli", runs_on=host)
            click.echo(f"vmkeep: job {job['id']} queued for host {host}'s daemon", err=True)
            result, warnings = remote.QueuedJob(ctx, job).follow(progress)
            return result, Warnings(warnings)
        result, warns = actions.run_here(ctx, a, p, progress)
    return jsontext.plain(result), warns


@contextmanager
def shown_on_failure(as_json: bool, human: Callable[[Any], None]) -> Iterator[None]:
    """Render the result an action's error carries (a drill's evidence) before the error."""
    try:
        yield
    except errors.VmkeepError as err:
        if err.result is not None:
            render(jsontext.plain(err.result), as_json, human)
        raise


def report_warnings(warnings: Warnings) -> None:
    """Print warnings on stderr and make the process exit 1 (finished with warnings)."""
    for w in warnings.items:
        _consoles()[1].print(f"[yellow]warning:[/yellow] {w}")
    if warnings:
        click.get_current_context().find_root().meta["vmkeep.exit_code"] = 1


def kv(data: dict[str, Any]) -> None:
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        if isinstance(v, (list, dict)):
            v = json.dumps(v, default=jsontext.default)
        _consoles()[0].print(f"{k.upper():<{width}}  {v if v is not None else ''}", highlight=False)


def die_usage(message: str) -> None:
    _consoles()[1].print(f"vmkeep: error: {message}")
    sys.exit(2)
