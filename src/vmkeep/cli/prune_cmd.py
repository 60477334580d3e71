"""``vmkeep prune (VM | --all) [--datastore D] [--dry-run] [--keep-* N] [--json]``: retention
now (engine/points/prune.py), each point listed as keep or remove with the rule that decided and
how it goes (merged into a later point, its chain deleted)."""

from __future__ import annotations

from typing import Any

import click

from vmkeep.cli import complete
from vmkeep.cli.output import act, console, json_option, read, render, report_warnings
from vmkeep.engine.core.backup_config import KEEP_KEYS
from vmkeep.errors import InvalidValue
from vmkeep.model import Warnings


def _rule_options(fn: Any) -> Any:
    for rule in reversed(KEEP_KEYS):
        option = "--" + rule.replace("_", "-")
        fn = click.option(option, rule, type=click.IntRange(1, 1_000_000), default=None,
                          help=f"For this run: {rule} (instead of the VM's policy).")(fn)  # fmt: skip
    return fn


@click.command()
@click.argument("vm", required=False, shell_complete=complete.vms)
@click.option("--all", "all_vms", is_flag=True, help="Every VM that has restore points.")
@click.option("--datastore", default=None, shell_complete=complete.datastores,
              help="Only this datastore (default: every one the VM has points on).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Only say what would be kept and removed, and why.")
@_rule_options
@json_option
@click.pass_context
def prune(
    c: click.Context,
    vm: str | None,
    all_vms: bool,
    datastore: str | None,
    dry_run: bool,
    as_json: bool,
    **rules: int | None,
) -> None:
    """Apply retention now: keep_last/hourly/daily/weekly/monthly/yearly over every chain of
    the VM on a datastore; protected points and the points they need stay."""
    if (vm is None) == (not all_vms):
        raise InvalidValue("VM", vm or "", "name one VM, or give --all (not both)")
    if all_vms:
        rows = read(c, "/v1/backups", "points.listing:list_backups", None)
        names = list(dict.fromkeys(r["vm"] for r in rows if r["status"] == "VALID"))
    else:
        names = [str(vm)]
    results, warnings = [], Warnings()
    for name in names:
        params = {"vm": name, "datastore": datastore, "dry_run": dry_run, **rules}
        res, warns = act(c, "prune", params, bar=False)
        results.append(res)
        warnings.items.extend(warns.items)
    render(results if all_vms else results[0], as_json, lambda r: _human(r if all_vms else [r]))
    report_warnings(warnings)


def _human(results: list[dict[str, Any]]) -> None:
    out = console()
    for r in results:
        rules = ", ".join(f"{k}={v}" for k, v in r["rules"].items()) or "none (every point kept)"
        what = "would keep" if r["dry_run"] else "kept"
        for ds in r["datastores"]:
            out.print(f"{r['vm']} on {ds['datastore']}: rules {rules} ({ds['timezone']}); "
                      f"{what} {ds['keep']}, {'would remove' if r['dry_run'] else 'removed'} "
                      f"{ds['remove']}", markup=False, highlight=False)  # fmt: skip
            for p in ds["points"]:
                mark = "keep  " if p["keep"] else "remove"
                how = f" -> {p['how']}" if p["how"] else ""
                out.print(f"  {mark} backup {p['backup']} point {p['increment']}  "
                          f"{p['taken']}  {p['rule']}{how}", markup=False, highlight=False)  # fmt: skip
            for line in ds.get("done", []):
                out.print(f"  {line}", markup=False, highlight=False)
        if not r["datastores"]:
            out.print(f"{r['vm']}: no restore points", markup=False, highlight=False)
