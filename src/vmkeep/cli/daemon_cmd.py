"""``vmkeep daemon [--host NAME] [--listen HOST:PORT] [--workers N] [--http-workers N]``: the
REST API and the job workers (``--host``: of one host of a shared catalog)."""

from __future__ import annotations

import signal

import click

from vmkeep.cli.output import ctx_of


@click.command()
@click.option(
    "--host",
    "host_name",
    default=None,
    help="The host (vmkeep host list) whose jobs this daemon runs, on its libvirt "
    "(default [cluster] host; none: a catalog without hosts).",
)
@click.option("--listen", default=None, help="HOST:PORT (default [api] listen, 127.0.0.1:8700).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Jobs run at once.")
@click.option(
    "--http-workers",
    type=click.IntRange(1, 32),
    default=None,
    help="Processes serving the API (default [api] http_workers, 1); the daemon's own process "
    "keeps the job workers, monitor and scheduler.",
)
@click.option(
    "--clock",
    default=None,
    hidden=True,  # for tests (CONTRIBUTING.md)
    help="The scheduler's clock: START,SPEED[,SINCE] (ISO time it reads at Unix time SINCE, "
    "clock seconds per real second).",
)
@click.pass_context
def daemon(
    c: click.Context,
    host_name: str | None,
    listen: str | None,
    workers: int | None,
    http_workers: int | None,
    clock: str | None,
) -> None:
    """Run the vmkeep service in the foreground (API under /v1, job workers, the scheduler of
    backup jobs)."""
    from vmkeep.api.daemon import serve
    from vmkeep.engine.service.scheduler import parse_clock

    fast = parse_clock(clock) if clock else None

    # uvicorn handles SIGTERM/SIGINT during serve() and re-raises them when it has shut down; by
    # then the daemon has stopped cleanly, so the re-raised signal must not turn into exit 130.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: None)
    config = ctx_of(c).config
    serve(config, listen, workers, clock=fast, http_workers=http_workers, host_name=host_name)
