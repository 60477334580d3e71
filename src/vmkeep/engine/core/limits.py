"""Which QUEUED job a worker may start next: higher priority first, then the oldest, and none
beyond the limits (``[limits]``; OpenNebula's MAX_BACKUPS and MAX_BACKUPS_HOST):

- ``max_backups``: backups running in the whole catalog (every host, every daemon);
- ``max_backups_host``: backups running on one host;
- ``max_backups_datastore``: backups writing to one datastore; a driver that takes one writer
  at a time (restic: ``one-writer``) takes one whatever this says;
- a run of a backup job with ``--execution sequential``: one of its jobs at a time.

A backup is a job of a kind in BACKUP_KINDS (a group backup counts once: its members are frozen
together and cannot wait for each other). A job that must wait keeps its reason on its row
(``jobs list`` shows it) until a worker starts it. ``jobs.claim`` asks ``blocker`` about each
candidate while it holds the claim counter, so that two claimers never count the same slot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmkeep.config import LimitsConfig

BACKUP_KINDS = frozenset({"backup", "group-backup"})
# the params field naming the datastore a job of this kind writes to
WRITES = {"backup": "datastore", "group-backup": "datastore", "copy": "to"}


def writes_to(kind: str, params: Mapping[str, Any]) -> str | None:
    field_name = WRITES.get(kind)
    value = params.get(field_name) if field_name else None
    return str(value) if value else None


@dataclass
class Running:
    """What runs now, counted once per claim."""

    backups: int = 0
    backups_on: Counter[str] = field(default_factory=Counter)  # host -> backups
    writers_on: Counter[str] = field(default_factory=Counter)  # datastore -> writing jobs
    runs: set[int] = field(default_factory=set)  # backup-job runs with a job running

    def add(self, kind: str, host: str, datastore: str | None, run_id: int | None) -> None:
        if kind in BACKUP_KINDS:
            self.backups += 1
            self.backups_on[host] += 1
        if datastore:
            self.writers_on[datastore] += 1
        if run_id is not None:
            self.runs.add(run_id)


def blocker(
    limits: LimitsConfig,
    running: Running,
    kind: str,
    datastore: str | None,
    host: str,
    one_writer: bool,
    sequential_run: int | None,
) -> str | None:
    """Why a job of ``kind`` writing to ``datastore`` may not start on ``host`` now (None: it
    may). ``sequential_run``: the job belongs to this sequential run."""
    if sequential_run is not None and sequential_run in running.runs:
        return f"sequential run {sequential_run}: waits for its running job"
    if kind in BACKUP_KINDS:
        if limits.max_backups and running.backups >= limits.max_backups:
            return f"max_backups: {running.backups} of {limits.max_backups} backups running"
        on_host = running.backups_on[host]
        if limits.max_backups_host and on_host >= limits.max_backups_host:
            return (
                f"max_backups_host: {on_host} of {limits.max_backups_host} backups running on "
                f"{host}"
            )
    if datastore:
        cap = limits.max_backups_datastore
        cap = 1 if one_writer else cap
        writing = running.writers_on[datastore]
        if cap and writing >= cap:
            why = "takes one writer at a time" if one_writer else "max_backups_datastore"
            return f"datastore {datastore} {why}: {writing} of {cap} writing"
    return None
