"""``vmkeep lab ...``: the tiny real guests used by tests, the demo and benchmarks."""

from __future__ import annotations

import click

from vmkeep.cli.output import ctx_of, emit_json
from vmkeep.engine.core.context import Context
from vmkeep.lab import Lab, parse_size
from vmkeep.lab.lab import DEFAULT_PREFIX


def _lab(c: click.Context, prefix: str) -> Lab:
    ctx: Context = ctx_of(c)
    return Lab(ctx.hv, ctx.config.lab.dir, prefix=prefix, within=ctx.config.data_dir)


prefix_option = click.option(
    "--prefix", default=DEFAULT_PREFIX, show_default=True, help="Name prefix of the lab domains."
)


@click.group()
def lab() -> None:
    """Test lab: tiny real guests (TCG) with qemu-guest-agent and ext4 data disks."""


@lab.command("up")
@click.option("--vms", "count", default=1, show_default=True, type=click.IntRange(1, 20))
@click.option(
    "--disk-size", default="256M", show_default=True, help="Data disk size (qcow2 v3, ext4)."
)
@click.option("--no-agent", is_flag=True, help="Boot without qemu-guest-agent running.")
@prefix_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def up_cmd(
    c: click.Context, count: int, disk_size: str, no_agent: bool, prefix: str, as_json: bool
) -> None:
    """Create and boot lab VMs (idempotent)."""
    names = _lab(c, prefix).up(count, parse_size(disk_size), agent=not no_agent)
    if as_json:
        emit_json(names)
    else:
        for n in names:
            click.echo(f"{n}: running")


@lab.command("down")
@prefix_option
@click.pass_context
def down_cmd(c: click.Context, prefix: str) -> None:
    """Destroy and remove every lab VM with the prefix."""
    for n in _lab(c, prefix).down():
        click.echo(f"{n}: removed")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("vm")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(c: click.Context, vm: str, command: tuple[str, ...]) -> None:
    """Run CMD in the guest through the agent: vmkeep lab exec VM -- CMD ARGS."""
    ctx: Context = ctx_of(c)
    res = ctx.hv.guest_exec(vm, list(command), 300)
    click.echo(res.stdout, nl=False)
    click.echo(res.stderr, nl=False, err=True)
    if res.exit_code:
        c.find_root().meta["vmkeep.exit_code"] = 2


@lab.command("demo")
@click.pass_context
def demo_cmd(c: click.Context) -> None:
    """Run the README's demo on a real lab VM and print each step."""
    from vmkeep.lab.demo import run_demo

    run_demo(ctx_of(c), lambda msg: click.echo(f"demo: {msg}"))


@lab.group("postgres")
def postgres_group() -> None:
    """A throwaway PostgreSQL 15 server: a catalog several hosts' daemons share."""


@postgres_group.command("up")
def postgres_up_cmd() -> None:
    """Start it (unless it runs) and print its catalog URL (for VMKEEP_CATALOG_URL)."""
    from vmkeep.lab import postgres

    click.echo(postgres.lab_up())


@postgres_group.command("down")
def postgres_down_cmd() -> None:
    """Stop it and remove its data."""
    from vmkeep.lab import postgres

    click.echo("stopped" if postgres.lab_down() else "no lab PostgreSQL was running")


@lab.group("hosts")
def hosts_group() -> None:
    """The two-host lab: more libvirt hosts on this machine, in their own namespaces."""


@hosts_group.command("up")
@click.argument("count", type=click.IntRange(2, 200))
def hosts_up_cmd(count: int) -> None:
    """Bring hosts 1..COUNT up (running ones are kept): host 1 is this machine's libvirtd."""
    from vmkeep.lab import hosts

    for h in hosts.up(count):
        click.echo(f"{h.name}: {h.uri}")


@hosts_group.command("down")
@click.argument("number", type=click.IntRange(2, 200), required=False)
def hosts_down_cmd(number: int | None) -> None:
    """Stop and remove every lab host, or only host NUMBER (this machine's own libvirtd keeps
    running)."""
    from vmkeep.lab import hosts

    for n in hosts.down(number):
        click.echo(f"host{n}: removed")


@hosts_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def hosts_list_cmd(as_json: bool) -> None:
    """The lab's hosts: number, name, libvirt URI, libvirtd pid, alive."""
    from vmkeep.lab import hosts

    rows = hosts.list()
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        state = "alive" if r["alive"] else "down"
        click.echo(f"{r['number']}  {r['name']}  {r['uri']}  pid {r['libvirtd_pid']}  {state}")


@hosts_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("number", type=click.IntRange(1, 200))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def hosts_exec_cmd(c: click.Context, number: int, command: tuple[str, ...]) -> None:
    """Run CMD in host N's mount and network namespaces: vmkeep lab hosts exec N -- CMD ARGS."""
    from vmkeep.lab import hosts

    code = hosts.exec(number, list(command)).returncode
    if code:
        c.find_root().meta["vmkeep.exit_code"] = code
