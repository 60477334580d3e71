"""``vmkeep backupjob create|list|show|run|enable|disable|edit|delete``: backups on a schedule
(docs/policies.md). The daemon's scheduler fires them; ``run`` fires one now."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from vmkeep import errors
from vmkeep.cli import remote
from vmkeep.cli.output import ctx_of, json_option, kv, read, render, table
from vmkeep.cli.policy_options import job_policy_options, policy_changes
from vmkeep.cli.remote import segment


def _job_options(create: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options ``create`` and ``edit`` share (``edit``: only those given change)."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        opts = [
            click.option(
                "--task",
                type=click.Choice(["backup", "prune", "verify", "drill"]),
                default=None,
                help="What each run does (default backup): prune applies the retention rules "
                "(--keep-*), verify reads the points not verified lately (--reverify-after), "
                "drill boots each VM's newest point (--probe, --timeout).",
            ),
            click.option("--vm", "vms", multiple=True, help="A VM to back up (repeat it)."),
            click.option("--group", default=None, help="A group: one group-consistent cut."),
            click.option("--pool", default=None, help="Every VM of a pool (not the excluded)."),
            click.option("--all", "all_", is_flag=True, help="Every VM (not the excluded)."),
            click.option("--datastore", required=create, default=None, help="Where to store."),
            click.option(
                "--schedule",
                required=create,
                default=None,
                help="Cron ('0 2 * * *'), calendar event ('daily', 'mon..fri 02:00'), "
                "'now', '+SECONDS' or an ISO time.",
            ),
            click.option(
                "--priority",
                type=click.IntRange(0, 99),
                default=None,
                help="0-99, higher runs first (default 50).",
            ),
            click.option(
                "--execution",
                type=click.Choice(["sequential", "parallel"]),
                default=None,
                help="One VM at a time (default), or all at once.",
            ),
            click.option(
                "--bwlimit",
                default=None,
                help="KiB/s to a restic or rsync datastore ('unset' in edit).",
            ),
            click.option(
                "--copy-to",
                default=None,
                help="Copy and verify each new point to this second datastore.",
            ),
            click.option(
                "--reverify-after",
                default=None,
                metavar="DAYS",
                help="verify task: skip points verified within DAYS days.",
            ),
            click.option(
                "--probe",
                default=None,
                metavar="CMD",
                help="drill task: run CMD in each guest; must exit 0.",
            ),  # fmt: skip
            click.option(
                "--cross-probe",
                default=None,
                metavar="MEMBER=CMD",
                help="drill task of a --group: run CMD in MEMBER once every member is up.",
            ),
            click.option(
                "--timeout",
                default=None,
                metavar="S",
                help="drill task: seconds the guest agent has to answer.",
            ),  # fmt: skip
            click.option(
                "--repeat-missed/--no-repeat-missed",
                default=None,
                help="Run a slot missed while no daemon ran, once (default) or not.",
            ),
            json_option,
        ]
        for opt in reversed(opts):
            f = opt(f)
        return job_policy_options(f)

    return wrap


def _fields(o: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(selector, policy options, other fields) from the parsed options."""
    selector = {"vms": list(o.pop("vms") or []), "group": o.pop("group"), "pool": o.pop("pool"),
                "all": o.pop("all_")}  # fmt: skip
    policy = policy_changes(o)
    for key in ("bwlimit", "reverify_after", "probe", "timeout", "cross_probe"):
        if (value := o.pop(key)) is not None:
            policy[key] = value
    return selector, policy, o


def _show(j: dict[str, Any]) -> None:
    last = j.get("last_run")
    kv({
        "name": j["name"], "task": j["task"], "target": j["target"], "datastore": j["datastore"],
        "copy_to": j["copy_to"], "schedule": j["schedule"], "enabled": j["enabled"],
        "priority": j["priority"], "execution": j["execution"], "options": j["options"],
        "repeat_missed": j["repeat_missed"], "next_run": j["next_run"],
        "last_run": f"{last['slot']} ({last['origin']}, {last['state']})" if last else None,
    })  # fmt: skip
    if j.get("vms"):
        click.echo("")
        table(j["vms"], ("vm", "state", "job", "finished", "reason", "error"))
    elif "vms" in j:  # show, not create/edit
        click.echo(f"\nno VM selected now ({j['target']})")


def _list(rows: list[dict[str, Any]]) -> None:
    flat = [r | {"last": r["last_run"]["slot"] if r["last_run"] else None} for r in rows]
    table(flat, ("name", "task", "target", "datastore", "schedule", "priority", "enabled", "next_run",
                 "last"))  # fmt: skip


@click.group()
def backupjob() -> None:
    """Backups that run themselves: what, where, when, how urgent."""


@backupjob.command("create")
@click.argument("name")
@_job_options(create=True)
@click.option("--disabled", is_flag=True, help="Create it disabled (enable it later).")
@click.pass_context
def create_cmd(c: click.Context, name: str, as_json: bool, disabled: bool, **o: Any) -> None:
    """Create backup job NAME: give one of --vm, --group, --pool, --all."""
    from vmkeep.engine.core.jobs import DEFAULT_PRIORITY, local_user
    from vmkeep.engine.service import backupjobs

    selector, policy, rest = _fields(o)
    made = backupjobs.create(
        ctx_of(c), name, selector, rest["datastore"], rest["schedule"],
        priority=DEFAULT_PRIORITY if rest["priority"] is None else rest["priority"],
        execution=rest["execution"] or "sequential", options=policy, copy_to=rest["copy_to"],
        repeat_missed=rest["repeat_missed"] is not False, enabled=not disabled, owner=local_user(),
        task=rest["task"] or "backup",
    )  # fmt: skip
    render(made, as_json, _show)


@backupjob.command("edit")
@click.argument("name")
@_job_options(create=False)
@click.pass_context
def edit_cmd(c: click.Context, name: str, as_json: bool, **o: Any) -> None:
    """Change what is given; a policy key given as 'unset' goes back to the VMs' own."""
    from vmkeep.engine.service import backupjobs

    selector, policy, rest = _fields(o)
    changes = {k: v for k, v in selector.items() if v} | {
        k: v for k, v in rest.items() if v is not None
    }
    if policy:
        changes["options"] = {k: None if v.lower() == "unset" else v for k, v in policy.items()}
    if not changes:
        raise click.UsageError("give at least one option to change (see --help)")
    from vmkeep.engine.core.jobs import local_user

    by = (local_user(), "admin")  # the catalog's owner, as every command without a daemon
    render(backupjobs.edit(ctx_of(c), name, changes, by=by), as_json, _show)


@backupjob.command("list")
@json_option
@click.pass_context
def list_cmd(c: click.Context, as_json: bool) -> None:
    """Every backup job with its next and last run."""
    render(read(c, "/v1/backupjobs", "service.backupjobs:list_all"), as_json, _list)


@backupjob.command("show")
@click.argument("name")
@json_option
@click.pass_context
def show_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """One backup job: its runs, and per VM its last result or why it was left out."""
    path = f"/v1/backupjobs/{segment(name)}" if "/" not in name else ""
    render(read(c, path, "service.backupjobs:show", name), as_json, _show)


def _toggle(enabled: bool) -> None:
    def cmd(c: click.Context, name: str, as_json: bool) -> None:
        from vmkeep.engine.service import backupjobs

        render(backupjobs.set_enabled(ctx_of(c), name, enabled), as_json, _show)

    cmd.__doc__ = "Let the scheduler fire it." if enabled else "Keep the scheduler from firing it."
    backupjob.command("enable" if enabled else "disable")(
        click.argument("name")(json_option(click.pass_context(cmd)))
    )


_toggle(True)
_toggle(False)


@backupjob.command("delete")
@click.argument("name")
@json_option
@click.pass_context
def delete_cmd(c: click.Context, name: str, as_json: bool) -> None:
    """Delete it; its queued jobs are cancelled, running ones finish."""
    from vmkeep.engine.service import backupjobs

    gone = backupjobs.remove(ctx_of(c), name)
    render(gone, as_json, lambda j: click.echo(f"deleted backup job {j['name']}"))


@backupjob.command("run")
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="With a daemon: queue the run and return.")
@json_option
@click.pass_context
def run_cmd(c: click.Context, name: str, no_wait: bool, as_json: bool) -> None:
    """Run it now, outside its schedule. With a daemon serving the catalog, the daemon fires
    the run and its workers run the queued jobs (within the limits), followed here; without
    one they run here, one after another."""
    path = f"/v1/backupjobs/{segment(name)}"
    run = remote.post(c, f"{path}/run") if "/" not in name else None
    if run is not None:  # the daemon's run (this process never reaches libvirt)
        if not no_wait:
            remote.follow_all(c, run["jobs"])
        shown = remote.get(c, path) or {}
        run = next((r for r in shown.get("runs", []) if r["id"] == run["id"]), run)
    else:
        run = _run_here(ctx_of(c), name)
    render(run, as_json, _run)
    _exit_of(run)


def _run_here(ctx: Any, name: str) -> dict[str, Any]:
    """No daemon: fire the run and run its jobs in this process; the run as it ended."""
    from vmkeep.engine.core import jobs
    from vmkeep.engine.service import notify, scheduler
    from vmkeep.engine.service.backupjobs import get_run

    run = scheduler.run_now(ctx, name, jobs.local_user())
    _wait_all(ctx, [j["id"] for j in run["jobs"]])
    if any(not x.get("excluded") for x in run["skipped"]):
        notify.deliver_due(ctx)  # the run's report of the VMs it left out: no daemon sends it
    return get_run(ctx, run["id"])


def _wait_all(ctx: Any, ids: list[int]) -> None:
    """Each job to its end, run in this process (a job another process holds back with the
    limits is waited for). Ctrl-C cancels what has not ended. Jobs run here are reported as the daemon's are
    (``[notify]``): their notifications are sent once the last has ended (a dead receiver
    never holds a backup up); one that fails stays in the outbox for a daemon to retry."""
    from vmkeep.engine.core import jobs
    from vmkeep.engine.service import notify
    from vmkeep.engine.service.actions import ONE_PER_VM, RUNNERS

    reports = 0
    try:
        for job_id in ids:
            while jobs.get(ctx, job_id)["state"] not in jobs.FINAL:
                if jobs.claim(ctx, only=job_id, one_per_target=ONE_PER_VM) == job_id:
                    job = jobs.execute(ctx, job_id, RUNNERS)
                    reports += notify.job_ended(ctx, job)
                    if job["state"] == "CANCELLED":
                        raise KeyboardInterrupt
                    break
                jobs.wait(ctx, job_id, 1.0)
    except KeyboardInterrupt:
        for job_id in ids:
            if jobs.get(ctx, job_id)["state"] not in jobs.FINAL:
                jobs.cancel(ctx, job_id)
        raise
    finally:
        if reports:
            notify.deliver_due(ctx)


def _run(r: dict[str, Any]) -> None:
    click.echo(f"run {r['id']} ({r['origin']}): {len(r['jobs'])} jobs, {len(r['skipped'])} skipped")
    if r["jobs"]:
        table(r["jobs"], ("id", "target", "state", "waiting", "exit_code", "error"))
    for x in r["skipped"]:
        click.echo(f"skipped {x['vm']}: {x['reason']}")


def _exit_of(run: dict[str, Any]) -> None:
    """Exit 0 when every job ended DONE, 1 with warnings or a VM left out (not one excluded by
    its policy or with nothing to do), else the first failure's code."""
    codes = [j["exit_code"] for j in run["jobs"] if j["exit_code"] not in (None, 0, 1)]
    if codes:
        failed = [j for j in run["jobs"] if j["exit_code"] == codes[0]][0]
        err = errors.VmkeepError(
            f"{len(codes)} of {len(run['jobs'])} jobs of run {run['id']} failed; first: job "
            f"{failed['id']} ({failed['target']}): {failed['error']}"
        )
        err.exit_code = codes[0]
        raise err
    left_out = [x for x in run["skipped"] if not x.get("excluded")]  # not: nothing to do
    if left_out or any(j["exit_code"] == 1 for j in run["jobs"]):
        click.get_current_context().find_root().meta["vmkeep.exit_code"] = 1
