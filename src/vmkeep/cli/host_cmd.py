"""``vmkeep host ...``: the hosts of a catalog shared by many (``engine/hosts/records.py``;
docs/hosts.md). Each host runs ``vmkeep daemon --host NAME``."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import ctx_of, json_option, read, render, table
from vmkeep.cli.remote import segment


@click.group()
def host() -> None:
    """Hosts sharing this catalog: each runs 'vmkeep daemon --host NAME'."""


def _mib(kib: Any) -> str:
    return f"{int(kib) // 1024} MiB" if isinstance(kib, int | float) else "-"


def _show(h: dict[str, Any]) -> None:
    m = h.get("monitor") or {}
    click.echo(f"host {h['name']} (id {h['id']})")
    click.echo(f"  uri:        {h['uri']}")
    click.echo(f"  vmm:        {h['vmm']}" + (f" ({h['vmm_dir']})" if h.get("vmm_dir") else ""))
    click.echo(f"  state:      {h['state']}" + (f": {h['error']}" if h.get("error") else ""))
    click.echo(f"  daemon:     {h['daemon']} (last heartbeat {h['heartbeat_at'] or 'never'})")
    click.echo(f"  monitored:  {h['monitored_at'] or 'never'}")
    click.echo(
        f"  capacity:   {m.get('cpus', '-')} CPUs, {_mib(m.get('memory_kib'))} memory, "
        f"{_mib(m.get('free_memory_kib'))} free"
    )
    if h.get("max_backups") is not None:
        click.echo(f"  max backups at once: {h['max_backups']}")
    vms = h.get("vm_list")
    if vms is not None:
        shown = ", ".join(f"{v['name']} ({v['lcm_state']})" for v in vms)
        click.echo(f"  vms:        {shown or '(none)'}")
        click.echo(f"  queued jobs for it: {h.get('queued_jobs', 0)}")


@host.command("add")
@click.argument("name")
@click.option(
    "--uri",
    required=True,
    help="Its libvirt URI as the daemons reach it, e.g. qemu+tcp://10.0.0.2/system.",
)
@click.option("--vmm", type=click.Choice(["native", "exec"]), default="native", show_default=True,
              help="Its VMM driver.")  # fmt: skip
@click.option("--vmm-dir", default=None, help="exec: the folder of action scripts.")
@click.option("--vmm-args", default="", help="exec: -r N -t N -l ACTION[=SCRIPT],...")
@click.option("--max-backups", type=int, default=None,
              help="Backups running on it at once (default: [limits] max_backups_host).")  # fmt: skip
@json_option
@click.pass_context
def add_cmd(
    c: click.Context,
    name: str,
    uri: str,
    vmm: str,
    vmm_dir: str | None,
    vmm_args: str,
    max_backups: int | None,
    as_json: bool,
) -> None:
    """Add host NAME (INIT until its daemon monitors it)."""
    from vmkeep.engine.hosts import records

    row = records.add(ctx_of(c), name, uri, vmm, vmm_dir, vmm_args, max_backups)
    render(row, as_json, _show)


@host.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """List hosts: state, VMs, free memory, their daemon (alive, silent or none)."""
    rows = read(c, "/v1/hosts", "hosts.records:list_hosts")

    def human(rows: list[dict[str, Any]]) -> None:
        flat = [
            r | {
                "cpus": (r.get("monitor") or {}).get("cpus", "-"),
                "free_memory": _mib((r.get("monitor") or {}).get("free_memory_kib")),
            }
            for r in rows
        ]  # fmt: skip
        table(flat, ("id", "name", "state", "daemon", "vms", "cpus", "free_memory", "uri"))

    render(rows, as_json, human)


@host.command("show")
@click.argument("name", metavar="HOST", shell_complete=complete.hosts)
@json_option
@click.pass_context
def show_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """Show a host: state, capacity, daemon, its VMs and the jobs waiting for it."""
    path = f"/v1/hosts/{segment(name)}" if "/" not in name else ""
    render(read(c, path, "hosts.records:show", name), as_json, _show)


@host.command("enable")
@click.argument("name", metavar="HOST", shell_complete=complete.hosts)
@json_option
@click.pass_context
def enable_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """Let VMs be placed on a DISABLED or OFFLINE host again (INIT until monitored)."""
    from vmkeep.engine.hosts import records

    render(records.enable(ctx_of(c), name), as_json, _show)


@host.command("disable")
@click.argument("name", metavar="HOST", shell_complete=complete.hosts)
@click.option("--offline", is_flag=True, help="Not monitored either (maintenance).")
@json_option
@click.pass_context
def disable_cmd(c: click.Context, name: str, offline: bool, as_json: bool) -> None:
    """Place nothing new on a host (its VMs keep running): DISABLED, or OFFLINE."""
    from vmkeep.engine.hosts import records

    render(records.disable(ctx_of(c), name, offline=offline), as_json, _show)


@host.command("remove")
@click.argument("name", metavar="HOST", shell_complete=complete.hosts)
@json_option
@click.pass_context
def remove_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """Forget a host no VM lives on and no job waits for."""
    from vmkeep.engine.hosts import records

    render(
        records.remove(ctx_of(c), name), as_json, lambda r: click.echo(f"host {r['name']} removed")
    )
