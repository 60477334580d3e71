"""``vmkeep jobs list [--state S] | show ID | cancel ID``."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import CATALOG_ID, ctx_of, json_option, kv, read, render
from vmkeep.cli.remote import segment
from vmkeep.model import JobState


def _table(rows: list[dict[str, Any]]) -> None:
    for j in rows:
        done, total = j["done_bytes"], j["total_bytes"]
        pct = f"{100 * done / total:3.0f}%" if total else "   -"
        err = f"  {j['error']['message']}" if j["error"] else ""
        if j["state"] == JobState.QUEUED:  # why it has not started (engine/core/limits.py)
            err = f"  waiting: {j.get('waiting') or 'for a free worker'}"
        on = f"  @{j['runs_on']}" if j.get("runs_on") else ""  # only that host's daemon runs it
        click.echo(
            f"{j['id']:>5}  {j['state']:<9} {pct}  {j['kind']:<12} {j['target']:<24} "
            f"{j['origin']}/{j['who']}{on}{err}"
        )


@click.group()
def jobs() -> None:
    """Long actions (backup, restore, verify, quiesce) and their state."""


@jobs.command("list")
@click.option(
    "--state",
    type=click.Choice([s.value for s in JobState], case_sensitive=False),
)
@json_option
@click.pass_context
def list_cmd(c: click.Context, state: str | None, as_json: bool) -> None:
    """Newest first."""
    rows = read(c, "/v1/jobs", "core.jobs:list_jobs", state, state=state, limit="200")
    render(rows, as_json, _table)  # the newest 200 (list_jobs' default)


@jobs.command("show")
@click.argument("job_id", type=CATALOG_ID, shell_complete=complete.jobs)
@json_option
@click.pass_context
def show_cmd(c: click.Context, job_id: int, as_json: bool) -> None:
    render(read(c, f"/v1/jobs/{segment(job_id)}", "core.jobs:get", job_id), as_json, kv)


@jobs.command("cancel")
@click.argument("job_id", type=int, shell_complete=complete.jobs)
@json_option
@click.pass_context
def cancel_cmd(c: click.Context, job_id: int, as_json: bool) -> None:
    """A queued job is cancelled at once; a running one stops and cleans up."""
    from vmkeep.engine.core.jobs import cancel

    render(cancel(ctx_of(c), job_id), as_json, kv)
