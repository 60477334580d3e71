"""``vmkeep group ...``: ordered groups of VMs, group-consistent backup, group restore, group
drills, ordered start/stop."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import (
    act,
    console,
    ctx_of,
    emit_json,
    json_option,
    render,
    report_warnings,
    shown_on_failure,
    table,
)
from vmkeep.engine.groups import drill as group_drill
from vmkeep.engine.groups import manage
from vmkeep.errors import InvalidValue


@click.group()
def group() -> None:
    """Groups of VMs backed up as one consistent cut, started and stopped in order."""


def _show(g: dict[str, Any]) -> None:
    click.echo(f"group {g['name']} (id {g['id']})")
    click.echo(f"  start/freeze order: {' -> '.join(g['start_order']) or '(no members)'}")
    click.echo(f"  stop order:         {' -> '.join(g['stop_order']) or '(no members)'}")
    if g.get("backups"):
        _backups(g["backups"])


def _backups(rows: list[dict[str, Any]]) -> None:
    flat = [
        r
        | {
            "members": ", ".join(f"{m['vm']}:{m['backup']}/{m['increment']}" for m in r["members"]),
            "freeze_window_ms": None
            if r["freeze_window_ms"] is None
            else round(r["freeze_window_ms"], 1),
            "last_drill": _drill_cell(r.get("last_drill")),
        }
        for r in rows
    ]
    table(
        flat,
        (
            "id",
            "status",
            "datastore",
            "freeze_window_ms",
            "members",
            "failed_vm",
            "last_drill",
            "created",
        ),
    )


def _drill_cell(d: dict[str, Any] | None) -> str | None:
    return None if d is None else f"{d['result']} (drill {d['group_drill']}, {d['finished']})"


@group.command("create")
@click.argument("name")
@click.argument("vms", nargs=-1, required=True, metavar="VM...", shell_complete=complete.vms)
@click.option(
    "--stop-order",
    default=None,
    help="Comma-separated stop order (default: the reverse of the start order).",
)
@json_option
@click.pass_context
def create_cmd(
    c: click.Context, name: str, vms: tuple[str, ...], stop_order: str | None, as_json: bool
) -> None:
    """Create group NAME; the VMs' order is the freeze and start order."""
    stop = [v.strip() for v in stop_order.split(",")] if stop_order else None
    render(manage.create_group(ctx_of(c), name, list(vms), stop), as_json, _show)


@group.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """List groups with their members and last group backup."""
    rows = manage.list_groups(ctx_of(c))

    def human(rows: list[dict[str, Any]]) -> None:
        table(
            [
                r
                | {
                    "members": " -> ".join(r["members"]),
                    "last_backup": (
                        f"{r['last_backup']['id']} {r['last_backup']['status']}"
                        if r["last_backup"]
                        else ""
                    ),
                }
                for r in rows
            ],
            ("id", "name", "members", "last_backup"),
        )

    render(rows, as_json, human)


@group.command("show")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@json_option
@click.pass_context
def show_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """Show a group: orders, and its group backups with freeze windows."""
    render(manage.show_group(ctx_of(c), ref), as_json, _show)


@group.command("add")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@click.argument("vms", nargs=-1, required=True, metavar="VM...", shell_complete=complete.vms)
@click.option("--position", type=int, default=None, help="Insert at this 0-based position.")
@json_option
@click.pass_context
def add_cmd(
    c: click.Context, ref: str, vms: tuple[str, ...], position: int | None, as_json: bool
) -> None:
    """Add VMs to a group (at the end of the order, or at --position)."""
    render(manage.add_members(ctx_of(c), ref, list(vms), position), as_json, _show)


@group.command("remove")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@click.argument("vms", nargs=-1, required=True, metavar="VM...", shell_complete=complete.vms)
@json_option
@click.pass_context
def remove_cmd(c: click.Context, ref: str, vms: tuple[str, ...], as_json: bool) -> None:
    """Remove VMs from a group (their backups stay)."""
    render(manage.remove_members(ctx_of(c), ref, list(vms)), as_json, _show)


@group.command("delete")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@json_option
@click.pass_context
def delete_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """Delete a group and its group-backup records (member backups stay)."""
    render(
        manage.delete_group(ctx_of(c), ref),
        as_json,
        lambda r: click.echo(f"deleted group {r['name']}"),
    )


@group.command("backup")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@complete.datastore_option
@click.option(
    "--parallel-freeze",
    is_flag=True,
    help="Freeze and thaw all members at once (no order constraint; shorter window).",
)
@click.option("--reset", is_flag=True, help="Start new full chains for every member.")
@json_option
@click.pass_context
def backup_cmd(
    c: click.Context, ref: str, datastore: str, parallel_freeze: bool, reset: bool, as_json: bool
) -> None:
    """Back up every member at one consistent cut: freeze in order, begin all, thaw in reverse.
    A running daemon on this catalog runs it as a job (Ctrl-C cancels it)."""

    params = {"group": ref, "datastore": datastore, "parallel_freeze": parallel_freeze}
    r, warnings = act(c, "group-backup", params | {"reset": reset}, bar=not as_json)
    if as_json:
        emit_json(r)
    else:
        w = r["freeze_window_ms"]
        window = "nothing frozen (all members off)" if w is None else f"freeze window {w:.1f} ms"
        click.echo(
            f"group backup {r['id']} of {r['group']}: {r['status']}, {window}, {r['seconds']} s"
        )
        for m in r["members"]:
            frozen = "" if m["freeze_ms"] is None else f", frozen {m['freeze_ms']:.1f} ms"
            click.echo(
                f"  {m['vm']}: backup {m['backup']} increment {m['increment']}, "
                f"{m['consistency']}{frozen}"
            )
    report_warnings(warnings)


@group.command("backups")
@click.argument("ref", metavar="[GROUP]", required=False, shell_complete=complete.groups)
@json_option
@click.pass_context
def backups_cmd(c: click.Context, ref: str | None, as_json: bool) -> None:
    """List group backups (restore points), of one group or all."""
    render(manage.list_group_backups(ctx_of(c), ref), as_json, _backups)


@group.command("restore")
@click.argument("gb_id", type=int, metavar="ID")
@click.option("--suffix", default=None, help="Appended to each member's name (default -g<ID>).")
@click.option("--start", is_flag=True, help="Start the restored VMs.")
@json_option
@click.pass_context
def restore_cmd(
    c: click.Context, gb_id: int, suffix: str | None, start: bool, as_json: bool
) -> None:
    """Restore every member of group backup ID as new VMs (name + suffix)."""
    params = {"group_backup": gb_id, "suffix": suffix, "start": start}
    res, warnings = act(c, "group-restore", params, bar=False)

    def human(r: dict[str, Any]) -> None:
        for m in r["members"]:
            click.echo(
                f"{m['from']} -> {m['vm']} (backup {m['backup']} increment {m['increment']})"
            )

    render(res, as_json, human)
    report_warnings(warnings)


def _actions(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        click.echo(f"{r['vm']}: {r['action']}")


@group.command("start")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@click.option(
    "--no-wait-agent",
    is_flag=True,
    help="Do not wait for each member's guest agent before starting the next.",
)
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds per member.")
@json_option
@click.pass_context
def start_cmd(
    c: click.Context, ref: str, no_wait_agent: bool, timeout: float, as_json: bool
) -> None:
    """Start members in start order, each up before the next."""
    params = {"group": ref, "wait_agent": not no_wait_agent, "timeout": timeout}
    res, warnings = act(c, "group-start", params, bar=False)
    render(res["members"], as_json, _actions)
    report_warnings(warnings)


@group.command("stop")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@click.option("--force", is_flag=True, help="Destroy a member that is not off after --timeout.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per member.")
@json_option
@click.pass_context
def stop_cmd(c: click.Context, ref: str, force: bool, timeout: float, as_json: bool) -> None:
    """Shut members down in stop order, each off before the next."""
    params = {"group": ref, "force": force, "timeout": timeout}
    res, warnings = act(c, "group-stop", params, bar=False)
    render(res["members"], as_json, _actions)
    report_warnings(warnings)


@group.command("recover")
@click.argument("ref", metavar="GROUP", shell_complete=complete.groups)
@click.option(
    "--redeploy",
    is_flag=True,
    required=True,
    help="Bring the members of failed hosts up on another host (start order).",
)
@click.option(
    "--host",
    default=None,
    metavar="HOST",
    help="On this host (default: placement chooses one for all of them).",
)
@click.option(
    "--from-backup",
    is_flag=True,
    help="From each member's newest restore point instead of its disks.",
)
@json_option
@click.pass_context
def recover_cmd(
    c: click.Context, ref: str, redeploy: bool, host: str | None, from_backup: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Redeploy the members on failed hosts on another host, in the group's start order;
    members on working hosts are skipped (with the reason)."""
    params = {"group": ref, "host": host, "from_backup": from_backup}
    res, warnings = act(c, "group-recover", params, bar=False)

    def human(r: dict[str, Any]) -> None:
        for m in r["members"]:
            where = f" on {m['host']} (from {m['from']}, was on {m['from_host']})"
            click.echo(f"{m['vm']}: {m['action']}" + (where if "host" in m else f": {m['why']}"))

    render(res, as_json, human)
    report_warnings(warnings)


def member_commands(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``MEMBER=CMD`` options -> {member: command}, split at the first ``=``; a member named
    twice is refused."""
    out: dict[str, str] = {}
    for text in values:
        member, sep, command = text.partition("=")
        member = member.strip()
        if not sep or not member or not command.strip():
            raise InvalidValue(option, text, "write MEMBER=CMD, e.g. app='nc -w 5 10.0.0.2 5432'")
        if member in out:
            raise InvalidValue(option, text, f"{member} has a probe already; give one per member")
        out[member] = command
    return out


@group.command("drill")
@click.argument("gb_id", type=int, metavar="GROUP_BACKUP_ID")
@click.option(
    "--probe",
    "probes",
    multiple=True,
    metavar="MEMBER=CMD",
    help="Run CMD in member MEMBER's drill VM; must exit 0 (repeatable, one per member).",
)
@click.option(
    "--cross-probe",
    default=None,
    metavar="MEMBER=CMD",
    help="Run CMD in MEMBER after every member is up; must exit 0 (e.g. app reaches db's port).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds each member's guest agent has to answer after its start.",
)
@json_option
@click.pass_context
def drill_cmd(
    c: click.Context,
    gb_id: int,
    probes: tuple[str, ...],
    cross_probe: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Boot every member of group backup GROUP_BACKUP_ID together, in start order, on an isolated
    network of its own, and check them: each member's drill steps (checksums, fsck, agent,
    probe), then the cross-member probe. Exit 0 on PASS, 26 on FAIL; the result is recorded
    (group backups). A running daemon on this catalog runs it as a job."""
    cross = member_commands((cross_probe,), "--cross-probe") if cross_probe else {}
    params = {
        "group_backup": gb_id,
        "probes": member_commands(probes, "--probe"),
        "cross_probe": next(({"member": m, "command": x} for m, x in cross.items()), None),
        "timeout": timeout,
    }

    def human(r: dict[str, Any]) -> None:
        for chk in r["checks"]:
            mark = "ok  " if chk["ok"] else "FAIL"
            who = f"{chk['member']}: " if chk["member"] else ""
            console().print(
                f"{mark} {who}{chk['step']}: {chk['detail']}", markup=False, highlight=False
            )
        console().print(
            f"group drill {r['group_drill']} of group backup {r['group_backup']} "
            f"({r['group']}: {' -> '.join(r['members'])}): {r['result']}",
            markup=False,
            highlight=False,
        )

    with shown_on_failure(as_json, human):  # FAIL: the evidence, then exit 26 (a FAILED job)
        res, warnings = act(c, "group-drill", params, bar=False)
    render(res, as_json, human)
    report_warnings(warnings)


@group.command("drill-clean")
@json_option
@click.pass_context
def drill_clean_cmd(c: click.Context, as_json: bool) -> None:
    """Remove the drill VMs and networks that killed group drills left (recognised by their mark;
    a running drill's are kept). Every group drill does this first, too."""
    removed = group_drill.clear_leftovers(ctx_of(c))
    render(
        {"removed": removed},
        as_json,
        lambda r: click.echo("\n".join(f"removed {n}" for n in r["removed"]) or "nothing left"),
    )
