"""``vmkeep vm ACTION VM ...``: the lifecycle actions (engine/lifecycle.py), ``vm poll`` and
``vm history``. Each action is recorded as a job and in the VM's history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmkeep.cli.output import ctx_of, json_option, kv, render, report_warnings, table
from vmkeep.engine import jobs, lifecycle

VM = click.argument("ref", metavar="VM")
HARD = click.option("--hard", is_flag=True, help="Do not ask the guest: pull the plug / reset.")


def _run(c: click.Context, ref: str, action: str, opts: dict[str, Any], as_json: bool) -> None:
    ctx = ctx_of(c)
    opts = {k: v for k, v in opts.items() if v not in (None, False)}
    params = {"vm": ref, "action": action, "opts": opts}
    with jobs.recorded(ctx, "vm-action", ref, params) as job:
        res, warnings = lifecycle.run_action(ctx, ref, action, opts, who=jobs.local_user())
        job.result = res
    render(res, as_json, kv)
    report_warnings(warnings)


def _simple(name: str, doc: str, hard: bool = False) -> click.Command:
    def cmd(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
        _run(c, ref, name, opts, as_json)

    cmd.__doc__ = doc
    f: Any = click.pass_context(cmd)
    f = json_option(f)
    if hard:
        f = HARD(f)
    return click.command(name)(VM(f))


SIMPLE = [
    ("deploy", "Define and boot a PENDING or UNDEPLOYED VM on the host.", False),
    ("hold", "Keep a PENDING VM from being deployed.", False),
    ("release", "Let a HOLD VM be deployed (PENDING).", False),
    ("poweroff", "Shut the guest down (--hard: pull the plug).", True),
    ("reboot", "Reboot the guest (--hard: reset).", True),
    ("suspend", "Save the guest's memory on the host and stop it (resume brings it back).", False),
    ("resume", "Bring a SUSPENDED or STOPPED VM back with its memory; boot a POWEROFF one.", False),
    ("stop", "Save the memory to a state file and take the VM off the host.", False),
    ("undeploy", "Take the VM off the host, disks kept (--hard: no guest shutdown).", True),
]


@click.command("create")
@click.option("--xml", "xml_file", required=True, type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="libvirt domain XML of the new VM.")  # fmt: skip
@click.option("--hold", is_flag=True, help="Create it in HOLD (deploy refused until release).")
@json_option
@click.pass_context
def create_cmd(c: click.Context, xml_file: Path, hold: bool, as_json: bool) -> None:
    """Create a VM in the catalog (PENDING) from a domain XML; 'vm deploy' boots it."""
    ctx = ctx_of(c)
    res = lifecycle.create(ctx, xml_file.read_text(), hold=hold, who=jobs.local_user())
    render(res, as_json, kv)


@click.command("terminate")
@VM
@HARD
@click.option("--keep-disks", is_flag=True, help="Leave the disk images where they are.")
@json_option
@click.pass_context
def terminate_cmd(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Destroy the VM and delete its disks (DONE); its backups stay."""
    _run(c, ref, "terminate", opts, as_json)


@click.group("snapshot")
def snapshot() -> None:
    """System snapshots: disks and, of a running VM, its memory."""


@snapshot.command("create")
@VM
@json_option
@click.pass_context
def snapshot_create(c: click.Context, ref: str, as_json: bool) -> None:
    """Take a system snapshot."""
    _run(c, ref, "snapshot-create", {}, as_json)


@snapshot.command("revert")
@VM
@click.argument("snapshot", type=int)
@json_option
@click.pass_context
def snapshot_revert(c: click.Context, ref: str, snapshot: int, as_json: bool) -> None:
    """Go back to a system snapshot (memory too when it has it)."""
    _run(c, ref, "snapshot-revert", {"snapshot": snapshot}, as_json)


@snapshot.command("delete")
@VM
@click.argument("snapshot", type=int)
@json_option
@click.pass_context
def snapshot_delete(c: click.Context, ref: str, snapshot: int, as_json: bool) -> None:
    """Delete a system snapshot."""
    _run(c, ref, "snapshot-delete", {"snapshot": snapshot}, as_json)


@snapshot.command("list")
@VM
@json_option
@click.pass_context
def snapshot_list(c: click.Context, ref: str, as_json: bool) -> None:
    """System and disk snapshots of a VM."""
    res = lifecycle.snapshots(ctx_of(c), ref)
    render(res, as_json, lambda r: table(r["snapshots"], ("id", "kind", "disk", "memory", "name")))


@click.group("disk-snapshot")
def disk_snapshot() -> None:
    """Snapshots of one disk of a powered-off VM (qcow2 internal, no memory)."""


@disk_snapshot.command("create")
@VM
@click.option("--disk", default=None, help="Disk target (default: the first).")
@json_option
@click.pass_context
def disk_snapshot_create(c: click.Context, ref: str, disk: str | None, as_json: bool) -> None:
    """Snapshot one disk."""
    _run(c, ref, "disk-snapshot-create", {"disk": disk}, as_json)


@disk_snapshot.command("revert")
@VM
@click.argument("snapshot", type=int)
@json_option
@click.pass_context
def disk_snapshot_revert(c: click.Context, ref: str, snapshot: int, as_json: bool) -> None:
    """Put one disk back to its snapshot."""
    _run(c, ref, "disk-snapshot-revert", {"snapshot": snapshot}, as_json)


@disk_snapshot.command("delete")
@VM
@click.argument("snapshot", type=int)
@json_option
@click.pass_context
def disk_snapshot_delete(c: click.Context, ref: str, snapshot: int, as_json: bool) -> None:
    """Delete a disk snapshot."""
    _run(c, ref, "disk-snapshot-delete", {"snapshot": snapshot}, as_json)


@click.group("disk")
def disk() -> None:
    """Attach or detach disks (hotplug on a running VM)."""


@disk.command("attach")
@VM
@click.option("--source", default=None, help="An existing image file.")
@click.option("--size", default=None, help="Create a new qcow2 image of this size (4G, 512M).")
@click.option("--target", default=None, help="Device name in the guest (default: next vdX).")
@click.option("--format", "format", default=None, help="Image format (default: detected).")
@json_option
@click.pass_context
def disk_attach(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Attach a disk."""
    _run(c, ref, "disk-attach", opts, as_json)


@disk.command("detach")
@VM
@click.option("--target", required=True, help="Device name in the guest (vdb).")
@json_option
@click.pass_context
def disk_detach(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Detach a disk (its image stays)."""
    _run(c, ref, "disk-detach", opts, as_json)


@click.group("nic")
def nic() -> None:
    """Attach or detach network interfaces."""


@nic.command("attach")
@VM
@click.option("--bridge", default=None, help="Host bridge (default: user-mode networking).")
@click.option("--mac", default=None, help="MAC address (default: a random 52:54:00:...).")
@click.option("--model", default=None, help="NIC model (default virtio).")
@json_option
@click.pass_context
def nic_attach(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Attach a NIC."""
    _run(c, ref, "nic-attach", opts, as_json)


@nic.command("detach")
@VM
@click.option("--mac", required=True, help="MAC address of the NIC.")
@json_option
@click.pass_context
def nic_detach(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Detach a NIC."""
    _run(c, ref, "nic-detach", opts, as_json)


@click.command("resize")
@VM
@click.option("--vcpus", type=click.IntRange(1, 512), default=None)
@click.option("--memory", type=click.IntRange(16, 1 << 24), default=None, metavar="MIB")
@json_option
@click.pass_context
def resize_cmd(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Change vCPUs and memory of a POWEROFF or UNDEPLOYED VM (next boot)."""
    _run(c, ref, "resize", opts, as_json)


@click.command("disk-resize")
@VM
@click.option("--disk", default=None, help="Disk target (default: the first).")
@click.option("--size", required=True, help="New size (grow only): 8G, 1024M.")
@json_option
@click.pass_context
def disk_resize_cmd(c: click.Context, ref: str, as_json: bool, **opts: Any) -> None:
    """Grow a disk (live on a running VM)."""
    _run(c, ref, "disk-resize", opts, as_json)


@click.command("migrate")
@VM
@click.argument("host")
@json_option
@click.pass_context
def migrate_cmd(c: click.Context, ref: str, host: str, as_json: bool) -> None:
    """Live migration (not supported yet: comes with the many-hosts work)."""
    _run(c, ref, "migrate", {"host": host}, as_json)


@click.command("recover")
@VM
@click.option("--success", "how", flag_value="success", help="As if the last action worked.")
@click.option("--failure", "how", flag_value="failure", help="Back where the action started.")
@click.option("--retry", "how", flag_value="retry", help="Run the last action again.")
@click.option("--delete", "how", flag_value="delete", help="Terminate it (--hard).")
@json_option
@click.pass_context
def recover_cmd(c: click.Context, ref: str, how: str | None, as_json: bool) -> None:
    """Admin: leave a *_FAILURE or stuck state."""
    if how is None:
        raise click.UsageError("give one of --success, --failure, --retry, --delete")
    res, warnings = lifecycle.recover(ctx_of(c), ref, how, who=jobs.local_user())
    render(res, as_json, kv)
    report_warnings(warnings)


@click.command("poll")
@click.argument("ref", metavar="[VM]", required=False)
@json_option
@click.pass_context
def poll_cmd(c: click.Context, ref: str | None, as_json: bool) -> None:
    """Poll the VMM driver: states and usage of the VMs on the host."""
    rows = lifecycle.poll(ctx_of(c), ref)
    flat = [{"vm": r["vm"], "state": r.get("state"), **r.get("poll", {}),
             **({"error": r["error"]} if "error" in r else {})} for r in rows]  # fmt: skip
    render(rows, as_json, lambda _: table(flat, ("vm", "state", "STATE", "CPU", "MEMORY")))


@click.command("history")
@VM
@json_option
@click.pass_context
def history_cmd(c: click.Context, ref: str, as_json: bool) -> None:
    """The lifecycle actions run on a VM."""
    rows = lifecycle.history(ctx_of(c), ref)
    render(rows, as_json, lambda r: table(r, ("id", "action", "origin", "who", "start", "end",
                                               "result", "error")))  # fmt: skip


def register(group: click.Group) -> None:
    for name, doc, hard in SIMPLE:
        group.add_command(_simple(name, doc, hard))
    for cmd in (create_cmd, terminate_cmd, snapshot, disk_snapshot, disk, nic, resize_cmd,
                disk_resize_cmd, migrate_cmd, recover_cmd, poll_cmd, history_cmd):  # fmt: skip
        group.add_command(cmd)
