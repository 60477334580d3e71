"""``vmkeep backups list|show|verify|delete|copy|protect|unprotect|note``.

Engine modules are imported inside the commands that use them: ``backups list`` is the no-op
command every script runs, and its start-up is most of its time (a running daemon answers it
without this process loading the catalog at all: ``output.read``).
"""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import (
    CATALOG_ID,
    act,
    console,
    ctx_of,
    json_option,
    kv,
    read,
    render,
    table,
)
from vmkeep.cli.remote import segment


@click.group()
def backups() -> None:
    """Backups in the catalog."""


def _row(b: dict[str, Any]) -> dict[str, Any]:
    valid = [i for i in b["increments"] if i["status"] == "VALID"]
    return dict(
        b, points=",".join(str(i["id"]) for i in valid) or "-", size=sum(i["size"] for i in valid)
    )


@backups.command("list")
@click.option(
    "--vm", "vm_ref", default=None, help="Only this VM's backups.", shell_complete=complete.vms
)
@json_option
@click.pass_context
def list_cmd(c: click.Context, vm_ref: str | None, as_json: bool) -> None:
    """List backups (one row per chain)."""
    rows = read(c, "/v1/backups", "points.listing:list_backups", vm_ref, vm=vm_ref)
    render(
        rows,
        as_json,
        lambda r: table(
            [_row(b) for b in r], ("id", "vm", "datastore", "mode", "status", "points", "size")
        ),
    )


def _point_row(i: dict[str, Any]) -> dict[str, Any]:
    """A point's row in ``backups show``: P marks a protected one (by whom), its last verify
    and last drill (result, when, how long to a running copy), the note's first line."""
    note = (i.get("note") or "").splitlines()
    drill = i.get("last_drill")
    took = f" {drill['duration_s']}s" if drill and drill.get("duration_s") is not None else ""
    verified = i.get("verified_at")
    return dict(
        i,
        P=f"P ({i['protected_by']})" if i.get("protected") else "",
        files=len(i["files"]),
        note=note[0] + (" ..." if len(note) > 1 else "") if note else "",
        verified=f"{i['verify_result']} {str(verified)[:19]}" if verified else "",
        drill=f"{drill['result']} {str(drill['at'])[:19]}{took}" if drill else "",
    )


@backups.command("show")
@click.argument("backup_id", type=CATALOG_ID, shell_complete=complete.backups)
@json_option
@click.pass_context
def show_cmd(c: click.Context, backup_id: int, as_json: bool) -> None:
    """Show one backup chain and its increments."""
    data = read(c, f"/v1/backups/{segment(backup_id)}", "points.listing:show_with_sizes", backup_id)

    def human(d: dict[str, Any]) -> None:
        kv({k: v for k, v in d.items() if k != "increments"})
        table(
            [_point_row(i) for i in d["increments"]],
            ("id", "P", "parent", "status", "consistency", "size", "restored_size", "finished",
             "verified", "drill", "note"),
            title="increments (P: protected)",
        )  # fmt: skip

    render(data, as_json, human)


@backups.command("verify")
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@json_option
@click.pass_context
def verify_cmd(c: click.Context, backup_id: int, as_json: bool) -> None:
    """Check every stored file against its checksum (exit 17 on a mismatch)."""
    res, _ = act(c, "verify", {"backup": backup_id}, bar=False)
    render(
        res,
        as_json,
        lambda r: console().print(
            f"backup {r['backup']}: {len(r['files'])} files OK", highlight=False
        ),
    )


@backups.command("delete")
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.option("--increment", type=int, default=None, help="Only this (newest) increment.")
@click.option(
    "--force", is_flag=True, help="Admin: delete protected points too (see 'backups unprotect')."
)
@json_option
@click.pass_context
def delete_cmd(
    c: click.Context, backup_id: int, increment: int | None, force: bool, as_json: bool
) -> None:
    """Delete a whole chain, or its newest increment (never one others are built on). A chain
    with a protected point is refused unless --force."""
    params = {"backup": backup_id, "increment": increment} | ({"force": True} if force else {})
    res, _ = act(c, "delete", params, bar=False)
    what = f"increment {increment} of backup" if increment is not None else "backup"
    render(
        res,
        as_json,
        lambda r: console().print(
            f"{what} {backup_id} deleted: {len(r['deleted_files'])} files, "
            f"{r['freed_bytes']} bytes freed",
            highlight=False,
        ),
    )


@backups.command("copy")
@click.argument("backup_id", type=int, shell_complete=complete.backups)
@click.option(
    "--to",
    "to_ref",
    required=True,
    metavar="DATASTORE",
    help="Second datastore.",
    shell_complete=complete.datastores,
)
@json_option
@click.pass_context
def copy_cmd(c: click.Context, backup_id: int, to_ref: str, as_json: bool) -> None:
    """Copy a chain to a second datastore and verify it there (again later: only what is new)."""
    res, _ = act(c, "copy", {"backup": backup_id, "to": to_ref}, bar=False)
    render(
        res,
        as_json,
        lambda r: console().print(
            f"backup {r['backup']} copied to {r['datastore']} as backup {r['copy']}: "
            f"increments {r['copied_increments'] or 'none (up to date)'}, verified",
            highlight=False,
        ),
    )


# --- protection and notes: quick catalog writes (as 'vm config'), not actions -------------------
_INCREMENT = click.option(
    "--increment",
    type=click.IntRange(0),
    default=None,
    help="This increment (default: the newest VALID one).",
)


def _point_done(res: dict[str, Any], as_json: bool, what: str) -> None:
    render(
        res,
        as_json,
        lambda r: console().print(
            f"increment {r['increment']} of backup {r['backup']} {what}", highlight=False
        ),
    )


@backups.command("protect")
@click.argument("backup_id", type=CATALOG_ID, shell_complete=complete.backups)
@_INCREMENT
@json_option
@click.pass_context
def protect_cmd(c: click.Context, backup_id: int, increment: int | None, as_json: bool) -> None:
    """Protect a point: retention never prunes it (nor the points it is built on) and
    'backups delete' refuses it unless an admin adds --force."""
    from vmkeep.engine.core.jobs import local_user
    from vmkeep.engine.points import protect

    res = protect.protect(ctx_of(c), backup_id, increment, actor_name=local_user())
    _point_done(res, as_json, f"protected (by {res['protected_by']})")


@backups.command("unprotect")
@click.argument("backup_id", type=CATALOG_ID, shell_complete=complete.backups)
@_INCREMENT
@json_option
@click.pass_context
def unprotect_cmd(c: click.Context, backup_id: int, increment: int | None, as_json: bool) -> None:
    """Lift a point's protection: retention and delete may remove it again."""
    from vmkeep.engine.points import protect

    _point_done(protect.unprotect(ctx_of(c), backup_id, increment), as_json, "unprotected")


@backups.command("note")
@click.argument("backup_id", type=CATALOG_ID, shell_complete=complete.backups)
@click.argument("text")
@_INCREMENT
@json_option
@click.pass_context
def note_cmd(
    c: click.Context, backup_id: int, text: str, increment: int | None, as_json: bool
) -> None:
    """Set a point's note (at most 1024 characters); an empty TEXT ("") removes it."""
    from vmkeep.engine.points import protect

    res = protect.set_note(ctx_of(c), backup_id, increment, text)
    _point_done(res, as_json, "note set" if res["note"] else "note removed")
