"""Backup datastores in the catalog: add, list, show (with monitor: total/free bytes)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.tables import BackupJob, Datastore
from vmkeep.datastores import REGISTRY, DatastoreDriver, make_driver
from vmkeep.datastores.ssh import learn_host_key
from vmkeep.engine.core.context import Context
from vmkeep.errors import AlreadyExists, DatastoreError, DatastoreNotFound, VmkeepError
from vmkeep.names import check_name, is_id


def find_datastore(s: Session, ref: str) -> Datastore:
    q = select(Datastore).where(Datastore.id == int(ref) if is_id(ref) else Datastore.name == ref)
    ds = s.execute(q).scalar_one_or_none()
    if ds is None:
        raise DatastoreNotFound(ref)
    return ds


def driver_of(ds: Datastore, bwlimit: int | None = None) -> DatastoreDriver:
    """The datastore's driver; ``bwlimit`` (KiB/s, a backup job's) over its own, for a driver
    that sends over the network (restic, rsync; a dir datastore writes locally: no limit)."""
    options = ds.options
    if bwlimit and "bwlimit" in REGISTRY[ds.driver].options_model.model_fields:
        options = options | {"bwlimit": bwlimit}
    return make_driver(ds.driver, ds.name, options)


def add(ctx: Context, name: str, driver: str, options: dict[str, Any]) -> dict[str, Any]:
    check_name("datastore name", name)
    with ctx.catalog.session() as s:
        if s.execute(select(Datastore).where(Datastore.name == name)).scalar_one_or_none():
            raise AlreadyExists(f"datastore {name!r}")
    drv = make_driver(driver, name, options)  # validates the options before anything is stored
    host_keys: list[str] = []
    target = drv.ssh_target()
    if target is not None and target.known_hosts is None:
        # host keys are always checked: learn them now, once, and show them to the user
        known = ctx.config.data_dir / "known_hosts" / name
        host_keys = learn_host_key(name, target, known)
        drv = make_driver(driver, name, options | {"known_hosts": str(known)})
    drv.check()
    with ctx.catalog.session() as s:
        if s.execute(select(Datastore).where(Datastore.name == name)).scalar_one_or_none():
            raise AlreadyExists(f"datastore {name!r}")
        ds = Datastore(name=name, driver=driver, options=drv.options.model_dump(mode="json"))
        s.add(ds)
        s.flush()
        return ds_dict(ds, drv) | ({"host_keys_learned": host_keys} if host_keys else {})


def list_all(
    ctx: Context, limit: int | None = None, after: int | None = None
) -> list[dict[str, Any]]:
    """The datastores in id order (``limit`` of them, those after id ``after``: a page), each
    with its monitor's total and free bytes."""
    with ctx.catalog.session() as s:
        q = select(Datastore).order_by(Datastore.id).limit(limit)
        if after is not None:
            q = q.where(Datastore.id > after)
        return [ds_dict(ds) for ds in s.execute(q).scalars()]


def check_exists(ctx: Context, ref: str) -> None:
    """DatastoreNotFound unless ``ref`` names a datastore (no driver call)."""
    with ctx.catalog.session() as s:
        find_datastore(s, ref)


def show(ctx: Context, ref: str) -> dict[str, Any]:
    """One datastore, with the bytes its backups take (``list`` skips that: it walks the store)."""
    with ctx.catalog.session() as s:
        ds = find_datastore(s, ref)
        drv = driver_of(ds)
        row = ds_dict(ds, drv)
    try:
        row["used_bytes"] = drv.used()
    except DatastoreError as err:
        row["used_bytes"], row["error"] = None, row["error"] or str(err)
    return row


def monitor_once(drv: DatastoreDriver) -> tuple[int, int]:
    """(total, free) without the retry layer: a listing or a metrics scrape reports a datastore
    that is down at once instead of backing off for it."""
    inner: DatastoreDriver = getattr(drv, "inner", drv)
    return inner.monitor()


def ds_dict(ds: Datastore, drv: DatastoreDriver | None = None) -> dict[str, Any]:
    try:
        drv = drv or driver_of(ds)
    except VmkeepError as err:  # options an older vmkeep stored that the allowlists now refuse
        return {"id": ds.id, "name": ds.name, "driver": ds.driver, "options": {},
                "total_bytes": None, "free_bytes": None,
                "error": f"{err} (remove the datastore and add it again with allowed options)"}  # fmt: skip
    total: int | None = None
    free: int | None = None
    error = None
    try:
        total, free = monitor_once(drv)
    except DatastoreError as err:
        error = str(err)
    return {
        "id": ds.id,
        "name": ds.name,
        "driver": ds.driver,
        "options": drv.shown_options(),  # a secret (restic password_command) as "(set)"
        "total_bytes": total,
        "free_bytes": free,
        "error": error,
    }


def backup_jobs_using(
    s: Session, datastore: str | None = None, group: str | None = None
) -> list[str]:
    """The backup jobs that write to ``datastore`` (or copy to it), or back up ``group``: what
    removing it would silently stop."""
    out = []
    for name, ds, copy_to, selector in s.execute(
        select(BackupJob.name, BackupJob.datastore, BackupJob.copy_to, BackupJob.selector)
    ):
        if (
            datastore is not None
            and datastore in (ds, copy_to)
            or group is not None
            and (selector or {}).get("group") == group
        ):
            out.append(name)
    return sorted(out)
