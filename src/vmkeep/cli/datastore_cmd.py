"""``vmkeep datastore ...``: backup datastores (dir, restic, rsync; the contract is in datastores/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import act, ctx_of, json_option, kv, render, table
from vmkeep.engine.core import stores
from vmkeep.engine.points import copy, delete


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
    res = stores.add(ctx_of(c), name, driver, options)

    def human(r: dict[str, Any]) -> None:
        for key in r.get("host_keys_learned", []):
            click.echo(f"host key learned (check it with the host's admin): {key}")
        click.echo(f"datastore {r['name']} (id {r['id']}, {r['driver']}) added")

    render(res, as_json, human)


@datastore.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """List datastores with total/free bytes."""
    rows = stores.list_all(ctx_of(c))
    human = [dict(r, total=_size(r["total_bytes"]), free=_size(r["free_bytes"])) for r in rows]
    render(rows, as_json, lambda _r: table(human, ("id", "name", "driver", "total", "free")))


@datastore.command("show")
@click.argument("ref", metavar="DATASTORE", shell_complete=complete.datastores)
@json_option
@click.pass_context
def show_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """Show one datastore."""
    render(stores.show(ctx_of(c), ref), as_json, kv)


@datastore.command("remove")
@click.argument("ref", metavar="DATASTORE", shell_complete=complete.datastores)
@click.option(
    "--force",
    is_flag=True,
    help="Forget its backups too, protected points included (their files stay there).",
)
@json_option
@click.pass_context
def remove_cmd(c: click.Context, ref: str, force: bool, as_json: bool) -> None:
    """Remove a datastore from the catalog (refused while it holds backups, unless --force)."""
    res = delete.remove_datastore(ctx_of(c), ref, force)
    render(
        res,
        as_json,
        lambda r: click.echo(
            f"datastore {r['datastore']} removed"
            + (f"; forgot backups {r['forgotten_backups']}" if r["forgotten_backups"] else "")
        ),
    )


@datastore.command("scan")
@click.argument("ref", metavar="DATASTORE", shell_complete=complete.datastores)
@click.option("--import", "do_import", is_flag=True, help="Add unknown chains to the catalog.")
@json_option
@click.pass_context
def scan_cmd(c: click.Context, ref: str, do_import: bool, as_json: bool) -> None:
    """List the chains stored in a datastore; --import brings unknown ones into the catalog."""
    rows = act(c, "scan", {"datastore": ref, "import": do_import}, bar=False)[0]["chains"]
    human = [
        dict(
            r,
            vm=r.get("vm", "-"),
            points=",".join(map(str, r.get("increments", []))) or "-",
            imported=r["imported"] or "-",
            error=r.get("error") or (f"refused: {r['refused']}" if r.get("refused") else ""),
        )
        for r in rows
    ]
    render(
        rows,
        as_json,
        lambda _r: table(human, ("chain", "vm", "known", "points", "imported", "error")),
    )


@datastore.command("download")
@click.argument("url")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@json_option
@click.pass_context
def download_cmd(c: click.Context, url: str, dest: Path, force: bool, as_json: bool) -> None:
    """Download one stored file by the URL 'backups show' prints (<driver>://<ds>/<chain>/<file>)."""
    res = copy.download(ctx_of(c), url, dest, force)
    render(res, as_json, lambda r: click.echo(f"{r['url']} -> {r['path']} ({r['size']} bytes)"))
