"""``vmkeep token create NAME --role viewer|operator|admin | list | revoke NAME``."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli.output import ctx_of, json_option, kv, render
from vmkeep.engine.service import tokens as engine
from vmkeep.model import ROLES


@click.group()
def token() -> None:
    """API bearer tokens (stored hashed; the secret is shown once)."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True)
@json_option
@click.pass_context
def create_cmd(c: click.Context, name: str, role: str, as_json: bool) -> None:
    """Create a token and print its secret once: keep it, it cannot be shown again."""
    render(engine.create(ctx_of(c), name, role), as_json, kv)


@token.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    def table(rows: list[dict[str, Any]]) -> None:
        for t in rows:
            click.echo(f"{t['name']:<24} {t['role']:<9} created {t['created']}")

    render(engine.list_tokens(ctx_of(c)), as_json, table)


@token.command("revoke")
@click.argument("name")
@json_option
@click.pass_context
def revoke_cmd(c: click.Context, name: str, as_json: bool) -> None:
    render(engine.revoke(ctx_of(c), name), as_json, kv)
