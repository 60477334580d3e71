"""``vmkeep pool ...``: pools of VMs sharing a backup policy (``engine/vm/policy.py``;
docs/policies.md). A VM's own keys go over its pool's, which go over ``[backup]`` of the config."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import ctx_of, json_option, read, render, table
from vmkeep.cli.policy_options import NAMES, policy_changes, policy_lines, policy_options
from vmkeep.cli.remote import segment


@click.group()
def pool() -> None:
    """Pools of VMs sharing a backup policy (VM -> pool -> [backup] of the config)."""


def _show(p: dict[str, Any]) -> None:
    click.echo(f"pool {p['name']} (id {p['id']})")
    click.echo("  effective backup config (source):")
    policy_lines(p["effective"], p["sources"], indent="    ")
    click.echo(f"  vms:         {', '.join(p['vms']) or '(none)'}")
    click.echo(f"  backup jobs: {', '.join(p['backup_jobs']) or '(none)'}")


def _keys(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={'all' if v is None else v}" for k, v in config.items())


def _changes(opts: dict[str, Any], required: bool) -> dict[str, Any]:
    changes = policy_changes(opts)
    if required and not changes:
        raise click.UsageError(f"give at least one of {', '.join(NAMES)}")
    return changes


@pool.command("create")
@click.argument("name")
@policy_options
@json_option
@click.pass_context
def create_cmd(c: click.Context, name: str, as_json: bool, **opts: Any) -> None:
    """Create pool NAME with these backup keys (the others come from [backup])."""
    from vmkeep.engine.vm import policy

    render(policy.create_pool(ctx_of(c), name, _changes(opts, False)), as_json, _show)


@pool.command("set")
@click.argument("name", metavar="POOL", shell_complete=complete.pools)
@policy_options
@json_option
@click.pass_context
def set_cmd(c: click.Context, name: str, as_json: bool, **opts: Any) -> None:
    """Set backup keys of a pool ('unset' removes one); its VMs inherit them."""
    from vmkeep.engine.vm import policy

    render(policy.set_pool(ctx_of(c), name, _changes(opts, True)), as_json, _show)


@pool.command("show")
@click.argument("name", metavar="POOL", shell_complete=complete.pools)
@json_option
@click.pass_context
def show_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """Show a pool: its effective backup config and sources, its VMs and backup jobs."""
    # no pool name holds a "/": the command itself says what is wrong with such a reference
    path = f"/v1/pools/{segment(name)}" if "/" not in name else ""
    render(read(c, path, "vm.policy:show_pool", name), as_json, _show)


@pool.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """List pools with their own backup keys and how many VMs each has."""
    rows = read(c, "/v1/pools", "vm.policy:list_pools")

    def human(rows: list[dict[str, Any]]) -> None:
        flat = [
            r
            | {
                "vms": len(r["vms"]),
                "keys": _keys(r["backup_config"]),
                "backup_jobs": ", ".join(r["backup_jobs"]),
            }  # fmt: skip
            for r in rows
        ]
        table(flat, ("id", "name", "vms", "keys", "backup_jobs"))

    render(rows, as_json, human)


@pool.command("delete")
@click.argument("name", metavar="POOL", shell_complete=complete.pools)
@json_option
@click.pass_context
def delete_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """Delete a pool no VM and no backup job uses."""
    from vmkeep.engine.vm import policy

    render(
        policy.delete_pool(ctx_of(c), name),
        as_json,
        lambda r: click.echo(f"pool {r['name']} deleted"),
    )
