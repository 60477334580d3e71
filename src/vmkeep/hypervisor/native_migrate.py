"""The ``native`` driver's migration: libvirt's managed migration from this process, which holds
a connection to each host (``virDomainMigrate3``; the source's libvirtd need not reach the
destination's, only QEMU must reach QEMU, at ``vmm.migration_uri``).

* running, ``live``: the guest runs on during the copy of its memory (paused only for the last
  round: the downtime); not live: paused for the whole copy.
* powered off: the definition moves (libvirt's offline migration, which checks no disk: a
  destination that does not see them is refused here, before anything moves). With ``copy_storage`` libvirt
  cannot copy the disks of a stopped domain, so it is started paused (no guest code runs), its
  disks are copied as for a running one, and it is stopped again on the destination.
* ``copy_storage``: libvirt copies the disks to the same paths on the destination and moves their
  dirty bitmaps with them; it creates the destination files only in a storage pool, so each
  disk's folder gets a transient ``dir`` pool there for the time of the migration (a folder in a
  pool already is left as it is). A destination that already has the file is refused: the
  folder is shared, and copying onto it would write into the running disk.
* storage both hosts see (no ``copy_storage``): ``VIR_MIGRATE_UNSAFE``, since libvirt cannot tell
  a shared file system from a local one and refuses disks cached by the host otherwise.

Every migration is also the domain's job: ``progress`` gets its bytes; when progress raises, the
job is aborted (``abortJob``) and the domain stays on this host, running as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from xml.sax.saxutils import escape

import libvirt

from vmkeep.errors import DomainNotFound, HypervisorUnreachable, VmmError
from vmkeep.hypervisor import carry
from vmkeep.hypervisor.domain_xml import parse_disks
from vmkeep.hypervisor.vmm import Migration, Progress, migration_uri

POLL_EVERY = 0.25
STATS_EVERY = 2.0


class DomainCheckpoints:
    """``carry.CheckpointSide`` over a libvirt domain."""

    def __init__(self, dom: libvirt.virDomain, where: str) -> None:
        self.dom, self.where = dom, where

    def read(self) -> list[tuple[str, str]]:
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL
        return [(c.getName(), c.getXMLDesc(0)) for c in self.dom.listAllCheckpoints(flags)]

    def read_or_none(self) -> list[tuple[str, str]]:
        """``read``, or none when libvirt cannot say."""
        try:
            return self.read()
        except libvirt.libvirtError:
            return []

    def drop_metadata(self, name: str) -> None:
        cp = self.dom.checkpointLookupByName(name)
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    def redefine(self, xml: str) -> None:
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        if self.dom.isActive():  # libvirt checks each disk's bitmap is in the running QEMU
            flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        try:
            self.dom.checkpointCreateXML(xml, flags)
        except libvirt.libvirtError as err:
            raise VmmError("native", "migrate", err.get_error_message()) from err


def _refused_for_checkpoints(err: BaseException) -> bool:
    return (
        isinstance(err, libvirt.libvirtError)
        and err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
        and "checkpoint" in (err.get_error_message() or "")
    )


def _fail(err: libvirt.libvirtError) -> VmmError:
    return VmmError("native", "migrate", err.get_error_message())


def _pool_paths(conn: libvirt.virConnect) -> dict[str, libvirt.virStoragePool]:
    out = {}
    for pool in conn.listAllStoragePools(0):
        path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
        if path and pool.isActive():
            out[os.path.normpath(path)] = pool
    return out


@contextlib.contextmanager
def destination_pools(
    dest: libvirt.virConnect, dest_uri: str, files: list[str], copying: bool = True
) -> Iterator[None]:
    """A ``dir`` pool on the destination over each disk's folder for the time of the block;
    refuses a disk file the destination has already (``copying``), or one it does not see (the
    offline move of a definition: its disks must be on storage both hosts share)."""
    made: list[libvirt.virStoragePool] = []
    unseen = (
        f"{dest_uri} does not see %s: the disks are not on storage both hosts share, so "
        "the VM could not start there; migrate it with --copy-storage"
    )
    try:
        pools = _pool_paths(dest)
        for file in files:
            folder = os.path.dirname(os.path.normpath(file))
            pool = pools.get(folder)
            if copying and pool is not None and pool.name().startswith("vmkeep-migrate-"):
                made.append(pool)  # left by a migration whose process died: ours to remove
            if pool is None:
                key = hashlib.sha256(folder.encode()).hexdigest()[:10]
                xml = (
                    f"<pool type='dir'><name>vmkeep-migrate-{key}</name>"
                    f"<target><path>{escape(folder)}</path></target></pool>"
                )
                try:
                    pool = dest.storagePoolCreateXML(xml, 0)
                except libvirt.libvirtError as err:
                    if not copying:
                        why = f"folder {folder} ({err.get_error_message()})"
                        raise VmmError("native", "migrate", unseen % why) from err
                    raise VmmError(
                        "native",
                        "migrate",
                        f"{dest_uri} cannot hold the disks' folder {folder} "
                        f"({err.get_error_message()}): create it there first",
                    ) from err
                made.append(pool)
                pools[folder] = pool
            else:
                try:
                    pool.refresh(0)
                except libvirt.libvirtError as err:
                    raise _fail(err) from err
            if not copying:
                try:
                    pool.storageVolLookupByName(os.path.basename(file))
                except libvirt.libvirtError as err:
                    raise VmmError("native", "migrate", unseen % f"disk {file}") from err
                continue
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(os.path.basename(file))
                raise VmmError(
                    "native",
                    "migrate",
                    f"{dest_uri} has {file} already: that folder is shared between the hosts "
                    "(migrate without --copy-storage), or the file is left over there (remove "
                    "it first)",
                )
        yield
    finally:
        for pool in made:
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()  # transient: gone; the files it created stay


def _job_bytes(dom: libvirt.virDomain) -> tuple[int, int]:
    try:
        stats = dom.jobStats(0)
    except libvirt.libvirtError:
        return 0, 0
    return int(stats.get("data_processed", 0)), int(stats.get("data_total", 0))


def _run(
    dom: libvirt.virDomain,
    call: Any,
    progress: Progress | None,
) -> libvirt.virDomain:
    """``call()`` (the blocking migration) in a thread; this one reports progress and aborts the
    job when progress (or a cancel delivered to this thread) raises."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["dom"] = call()
        except BaseException as err:  # noqa: BLE001 (handed to the caller's thread)
            out["err"] = err

    worker = threading.Thread(target=work, name="migrate", daemon=True)
    worker.start()
    asked = time.monotonic()
    done = total = 0
    try:
        while worker.is_alive():
            worker.join(POLL_EVERY)  # a cancel raised in this thread arrives within it
            if progress is None or not worker.is_alive():
                continue
            if time.monotonic() - asked >= STATS_EVERY:  # each asks QEMU: not too often
                done, total = _job_bytes(dom)
                asked = time.monotonic()
            progress(done, total)
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        worker.join()
        if "dom" not in out:  # aborted: the domain is still here
            raise
        # too late: it had switched over; the migration stands
    if "err" in out:
        err = out["err"]
        raise _fail(err) if isinstance(err, libvirt.libvirtError) else err
    return out["dom"]


def migrate(
    src: libvirt.virConnect,
    domain: str,
    dest_uri: str,
    *,
    live: bool,
    copy_storage: bool,
    bandwidth_mib: int,
    progress: Progress | None,
) -> Migration:
    try:
        dom = src.lookupByName(domain)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise DomainNotFound(domain, src.getURI()) from err
        raise _fail(err) from err
    try:
        dest = libvirt.open(dest_uri)
    except libvirt.libvirtError as err:
        raise HypervisorUnreachable(dest_uri, err.get_error_message()) from err
    try:
        return _migrate(src, dom, dest, dest_uri, live, copy_storage, bandwidth_mib, progress)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dest.close()


def _migrate(
    src: libvirt.virConnect,
    dom: libvirt.virDomain,
    dest: libvirt.virConnect,
    dest_uri: str,
    live: bool,
    copy_storage: bool,
    bandwidth_mib: int,
    progress: Progress | None,
) -> Migration:
    running = bool(dom.isActive())
    flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    params: dict[str, Any] = {}
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    started_paused = False
    if not running and not copy_storage:
        flags |= libvirt.VIR_MIGRATE_OFFLINE
    else:
        uri = migration_uri(dest_uri)
        if uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = uri
        if live and running:
            flags |= libvirt.VIR_MIGRATE_LIVE
        if copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        else:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
    files = [
        d.path
        for d in parse_disks(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if d.path and d.device == "disk" and not d.readonly
    ]
    source = DomainCheckpoints(dom, src.getURI())
    pools: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if copy_storage or not running:  # a stopped domain's definition moves: its disks must be there
        pools = destination_pools(dest, dest_uri, files, copying=copy_storage)
    t0 = time.monotonic()
    with pools:
        try:
            if not running and copy_storage:
                started_paused = True  # first: an interrupt just after the start still stops it
                try:
                    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                except libvirt.libvirtError as err:
                    raise _fail(err) from err
            new, saved = carry.migrate_with_checkpoints(
                source,
                lambda: _run(dom, lambda: dom.migrate3(dest, params, flags), progress),
                _refused_for_checkpoints,
            )
        except BaseException:
            if started_paused:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
            raise
    # switched over: the rest runs to its end, a cancel now is too late (as in ``_run``)
    total_ms = int((time.monotonic() - t0) * 1000)
    stats: dict[str, Any] = {}
    try:
        if running:
            with contextlib.suppress(libvirt.libvirtError):
                stats = new.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        names, why = carry.redefine_all(DomainCheckpoints(new, dest_uri), saved)
    except BaseException as err:  # noqa: BLE001 (a cancel after the switch-over: it stands)
        names = tuple(n for n, _ in DomainCheckpoints(new, dest_uri).read_or_none())
        why = ""
        if len(names) < len(saved):
            why = (
                f"the migration was interrupted after it had switched over ({err!r}), before "
                f"every checkpoint was defined on {dest_uri}"
            )
    finally:
        if started_paused:  # it was off: off there too, never left paused
            try:
                new.destroy()
            except libvirt.libvirtError as err:
                raise _fail(err) from err
    return Migration(
        checkpoints=names,
        chain_break=why,
        live=bool(flags & libvirt.VIR_MIGRATE_LIVE),
        total_ms=int(stats.get("time_elapsed", total_ms)),
        downtime_ms=int(stats["downtime"]) if "downtime" in stats else None,
        data_bytes=int(stats["data_processed"]) if "data_processed" in stats else None,
    )
