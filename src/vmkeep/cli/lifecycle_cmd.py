"""``vmkeep vm ACTION VM ...``: the lifecycle actions (engine/lifecycle/), ``vm poll`` and
``vm history``. Each action is an entry of the action table: the daemon's job when a daemon
serves the catalog, else run here and recorded as a job; always in the VM's history."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import act, ctx_of, json_option, kv, render, report_warnings, table

VM = click.argument("ref", metavar="VM", shell_complete=complete.vms)
HARD = click.option("--hard", is_flag=True, help="Do not ask the guest: pull the plug / reset.")
HOST = click.option("--host", default=None, metavar="HOST",
                    help="Pin it to this host (refused, with the reason, when it cannot take "
                         "the VM); default: placement chooses (docs/hosts.md).")  # fmt: skip


def _run(c: click.Context, ref: str, action: str, opts: dict[str, Any], as_json: bool) -> None:
    given = {k: v for k, v in opts.items() if v is not None}
    if isinstance(given.get("source"), str):  # the daemon's working directory is not this one
        given["source"] = os.path.abspath(given["source"])
    res, warnings = act(c, f"vm-{action}", {"vm": ref, **given}, bar=action == "migrate")
    render(res, as_json, kv)
    report_warnings(warnings)


Param = Callable[[Any], Any]  # a click.option or click.argument decorator


def _action(name: str, doc: str, params: tuple[Param, ...], action: str) -> click.Command:
    """``NAME VM [PARAMS] [--json]``: runs lifecycle ``action`` with the params as its options."""

    def cmd(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
        _run(c, ref, action, opts, as_json)

    cmd.__doc__ = doc
    f: Any = json_option(click.pass_context(cmd))
    for param in reversed(params):
        f = param(f)
    return click.command(name)(VM(f))


SNAPSHOT = click.argument("snapshot", metavar="SNAPSHOT")  # a name, or an id (all digits)
NAME = click.argument("name", metavar="[NAME]", required=False)
DISK = click.option("--disk", default=None, help="Disk target (default: the first).")

# vmkeep vm NAME VM ...: runs action NAME
ACTIONS: list[tuple[str, str, tuple[Param, ...]]] = [
    ("deploy", "Define and boot a PENDING or UNDEPLOYED VM (with hosts: on the host placement "
               "chooses, or --host).", (HOST,)),
    ("hold", "Keep a PENDING VM from being deployed.", ()),
    ("release", "Let a HOLD VM be deployed (PENDING).", ()),
    ("poweroff", "Shut the guest down (--hard: pull the plug).", (HARD,)),
    ("reboot", "Reboot the guest (--hard: reset).", (HARD,)),
    ("suspend", "Save the guest's memory on the host and stop it (resume brings it back).", ()),
    ("resume", "Bring a SUSPENDED or STOPPED VM back with its memory; boot a POWEROFF one.", ()),
    ("stop", "Save the memory to a state file and take the VM off the host.", ()),
    ("undeploy", "Take the VM off the host, disks kept (--hard: no guest shutdown).", (HARD,)),
    ("terminate", "Destroy the VM and delete its disks (DONE); its backups stay.", (HARD,
        click.option("--keep-disks", is_flag=True, help="Leave the disk images where they are."))),
    ("resize", "Change vCPUs and memory of a POWEROFF or UNDEPLOYED VM (next boot).", (
        click.option("--vcpus", type=click.IntRange(1, 512), default=None),
        click.option("--memory", type=click.IntRange(16, 1 << 24), default=None, metavar="MIB"))),
    ("disk-resize", "Grow a disk (live on a running VM).", (DISK,
        click.option("--size", required=True, help="New size (grow only): 8G, 1024M."))),
    ("migrate", "Move the VM to host HOST, running or powered off, in the state it has. Its "
                "checkpoints follow it (else its next backup is a new full chain, with a warning "
                "saying why).", (
        click.argument("host", metavar="HOST"),
        click.option("--live", is_flag=True,
                     help="A running VM runs on while its memory is copied (else paused)."),
        click.option("--copy-storage", is_flag=True,
                     help="Copy its disks too, to the same paths on HOST (host-local storage)."),
        click.option("--bandwidth", type=click.IntRange(0, 1 << 20), default=None,
                     metavar="MIB", help="Limit the copy to MIB MiB/s (default: no limit)."))),
]  # fmt: skip

# vmkeep vm GROUP SUB VM ...: runs action GROUP-SUB
GROUPS: dict[str, tuple[str, list[tuple[str, str, tuple[Param, ...]]]]] = {
    "snapshot": ("System snapshots: disks and, of a running VM, its memory.", [
        ("create", "Take a system snapshot, named NAME if given (unique per VM).", (NAME,)),
        ("revert", "Go back to a system snapshot (memory too when it has it). SNAPSHOT: its "
                   "name, or its id (all digits).", (SNAPSHOT,)),
        ("delete", "Delete a system snapshot. SNAPSHOT: its name, or its id (all digits).",
            (SNAPSHOT,)),
    ]),
    "disk-snapshot": ("Snapshots of one disk of a powered-off VM (qcow2 internal, no memory).", [
        ("create", "Snapshot one disk, named NAME if given (unique per VM).", (NAME, DISK)),
        ("revert", "Put one disk back to its snapshot. SNAPSHOT: its name, or its id (all "
                   "digits).", (SNAPSHOT,)),
        ("delete", "Delete a disk snapshot. SNAPSHOT: its name, or its id (all digits).",
            (SNAPSHOT,)),
    ]),
    "disk": ("Attach or detach disks (hotplug on a running VM).", [
        ("attach", "Attach a disk.", (
            click.option("--source", default=None, help="An existing image file."),
            click.option("--size", default=None,
                         help="Create a new qcow2 image of this size (4G, 512M)."),
            click.option("--target", default=None,
                         help="Device name in the guest (default: next vdX)."),
            click.option("--format", "format", default=None,
                         help="Image format (default: detected)."))),
        ("detach", "Detach a disk (its image stays).", (
            click.option("--target", required=True, help="Device name in the guest (vdb)."),)),
    ]),
    "nic": ("Attach or detach network interfaces.", [
        ("attach", "Attach a NIC.", (
            click.option("--bridge", default=None,
                         help="Host bridge (default: user-mode networking)."),
            click.option("--mac", default=None,
                         help="MAC address (default: a random 52:54:00:...)."),
            click.option("--model", default=None, help="NIC model (default virtio)."))),
        ("detach", "Detach a NIC.", (
            click.option("--mac", required=True, help="MAC address of the NIC."),)),
    ]),
}  # fmt: skip


def _group(name: str) -> click.Group:
    doc, subs = GROUPS[name]
    group = click.Group(name, help=doc)
    for sub, sub_doc, params in subs:
        group.add_command(_action(sub, sub_doc, params, f"{name}-{sub}"))
    return group


@click.command("create")
@click.option("--xml", "xml_file", required=True, type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="libvirt domain XML of the new VM.")  # fmt: skip
@click.option("--hold", is_flag=True, help="Create it in HOLD (deploy refused until release).")
@HOST
@json_option
@click.pass_context
def create_cmd(
    c: click.Context, xml_file: Path, hold: bool, host: str | None, as_json: bool
) -> None:
    """Create a VM in the catalog (PENDING) from a domain XML; 'vm deploy' boots it."""
    from vmkeep.engine.core.jobs import local_user
    from vmkeep.engine.lifecycle import dispatch

    res = dispatch.create(ctx_of(c), xml_file.read_text(), hold=hold, host=host, who=local_user())
    render(res, as_json, kv)


@click.command("list")
@VM
@json_option
@click.pass_context
def snapshot_list(c: click.Context, ref: str, as_json: bool) -> None:
    """System and disk snapshots of a VM: id, name (empty: unnamed), the hypervisor's name."""
    from vmkeep.engine.lifecycle import dispatch

    res = dispatch.snapshots(ctx_of(c), ref)
    columns = ("id", "name", "kind", "disk", "memory", "hypervisor_name")
    render(res, as_json, lambda r: table(r["snapshots"], columns))


@click.command("recover")
@VM
@click.option("--success", "how", flag_value="success", help="As if the last action worked.")
@click.option("--failure", "how", flag_value="failure", help="Back where the action started.")
@click.option("--retry", "how", flag_value="retry", help="Run the last action again.")
@click.option("--delete", "how", flag_value="delete", help="Terminate it (--hard).")
@click.option(
    "--redeploy",
    is_flag=True,
    help="Its host failed: bring it up on another host from its disks (shared "
    "storage), or with --from-backup from its newest restore point.",
)
@click.option(
    "--host",
    default=None,
    metavar="HOST",
    help="With --redeploy: on this host (default: placement chooses).",
)
@click.option(
    "--from-backup",
    is_flag=True,
    help="With --redeploy: write its newest restore point over its disks first.",
)
@json_option
@click.pass_context
def recover_cmd(
    c: click.Context,
    ref: str,
    how: str | None,
    redeploy: bool,
    host: str | None,
    from_backup: bool,
    as_json: bool,
) -> None:
    """Admin: leave a *_FAILURE or stuck state; --redeploy: bring the VM of a failed host up
    on another host (never while it still runs on its old host)."""
    if (how is None) == (not redeploy):
        raise click.UsageError("give one of --success, --failure, --retry, --delete, --redeploy")
    if not redeploy and (host is not None or from_backup):
        raise click.UsageError("--host and --from-backup go with --redeploy")
    opts = {"how": how} if how else {"redeploy": True, "host": host, "from_backup": from_backup}
    _run(c, ref, "recover", opts, as_json)


@click.command("poll")
@click.argument("ref", metavar="[VM]", required=False)
@json_option
@click.pass_context
def poll_cmd(c: click.Context, ref: str | None, as_json: bool) -> None:
    """Poll the VMM driver: states and usage of the VMs on the host."""
    from vmkeep.engine.lifecycle import dispatch

    rows = dispatch.poll(ctx_of(c), ref)
    flat = [{"vm": r["vm"], "state": r.get("state"), **r.get("poll", {}),
             **({"error": r["error"]} if "error" in r else {})} for r in rows]  # fmt: skip
    render(rows, as_json, lambda _: table(flat, ("vm", "state", "STATE", "CPU", "MEMORY")))


@click.command("history")
@VM
@json_option
@click.pass_context
def history_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """The lifecycle actions run on a VM."""
    from vmkeep.engine.lifecycle import dispatch

    rows = dispatch.history(ctx_of(c), ref)
    render(rows, as_json, lambda r: table(r, ("id", "action", "origin", "who", "start", "end",
                                               "result", "error")))  # fmt: skip


def _commands() -> dict[str, click.Command]:
    cmds = [_action(name, doc, params, name) for name, doc, params in ACTIONS]
    groups = {name: _group(name) for name in GROUPS}
    groups["snapshot"].add_command(snapshot_list)
    cmds += [*groups.values(), create_cmd, recover_cmd, poll_cmd, history_cmd]
    return {cmd.name or "": cmd for cmd in cmds}


# the 'vmkeep vm' subcommands of this module, by name (vm_cmd loads them when used)
COMMANDS = _commands()
