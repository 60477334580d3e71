"""``vmkeep audit list [--limit N] [--json]``: who did what through the API."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli.output import json_option, read, render, table

COLUMNS = ("at", "actor", "role", "method", "path", "status", "client")


def _table(rows: list[dict[str, Any]]) -> None:
    table(rows, COLUMNS)


@click.group()
def audit() -> None:
    """The API's audit log: every mutating request and every failed login."""


@audit.command("list")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@json_option
@click.pass_context
def list_cmd(c: click.Context, limit: int, as_json: bool) -> None:
    """Newest first: time, actor (token name, @local, - when no token was accepted), role,
    method, path, status and client address. Never a request's body or headers."""
    rows = read(c, "/v1/audit", "service.audit:list_entries", limit, limit=str(limit))
    render(rows, as_json, _table)
