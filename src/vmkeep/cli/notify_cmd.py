"""``vmkeep notify test [--json] | list [--state S] [--json]``: the notifications of finished
jobs (``[notify]``; docs/notifications.md). Targets are shown redacted, never their URLs."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli.output import ctx_of, json_option, read, render, shown_on_failure, table

STATES = ("PENDING", "SENT", "FAILED")


@click.group()
def notify() -> None:
    """Reports of finished backups, verifies, drills and copies (webhook, apprise URLs)."""


def _results(data: dict[str, Any]) -> None:
    for r in data["targets"]:
        said = "ok" if r["ok"] else f"FAILED: {r['error']}"
        click.echo(f"{r['target']:<8} {r['to']}  {said}")


@notify.command("test")
@json_option
@click.pass_context
def test_cmd(c: click.Context, as_json: bool) -> None:
    """Send a test notification to every configured target now; exit 30 if one failed."""
    from vmkeep.engine.service.notify import send_test

    with shown_on_failure(as_json, _results):
        render(send_test(ctx_of(c)), as_json, _results)


def _rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no notifications")
        return
    columns = ("id", "job", "target", "to", "state", "attempts", "next_at", "error")
    table(rows, columns)


@notify.command("list")
@click.option("--state", type=click.Choice(STATES, case_sensitive=False))
@json_option
@click.pass_context
def list_cmd(c: click.Context, state: str | None, as_json: bool) -> None:
    """The outbox, newest first: one row per finished job and target."""
    rows = read(c, "/v1/notifications", "service.notify:list_rows", state, state=state)
    render(rows, as_json, _rows)
