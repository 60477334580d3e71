"""The backup policy options that ``vm config`` and ``pool create|set`` share (one declaration),
and how a policy is printed: each key's effective value and the layer that set it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

UNSET = "unset"  # engine/core/backup_config.py UNSET
UNSET_HELP = f"'{UNSET}' removes the key (inherited again)"
# (option, its parameter name, help): the keys of engine/core/backup_config.py KEYS
OPTIONS = (
    ("--keep-last", "keep_last", "Newest restore points to keep (a number, or 'all')."),
    ("--keep-hourly", "keep_hourly", "Hours to keep the newest point of (a number, or 'all')."),
    ("--keep-daily", "keep_daily", "Days to keep the newest point of (a number, or 'all')."),
    ("--keep-weekly", "keep_weekly", "ISO weeks to keep the newest point of (a number, or 'all')."),
    ("--keep-monthly", "keep_monthly", "Months to keep the newest point of (a number, or 'all')."),
    ("--keep-yearly", "keep_yearly", "Years to keep the newest point of (a number, or 'all')."),
    ("--mode", "mode", "full | increment"),
    ("--fs-freeze", "fs_freeze", "none | agent | suspend"),
    ("--backup-volatile", "backup_volatile", "yes | no"),
    ("--memory", "memory", "yes | no: also save the RAM of a running VM (restore resumes it)"),
    ("--exclude", "exclude", "yes | no: leave the VM out of --all and --pool backup jobs"),
    ("--exclude-disk", "exclude_disks", "A disk target (vdb) left out of backups; repeat it for "
     "more. The disks given are the whole list: 'none' excludes none"),
)  # fmt: skip
NAMES = tuple(name for name, _, _ in OPTIONS)
# options given more than once (their values make one list)
MULTIPLE = frozenset({"exclude_disks"})
# a backup job's keys over its VMs' (``backupjob create|edit``): all but exclude and
# exclude_disks, a job names its VMs itself
JOB_OPTIONS = tuple(o for o in OPTIONS if o[1] not in ("exclude", "exclude_disks"))


def policy_options(fn: F, options: tuple[tuple[str, str, str], ...] = OPTIONS) -> F:
    """Add the policy options to a command; they arrive as keyword arguments (None: not given)."""
    for option, param, help_text in reversed(options):
        many = param in MULTIPLE
        fn = click.option(
            option, param, default=None, multiple=many, help=f"{help_text} ({UNSET_HELP})"
        )(fn)
    return fn


def job_policy_options(fn: F) -> F:
    return policy_options(fn, JOB_OPTIONS)


def policy_changes(opts: dict[str, Any]) -> dict[str, Any]:
    """The policy keys given on the command line (taken out of ``opts``). A repeated option's
    values are one list, but ``unset`` alone (the key is inherited again)."""
    out = {}
    for _, param, _ in OPTIONS:
        value = opts.pop(param, None)
        if param in MULTIPLE:
            if not value:
                continue
            value = value[0] if len(value) == 1 and value[0].strip().lower() == UNSET else value
            value = list(value) if isinstance(value, tuple) else value
        if value is not None:
            out[param] = value
    return out


def policy_lines(config: dict[str, Any], sources: dict[str, str] | None, indent: str = "") -> None:
    """``KEY  VALUE  (SOURCE)`` per key of an effective config."""
    width = max((len(k) for k in config), default=0)
    for key, value in config.items():
        shown = "-" if key.startswith("keep_") and value is None else value
        if isinstance(shown, bool):
            shown = "yes" if shown else "no"
        elif isinstance(shown, list):
            shown = ", ".join(map(str, shown)) or "none"
        source = f"  ({sources[key]})" if sources and key in sources else ""
        click.echo(f"{indent}{key:<{width}}  {shown}{source}")
