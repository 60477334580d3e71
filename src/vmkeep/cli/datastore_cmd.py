"""``vmkeep datastore ...``: backup datastores (dir today; the driver contract is in datastores/)."""

from __future__ import annotations

import click

from vmkeep.cli.output import ctx_of, json_option, kv, render, table
from vmkeep.engine import datastores


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


@click.group()
def datastore() -> None:
    """Backup datastores."""


@datastore.command("add")
@click.argument("name")
@click.option("--driver", default="dir", show_default=True)
@click.option("--path", help="Folder (dir driver).")
@click.option("--opt", "opts", multiple=True, metavar="K=V", help="Driver option (repeatable).")
@json_option
@click.pass_context
def add_cmd(
    c: click.Context, name: str, driver: str, path: str | None, opts: tuple[str, ...], as_json: bool
) -> None:
    """Add a datastore: vmkeep datastore add NAME --driver dir --path P."""
    options: dict[str, str] = {}
    for o in opts:
        if "=" not in o:
            raise click.BadParameter(f"{o!r} is not K=V", param_hint="--opt")
        k, v = o.split("=", 1)
        options[k] = v
    if path is not None:
        options["path"] = path
    res = datastores.add(ctx_of(c), name, driver, options)
    render(
        res,
        as_json,
        lambda r: click.echo(f"datastore {r['name']} (id {r['id']}, {r['driver']}) added"),
    )


@datastore.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """List datastores with total/free bytes."""
    rows = datastores.list_all(ctx_of(c))
    human = [dict(r, total=_size(r["total_bytes"]), free=_size(r["free_bytes"])) for r in rows]
    render(rows, as_json, lambda _r: table(human, ("id", "name", "driver", "total", "free")))


@datastore.command("show")
@click.argument("ref", metavar="DATASTORE")
@json_option
@click.pass_context
def show_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """Show one datastore."""
    render(datastores.show(ctx_of(c), ref), as_json, kv)
