"""``vmkeep vm ...``: inventory, backup config, quiesce/unquiesce, reset-state; the lifecycle
actions come from ``lifecycle_cmd``, imported only when one is used (or listed by --help): it
pulls in the VMM drivers and libvirt, which the commands here do not need."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.lazy import LazyGroup
from vmkeep.cli.output import (
    act,
    ctx_of,
    emit_json,
    json_option,
    kv,
    read,
    render,
    report_warnings,
    table,
)
from vmkeep.cli.policy_options import NAMES, policy_changes, policy_lines, policy_options
from vmkeep.cli.remote import segment
from vmkeep.model import Warnings

COLUMNS = ("id", "name", "state", "lcm_state", "host")
# lifecycle_cmd.COMMANDS' names (a unit test keeps the two the same)
LIFECYCLE = (
    "create", "deploy", "hold", "release", "poweroff", "reboot", "suspend", "resume", "stop",
    "undeploy", "terminate", "resize", "disk-resize", "migrate", "snapshot", "disk-snapshot",
    "disk", "nic", "recover", "poll", "history",
)  # fmt: skip


@click.group(
    cls=LazyGroup,
    lazy_subcommands={name: "vmkeep.cli.lifecycle_cmd:COMMANDS" for name in LIFECYCLE},
)
def vm() -> None:
    """VMs known to vmkeep."""


@vm.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """List imported VMs with their current state."""
    rows = read(c, "/v1/vms", "vm.inventory:list_vms")
    render(rows, as_json, lambda r: table(r, COLUMNS))


@vm.command("show")
@click.argument("ref", metavar="VM", shell_complete=complete.vms)
@json_option
@click.pass_context
def show_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """Show one VM (name or id): state, disks, backup config."""
    # no VM name holds a "/": the command itself says what is wrong with such a reference
    path = f"/v1/vms/{segment(ref)}" if "/" not in ref else ""
    render(read(c, path, "vm.inventory:show_vm", ref), as_json, _show)


def _show(vm: dict[str, Any]) -> None:
    """``vm show``: the VM's fields, then its effective backup config with each key's source."""
    config, sources = vm.get("backup_config") or {}, vm.get("backup_config_sources")
    kv({k: v for k, v in vm.items() if k not in ("backup_config", "backup_config_sources")})
    click.echo("BACKUP_CONFIG")
    policy_lines(config, sources, indent="  ")


@vm.command("import")
@click.argument("domain", required=False)
@click.option("--all", "all_", is_flag=True, help="Import every libvirt domain.")
@json_option
@click.pass_context
def import_cmd(c: click.Context, domain: str | None, all_: bool, as_json: bool) -> None:
    """Import a libvirt domain (or --all) into the catalog."""
    from vmkeep.engine.vm import inventory

    if bool(domain) == all_:
        raise click.UsageError("give a DOMAIN or --all (not both)")
    if all_:
        rows, warnings = inventory.import_all(ctx_of(c))
    else:
        rows, warnings = [inventory.import_vm(ctx_of(c), domain or "")], Warnings()
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            done = "imported" if r["new"] else "already imported"
            click.echo(f"{done} {r['name']} (id {r['id']}, {r['lcm_state']})")
    report_warnings(warnings)


def _freeze_command(kind: str, doc: str, state: str, done: str) -> None:
    """``vm quiesce|unquiesce VM``: the action, then ``VM: STATE (N file systems DONE)``."""

    def cmd(c: click.Context, ref: str, as_json: bool) -> None:
        res, _ = act(c, kind, {"vm": ref}, bar=False)
        human = f"{{vm}}: {state} ({{filesystems}} file systems {done})"
        render(res, as_json, lambda r: click.echo(human.format(**r)))

    cmd.__doc__ = doc
    vm.command(kind)(
        click.argument("ref", metavar="VM", shell_complete=complete.vms)(
            json_option(click.pass_context(cmd))
        )
    )


_freeze_command("quiesce", "Freeze the guest file systems (RUNNING -> QUIESCED).", "QUIESCED",
                "frozen")  # fmt: skip
_freeze_command("unquiesce", "Thaw the guest file systems (QUIESCED -> RUNNING).", "RUNNING",
                "thawed")  # fmt: skip


@vm.command("reset-state")
@click.argument("ref", metavar="VM", shell_complete=complete.vms)
@json_option
@click.pass_context
def reset_state_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """Admin: thaw/resume the guest and take the state from libvirt (clears ERROR)."""
    render(act(c, "reset-state", {"vm": ref}, bar=False)[0], as_json, kv)


@vm.command("config")
@click.argument("ref", metavar="VM", shell_complete=complete.vms)
@policy_options
@click.option("--pool", help="Put the VM in this pool (see 'vmkeep pool list').",
              shell_complete=complete.pools)  # fmt: skip
@click.option("--no-pool", is_flag=True, help="Take the VM out of its pool.")
@json_option
@click.pass_context
def config_cmd(
    c: click.Context, ref: str, pool: str | None, no_pool: bool, as_json: bool, **opts: Any
) -> None:
    """Set the VM's BACKUP_CONFIG keys and its pool. The effective config (the VM's keys over
    its pool's over [backup] of the config file) is printed, with each key's source."""
    from vmkeep.engine.vm import inventory

    changes = policy_changes(opts)
    if pool is not None and no_pool:
        raise click.UsageError("give --pool POOL or --no-pool, not both")
    if pool is not None or no_pool:
        changes["pool"] = pool  # None: out of its pool
    if not changes:
        options = ", ".join(NAMES)
        raise click.UsageError(f"give at least one of {options}, --pool, --no-pool")
    res = inventory.configure(ctx_of(c), ref, changes)
    out = {k: res[k] for k in ("name", "pool", "backup_config", "backup_config_sources")}

    def human(r: dict[str, Any]) -> None:
        click.echo(f"VM {r['name']}, pool {r['pool'] or '(none)'}")
        policy_lines(r["backup_config"], r["backup_config_sources"], indent="  ")

    render(out, as_json, human)
