"""Prometheus metrics, read from the catalog at scrape time (prometheus_client custom collector):
the catalog is the source of truth, so every daemon on one catalog reports the same figures.

Per VM: time and size of the last VALID backup increment. Backups by status, jobs by state (the
queue depth is ``vmkeep_jobs{state="QUEUED"}``), bytes written by VALID increments, the duration
of finished jobs, datastore free and total bytes. No secret (token, datastore option) is exported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select

from vmkeep.catalog.tables import Backup, Datastore, Increment, Job, Vm
from vmkeep.engine.core.context import Context
from vmkeep.engine.core.stores import driver_of, monitor_once
from vmkeep.errors import VmkeepError
from vmkeep.model import BackupStatus, JobState


class CatalogCollector(Collector):
    def __init__(self, ctx: Callable[[], Context]) -> None:
        self._ctx = ctx

    def collect(self) -> Iterator[Metric]:
        ctx = self._ctx()
        last_time = GaugeMetricFamily(
            "vmkeep_vm_last_backup_timestamp_seconds",
            "End of the newest VALID backup increment of the VM",
            labels=["vm"],
        )
        last_size = GaugeMetricFamily(
            "vmkeep_vm_last_backup_bytes", "Size of the newest VALID increment", labels=["vm"]
        )
        by_status = GaugeMetricFamily(
            "vmkeep_backups", "Backup chains by status", labels=["status"]
        )
        written = GaugeMetricFamily(
            "vmkeep_backup_bytes_written", "Bytes stored by VALID increments (all chains)"
        )
        jobs = GaugeMetricFamily("vmkeep_jobs", "Jobs by state", labels=["state"])
        durations = GaugeMetricFamily(
            "vmkeep_job_last_duration_seconds",
            "Duration of the newest finished job of each kind",
            labels=["kind", "state"],
        )
        ds_free = GaugeMetricFamily(
            "vmkeep_datastore_free_bytes", "Free bytes of the datastore", labels=["datastore"]
        )
        ds_total = GaugeMetricFamily(
            "vmkeep_datastore_total_bytes", "Total bytes of the datastore", labels=["datastore"]
        )
        usage = GaugeMetricFamily(
            "vmkeep_vm_usage",
            "The last poll of each VM (CPU %, MEMORY KiB, NETRX/NETTX, DISKRD/WR bytes and IOPS)",
            labels=["vm", "key"],
        )
        with ctx.catalog.session() as s:
            for name, figures in s.execute(select(Vm.name, Vm.usage)).all():
                for key, value in sorted((figures or {}).items()):
                    if isinstance(value, int | float):
                        usage.add_metric([name, key], float(value))
            newest = s.execute(
                select(Vm.name, Increment.finished_at, Increment.size)
                .join(Backup, Backup.vm_id == Vm.id)
                .join(Increment, Increment.backup_id == Backup.id)
                .where(Increment.status == BackupStatus.VALID)
                .order_by(Increment.finished_at)
            ).all()
            latest = {name: (when, size) for name, when, size in newest if when is not None}
            for name, (when, size) in sorted(latest.items()):
                last_time.add_metric([name], when.timestamp())
                last_size.add_metric([name], size)
            statuses = Counter(s.execute(select(Backup.status)).scalars())
            for status in BackupStatus:
                by_status.add_metric([status.value], statuses.get(status.value, 0))
            written.add_metric([], sum(size for _name, _when, size in newest))
            states = Counter(s.execute(select(Job.state)).scalars())
            for job_state in JobState:
                jobs.add_metric([job_state.value], states.get(job_state.value, 0))
            finished = s.execute(
                select(Job.kind, Job.state, Job.started_at, Job.finished_at)
                .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
                .order_by(Job.id)
            ).all()
            last: dict[tuple[str, str], float] = {}
            for kind, state, start, end in finished:
                if start is not None and end is not None:
                    last[(kind, state)] = (end - start).total_seconds()
            for (kind, state), secs in sorted(last.items()):
                durations.add_metric([kind, state], secs)
            stores = list(s.execute(select(Datastore)).scalars())
            for ds in stores:
                try:
                    total, free = monitor_once(driver_of(ds))
                except VmkeepError:
                    continue
                ds_free.add_metric([ds.name], free)
                ds_total.add_metric([ds.name], total)
        yield from (last_time, last_size, by_status, written, jobs, durations, ds_free, ds_total)
        yield usage
